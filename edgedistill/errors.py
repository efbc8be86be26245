"""Errors the CLI maps to exit codes (DESIGN.md: 2 bad input, 3 internal)."""


class UserError(Exception):
    """Bad input or usage. The message is shown as one line, without a traceback (exit 2)."""
