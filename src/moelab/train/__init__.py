"""moelab.train."""
