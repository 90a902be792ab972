"""Methods: one package per method (`<id>/`: config.py, module.py, recipe.py), each registering
itself on import (`registry.register`). Importing this package registers the built-in ones; plugins
add more (`registry.load_plugins`)."""

from server.methods import plain, prompt_tuning, tpv, attempt, ip, pha  # noqa: F401, I001  (registration order: multi-task runs go in it)
from server.methods.base import BackboneDims, Method, RowGroup
from server.methods.registry import REGISTRY, load_plugins, method_class, method_for_peft, method_ids, recipe_for, register

PLAIN = plain.Plain.method_id
"""The method whose tasks are the backbone alone (zero-shot baselines)."""

__all__ = ["PLAIN", "REGISTRY", "BackboneDims", "Method", "RowGroup", "load_plugins", "method_class", "method_for_peft", "method_ids", "recipe_for", "register"]
