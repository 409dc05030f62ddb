"""moelab.compress."""
