"""What every CLI here does with an error the user can fix: one line on stderr, an exit status."""
from __future__ import annotations

import sys


def fail(error: BaseException | str, code: int = 1, program: str | None = None) -> int:
    """Prints `[<program>: ]error: <the error's first line>` to stderr and returns `code` (the
    rest of a multi-line message, e.g. gin's call trail, would bury the line that matters)."""
    prefix = f"{program}: " if program else ""
    print(f"{prefix}error: {error}".splitlines()[0], file=sys.stderr)
    return code
