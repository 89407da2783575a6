"""Field provisioning: frame codec, session protocol, device agent, technician flow (docs/provisioning.md)."""
