"""moelab.offload."""
