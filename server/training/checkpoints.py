"""Resumable training checkpoints without pickle: tensors in safetensors, everything else in JSON.

A checkpoint is a folder (`tensors.safetensors` + `state.json`) written atomically (a crash leaves
the previous one). Nothing is ever unpickled: a file planted where a checkpoint is expected is
refused with a clear error instead of being run (unpickling it would run whatever it holds).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from server import atomic
from server.errors import CorruptArtifact

TENSORS, STATE = "tensors.safetensors", "state.json"


def save(folder: Path, step: int, values: dict[str, torch.Tensor], optimizer: dict[str, Any], schedule: dict[str, Any],
         state: dict[str, Any], best: Sequence[torch.Tensor] | None) -> None:
    """Write a checkpoint: trained values by name, the optimizer's and schedule's state dicts, the
    trainer's bookkeeping (JSON-able) and the best step's values."""
    tensors = {f"value.{name}": v.detach().cpu().contiguous() for name, v in values.items()}
    opt_state: dict[str, dict[str, Any]] = {}
    for index, entries in optimizer["state"].items():
        opt_state[str(index)] = {}
        for key, value in entries.items():
            if isinstance(value, torch.Tensor):
                tensors[f"opt.{index}.{key}"] = value.detach().cpu().contiguous()
                opt_state[str(index)][key] = {"tensor": f"opt.{index}.{key}"}
            else:
                opt_state[str(index)][key] = value
    for i, value in enumerate(best or []):
        tensors[f"best.{i}"] = value.detach().cpu().contiguous()
    meta = {"step": step, "optimizer": {"state": opt_state, "param_groups": optimizer["param_groups"]}, "schedule": schedule,
            "state": state, "best": len(best) if best is not None else None}
    with atomic.new_folder(folder, prefix=f".{folder.name}.tmp-", replace=True) as tmp:
        save_file(tensors, str(tmp / TENSORS))
        (tmp / STATE).write_text(json.dumps(meta, default=_plain))


def load(folder: Path) -> dict[str, Any] | None:
    """The checkpoint in `folder` (None when there is none): step, values, optimizer, schedule,
    state, best. Anything that is not this format is refused (CorruptArtifact), never executed."""
    folder = Path(folder)
    if not folder.exists():
        return None
    if not folder.is_dir() or not (folder / STATE).is_file() or not (folder / TENSORS).is_file():
        raise CorruptArtifact(f"checkpoint {folder} is not a taskserve checkpoint (a folder with {STATE} and {TENSORS}); refused, not loaded")
    try:
        meta = json.loads((folder / STATE).read_text())
        tensors = load_file(str(folder / TENSORS))
    except Exception as exc:  # a broken or foreign file: refuse it
        raise CorruptArtifact(f"checkpoint {folder} cannot be read ({type(exc).__name__}: {exc}); refused") from None
    opt_state = {int(index): {k: tensors[v["tensor"]] if isinstance(v, dict) and "tensor" in v else v for k, v in entries.items()}
                 for index, entries in meta["optimizer"]["state"].items()}
    return {
        "step": int(meta["step"]),
        "values": {k.removeprefix("value."): v for k, v in tensors.items() if k.startswith("value.")},
        "optimizer": {"state": opt_state, "param_groups": meta["optimizer"]["param_groups"]},
        "schedule": meta["schedule"],
        "state": meta["state"],
        "best": [tensors[f"best.{i}"] for i in range(meta["best"])] if meta["best"] is not None else None,
    }


def _plain(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return value.item()
    raise TypeError(f"{type(value).__name__} is not JSON serialisable")
