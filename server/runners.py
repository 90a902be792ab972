"""How one forward runs on each backbone kind. The engine decides *what* to run; a runner knows
*how* on its architecture: masks, positions, caches.

Decoder-only (left padding, so every row's last real token sits at position t-1; static prompts may
come as cached keys/values, `prefix_cache`, fed as a past the row's tokens continue after):
- `encode`: the form module reads the rows that asked for it (IP) first, so their hidden-state
  scales are in the context; then ONE prompt pass with a KV cache, logits only for the last position.
- `label_logprobs`: label token 1 is scored from the prompt's last logits (first-token scoring
  needs nothing more); longer labels go through one extra pass over the label tokens of every
  (row, label) pair on its row's cached prompt — the prompt is never recomputed per label.
- `generate`: a `Decoding` (greedy or sampled, token by token) on the cache.
T5 (right padding):
- `encode`: the encoder once; its per-layer states are IP's form-module states (seed 000 §3.3),
  handed over before the decoder runs (IP acts on the decoder blocks only);
- `label_logprobs`: ONE decoder pass over all (row, label) pairs re-using the encoder output (with
  first-token scoring, one decoder step per row: the labels share it);
- `generate`: a `Decoding` with the self- and cross-attention caches.
Training uses the same two steps (`encode`, then `label_logprobs` of the targets): teacher forcing
through the cache gives the same log-likelihoods as one pass over [prompt; target].
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import Tensor
from transformers.cache_utils import DynamicCache, EncoderDecoderCache
from transformers.modeling_outputs import BaseModelOutput, CausalLMOutputWithPast

from server.backbone import Backbone, FormModule, head_columns, masked_mean
from server.batch import BatchContext
from server.decoding import Decoding, Sampling
from server.hooks import ContextHooks


# transformers renamed the forward's and the outputs' `past_key_values` to `cache` (the old name warns and
# is to go in 5.40); the vLLM venv pins a release from before the rename, so the name is looked up once.
CACHE = "cache" if "cache" in {f.name for f in dataclasses.fields(CausalLMOutputWithPast)} else "past_key_values"


@dataclass
class Encoded:
    """What the first pass of a batch leaves for scoring and generation."""

    mask: Tensor  # [b, t] long, real positions of prefix + prompt
    last_logits: Tensor | None = None  # [b, vocab] (decoder-only), or [b, k] for the k `columns`
    columns: Tensor | None = None  # [k] sorted vocabulary ids of last_logits' columns; None: the whole vocabulary
    cache: DynamicCache | None = None  # decoder-only prompt cache
    encoder_states: Tensor | None = None  # [b, t, d] (T5)


@dataclass
class FormRequest:
    """Rows whose method reads the form module's per-layer pooled states (IP). The runner produces
    them where its architecture has them and calls `deliver` before the modulated pass needs them."""

    rows: Tensor  # [f] long, rows of the batch
    texts: list[str]  # their rendered inputs (what a separate form module reads)
    deliver: Callable[[Tensor], None]  # form states [n1, f, d1], rows in `rows` order


def pad_ids(rows: list[list[int]], pad: int, device: torch.device, multiple: int = 1) -> tuple[Tensor, Tensor]:
    """Ragged id lists -> right-padded ids [b, n] and lengths [b]."""
    n = max(1, max((len(r) for r in rows), default=1))
    n = -(-n // multiple) * multiple
    ids = torch.full((len(rows), n), pad, dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, : len(r)] = torch.tensor(r, dtype=torch.long)
    return ids.to(device), torch.tensor([len(r) for r in rows], device=device)


@contextmanager
def unpadded(ctx: BatchContext, mask: Tensor) -> Iterator[None]:
    """Within: the position-wise modules (`Backbone.position_wise`) of a pass over [b, t] positions
    whose real ones are `mask` [b, t] run on those only (`ContextHooks`). Only around a first pass."""
    if not bool(mask.all()):
        ctx.real_positions, ctx.pass_shape = mask.reshape(-1).nonzero().squeeze(1), tuple(mask.shape)  # [T]
    try:
        yield
    finally:
        ctx.real_positions = ctx.pass_shape = None


def _gather_logprobs(logits: Tensor, targets: Tensor) -> Tensor:
    """logits [p, n, vocab], targets [p, n] -> log p(target) [p, n] in fp32."""
    return logits.float().log_softmax(-1).gather(-1, targets.unsqueeze(-1)).squeeze(-1)


class DecoderRunner:
    left_pad = True

    def __init__(self, backbone: Backbone, hooks: ContextHooks, multiple: int, form: FormModule | None = None) -> None:
        self.backbone, self.hooks, self.multiple, self.form = backbone, hooks, multiple, form

    @property
    def can_form(self) -> bool:
        """Whether rows can ask for form states: a decoder-only model needs a separate form module."""
        return self.form is not None

    def _forward(self, ctx: BatchContext, **kwargs):
        with self.hooks.use(ctx):
            return self.backbone.model(**kwargs)

    @torch.no_grad()
    def prefix_cache(self, prompt: Tensor) -> Tensor:
        """The keys and values every layer computes for a static prompt [m, d] at positions 0..m-1,
        unmodulated: [n_layers, 2, kv_heads, m, head_dim]. A causal model's prefix never sees what
        follows it, so these are what any request behind that prefix would compute."""
        embeds = prompt.to(self.backbone.device, self.backbone.dtype).unsqueeze(0)  # [1, m, d]
        positions = torch.arange(prompt.shape[0], device=embeds.device).unsqueeze(0)
        with self.hooks.use(None):
            out = self.backbone.model(inputs_embeds=embeds, position_ids=positions, use_cache=True, logits_to_keep=1)
        return torch.stack([torch.stack([layer.keys[0], layer.values[0]]) for layer in getattr(out, CACHE).layers])

    def encode(self, embeds: Tensor, mask: Tensor, ctx: BatchContext, form: FormRequest | None = None, columns: Tensor | None = None) -> Encoded:
        """The prompt pass; `columns` [k] (sorted vocabulary ids): the last logits of those tokens only,
        unnormalised — enough to score labels whose first tokens are among them (`label_logprobs`)."""
        if form is not None:
            form.deliver(self.form.layer_states(form.texts).to(embeds.device))  # [n1, f, d1]
            ctx.assemble()
        positions = (mask.cumsum(-1) - 1).clamp(min=0)  # [b, t]; left padding keeps real positions 0..len-1
        token_mask = mask  # [b, t]: the positions the layers compute (a cached past is not recomputed)
        cache = None
        if ctx.past is not None:  # cached prefixes (right-aligned in P positions): a past the tokens follow
            width = ctx.past.shape[4]
            cache = DynamicCache()
            for layer, kv in enumerate(ctx.past):  # kv [2, b, kvh, P, hd]
                cache.update(kv[0], kv[1], layer)
            past_mask = (torch.arange(width, device=mask.device) >= width - ctx.past_len.unsqueeze(1)).long()  # [b, P]
            positions = positions + ctx.past_len.unsqueeze(1)  # a row's tokens continue after its prefix
            mask = torch.cat([past_mask, mask], dim=1)  # [b, P + t]
        # no padding anywhere (one task, or equal lengths): HF's causal path instead of a masked one (~7% of a batch on CPU)
        attention = None if bool(mask.all()) else mask
        with head_columns(self.backbone.model, columns), unpadded(ctx, token_mask):
            out = self._forward(ctx, inputs_embeds=embeds, attention_mask=attention, position_ids=positions, use_cache=True, logits_to_keep=1, **{CACHE: cache})
        return Encoded(mask=mask, last_logits=out.logits[:, -1], columns=columns, cache=getattr(out, CACHE))

    @staticmethod
    def _select_cache(cache: DynamicCache, index: Tensor) -> DynamicCache:
        selected = DynamicCache()
        for layer_idx, layer in enumerate(cache.layers):
            selected.update(layer.keys[index], layer.values[index], layer_idx)
        return selected

    def _continue(self, ctx: BatchContext, mask: Tensor, ids: Tensor, id_mask: Tensor, cache: DynamicCache) -> Tensor:
        """Feed ids [p, n] (mask id_mask) after cached prompts whose mask is `mask` [p, t]; the cache
        and ctx already hold these p rows. Returns logits [p, n, vocab]."""
        positions = mask.sum(-1, keepdim=True) + torch.arange(ids.shape[1], device=ids.device)  # [p, n]
        out = self._forward(ctx, inputs_embeds=self.backbone.embed(ids), attention_mask=torch.cat([mask, id_mask], dim=1), position_ids=positions, use_cache=True, **{CACHE: cache})
        return out.logits

    def label_logprobs(self, enc: Encoded, ctx: BatchContext, pair_row: Tensor, targets: list[list[int]]) -> Tensor:
        """Per (row, label) pair: log p(y_j | prompt, y_<j) for every label token [p, n_max] (0 past the end).
        When the prompt pass kept only some `columns`, token 1's is its logit: log p less the row's
        log-normaliser, the same for every label of the row."""
        ids, lengths = pad_ids(targets, self.backbone.pad_id, pair_row.device)  # [p, n]
        if enc.columns is None:
            row_logp = enc.last_logits.float().log_softmax(-1)  # [b, vocab]: normalise once per row, not per label
            first = row_logp[pair_row, ids[:, 0]].unsqueeze(1)  # [p, 1]
        else:
            first = enc.last_logits.float()[pair_row, torch.searchsorted(enc.columns, ids[:, 0].contiguous())].unsqueeze(1)  # [p, 1]
        if ids.shape[1] == 1:
            return first
        rest_ids, _ = pad_ids([t[:-1] for t in targets], self.backbone.pad_id, pair_row.device, self.multiple)
        rest_mask = (torch.arange(rest_ids.shape[1], device=ids.device) < (lengths - 1).unsqueeze(1)).long()
        cache = self._select_cache(enc.cache, pair_row)
        logits = self._continue(ctx.select(pair_row), enc.mask[pair_row], rest_ids, rest_mask, cache)
        rest = _gather_logprobs(logits[:, : ids.shape[1] - 1], ids[:, 1:])  # [p, n-1]
        valid = torch.arange(ids.shape[1], device=ids.device) < lengths.unsqueeze(1)
        return torch.cat([first, rest], dim=1).masked_fill(~valid, 0.0)

    def generate(self, enc: Encoded, ctx: BatchContext, rows: Tensor, max_new: list[int], sampling: list[Sampling], sinks: list | None = None) -> Decoding:
        """Token-by-token decoding for rows [g] on the prompt cache (consumed when every row generates)."""
        assert enc.columns is None, "generation needs the whole vocabulary's logits"
        everyone = rows.numel() == enc.mask.shape[0]
        cache = enc.cache if everyone else self._select_cache(enc.cache, rows)
        sub_ctx = ctx if everyone else ctx.select(rows)
        mask = enc.mask[rows]
        one = torch.ones(rows.numel(), 1, dtype=torch.long, device=rows.device)

        def step(token: Tensor | None) -> Tensor:
            nonlocal mask
            if token is None:
                return enc.last_logits[rows]
            logits = self._continue(sub_ctx, mask, token.unsqueeze(1), one, cache)[:, -1]
            mask = torch.cat([mask, one], dim=1)
            return logits

        return Decoding(step, sampling, max_new, self.backbone.eos_id, self.backbone.decode, sinks)


class Seq2SeqRunner:
    left_pad = False
    can_form = True  # the encoder is the form module
    prefix_cache = None  # T5's encoder attends both ways: a prompt's states depend on the input

    def __init__(self, backbone: Backbone, hooks: ContextHooks, multiple: int) -> None:
        self.backbone, self.hooks, self.multiple = backbone, hooks, multiple
        self.start_id = int(backbone.model.config.decoder_start_token_id)

    def encode(self, embeds: Tensor, mask: Tensor, ctx: BatchContext, form: FormRequest | None = None, columns: Tensor | None = None) -> Encoded:
        """The encoder pass. `columns` is ignored: T5's logits come from its decoder (`label_logprobs`)."""
        with self.hooks.use(ctx), unpadded(ctx, mask):
            out = self.backbone.model.encoder(inputs_embeds=embeds, attention_mask=mask, output_hidden_states=form is not None)
        if form is not None:
            states = masked_mean(torch.stack(out.hidden_states[1:]), mask)  # [n1, b, d]
            form.deliver(states[:, form.rows])
            ctx.assemble()
        return Encoded(mask=mask, encoder_states=out.last_hidden_state)

    def _decode(self, enc: Encoded, ctx: BatchContext, index: Tensor | None, dec_ids: Tensor, dec_mask: Tensor | None = None, cache: EncoderDecoderCache | None = None):
        """Decoder pass for rows `index` of the encoded batch (None: all rows, in order)."""
        states, mask = (enc.encoder_states, enc.mask) if index is None else (enc.encoder_states[index], enc.mask[index])
        with self.hooks.use(ctx if index is None else ctx.select(index)):
            return self.backbone.model(
                encoder_outputs=BaseModelOutput(last_hidden_state=states),
                attention_mask=mask,
                decoder_input_ids=dec_ids,
                decoder_attention_mask=dec_mask,
                use_cache=cache is not None,
                **{CACHE: cache},
            )

    def _shifted(self, targets: list[list[int]], device: torch.device) -> tuple[Tensor, Tensor, Tensor]:
        ids, lengths = pad_ids(targets, self.backbone.pad_id, device, self.multiple)  # [p, n]
        dec_in = torch.cat([torch.full_like(ids[:, :1], self.start_id), ids[:, :-1]], dim=1)
        valid = torch.arange(ids.shape[1], device=device) < lengths.unsqueeze(1)
        return ids, dec_in, valid

    def label_logprobs(self, enc: Encoded, ctx: BatchContext, pair_row: Tensor, targets: list[list[int]]) -> Tensor:
        n = max(len(t) for t in targets)
        if n == 1:  # first-token scoring: every label of a row shares decoder step 1 — one row each
            rows, inverse = pair_row.unique(return_inverse=True)
            start = torch.full((rows.numel(), 1), self.start_id, dtype=torch.long, device=rows.device)
            row_logp = self._decode(enc, ctx, rows, start).logits[:, 0].float().log_softmax(-1)  # [rows, vocab]
            first = torch.tensor([t[0] for t in targets], device=rows.device)
            return row_logp[inverse, first].unsqueeze(1)  # [p, 1]
        ids, dec_in, valid = self._shifted(targets, pair_row.device)
        logits = self._decode(enc, ctx, pair_row, dec_in, valid.long()).logits  # [p, n, vocab]
        return _gather_logprobs(logits, ids).masked_fill(~valid, 0.0)[:, :n]

    def generate(self, enc: Encoded, ctx: BatchContext, rows: Tensor, max_new: list[int], sampling: list[Sampling], sinks: list | None = None) -> Decoding:
        sub = Encoded(mask=enc.mask[rows], encoder_states=enc.encoder_states[rows])  # gathered once, not per step
        sub_ctx = ctx.select(rows)
        cache = EncoderDecoderCache(DynamicCache(), DynamicCache())
        start = torch.full((rows.numel(),), self.start_id, dtype=torch.long, device=rows.device)

        def step(token: Tensor | None) -> Tensor:
            nonlocal cache
            out = self._decode(sub, sub_ctx, None, (start if token is None else token).unsqueeze(1), cache=cache)
            cache = getattr(out, CACHE)
            return out.logits[:, -1]

        return Decoding(step, sampling, max_new, self.backbone.eos_id, self.backbone.decode, sinks)
