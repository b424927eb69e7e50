"""The one error type a user can fix, and the wrapper that turns it into a one-line message."""

import sys
from collections.abc import Callable


class UserError(Exception):
    """Bad input (params, data, files): reported as one line, exit status 2, no traceback."""


def run_cli(main: Callable[[], None]) -> None:
    """Run a stage entry point; a UserError prints `error: ...` and exits non-zero."""
    try:
        main()
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)
