"""Runs a Python script as if torch and peft were not installed.

    python tests/no_torch_runner.py SCRIPT [ARGS...]

`importlib.machinery.PathFinder.find_spec` (the finder for everything on sys.path) answers None for the top-level
names in BLOCKED and their submodules, so `importlib.util.find_spec("torch")` is None and `import torch` raises
ModuleNotFoundError, exactly as without the package. Availability checks that look for a spec (transformers'
`is_torch_available`) then see no torch. SCRIPT runs as `__main__` with `sys.argv = [SCRIPT, *ARGS]` and the
script's directory first on sys.path, as `python SCRIPT` would run it; its exit status is kept. Afterwards, if a
module of a blocked package got into `sys.modules` anyway, the runner says so on stderr and exits 3.
"""

from __future__ import annotations

import importlib.machinery
import os
import runpy
import sys

BLOCKED = frozenset({"torch", "peft"})

_original_find_spec = importlib.machinery.PathFinder.find_spec  # bound to PathFinder


def _find_spec(cls, fullname, path=None, target=None):
    if fullname.partition(".")[0] in BLOCKED:
        return None
    return _original_find_spec(fullname, path, target)


def install() -> None:
    importlib.machinery.PathFinder.find_spec = classmethod(_find_spec)
    importlib.invalidate_caches()


def main() -> None:
    if len(sys.argv) < 2:
        print("usage: no_torch_runner.py SCRIPT [ARGS...]", file=sys.stderr)
        sys.exit(2)
    for name in BLOCKED:
        if name in sys.modules:
            print(f"error: {name} was imported before the runner could block it", file=sys.stderr)
            sys.exit(3)
    install()
    script = sys.argv[1]
    sys.argv = sys.argv[1:]
    sys.path[0] = os.path.dirname(os.path.abspath(script))  # as `python SCRIPT` would have it, not this file's dir
    code = 0
    try:
        runpy.run_path(script, run_name="__main__")
    except SystemExit as e:
        code = e.code
    leaked = sorted(name for name in sys.modules if name.partition(".")[0] in BLOCKED)
    if leaked:
        print(f"error: modules of a blocked package were imported: {', '.join(leaked[:5])}", file=sys.stderr)
        sys.exit(3)
    sys.exit(code)


if __name__ == "__main__":
    main()
