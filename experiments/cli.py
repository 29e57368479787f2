"""One error path for every command line: invalid input exits with code 2 and one
line ``error: invalid <field>=<value>: <what is allowed>``, no traceback; a run
stopped by the non-finite check or the divergence guard exits with code 3.

Each entry point's ``main`` is wrapped with :func:`entry`; tyro's own parse errors
(unknown flag, a value of the wrong type) also exit with code 2.
"""

from __future__ import annotations

import functools
import sys
from typing import Callable

from marl.config import ConfigError

EXIT_INVALID = 2
EXIT_DIVERGED = 3


def entry(main: Callable[..., int]) -> Callable[..., int]:
    """Wrap a CLI ``main`` so that every ConfigError (and unknown environment) becomes
    ``error: ...`` on stderr and exit code 2."""

    @functools.wraps(main)
    def wrapped(*args, **kwargs) -> int:
        from envs.registry import UnknownEnvError
        from marl.runner import NonFiniteError

        try:
            return main(*args, **kwargs)
        except (ConfigError, UnknownEnvError) as e:
            print(f"error: {e}", file=sys.stderr)
            return EXIT_INVALID
        except NonFiniteError as e:
            print(f"error: {e}", file=sys.stderr)
            return EXIT_DIVERGED

    return wrapped
