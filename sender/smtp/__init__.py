"""SMTP: sans-IO client and server state machines, and the trio client transport."""
