"""What every command-line entry point shares: user errors become one line on stderr and a non-zero exit."""

from __future__ import annotations

import os
import sys
from typing import Callable

from jaxtok.errors import DISK_ERRORS, JaxtokError, Stopped


def run_main(main: Callable[[], object]) -> None:
    """Runs `main`; a `JaxtokError`, or a write the disk refuses, prints `error: <message>` and exits with status 2,
    without a traceback. A run stopped by a signal prints where to resume and exits with 128 + the signal."""
    try:
        main()
    except JaxtokError as e:
        print(f"error: {e}", file=sys.stderr)
        _exit(2)
    except Stopped as e:
        print(str(e), file=sys.stderr)
        _exit(e.code)
    except OSError as e:
        if e.errno not in DISK_ERRORS:
            raise
        print(f"error: could not write {e.filename or 'a file'}: {e.strerror}", file=sys.stderr)
        _exit(2)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)


def _exit(code: int) -> None:
    """Exits with `code`. In a multi-process JAX job a normal exit waits at the runtime's shutdown barrier for
    processes that may never get there (they wait in a collective for this one), so leave at once instead."""
    jax = sys.modules.get("jax")
    if jax is not None and jax.distributed.is_initialized():
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    sys.exit(code)


def parse_config(argv: list[str], flag_name: str = "config"):
    """The locked ConfigDict that `--config=FILE` and its `--config.key=value` overrides describe.

    absl and ml_collections report a bad file or key with a traceback; here each becomes a JaxtokError that names it.
    """
    import difflib

    from absl import flags
    from ml_collections import config_flags

    prefix = f"--{flag_name}."
    overrides = [a for a in argv[1:] if a.startswith(prefix)]
    others = [a for a in argv[1:] if a not in overrides]
    base_values = flags.FlagValues()
    holder = config_flags.DEFINE_config_file(flag_name, None, "config file", flag_values=base_values,
                                             lock_config=True, sys_argv=[argv[0], *others])
    try:
        rest = base_values([argv[0], *others])
    except flags.Error as e:
        raise JaxtokError(_one_line(e)) from None
    if len(rest) > 1:
        raise JaxtokError(f"unexpected arguments {rest[1:]}; options look like --{flag_name}.train.steps=10")
    if base_values[flag_name].value is None:
        raise JaxtokError(f"--{flag_name}=FILE is required, e.g. --{flag_name}=configs/demo.py")
    try:
        config = holder.value
        config.keys()  # a file that failed to load gives a stand-in that raises on first use
    except Exception as e:  # a missing file, or any error raised by the file's get_config()
        filename = config_flags.get_config_filename(base_values[flag_name])
        raise JaxtokError(f"could not load --{flag_name}={filename}: "
                          f"{str(e).strip().splitlines()[-1].strip()}") from None
    for arg in overrides:
        path = arg[len(prefix):].split("=", 1)[0].split(".")
        node = config
        for depth, key in enumerate(path):
            keys = list(node.keys()) if hasattr(node, "keys") else []
            if key not in keys:
                near = difflib.get_close_matches(key, keys, n=1)
                hint = f"; did you mean {'.'.join(path[:depth] + near)}?" if near else ""
                raise JaxtokError(f"unknown config key {'.'.join(path)} in {arg}{hint}")
            node = node[key]
    try:
        values = flags.FlagValues()
        holder = config_flags.DEFINE_config_file(flag_name, None, "config file", flag_values=values,
                                                 lock_config=True, sys_argv=list(argv))
        values(list(argv))
        return holder.value
    except flags.Error as e:
        raise JaxtokError(_one_line(e)) from None


def _one_line(e: Exception) -> str:
    lines = [line.strip() for line in str(e).splitlines() if line.strip()]
    if any(line.startswith("Traceback") for line in lines):
        return f"{lines[0]} {lines[-1]}"  # the error a config file raised, without its traceback
    return " ".join(lines)


def comma_names(value: str, allowed, what: str) -> list[str]:
    """Comma-separated names, each checked against `allowed` (case-sensitive, order kept, duplicates dropped)."""
    out = []
    for name in (n.strip() for n in value.split(",")):
        if name not in allowed:
            raise JaxtokError(f"unknown {what} {name!r}; choose from {', '.join(allowed)}")
        if name not in out:
            out.append(name)
    return out
