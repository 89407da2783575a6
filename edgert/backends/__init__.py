"""edgert.backends."""
