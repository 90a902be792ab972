"""ATTEMPT (seed 002): attentional mixtures of soft prompts, computed per instance.

- X̂ = max-pool of the input embeddings over its tokens, P̂_j = max-pool of prompt j over its rows;
  we pool over REAL tokens only (masked), so a row never depends on how its batch was padded
  (the reference code also pools pad embeddings).
- §3.2.1: H_up = LayerNorm(W_upᵀ SiLU(W_downᵀ X̂)), W_down ∈ R^{d×r} (no bias), W_up ∈ R^{r×d}.
- eq 3:   a_j = softmax_j( P̂_j · H_up / (d·e^K) ), j over the t source prompts and P_target (t+1).
- eq 4:   P_instance = P_target + Σ_{j=1}^{t+1} a_j P_j   (P_{t+1} = P_target, so it gets 1 + a_{t+1}).
Source prompts P_1..P_t are frozen after source training (shared, `requires_grad=False` unless the
trainer unfreezes them); the attention module G is shared; P_target is per task.
Parameters: shared G = 2·d·r + 3·d (W_down, W_up + bias, LayerNorm γ/β); source prompts t·m·d
(trained in the source stage); per task m·d.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor, nn

from server.batch import BatchContext
from server.data.spec import TaskSpec
from server.errors import Incompatible, InvalidRequest
from server.methods.attempt.config import AttemptConfig
from server.methods.base import BackboneDims, Method, RowGroup, Vocabulary
from server.methods.prompts import initial_prompt, sample_vocab_rows
from server.task import Task


class Attempt(Method):
    method_id = "attempt"
    prefix_only = True
    config_class = AttemptConfig
    config: AttemptConfig

    def __init__(self, dims: BackboneDims, config: AttemptConfig | None = None, embedding: Tensor | None = None) -> None:
        super().__init__(dims, config)
        c = self.config
        d = dims.d_model
        generator = torch.Generator().manual_seed(c.seed)
        if embedding is not None:
            sources = torch.stack([sample_vocab_rows(embedding, c.n_virtual, generator, c.init_vocab) for _ in range(c.n_sources)])
        else:
            sources = torch.randn(c.n_sources, c.n_virtual, d, generator=generator) * 0.02
        self.sources = nn.Parameter(sources, requires_grad=False)  # [t, m, d]
        self.down = nn.Linear(d, c.bottleneck, bias=False)
        self.up = nn.Linear(c.bottleneck, d)
        self.norm = nn.LayerNorm(d)
        self.scale = 1.0 / (d * math.exp(c.temperature_k))

    def init_task(self, spec: TaskSpec, vocab: Vocabulary, generator: torch.Generator, init: dict[str, Any]) -> tuple[nn.ParameterDict, dict[str, Any]]:
        if init:
            raise InvalidRequest(f"init: attempt takes no init options, got {sorted(init)}")
        c = self.config
        target = initial_prompt(vocab, spec, c.n_virtual, generator, text_init=c.text_init, first=c.init_vocab)
        return nn.ParameterDict({"target": nn.Parameter(target)}), {}

    def static(self, task: Task) -> dict[str, Tensor]:
        return {"target": task.params["target"]}  # [m, d]

    def prefix_positions(self, task: Task) -> int:
        return task.params["target"].shape[0]

    def attention(self, x_pooled: Tensor, targets: Tensor) -> Tensor:
        """x_pooled [g, d], targets [g, m, d] -> a [g, t+1] (eq 3; the last column is P_target)."""
        h_up = self.norm(self.up(nn.functional.silu(self.down(x_pooled))))  # [g, d]
        src_pooled = self.sources.amax(dim=1)  # [t, d]
        tgt_pooled = targets.amax(dim=1)  # [g, d]
        logits = torch.cat([h_up @ src_pooled.T, (h_up * tgt_pooled).sum(-1, keepdim=True)], dim=-1)  # [g, t+1]
        return torch.softmax(logits * self.scale, dim=-1)

    def modulate(self, group: RowGroup, ctx: BatchContext) -> None:
        targets = torch.stack([s["target"] for s in group.statics])[group.task_slot].float()  # [g, m, d]
        pad = (group.mask == 0).unsqueeze(-1)  # [g, n, 1]
        x_pooled = group.embeds.float().masked_fill(pad, float("-inf")).amax(dim=1)  # [g, d], real tokens only
        a = self.attention(x_pooled, targets)  # [g, t+1]
        mixed = torch.einsum("gt,tmd->gmd", a[:, :-1], self.sources.float())  # Σ_{j≤t} a_j P_j
        instance = targets * (1 + a[:, -1:, None]) + mixed  # eq 4, [g, m, d]
        ctx.add_prefix(group.rows, instance)

    def fixed_prompt(self, task: Task) -> Tensor:
        raise Incompatible("attempt tasks have no fixed prompt: ATTEMPT mixes its source prompts per instance (attention over each input, eqs 3-4), which PEFT's PROMPT_TUNING cannot express")

    def param_count(self) -> dict[str, int]:
        c, d = self.config, self.dims.d_model
        return {
            "shared": 2 * d * c.bottleneck + 3 * d,
            "sources": c.n_sources * c.n_virtual * d,
            "per_task": c.n_virtual * d,
        }
