"""Subcommands of the ``convbn`` CLI, one module each (see :mod:`convbn.cli`)."""
