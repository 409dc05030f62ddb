"""moelab.nn."""
