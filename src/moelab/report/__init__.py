"""moelab.report."""
