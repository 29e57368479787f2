"""One error path for every command line: invalid input exits with code 2 and one
line ``error: invalid <field>=<value>: <what is allowed>``, no traceback; a run
stopped by the non-finite check or the divergence guard exits with code 3.

Each entry point's ``main`` is wrapped with :func:`entry`; tyro's own parse errors
(unknown flag, a value of the wrong type) also exit with code 2.

Compiled programs are kept on disk (JAX's persistent compilation cache) for every command
but the benchmarks, so a command run again with other seeds or the same shapes loads its
programs instead of compiling them: ``$XDG_CACHE_HOME/marl/jax-compilation`` (by default
``~/.cache/...``; an entry is the size of its executable, about 1 MB for a PPO chunk; delete
the folder to clear it). Setting ``JAX_COMPILATION_CACHE_DIR`` moves it, and setting it to
an empty string turns it off.
The benchmarks (``entry(compile_cache=False)``) time compilation, so they leave the cache off
and warn when ``JAX_COMPILATION_CACHE_DIR`` turns it on.
"""

from __future__ import annotations

import functools
import os
import sys
from typing import Callable, Optional

from marl.config import ConfigError

EXIT_INVALID = 2
EXIT_DIVERGED = 3


def default_cache_dir() -> str:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "marl", "jax-compilation")


def use_compile_cache() -> Optional[str]:
    """Turn on JAX's persistent compilation cache at :func:`default_cache_dir`, unless
    ``JAX_COMPILATION_CACHE_DIR`` is set (JAX then reads it itself; empty: no cache).
    Call before anything compiles. Returns the directory in use, or None."""
    import jax

    if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
        jax.config.update("jax_compilation_cache_dir", default_cache_dir())
    return jax.config.jax_compilation_cache_dir or None


def warn_if_cached(name: str) -> None:
    """A benchmark times compilation: say so when a cache can serve its programs."""
    if os.environ.get("JAX_COMPILATION_CACHE_DIR"):
        print(
            f"warning: {name} times compilation, but JAX_COMPILATION_CACHE_DIR is set: programs found in that "
            "cache load instead of compiling; unset it for cold compile times",
            file=sys.stderr,
        )


def entry(main: Optional[Callable[..., int]] = None, *, compile_cache: bool = True):
    """Wrap a CLI ``main`` so that every ConfigError (and unknown environment) becomes
    ``error: ...`` on stderr and exit code 2, and it runs with the compilation cache
    (``compile_cache``; the benchmarks turn it off). ``@entry`` or
    ``@entry(compile_cache=False)``."""
    if main is None:
        return functools.partial(entry, compile_cache=compile_cache)

    @functools.wraps(main)
    def wrapped(*args, **kwargs) -> int:
        from envs.registry import UnknownEnvError
        from marl.runner import NonFiniteError

        if compile_cache:
            use_compile_cache()
        else:
            warn_if_cached(main.__module__)
        try:
            return main(*args, **kwargs)
        except (ConfigError, UnknownEnvError) as e:
            print(f"error: {e}", file=sys.stderr)
            return EXIT_INVALID
        except NonFiniteError as e:
            print(f"error: {e}", file=sys.stderr)
            return EXIT_DIVERGED

    return wrapped
