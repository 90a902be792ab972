"""Test helpers: tiny randomly initialised T5 and Llama backbones, a tiny form module, and an
engine with every method (small configs) whose shared weights are perturbed away from their
identity initialisation, so every test exercises real modulations."""

from __future__ import annotations

import torch
from transformers import BertConfig, BertModel, ByT5Tokenizer, LlamaConfig, LlamaForCausalLM, T5Config, T5ForConditionalGeneration

from server.backbone import Backbone, FormModule, freeze
from server.data.spec import TaskSpec
from server.engine import Engine, EngineConfig, default_methods
from server.methods.attempt import AttemptConfig
from server.methods.ip import IPConfig
from server.methods.pha import PHAConfig
from server.methods.prompt_tuning import PromptConfig
from server.methods.tpv import TPVConfig

METHODS = ("prompt_tuning", "tpv", "attempt", "ip", "pha")
SMALL_CONFIGS = {
    "prompt_tuning": PromptConfig(n_virtual=6),
    "tpv": TPVConfig(n_virtual=5),
    "attempt": AttemptConfig(n_virtual=4, n_sources=3, bottleneck=8),
    "ip": IPConfig(task_dim=12),
    "pha": PHAConfig(proto_dim=8, retriever_hidden=16, mixer_hidden=16, mixed_dim=8, bottleneck=8),
}
CLASSIFY = TaskSpec(template="Review: {text}\nSentiment:", labels=(" negative", " positive", " neutral stance"), description="Tell me the sentiment of the review:", scoring="sum")


def tiny_llama() -> Backbone:
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=384, hidden_size=32, intermediate_size=64, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512, initializer_range=0.1, tie_word_embeddings=True, bos_token_id=None, eos_token_id=1, pad_token_id=0)
    model = LlamaForCausalLM(config)
    return Backbone.from_model(model, ByT5Tokenizer())


def tiny_t5() -> Backbone:
    torch.manual_seed(0)
    config = T5Config(vocab_size=384, d_model=32, d_kv=8, d_ff=64, num_layers=3, num_decoder_layers=3, num_heads=4, decoder_start_token_id=0, eos_token_id=1, pad_token_id=0, dropout_rate=0.0)
    return Backbone.from_model(T5ForConditionalGeneration(config), ByT5Tokenizer())


def tiny_form() -> FormModule:
    """A tiny random BERT as IP's form module; byte-level ids (< 384) fit its vocabulary."""
    torch.manual_seed(1)
    model = BertModel(BertConfig(vocab_size=384, hidden_size=24, num_hidden_layers=2, num_attention_heads=2, intermediate_size=48))
    return FormModule(model=freeze(model), tokenizer=ByT5Tokenizer())


def perturb(engine: Engine, scale: float = 0.2, seed: int = 0) -> Engine:
    """Move every shared method weight off its identity init (IP's c2, PHA's up heads are zero)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in engine.methods.named_parameters():
            if "origins" in name:
                continue
            p.add_(torch.randn(p.shape, generator=g).to(p.device) * scale)
    return engine


def make_engine(kind: str, device: str = "cpu", dtype: torch.dtype = torch.float32, config: EngineConfig | None = None, **method_configs) -> Engine:
    """A tiny engine with every method; `method_configs` (method id -> config) replace SMALL_CONFIGS' ones."""
    backbone = tiny_t5() if kind == "t5" else tiny_llama()
    backbone.model.to(device=device, dtype=dtype)
    form = None if kind == "t5" else tiny_form()
    if form is not None:
        form.model.to(device)
    return perturb(Engine(backbone, form, default_methods(backbone, form, **(SMALL_CONFIGS | method_configs)), config))


def add_tasks(engine: Engine, per_method: int = 2, spec: TaskSpec = CLASSIFY) -> list[str]:
    """per_method tasks of every method, each with distinct random per-task params."""
    names = []
    for method in METHODS:
        for i in range(per_method):
            name = f"{method}-{i}"
            task = engine.tasks.new(name, method, spec, seed=100 + i)
            with torch.no_grad():
                for p in task.params.values():
                    p.add_(torch.randn_like(p) * 0.1)
            engine.tasks.add(task)
            names.append(name)
    return names



def free_port() -> int:
    """A free TCP port on loopback for a test server."""
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]
