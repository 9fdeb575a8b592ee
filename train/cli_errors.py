"""The one error style of Tessera's command-line tools: ``tessera: error: ...`` on stderr, exit code 2.

`train/main.py`, every tool under `tools/` and `slurm/submit.py` report bad input the same way, so a user (or a
script) reads one line and one exit code whatever the tool:

- `report_error(message)` prints the line and returns `BAD_INPUT` (2) for `main()` to return;
- `ToolParser` is an `argparse.ArgumentParser` whose usage errors (an unknown option, a missing argument,
  a value of the wrong type) print the usage and then the same line, with the same exit code; its
  sub-command parsers inherit it.

A failure that is not the input's fault (a run that diverged, a job that did not complete) keeps exit code 1.
"""

from __future__ import annotations

import argparse
import sys
from typing import NoReturn

PREFIX = "tessera: error: "
"""What every error line starts with."""
BAD_INPUT = 2
"""Exit code for bad input (arguments, files, settings), as argparse uses for usage errors."""


def report_error(message: object, *, code: int = BAD_INPUT) -> int:
    """Print ``tessera: error: <message>`` to stderr; return `code` (the caller's exit code)."""
    print(f"{PREFIX}{message}", file=sys.stderr, flush=True)
    return code


class ToolParser(argparse.ArgumentParser):
    """An ArgumentParser whose usage errors are ``tessera: error: ...`` lines with exit code 2."""

    def error(self, message: str) -> NoReturn:
        """Print the usage and the error line, then exit with `BAD_INPUT`."""
        self.print_usage(sys.stderr)
        self.exit(BAD_INPUT, f"{PREFIX}{message}\n")
