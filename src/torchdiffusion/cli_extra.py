"""Imports the modules that add further CLI commands (each registers itself with ``cli.command``)."""
