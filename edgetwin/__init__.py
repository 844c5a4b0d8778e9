"""The ``edgetwin`` command line: gateway, twin, config and demo subcommands."""
