"""Environments and adapters: ``envs.make("smax:3m")``, JaxMARL adapter, wrappers."""

from envs.registry import UnknownEnvError, make, register, register_prefix, registered

__all__ = ["make", "register", "register_prefix", "registered", "UnknownEnvError"]
