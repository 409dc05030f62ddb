"""moelab.models."""
