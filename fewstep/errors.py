"""User-facing errors, shared by every fewstep command: one clear line and a non-zero exit instead of a traceback.

They live in the shared leaf (standard library only), so the torch-free runtime and the training code raise the
same error; `distill.errors` and `runtime.errors` re-export them.
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
