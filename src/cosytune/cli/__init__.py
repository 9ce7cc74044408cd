"""Command-line interface: one entry point, one module per subcommand."""
