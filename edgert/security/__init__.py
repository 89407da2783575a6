"""edgert.security."""
