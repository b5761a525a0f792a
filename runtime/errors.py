"""User-facing errors, shared by every fewstep command: one clear line and a non-zero exit instead of a traceback.

They live in the runtime (the leaf of the package: numpy only) so that the runtime can ship without the training
code; `distill.errors` re-exports them.
"""

import functools
import sys


class UserError(Exception):
    """Bad input from the user: the message says what is wrong and what to do."""


def cli_main(fn):
    """Wrap a CLI `main(argv)` so a UserError prints `error: ...` and exits with status 2."""

    @functools.wraps(fn)
    def wrapper(argv=None):
        try:
            return fn(argv)
        except UserError as e:
            print(f"error: {e}", file=sys.stderr)
            raise SystemExit(2) from None
        except KeyboardInterrupt:
            print("interrupted", file=sys.stderr)
            raise SystemExit(130) from None

    return wrapper
