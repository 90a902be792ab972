"""Each method's reported parameter counts equal its documented formula AND the real tensors."""

from __future__ import annotations

import pytest
import torch

from server.data.spec import TaskSpec
from server.methods import BackboneDims, REGISTRY
from server.methods.base import Vocabulary
from server.methods.attempt import Attempt, AttemptConfig
from server.methods.ip import InspirationalPointer, IPConfig
from server.methods.pha import PHAConfig, PrototypeHyperAdapter
from server.methods.prompt_tuning import PromptConfig, PromptTuning
from server.methods.tpv import TaskPromptVectors, TPVConfig

SPEC = TaskSpec(labels=("a", "b"), description="Decide a or b:")
# T5-base: d 768, 12 encoder + 12 decoder layers; the encoder is IP's form module (n1 = 12, d1 = 768)
T5_BASE = BackboneDims(d_model=768, n_blocks=12, n_encoder_ffns=12, n_decoder_ffns=12, form_layers=12, form_dim=768)
# SmolLM2-135M: d 576, 30 layers (PHA: 15 "encoder" + 15 "decoder" FFNs); MiniLM form module (6 × 384)
SMOLLM2 = BackboneDims(d_model=576, n_blocks=30, n_encoder_ffns=15, n_decoder_ffns=15, form_layers=6, form_dim=384)
SMALL = BackboneDims(d_model=16, n_blocks=3, n_encoder_ffns=2, n_decoder_ffns=3, form_layers=4, form_dim=10)


def numel(params) -> int:
    return sum(p.numel() for p in params)


def new_task(method, dims: BackboneDims, **init):
    vocab = Vocabulary(torch.randn(50, dims.d_model), encode=lambda text: [b % 50 for b in text.encode()])
    params, _ = method.init_task(SPEC, vocab, torch.Generator().manual_seed(0), init)
    return params


@pytest.mark.parametrize("dims", [SMALL, T5_BASE, SMOLLM2], ids=["small", "t5-base", "smollm2"])
def test_ip_count_is_the_section_3_6_formula_plus_biases(dims: BackboneDims) -> None:
    ip = InspirationalPointer(dims, IPConfig(task_dim=200))
    t, d1, n1, n2, d2 = 200, dims.form_dim, dims.form_layers, dims.n_blocks, dims.d_model
    paper = d1 * t + n1 + t * n2 + (t * t + t * d2)  # seed 000 §3.6, weights only
    biases = t + t + d2  # T, c1, c2
    assert ip.param_count()["shared"] == paper + biases == numel(ip.nets.values())
    assert numel(new_task(ip, dims, copy_nets=True).values()) == ip.param_count()["per_task_with_copy"]
    assert numel(new_task(ip, dims).values()) == ip.param_count()["per_task"] == 0


def test_ip_t5_base_matches_the_papers_347k_order() -> None:
    """Seed 000 Table 1 reports 347K trainable parameters for IP on T5-base."""
    count = InspirationalPointer(T5_BASE).param_count()["shared"]
    assert 340_000 < count < 355_000


@pytest.mark.parametrize("dims", [SMALL, T5_BASE, SMOLLM2], ids=["small", "t5-base", "smollm2"])
def test_pha_count_is_appendix_b_with_reference_dims(dims: BackboneDims) -> None:
    c = PHAConfig()
    pha = PrototypeHyperAdapter(dims, c)
    d, b, dp, dh = dims.d_model, c.bottleneck, c.proto_dim, c.mixed_dim
    adapter = 2 * d * b + b + d  # appendix B: one adapter layer
    retriever = d * c.retriever_hidden + c.retriever_hidden + c.retriever_hidden * dp + dp
    mixer = 2 * dp * c.mixer_hidden + c.mixer_hidden + c.mixer_hidden * dh + dh + 2 * dh  # + LayerNorm
    formula = retriever + dims.n_decoder_ffns * dp + mixer + (dh + 1) * adapter + dims.n_encoder_ffns * adapter
    assert pha.param_count()["shared"] == formula == numel(pha.parameters())
    assert numel(new_task(pha, dims).values()) == pha.param_count()["per_task"] == dp


@pytest.mark.parametrize("dims", [SMALL, T5_BASE, SMOLLM2], ids=["small", "t5-base", "smollm2"])
def test_attempt_count(dims: BackboneDims) -> None:
    c = AttemptConfig()
    attempt = Attempt(dims, c)
    d, r = dims.d_model, c.bottleneck
    g = [p for n, p in attempt.named_parameters() if n != "sources"]
    assert attempt.param_count()["shared"] == 2 * d * r + 3 * d == numel(g)  # W_down, W_up + bias, LayerNorm
    assert attempt.param_count()["sources"] == c.n_sources * c.n_virtual * d == attempt.sources.numel()
    assert attempt.param_count()["per_task"] == c.n_virtual * d == numel(new_task(attempt, dims).values())


@pytest.mark.parametrize("cls,config", [(PromptTuning, PromptConfig()), (TaskPromptVectors, TPVConfig())])
def test_prompt_counts(cls, config) -> None:
    method = cls(SMOLLM2, config)
    if isinstance(method, TaskPromptVectors):
        method.add_origin("origin-0", torch.zeros(config.n_virtual, SMOLLM2.d_model))
    assert method.param_count() == {"shared": 0, "per_task": 100 * 576}
    assert numel(new_task(method, SMOLLM2).values()) == 100 * 576


def test_every_registered_method_reports_counts() -> None:
    assert set(REGISTRY) == {"plain", "prompt_tuning", "tpv", "attempt", "ip", "pha"}
    for entry in REGISTRY.values():
        counts = entry.module(SMALL).param_count()
        assert counts["per_task"] >= 0 and counts["shared"] >= 0
