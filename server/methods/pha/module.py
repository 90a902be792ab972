"""Prototype-based HyperAdapter (seed 003): prototypes + a hypernetwork generate per-task adapters.

- §3.1 retriever: z = G(h), h the masked mean-pooled last *encoder* state, G = FF→ReLU→FF;
  eqs 3–4, L_IR: supervised InfoNCE on cosine similarities / temperature (positives: other rows
  of the same task in the batch; negatives: every other row).
- §3.2 prototypes k_i (per task) with eqs 5–6, L_Pro: cross-entropy of cos(z, k_j)/temperature over
  all known prototypes, the own task as target.
- eq 7: (D_i^m, U_i^m) = H(C(k_i, e_m)), e_m layer embeddings, C = [k_i ; e_m] → FF → ReLU → FF →
  LayerNorm (reference code Bumble666/PHA: 128 → 128 → 64), H = linear heads for both matrices and
  their biases.
- eq 8: parallel adapter on the FFN, y = FFN(LN x) + A(LN x), on the decoder FFNs with generated
  weights and on the encoder FFNs with task-shared plain adapters (§3.3 "encoder with task-shared
  adapters").
- eq 9: L = L_PLM + λ(L_IR + L_Pro), λ = 0.1; eq 10: a new task retrieves k_a = argmax_i cos(k_i, z).
Decoder-only backbones: the lower half of the layers plays the encoder (shared adapters; the
retriever pools the output of its last layer over the prompt tokens) and the upper half the decoder
(generated adapters) — see docs/methods.md.
The generated adapters depend only on the task, so `static()` computes them once per task version.
The up-projection heads start at zero: an untrained PHA task is the identity.

Parameter count (our dims; d model size, b bottleneck, d' prototype dim, h_r retriever hidden,
h_c mixer hidden, d_h mixed-embedding dim, L_e / L_d encoder / decoder FFN sites, τ tasks):
  retriever d·h_r + h_r + h_r·d' + d'; layer embeddings L_d·d'; mixer C 2d'·h_c + h_c + h_c·d_h + 3d_h;
  hypernetwork (d_h + 1)(2db + b + d); shared encoder adapters L_e(2db + b + d); prototypes τ·d'.
This is appendix B's  dd' + d'^2 + (τd' + Ld') + 2d'd_h + d_h(2db+b+d) + L(2db+b+d)  with the
reference code's hidden layers in G and C and all biases counted.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from server.batch import BatchContext
from server.data.spec import TaskSpec
from server.errors import InvalidRequest
from server.methods.base import BackboneDims, Method, RowGroup, Vocabulary
from server.methods.pha.config import PHAConfig
from server.task import Task


class PrototypeHyperAdapter(Method):
    method_id = "pha"
    config_class = PHAConfig
    config: PHAConfig
    wants_features = True

    def __init__(self, dims: BackboneDims, config: PHAConfig | None = None, embedding: Tensor | None = None) -> None:
        super().__init__(dims, config)
        c = self.config
        d, b = dims.d_model, c.bottleneck
        # nn.Linear draws from the global generator: seed it inside fork_rng so the shared init is
        # reproducible without touching the caller's random state
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(c.seed)
            self.retriever = nn.Sequential(nn.Linear(d, c.retriever_hidden), nn.ReLU(), nn.Linear(c.retriever_hidden, c.proto_dim))
            self.layer_embeddings = nn.Parameter(torch.randn(dims.n_decoder_ffns, c.proto_dim) * 0.02)  # e_m
            self.mixer = nn.Sequential(
                nn.Linear(2 * c.proto_dim, c.mixer_hidden), nn.ReLU(), nn.Linear(c.mixer_hidden, c.mixed_dim), nn.LayerNorm(c.mixed_dim)
            )
            self.head_down = nn.Linear(c.mixed_dim, d * b)
            self.head_down_bias = nn.Linear(c.mixed_dim, b)
            self.head_up = nn.Linear(c.mixed_dim, b * d)
            self.head_up_bias = nn.Linear(c.mixed_dim, d)
            for head in (self.head_up, self.head_up_bias):  # generated A(x) = 0 until trained
                nn.init.zeros_(head.weight)
                nn.init.zeros_(head.bias)
            n_enc = dims.n_encoder_ffns
            self.enc_down = nn.Parameter(torch.randn(n_enc, d, b) * d**-0.5)  # task-shared encoder adapters
            self.enc_down_bias = nn.Parameter(torch.zeros(n_enc, b))
            self.enc_up = nn.Parameter(torch.zeros(n_enc, b, d))
            self.enc_up_bias = nn.Parameter(torch.zeros(n_enc, d))

    def init_task(self, spec: TaskSpec, vocab: Vocabulary, generator: torch.Generator, init: dict[str, Any]) -> tuple[nn.ParameterDict, dict[str, Any]]:
        """init = {} (a fresh prototype) or {"prototype": [d'] tensor} (e.g. retrieved by eq 10),
        optionally {"refine": True}: per-task gains g and shifts s on the generated adapters'
        outputs, A'(x) = (1 + g)∘A(x) + s per decoder FFN site, zero at first (so the task starts
        as its prototype alone) — for a few-shot task the prototype alone cannot fit."""
        unknown = set(init) - {"prototype", "refine"}
        if unknown:
            raise InvalidRequest(f"init: pha takes 'prototype' and 'refine', got {sorted(unknown)}")
        if "prototype" in init:
            proto = torch.as_tensor(init["prototype"], dtype=torch.float32).detach().clone().cpu()
            if proto.shape != (self.config.proto_dim,):
                raise InvalidRequest(f"init.prototype: expected shape [{self.config.proto_dim}], got {list(proto.shape)}")
        else:
            proto = torch.randn(self.config.proto_dim, generator=generator)
        params = nn.ParameterDict({"prototype": nn.Parameter(proto)})
        if init.get("refine"):
            shape = (self.dims.n_decoder_ffns, self.dims.d_model)
            params["adapter_gain"], params["adapter_shift"] = nn.Parameter(torch.zeros(shape)), nn.Parameter(torch.zeros(shape))
        return params, {}

    def generate(self, prototype: Tensor) -> dict[str, Tensor]:
        """k_i [d'] -> adapters for every decoder FFN site (eq 7)."""
        d, b, n = self.dims.d_model, self.config.bottleneck, self.dims.n_decoder_ffns
        mixed = self.mixer(torch.cat([prototype.expand(n, -1), self.layer_embeddings], dim=-1))  # I_i^m [n, d_h]
        return {
            "down": self.head_down(mixed).view(n, d, b),
            "down_bias": self.head_down_bias(mixed),  # [n, b]
            "up": self.head_up(mixed).view(n, b, d),
            "up_bias": self.head_up_bias(mixed),  # [n, d]
        }

    def static(self, task: Task) -> dict[str, Tensor]:
        adapters = self.generate(task.params["prototype"].float())
        if "adapter_gain" in task.params:  # (1 + g)∘A(x) + s: scale the up-projection's output channels, shift its bias
            gain = 1 + task.params["adapter_gain"].float()  # [n, d]
            adapters["up"] = adapters["up"] * gain.unsqueeze(1)  # [n, b, d]
            adapters["up_bias"] = adapters["up_bias"] * gain + task.params["adapter_shift"].float()
        return adapters

    def modulate(self, group: RowGroup, ctx: BatchContext) -> None:
        n_enc, n_dec = self.dims.n_encoder_ffns, self.dims.n_decoder_ffns
        shared = [t.unsqueeze(0) for t in (self.enc_down, self.enc_down_bias, self.enc_up, self.enc_up_bias)]  # [1, n_enc, ...]
        ctx.add_adapters(list(range(n_enc)), group.rows, torch.zeros_like(group.rows), *shared)
        generated = [torch.stack([s[k] for s in group.statics]) for k in ("down", "down_bias", "up", "up_bias")]  # [s, n_dec, ...]
        ctx.add_adapters(list(range(n_enc, n_enc + n_dec)), group.rows, group.task_slot, *generated)

    # ---- retrieval and the contrastive losses ----------------------------------------------
    def retrieval_vectors(self, features: Tensor) -> Tensor:
        """pooled encoder states [n, d] -> L2-normalised z [n, d']."""
        return nn.functional.normalize(self.retriever(features.float()), dim=-1)

    def similarities(self, features: Tensor, prototypes: Tensor) -> Tensor:
        """Eq 10's scores for a set of examples: each prototype's mean cosine similarity with the
        examples' retrieval vectors. features [n, d]; prototypes [p, d'] -> [p]."""
        z = self.retrieval_vectors(features)  # [n, d']
        return (z @ nn.functional.normalize(prototypes.float(), dim=-1).T).mean(0)  # [p]

    def retrieve(self, features: Tensor, prototypes: Tensor) -> int:
        """Eq 10: the index of the prototype most similar to the examples."""
        return int(self.similarities(features, prototypes).argmax())

    def extra_loss(self, group: RowGroup) -> Tensor | None:
        if group.features is None:
            return None
        c = self.config
        z = self.retrieval_vectors(group.features)  # [g, d']
        same = group.task_slot.unsqueeze(0) == group.task_slot.unsqueeze(1)  # [g, g]
        eye = torch.eye(len(z), dtype=torch.bool, device=z.device)
        logits = (z @ z.T / c.temperature).masked_fill(eye, float("-inf"))  # eqs 3-4: InfoNCE over the batch
        log_prob = logits.log_softmax(-1)
        positives = same & ~eye
        has_pos = positives.any(-1)
        loss_ir = z.new_zeros(())
        if has_pos.any():
            per_row = -(log_prob.masked_fill(~positives, 0).sum(-1) / positives.sum(-1).clamp(min=1))
            loss_ir = per_row[has_pos].mean()
        peers = group.peers if group.peers else group.tasks
        protos = nn.functional.normalize(torch.stack([t.params["prototype"] for t in peers]).float(), dim=-1)  # [p, d']
        index = {id(t): i for i, t in enumerate(peers)}
        targets = torch.tensor([index[id(group.tasks[s])] for s in group.task_slot.tolist()], device=z.device)
        loss_pro = nn.functional.cross_entropy(z @ protos.T / c.temperature, targets)  # eqs 5-6
        return c.loss_weight * (loss_ir + loss_pro)

    def param_count(self) -> dict[str, int]:
        c, dm = self.config, self.dims
        d, b, dp = dm.d_model, c.bottleneck, c.proto_dim
        adapter = 2 * d * b + b + d
        shared = (
            d * c.retriever_hidden + c.retriever_hidden + c.retriever_hidden * dp + dp
            + dm.n_decoder_ffns * dp
            + 2 * dp * c.mixer_hidden + c.mixer_hidden + c.mixer_hidden * c.mixed_dim + 3 * c.mixed_dim
            + (c.mixed_dim + 1) * adapter
            + dm.n_encoder_ffns * adapter
        )
        return {"shared": shared, "per_task": dp, "per_task_refined": dp + 2 * dm.n_decoder_ffns * d}
