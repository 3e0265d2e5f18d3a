"""The `safesteer` command: the same library calls as the app, for scripts and terminals.

Every failure a user can cause ends as one `error: ...` line on stderr and exit status 2.
Read commands take `--json` for scripts.
"""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Sequence

from safesteer.errors import SafeSteerError

from .parser import build_parser

__all__ = ["build_parser", "main"]


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s"
    )
    if not args.verbose:
        from transformers.utils import logging as hf_logging  # heavy: only once arguments parsed (`--help` stays fast)

        hf_logging.set_verbosity_error()
        hf_logging.disable_progress_bar()
    try:
        return args.handler(args)
    except SafeSteerError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except BrokenPipeError:  # `safesteer policy versions X | head`: the reader left; nothing is wrong
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())  # so Python's own flush at exit does not fail again
        return 0
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:  # a bug or an environment problem: one line, the traceback only with -v
        if args.verbose:
            raise
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        print(f"error: unexpected {type(exc).__name__}: {first} (run with -v for details)", file=sys.stderr)
        return 2
