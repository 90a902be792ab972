"""The frozen backbone and the frozen form module, behind one uniform view.

Two families are supported (DESIGN.md "Backbones"):
- decoder-only causal LMs with the Llama layer layout (`model.model.layers[i].mlp`), e.g. SmolLM2;
- T5 encoder-decoder (`T5ForConditionalGeneration`).

Methods never look inside the HF model: they see `d_model`, the *sites* where the per-instance
contract acts, and `embed()`.
- `block_sites`: blocks whose output hidden state IP modulates (h ← h + h∘I; seed 000 eq 3): every
  decoder block of T5 (§3.4), every layer of a decoder-only model (§A.5).
- `encoder_ffns` / `decoder_ffns`: FFN sub-layers that take parallel adapters (PHA eq 8). The FFN
  module's input is already LN(x), so `FFN(LN x) + A(LN x)` is "FFN output + adapter(FFN input)".
  On T5 these are the encoder and decoder FFNs; on a decoder-only model the lower half of the layers
  plays the encoder (task-shared adapters) and the upper half the decoder (generated adapters).
- `feature_site`: the module whose output is the "last encoder layer" state that PHA's retriever
  pools (seed 003 §3.1): T5's encoder final norm, or the last layer of the lower half.

The backbone is frozen (`eval()`, no grads) and never written.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import types
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn
from transformers import (
    AutoConfig,
    AutoModel,
    AutoModelForCausalLM,
    AutoTokenizer,
    PreTrainedModel,
    PreTrainedTokenizerBase,
    T5ForConditionalGeneration,
)

from server.data.spec import clean_label
from server.errors import Incompatible

Kind = Literal["decoder", "seq2seq"]


def freeze(model: nn.Module) -> nn.Module:
    model.eval()
    model.requires_grad_(False)
    return model


def contiguous_head_input(model: PreTrainedModel) -> None:
    """HF slices the positions it keeps (`logits_to_keep`) before the LM head: a [b, 1, d] view
    with the full sequence's strides. For a frozen head torch's matmul cannot fold that view into
    one mm and broadcasts the [vocab, d] weight into a batched matmul instead, copying the
    embedding b times: at b = 32 on SmolLM2 1.8 GB and ~1.8 s in bf16 (~0.2 s in fp32), at b = 1
    ~60 ms of a ~130 ms row. A fresh copy of the [b, 1, d] input (`.contiguous()` is not enough:
    at b = 1 the view already counts as contiguous) makes it one mm; the logits are the same."""
    head = model.get_output_embeddings()
    if head is not None and not getattr(head, "_taskserve_fresh_input", False):
        head.register_forward_pre_hook(lambda _module, args: (args[0].clone(memory_format=torch.contiguous_format), *args[1:]))
        head._taskserve_fresh_input = True


def fp32_logits(model: PreTrainedModel) -> None:
    """The LM head of a 16-bit model computes its logits in fp32, from a kept fp32 copy of its weight.
    bf16 logits of SmolLM2 sit at magnitude ~10–30, where bf16's spacing is 0.06–0.125: labels
    closer than that tie or swap, and rank classification reads exactly those differences. The
    blocks below the head keep the model's dtype; the copy costs vocab × d × 4 bytes (113 MB for
    SmolLM2). An fp32 head (fp32 serving, training's autocast) runs as it is."""
    head = model.get_output_embeddings()
    if head is not None and not getattr(head, "_taskserve_fp32", False):
        head.forward = types.MethodType(_fp32_head_forward, head)  # bound, so a deepcopy of the model binds its own head
        head._taskserve_fp32 = True


def _fp32_head_forward(head: nn.Linear, hidden: torch.Tensor) -> torch.Tensor:
    """hidden [..., d] -> logits [..., vocab] (or [..., k] inside `head_columns`): fp32 for a 16-bit
    head, the head's own product otherwise."""
    weight, bias = head.weight, head.bias
    if weight.dtype in (torch.bfloat16, torch.float16):
        kept = head.__dict__.setdefault("_taskserve_fp32_kept", {})
        key = (weight.data_ptr(), weight.device)  # a new copy only when the weight was moved, cast or copied
        if kept.get("key") != key:
            kept.update(key=key, weight=weight.detach().float(), bias=None if bias is None else bias.detach().float())
        weight, bias, hidden = kept["weight"], kept["bias"], hidden.float()
    columns = head.__dict__.get("_taskserve_columns")
    if columns is not None:
        weight, bias = weight[columns], None if bias is None else bias[columns]
    return nn.functional.linear(hidden, weight, bias)


@contextlib.contextmanager
def head_columns(model: PreTrainedModel, columns: torch.Tensor | None) -> Iterator[None]:
    """Within: the LM head computes the logits of vocabulary ids `columns` [k] only — the model's
    logits come out [..., k], column j the logit of token columns[j]. Exact: what a model does to
    its head's output (soft-capping, scaling) is elementwise. A row's log-normaliser then is not
    computed: for scoring labels against each other it cancels (the engine's `_label_columns`).
    At SmolLM2's vocabulary that skips a 49152 × 576 product, ~8 ms of a ~150 ms single row on
    2 CPU cores. None: the whole vocabulary."""
    head = model.get_output_embeddings()
    head.__dict__["_taskserve_columns"] = columns
    try:
        yield
    finally:
        head.__dict__.pop("_taskserve_columns", None)


def _linears(attention: nn.Module) -> list[nn.Module]:
    """An attention module's own linear projections (q, k, v, o; or a fused qkv): position-wise."""
    return [m for m in attention.children() if isinstance(m, nn.Linear)]


def fingerprint(model: PreTrainedModel) -> str:
    """Stable id of config + weights, independent of the dtype the model was loaded in.

    Hashes the config and a strided sample of every tensor rounded to bf16, so the same
    checkpoint loaded in fp32 on CPU and bf16 on GPU shares one store, and any retrained or
    different checkpoint gets another id. Costs milliseconds, not a pass over all weights.
    """
    config = model.config.to_dict()
    for volatile in ("torch_dtype", "dtype", "transformers_version", "_name_or_path", "architectures"):
        config.pop(volatile, None)
    digest = hashlib.sha256(json.dumps(config, sort_keys=True, default=str).encode())
    for name, tensor in sorted(model.state_dict().items()):
        flat = tensor.detach().reshape(-1)
        stride = max(1, flat.numel() // 4096)
        sample = flat[::stride].to(device="cpu", dtype=torch.bfloat16).view(torch.int16)
        digest.update(name.encode())
        digest.update(str(tuple(tensor.shape)).encode())
        digest.update(sample.numpy().tobytes())
    return digest.hexdigest()[:16]


@dataclass
class Backbone:
    """A frozen LM plus the sites the per-instance contract acts on."""

    model: PreTrainedModel
    tokenizer: PreTrainedTokenizerBase
    kind: Kind
    block_sites: list[nn.Module]
    encoder_ffns: list[nn.Module]
    decoder_ffns: list[nn.Module]
    feature_site: nn.Module
    fingerprint: str
    position_wise: list[nn.Module]
    """Modules of the first pass that act on each position alone — the attention's linear
    projections and the FFN of every decoder-only layer, of every T5 encoder block: a pass with
    padding runs them on its real positions only (`ContextHooks`)."""

    @classmethod
    def from_model(cls, model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase) -> Backbone:
        """Wrap an already loaded HF model (tests build tiny random ones this way)."""
        freeze(model)
        contiguous_head_input(model)
        fp32_logits(model)
        if tokenizer.pad_token_id is None:
            tokenizer.pad_token = tokenizer.eos_token
        if isinstance(model, T5ForConditionalGeneration):
            enc, dec = list(model.encoder.block), list(model.decoder.block)
            return cls(
                model=model,
                tokenizer=tokenizer,
                kind="seq2seq",
                block_sites=dec,
                encoder_ffns=[block.layer[-1].DenseReluDense for block in enc],
                decoder_ffns=[block.layer[-1].DenseReluDense for block in dec],
                feature_site=model.encoder.final_layer_norm,
                fingerprint=fingerprint(model),
                position_wise=[m for block in enc for m in (*_linears(block.layer[0].SelfAttention), block.layer[-1].DenseReluDense)],
            )
        layers = getattr(getattr(model, "model", None), "layers", None)
        if layers is None or not all(hasattr(layer, "mlp") for layer in layers):
            raise Incompatible(
                f"backbone: {type(model).__name__} has neither the T5 nor the Llama layer layout "
                "(expected model.model.layers[i].mlp)"
            )
        layers = list(layers)
        split = len(layers) // 2
        return cls(
            model=model,
            tokenizer=tokenizer,
            kind="decoder",
            block_sites=layers,
            encoder_ffns=[layer.mlp for layer in layers[:split]],
            decoder_ffns=[layer.mlp for layer in layers[split:]],
            feature_site=layers[split - 1],
            fingerprint=fingerprint(model),
            position_wise=[m for layer in layers for m in (*_linears(layer.self_attn), layer.mlp)],
        )

    @property
    def is_encoder_decoder(self) -> bool:
        return self.kind == "seq2seq"

    @property
    def d_model(self) -> int:
        return self.model.config.d_model if self.is_encoder_decoder else self.model.config.hidden_size

    @property
    def n_layers(self) -> int:
        """Number of blocks whose hidden states IP modulates (n_2 in seed 000)."""
        return len(self.block_sites)

    @property
    def device(self) -> torch.device:
        return self.model.device

    @property
    def dtype(self) -> torch.dtype:
        return self.model.dtype

    @property
    def embedding(self) -> nn.Embedding:
        return self.model.get_input_embeddings()

    def embed(self, ids: torch.Tensor) -> torch.Tensor:
        """Token ids [..., n] -> input embeddings [..., n, d_model] (T5 applies no scaling)."""
        return self.embedding(ids)

    @property
    def eos_id(self) -> int:
        return int(self.tokenizer.eos_token_id)

    @property
    def pad_id(self) -> int:
        return int(self.tokenizer.pad_token_id)

    def encode(self, text: str) -> list[int]:
        """Prompt text -> token ids as the backbone expects them (T5: ending in </s>; decoder-only:
        with the tokenizer's BOS if it adds one, never ending in EOS — the model must continue it)."""
        return self.encode_batch([text])[0]

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        """`encode` for many prompts in one tokenizer call (the fast tokenizers batch in Rust)."""
        batch = [list(ids) for ids in self.tokenizer(texts, add_special_tokens=True)["input_ids"]]
        if not self.is_encoder_decoder:
            for ids in batch:
                if ids and ids[-1] == self.eos_id:
                    ids.pop()
        return batch

    def encode_target(self, text: str) -> list[int]:
        """A target text -> the ids the model must produce after the prompt. T5 targets end in
        </s>; decoder-only targets are the bare continuation tokens."""
        if self.is_encoder_decoder:
            return self.encode(text)
        return list(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    def decode(self, ids: list[int]) -> str:
        """Generated token ids -> text (special tokens dropped)."""
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    def label_ids(self, label: str, template: str) -> list[int]:
        """A label's token ids as the answer to a prompt made from `template` — the ONE place labels
        are verbalized. On a decoder-only model a label continues the template's cue
        ("Sentiment:") as a new word, so it is scored with a leading space (" positive"), unless the
        template itself ends in whitespace; T5's decoder starts the label from scratch."""
        label = clean_label(label)
        if not self.is_encoder_decoder and not template[-1:].isspace():
            label = f" {label}"
        return self.encode_target(label)


@dataclass
class FormModule:
    """IP's form module f on decoder-only backbones: a frozen sentence encoder (seed 000 §3.3,
    §A.5) whose per-layer mean-pooled states feed IP's task-embedding network."""

    model: PreTrainedModel
    tokenizer: PreTrainedTokenizerBase
    max_length: int = 256

    @functools.cached_property
    def fingerprint(self) -> str:
        return fingerprint(self.model)

    @property
    def n_layers(self) -> int:
        return self.model.config.num_hidden_layers

    @property
    def d_model(self) -> int:
        return self.model.config.hidden_size

    @torch.no_grad()
    def layer_states(self, texts: list[str]) -> torch.Tensor:
        """texts -> per-layer masked mean-pooled states v_1..v_{n1}: [n1, batch, d1] (fp32)."""
        enc = self.tokenizer(
            texts, padding=True, truncation=True, max_length=self.max_length, return_tensors="pt"
        ).to(self.model.device)
        out = self.model(**enc, output_hidden_states=True)
        hidden = torch.stack(out.hidden_states[1:])  # [n1, batch, seq, d1]; [0] is the embeddings
        return masked_mean(hidden, enc["attention_mask"]).float()


def masked_mean(hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean over real tokens only: hidden [..., batch, seq, d], mask [batch, seq] -> [..., batch, d]."""
    weights = mask.to(hidden.dtype).unsqueeze(-1)  # [batch, seq, 1]
    return (hidden * weights).sum(-2) / weights.sum(-2).clamp(min=1.0)


def load_backbone(name_or_path: str, *, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32) -> Backbone:
    """Load a backbone from a local HF folder (or a hub id when the hub is reachable)."""
    config = AutoConfig.from_pretrained(name_or_path)
    if config.is_encoder_decoder:
        model = T5ForConditionalGeneration.from_pretrained(name_or_path, dtype=dtype)
    else:
        model = AutoModelForCausalLM.from_pretrained(name_or_path, dtype=dtype)
    tokenizer = AutoTokenizer.from_pretrained(name_or_path)
    return Backbone.from_model(model.to(device), tokenizer)


def load_form_module(name_or_path: str, *, device: str | torch.device = "cpu") -> FormModule:
    """Load the frozen sentence encoder used as IP's form module (kept in fp32: it is small)."""
    model = freeze(AutoModel.from_pretrained(name_or_path, dtype=torch.float32)).to(device)
    return FormModule(model=model, tokenizer=AutoTokenizer.from_pretrained(name_or_path))
