"""jobyard.cli: the `jobyard` command."""
