"""User-facing errors: one clear line and a non-zero exit instead of a traceback (defined in the shared leaf,
fewstep/errors.py)."""

from fewstep.errors import UserError, cli_main

__all__ = ["UserError", "cli_main"]
