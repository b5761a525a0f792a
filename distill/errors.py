"""User-facing errors: one clear line and a non-zero exit instead of a traceback (defined in runtime.errors, the
torch-free leaf every stage shares)."""

from runtime.errors import UserError, cli_main

__all__ = ["UserError", "cli_main"]
