"""HF PEFT prompt-tuning checkpoints, read and written without importing peft.

A PEFT `PROMPT_TUNING` checkpoint is a folder with `adapter_config.json` and
`adapter_model.safetensors`, whose one tensor `prompt_embeddings` holds
`num_transformer_submodules × num_virtual_tokens` rows of `token_dim`. On a decoder-only model the
table has one block and PEFT prepends it to the input embeddings; on a seq2seq model (T5) it has
two blocks but PROMPT_TUNING prepends only the FIRST to the encoder input (DESIGN.md) — so that block
is what a task imports, and an export writes the prompt into both blocks. Pickled `.bin`
checkpoints are refused: unpickling runs whatever code the file holds.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from server.errors import InvalidRequest

CONFIG, WEIGHTS, PICKLED = "adapter_config.json", "adapter_model.safetensors", "adapter_model.bin"
KEY = "prompt_embeddings"


@dataclass(frozen=True)
class PeftPrompt:
    prompt: torch.Tensor  # [num_virtual_tokens, token_dim] what PEFT prepends
    config: dict[str, Any]

    @property
    def base_model(self) -> str | None:
        return self.config.get("base_model_name_or_path")


def read(folder: Path) -> PeftPrompt:
    """The prompt a PEFT prompt-tuning checkpoint applies; InvalidRequest says what is wrong."""
    folder = Path(folder)
    try:
        config = json.loads((folder / CONFIG).read_text())
    except (OSError, ValueError) as exc:
        raise InvalidRequest(f"peft: {folder / CONFIG} cannot be read ({exc})") from None
    if config.get("peft_type") != "PROMPT_TUNING":
        raise InvalidRequest(f"peft: {folder} is a {config.get('peft_type')} adapter; only PROMPT_TUNING checkpoints become soft-prompt tasks")
    if not (folder / WEIGHTS).is_file():
        if (folder / PICKLED).is_file():
            raise InvalidRequest(f"peft: {folder} holds only {PICKLED}, a pickle (unpickling runs code); save it with safe_serialization=True")
        raise InvalidRequest(f"peft: {folder} has no {WEIGHTS}")
    try:
        tensors = load_file(str(folder / WEIGHTS))
    except Exception as exc:  # safetensors raises its own error types
        raise InvalidRequest(f"peft: {folder / WEIGHTS} is not readable safetensors ({exc})") from None
    if KEY not in tensors:
        raise InvalidRequest(f"peft: {folder / WEIGHTS} has no {KEY!r} tensor (it has {sorted(tensors)})")
    table = tensors[KEY].float()  # [submodules · n, d]
    n, d = int(config.get("num_virtual_tokens", 0)), int(config.get("token_dim", table.shape[-1]))
    blocks = int(config.get("num_transformer_submodules") or 1)
    if table.ndim != 2 or n < 1 or table.shape != (blocks * n, d):
        raise InvalidRequest(f"peft: {KEY} has shape {list(table.shape)}, the config says {blocks} × {n} rows of {d}")
    return PeftPrompt(table[:n].clone(), config)


def write(folder: Path, prompt: torch.Tensor, *, seq2seq: bool, base_model: str) -> Path:
    """A PEFT prompt-tuning checkpoint that `PeftModel.from_pretrained` loads and that applies
    exactly `prompt` [n, d]."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    n, d = prompt.shape
    blocks = 2 if seq2seq else 1
    config = {
        "peft_type": "PROMPT_TUNING", "task_type": "SEQ_2_SEQ_LM" if seq2seq else "CAUSAL_LM", "num_virtual_tokens": n, "token_dim": d,
        "num_transformer_submodules": blocks, "prompt_tuning_init": "RANDOM", "prompt_tuning_init_text": None,
        "tokenizer_name_or_path": None, "base_model_name_or_path": base_model, "inference_mode": True, "revision": None,
    }
    table = prompt.detach().float().cpu().repeat(blocks, 1).contiguous()  # [blocks · n, d]
    save_file({KEY: table}, str(folder / WEIGHTS))
    (folder / CONFIG).write_text(json.dumps(config, indent=2))
    return folder
