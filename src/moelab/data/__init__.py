"""moelab.data."""
