"""The method registry: ONE `register(Module, Recipe)` per method makes it servable (the engine's
default methods, the store's codec), trainable (worker, `taskserve train` / `eval`), listed in the
API schema and the CLI choices, and benchmarked (`bench/run.py`).

The built-in methods register when `server.methods` is imported. Methods defined elsewhere (an
installed package, or a test) register the same way from a *plugin* module, named in the
`TASKSERVE_PLUGINS` setting or under the `taskserve.methods` entry-point group; every process that
builds an engine (server, worker, CLI) imports them first.
"""

from __future__ import annotations

import importlib
import importlib.metadata
from collections.abc import Iterable
from dataclasses import dataclass

from server.errors import InvalidRequest
from server.methods.base import Method
from server.methods.recipe import Recipe

ENTRY_POINTS = "taskserve.methods"


@dataclass(frozen=True)
class Registered:
    module: type[Method]
    """The serving module (shared state + modulation)."""
    recipe: Recipe
    """How it trains (multi-task and few-shot)."""


REGISTRY: dict[str, Registered] = {}


def register(module: type[Method], recipe: type[Recipe] = Recipe) -> type[Method]:
    """Register a method under `module.method_id`; a second registration of the same id is refused
    (re-importing the same module is a no-op)."""
    method_id = module.method_id
    known = REGISTRY.get(method_id)
    if known is not None:
        if known.module.__qualname__ == module.__qualname__ and known.module.__module__ == module.__module__:
            return known.module
        raise ValueError(f"method id {method_id!r} registered twice ({known.module.__module__} and {module.__module__})")
    for name in ("config_class", "param_count"):
        if not hasattr(module, name):
            raise ValueError(f"method {method_id!r}: {module.__name__} has no {name}")
    REGISTRY[method_id] = Registered(module, recipe(method_id))
    return module


def _entry(method_id: str) -> Registered:
    try:
        return REGISTRY[method_id]
    except KeyError:
        raise InvalidRequest(f"method: unknown method {method_id!r}; known: {sorted(REGISTRY)}") from None


def method_class(method_id: str) -> type[Method]:
    return _entry(method_id).module


def recipe_for(method_id: str) -> Recipe:
    return _entry(method_id).recipe


def method_ids(*, trainable: bool = False) -> list[str]:
    """Registered ids in registration order (built-ins first); `trainable`: only those whose recipe trains."""
    return [m for m, entry in REGISTRY.items() if entry.recipe.trains or not trainable]


def method_for_peft(peft_type: str) -> str:
    """The registered method whose tasks are HF PEFT adapters of `peft_type` (e.g. PROMPT_TUNING)."""
    for method_id, entry in REGISTRY.items():
        if entry.module.peft_type == peft_type:
            return method_id
    raise InvalidRequest(f"peft_type: no registered method serves PEFT {peft_type} adapters")


def load_plugins(names: Iterable[str] = ()) -> list[str]:
    """Import plugin modules (`names`, then the `taskserve.methods` entry points) so their methods
    register; idempotent. Returns the modules imported."""
    modules = [n.strip() for n in names if n.strip()]
    for name in modules:
        try:
            importlib.import_module(name)
        except ImportError as exc:
            raise InvalidRequest(f"plugins: cannot import method plugin {name!r} ({exc})") from exc
    for entry_point in importlib.metadata.entry_points(group=ENTRY_POINTS):
        entry_point.load()
        modules.append(entry_point.value)
    return modules
