"""The ``edgert`` command line. Subcommands live one module per group and load lazily."""
