"""ATTEMPT (seed 002): attentional mixtures of soft prompts, computed per instance.

- X̂ = max-pool of the input embeddings over its tokens, P̂_j = max-pool of prompt j over its rows;
  we pool over REAL tokens only (masked), so a row never depends on how its batch was padded
  (the reference code also pools pad embeddings).
- §3.2.1: H_up = LayerNorm(W_upᵀ SiLU(W_downᵀ X̂)), W_down ∈ R^{d×r} (no bias), W_up ∈ R^{r×d}.
- eq 3:   a_j = softmax_j( P̂_j · H_up / (d·e^K) ), j over the t source prompts and P_target (t+1).
- eq 4:   P_instance = P_target + Σ_{j=1}^{t+1} a_j P_j   (P_{t+1} = P_target, so it gets 1 + a_{t+1}).
Source prompts P_1..P_t are frozen after source training (shared, `requires_grad=False` unless the
trainer unfreezes them); the attention module G is shared by the tasks trained with it (multi-task,
§3.3); P_target is per task. A task created after the fact trains "P_target as well as the attention
module G" (§3.2.2): it gets its own copy of G (`init={"own_attention": True}`, what a few-shot job
does), initialised from the shared one, and its rows attend with it.
Parameters: shared G = 2·d·r + 3·d (W_down, W_up + bias, LayerNorm γ/β); source prompts t·m·d
(trained in the source stage); per task m·d, plus 2·d·r + 3·d with its own G.
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


ATTENTION = ("attention_down", "attention_up", "attention_up_bias", "attention_norm", "attention_norm_bias")
"""A task's own copy of G: W_down [r, d], W_up [d, r] + bias [d], LayerNorm γ, β [d] (nn.Linear's layout)."""


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
        """init = {} (the task attends with the shared G) or {"own_attention": True} (its own copy of G,
        starting as the shared one's current values)."""
        unknown = set(init) - {"own_attention"}
        if unknown:
            raise InvalidRequest(f"init: attempt takes only 'own_attention', got {sorted(unknown)}")
        c = self.config
        target = initial_prompt(vocab, spec, c.n_virtual, generator, text_init=c.text_init, first=c.init_vocab)
        params = nn.ParameterDict({"target": nn.Parameter(target)})
        if init.get("own_attention"):
            for key, shared in self._shared_attention().items():
                params[key] = nn.Parameter(shared.detach().float().cpu().clone())
        return params, {}

    def _shared_attention(self) -> dict[str, Tensor]:
        """G's parameters under the names a task's own copy has."""
        return {ATTENTION[0]: self.down.weight, ATTENTION[1]: self.up.weight, ATTENTION[2]: self.up.bias,
                ATTENTION[3]: self.norm.weight, ATTENTION[4]: self.norm.bias}

    def static(self, task: Task) -> dict[str, Tensor]:
        return {k: p for k, p in task.params.items() if k == "target" or k in ATTENTION}  # target [m, d], own G if any

    def prefix_positions(self, task: Task) -> int:
        return task.params["target"].shape[0]

    def attention(self, x_pooled: Tensor, targets: Tensor, own: dict[str, Tensor] | None = None) -> Tensor:
        """x_pooled [g, d], targets [g, m, d] -> a [g, t+1] (eq 3; the last column is P_target).
        `own`: each row's G (the names of ATTENTION, stacked per row: down [g, r, d], up [g, d, r],
        up_bias, norm, norm_bias [g, d]); None: every row attends with the shared G."""
        if own is None:
            h_up = self.norm(self.up(nn.functional.silu(self.down(x_pooled))))  # [g, d]
        else:
            down, up, up_bias, gamma, beta = (own[k] for k in ATTENTION)
            hidden = nn.functional.silu(torch.einsum("gd,grd->gr", x_pooled, down))  # [g, r]
            h = torch.einsum("gr,gdr->gd", hidden, up) + up_bias  # [g, d]
            h_up = nn.functional.layer_norm(h, h.shape[-1:], eps=self.norm.eps) * gamma + beta
        src_pooled = self.sources.amax(dim=1)  # [t, d]
        tgt_pooled = targets.amax(dim=1)  # [g, d]
        logits = torch.cat([h_up @ src_pooled.T, (h_up * tgt_pooled).sum(-1, keepdim=True)], dim=-1)  # [g, t+1]
        return torch.softmax(logits * self.scale, dim=-1)

    def modulate(self, group: RowGroup, ctx: BatchContext) -> None:
        targets = torch.stack([s["target"] for s in group.statics])[group.task_slot].float()  # [g, m, d]
        pad = (group.mask == 0).unsqueeze(-1)  # [g, n, 1]
        x_pooled = group.embeds.float().masked_fill(pad, float("-inf")).amax(dim=1)  # [g, d], real tokens only
        a = self.attention(x_pooled, targets, self._row_attention(group))  # [g, t+1]
        mixed = torch.einsum("gt,tmd->gmd", a[:, :-1], self.sources.float())  # Σ_{j≤t} a_j P_j
        instance = targets * (1 + a[:, -1:, None]) + mixed  # eq 4, [g, m, d]
        ctx.add_prefix(group.rows, instance)

    def _row_attention(self, group: RowGroup) -> dict[str, Tensor] | None:
        """Each row's G where some task of the group has its own (the others' rows take the shared one)."""
        if not any(ATTENTION[0] in s for s in group.statics):
            return None
        shared = self._shared_attention()
        return {k: torch.stack([s.get(k, shared[k]).float() for s in group.statics])[group.task_slot] for k in ATTENTION}

    def fixed_prompt(self, task: Task) -> Tensor:
        raise Incompatible("attempt tasks have no fixed prompt: ATTEMPT mixes its source prompts per instance (attention over each input, eqs 3-4), which PEFT's PROMPT_TUNING cannot express")

    def param_count(self) -> dict[str, int]:
        c, d = self.config, self.dims.d_model
        return {
            "shared": 2 * d * c.bottleneck + 3 * d,
            "sources": c.n_sources * c.n_virtual * d,
            "per_task": c.n_virtual * d,
            "per_task_own_attention": c.n_virtual * d + 2 * d * c.bottleneck + 3 * d,
        }
