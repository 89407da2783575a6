"""edgert.engine."""
