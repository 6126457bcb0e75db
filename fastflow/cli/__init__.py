"""The ``fastflow`` command."""
