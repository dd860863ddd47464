"""What every command-line entry point shares: user errors become one line on stderr and a non-zero exit."""

from __future__ import annotations

import sys
from typing import Callable

from jaxtok.errors import JaxtokError


def run_main(main: Callable[[], object]) -> None:
    """Runs `main`; a `JaxtokError` prints `error: <message>` and exits with status 2, without a traceback."""
    try:
        main()
    except JaxtokError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)
