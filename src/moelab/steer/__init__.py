"""moelab.steer."""
