"""Environments and adapters: ``envs.make("smax:3m")``, JaxMARL adapter, wrappers."""

import io as _io
import sys as _sys

# Importing jaxmarl (its MABrax module) points sys.stdout / sys.stderr at
# sys.__stdout__ / sys.__stderr__, which silences printing in notebooks and under
# captured output; import it once here and put the streams back. It also prints two
# lines about optional submodules on every import: those two are dropped, anything else
# it prints is passed on (warnings go through the warnings module, untouched).
_NOISE = ("Importing submoduled environments...", "Submoduled environments not found. Skipping import.")
_streams = (_sys.stdout, _sys.stderr, _sys.__stdout__)
_captured = _io.StringIO()
try:
    _sys.stdout = _sys.__stdout__ = _captured  # type: ignore[misc,assignment]  # MABrax resets stdout to __stdout__ before the print
    import jaxmarl  # noqa: F401
finally:
    _sys.stdout, _sys.stderr, _sys.__stdout__ = _streams  # type: ignore[misc]
    _rest = [line for line in _captured.getvalue().splitlines() if line.strip() not in _NOISE]
    if _rest:
        print("\n".join(_rest), file=_sys.stdout)

from envs.registry import UnknownEnvError, make, register, register_prefix, registered  # noqa: E402

__all__ = ["make", "register", "register_prefix", "registered", "UnknownEnvError"]
