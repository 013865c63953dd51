"""Bundled recipes: ``recipes/<domain>/<method>.yaml``, resolvable by name from the CLI."""
