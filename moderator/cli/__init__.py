"""The `moderator` command: options, and one module per command."""
