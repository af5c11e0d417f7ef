"""The `rrp` command line: one module per command group; nothing else lives here."""
