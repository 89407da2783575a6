"""edgert.mqtt."""
