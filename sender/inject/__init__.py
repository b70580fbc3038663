"""Ways messages come in: the SMTP listener (and later the HTTP API)."""
