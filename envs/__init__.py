"""Environments and adapters: ``envs.make("smax:3m")``, JaxMARL adapter, wrappers."""

import sys as _sys

# Importing jaxmarl (its MABrax module) points sys.stdout / sys.stderr at
# sys.__stdout__ / sys.__stderr__, which silences printing in notebooks and under
# captured output; import it once here and put the streams back.
_streams = (_sys.stdout, _sys.stderr)
try:
    import jaxmarl  # noqa: F401
finally:
    _sys.stdout, _sys.stderr = _streams

from envs.registry import UnknownEnvError, make, register, register_prefix, registered  # noqa: E402

__all__ = ["make", "register", "register_prefix", "registered", "UnknownEnvError"]
