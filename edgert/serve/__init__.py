"""edgert.serve."""
