"""moelab.trace."""
