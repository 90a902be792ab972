"""Methods: one module per method, each registering itself by id (prompt_tuning, tpv, attempt, ip, pha)."""

from server.methods import attempt, ip, pha, prompt_tuning, tpv  # noqa: F401  (registration)
from server.methods.base import REGISTRY, BackboneDims, Method, RowGroup, method_class, register

__all__ = ["REGISTRY", "BackboneDims", "Method", "RowGroup", "method_class", "register"]
