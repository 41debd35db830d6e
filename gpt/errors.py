"""The one family of expected failures, and the entry-point wrapper that turns them into one `error:` line.

Every failure a user can cause and fix (bad params, bad input files, a missing model directory, a damaged
checkpoint, an unavailable translation backend...) raises a subclass of `GptError`, whose message names the file or
key and says what to do. Stage scripts and the `gpt` CLI run their `main` through `run_main`, which prints
`error: <message>` for a GptError (exit 1), `interrupted` for Ctrl-C (exit 130), and lets anything else — a bug —
keep its traceback.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import NoReturn


class GptError(Exception):
    """Base of every expected failure. The message must name the file/key at fault and, when known, the fix."""

    exit_code = 1


def fail(message: str) -> NoReturn:
    raise GptError(message)


def run_main(main: Callable[[], int | None]) -> NoReturn:
    """Run an entry point: GptError → one `error:` line (exit 1); Ctrl-C → one line (exit 130); bugs → traceback."""
    try:
        code = main()
    except GptError as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(err.exit_code)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)
    sys.exit(code or 0)
