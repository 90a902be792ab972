"""BatchContext: the per-row modulation tensors of one mixed-task batch (DESIGN.md, per-instance contract).

Task identity travels as data: methods write what their rows need through `add_*`, the engine calls
`assemble()` (again after late writers such as IP, whose form states arrive with the first pass;
only what changed is rebuilt), and the hooks in `server/hooks.py` read the assembled tensors during
the one forward pass. A row that no method touched gets the identity (no prefix, scale 1, zero adapter), so
one forward serves a batch that mixes tasks AND methods. Writers are out-of-place (`index_put`), so
gradients flow into method parameters when training.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor


@dataclass
class AdapterWeights:
    """Parallel adapters of one FFN site (PHA eq 8): a table of slots and each row's slot.

    A(x) = ReLU(x·down + down_bias)·up + up_bias. Slot 0 is the zero adapter (identity)."""

    down: Tensor  # [slots, d_model, bottleneck]
    down_bias: Tensor  # [slots, bottleneck]
    up: Tensor  # [slots, bottleneck, d_model]
    up_bias: Tensor  # [slots, d_model]
    slot: Tensor  # [batch] long

    def select(self, index: Tensor) -> AdapterWeights:
        return AdapterWeights(self.down, self.down_bias, self.up, self.up_bias, self.slot[index])

    def __call__(self, x: Tensor) -> Tensor:
        """x [batch, seq, d_model] (the FFN's input, already LN'd) -> A(x) [batch, seq, d_model]."""
        down = self.down[self.slot]  # [batch, d_model, bottleneck]
        hidden = torch.baddbmm(self.down_bias[self.slot].unsqueeze(1), x, down).relu()  # [batch, seq, b]
        return torch.baddbmm(self.up_bias[self.slot].unsqueeze(1), hidden, self.up[self.slot])


@dataclass
class _AdapterPiece:
    rows: Tensor  # [g]
    slot: Tensor  # [g] into this piece's tables
    down: Tensor  # [s, d, b]
    down_bias: Tensor  # [s, b]
    up: Tensor  # [s, b, d]
    up_bias: Tensor  # [s, d]


@dataclass
class BatchContext:
    """Per-row modulations for `batch_size` rows. Build with add_*, then `assemble()`."""

    batch_size: int
    d_model: int
    n_block_sites: int
    device: torch.device
    dtype: torch.dtype
    capture_features: bool = False
    """Ask the feature-site hook to keep its output (PHA's retriever input, training only)."""

    # assembled, read by the engine and the hooks
    prefix: Tensor | None = None  # [batch, max_prefix, d_model]
    prefix_len: Tensor | None = None  # [batch] long
    hidden_scale: Tensor | None = None  # [n_block_sites, batch, 1, d_model] = 1 + I_m per row
    adapters: dict[int, AdapterWeights] = field(default_factory=dict)  # ffn site -> adapters
    features: Tensor | None = None  # [batch, seq, d_model], written by the feature-site hook
    real_positions: Tensor | None = None  # [T] long: the non-padding positions of the first pass now running, flat in its [batch, seq] (set by the runner; None: no padding)
    pass_shape: tuple[int, int] | None = None  # that pass's (batch, seq): a position-wise module is unpadded only on inputs of that shape
    past: Tensor | None = None  # [n_layers, 2, batch, kv_heads, P, head_dim] cached prefix keys/values, right-aligned
    past_len: Tensor | None = None  # [batch] long: cached prefix positions per row (0: none)

    _prefixes: list[tuple[Tensor, Tensor, Tensor]] = field(default_factory=list, repr=False)
    _scales: list[tuple[Tensor, Tensor]] = field(default_factory=list, repr=False)
    _adapters: dict[int, list[_AdapterPiece]] = field(default_factory=dict, repr=False)
    _pasts: list[tuple[Tensor, Tensor, Tensor, Tensor]] = field(default_factory=list, repr=False)
    _assembled: dict[int | str, int] = field(default_factory=dict, repr=False)  # pieces per kind at the last assemble

    # ---- writers (methods) -------------------------------------------------------------------
    def add_prefix(self, rows: Tensor, prefix: Tensor, lengths: Tensor | None = None) -> None:
        """rows [g]; prefix [g, m, d]; lengths [g] (default m): real prefix rows come first."""
        if lengths is None:
            lengths = torch.full((rows.numel(),), prefix.shape[1], dtype=torch.long, device=rows.device)
        self._prefixes.append((rows, prefix, lengths))

    def add_cached_prefix(self, rows: Tensor, caches: list[Tensor], slot: Tensor) -> None:
        """rows [g]; each row's prefix as the keys/values every layer computed for it once
        (caches[k]: [n_layers, 2, kv_heads, m_k, head_dim], row i uses caches[slot[i]]): the
        decoder-only runner feeds them as a past, so the prefix costs no compute per request."""
        lengths = torch.tensor([c.shape[3] for c in caches], device=rows.device)
        width = int(lengths.max())
        table = torch.stack([torch.nn.functional.pad(c, (0, 0, width - c.shape[3], 0)) for c in caches])  # [s, L, 2, kvh, width, hd], right-aligned
        self._pasts.append((rows, table, lengths, slot))

    def add_hidden_scale(self, rows: Tensor, delta: Tensor) -> None:
        """rows [g]; delta = I [g, n_block_sites, d]: block outputs become h + h∘I (seed 000 eq 3)."""
        self._scales.append((rows, delta))

    def add_adapters(
        self,
        sites: list[int],
        rows: Tensor,
        slot: Tensor,
        down: Tensor,
        down_bias: Tensor,
        up: Tensor,
        up_bias: Tensor,
    ) -> None:
        """Parallel adapters on FFN `sites` for `rows` [g], each row using table entry `slot` [g].
        down [s, n_sites, d, b]; down_bias [s, n_sites, b]; up [s, n_sites, b, d]; up_bias [s, n_sites, d]."""
        for i, site in enumerate(sites):
            piece = _AdapterPiece(rows, slot, down[:, i], down_bias[:, i], up[:, i], up_bias[:, i])
            self._adapters.setdefault(site, []).append(piece)

    # ---- assembly ----------------------------------------------------------------------------
    def assemble(self) -> BatchContext:
        """Turn the written pieces into the batch tensors the hooks read. Idempotent: a kind is
        rebuilt (from all its pieces) only when something was written to it since the last call."""
        b, d, dev, dt = self.batch_size, self.d_model, self.device, self.dtype
        done = self._assembled
        if len(self._prefixes) != done.get("prefix", 0):
            width = max(p.shape[1] for _, p, _ in self._prefixes)
            prefix = torch.zeros(b, width, d, device=dev, dtype=dt)
            prefix_len = torch.zeros(b, dtype=torch.long, device=dev)
            for rows, p, lengths in self._prefixes:
                p = torch.nn.functional.pad(p.to(dt), (0, 0, 0, width - p.shape[1]))  # [g, width, d]
                prefix = prefix.index_put((rows,), p)
                prefix_len = prefix_len.index_put((rows,), lengths)
            self.prefix, self.prefix_len = prefix, prefix_len
        if len(self._scales) != done.get("scale", 0):
            scale = torch.ones(b, self.n_block_sites, d, device=dev, dtype=dt)
            for rows, delta in self._scales:
                scale = scale.index_put((rows,), 1 + delta.to(dt))
            self.hidden_scale = scale.transpose(0, 1).unsqueeze(2)  # [n_sites, batch, 1, d]
        for site, pieces in self._adapters.items():
            if len(pieces) != done.get(site, 0):
                self.adapters[site] = _merge_adapters(pieces, b, dt)
        if len(self._pasts) != done.get("past", 0):
            width = max(table.shape[4] for _, table, _, _ in self._pasts)
            n_layers, _, kv_heads, _, head_dim = self._pasts[0][1].shape[1:]
            past = torch.zeros(b, n_layers, 2, kv_heads, width, head_dim, device=dev, dtype=self._pasts[0][1].dtype)
            past_len = torch.zeros(b, dtype=torch.long, device=dev)
            for rows, table, lengths, slot in self._pasts:
                table = torch.nn.functional.pad(table, (0, 0, width - table.shape[4], 0))  # [s, L, 2, kvh, width, hd]
                past = past.index_put((rows,), table[slot])
                past_len = past_len.index_put((rows,), lengths[slot])
            self.past, self.past_len = past.permute(1, 2, 0, 3, 4, 5), past_len  # [L, 2, b, kvh, width, hd]
        self._assembled = {"prefix": len(self._prefixes), "scale": len(self._scales), "past": len(self._pasts), **{site: len(p) for site, p in self._adapters.items()}}
        return self

    def select(self, index: Tensor) -> BatchContext:
        """The context for a later pass over rows `index` [n] (labels, generation steps). The
        prefix is already in the cache/encoder output, so it is not carried over."""
        ctx = BatchContext(index.numel(), self.d_model, self.n_block_sites, self.device, self.dtype)
        if self.hidden_scale is not None:
            ctx.hidden_scale = self.hidden_scale[:, index]
        ctx.adapters = {site: a.select(index) for site, a in self.adapters.items()}
        return ctx


def _merge_adapters(pieces: list[_AdapterPiece], batch_size: int, dtype: torch.dtype) -> AdapterWeights:
    """Stack every writer's table behind a zero slot 0; rows nobody wrote keep slot 0. Writers may
    use different bottlenecks: tables are zero-padded to the widest, and a padded hidden unit is
    ReLU(x·0 + 0)·0 = 0 exactly, so every row computes what its own writer asked for."""
    width = max(p.down.shape[-1] for p in pieces)

    def widen(p: _AdapterPiece) -> list[Tensor]:
        extra = width - p.down.shape[-1]
        pad = torch.nn.functional.pad
        return [pad(p.down, (0, extra)), pad(p.down_bias, (0, extra)), pad(p.up, (0, 0, 0, extra)), p.up_bias]

    tables = [widen(p) for p in pieces]
    zero = [torch.zeros_like(t[:1]) for t in tables[0]]
    slot = torch.zeros(batch_size, dtype=torch.long, device=pieces[0].rows.device)
    offset = 1
    for p in pieces:
        slot = slot.index_put((p.rows,), p.slot + offset)
        offset += p.down.shape[0]
    down, down_bias, up, up_bias = (torch.cat([zero[i]] + [t[i] for t in tables]).to(dtype) for i in range(4))
    return AdapterWeights(down, down_bias, up, up_bias, slot)


def pack_rows(
    prefix: Tensor | None,
    prefix_len: Tensor | None,
    tokens: Tensor,
    token_len: Tensor,
    *,
    left_pad: bool,
    multiple: int = 1,
) -> tuple[Tensor, Tensor]:
    """Lay each row out as [prefix_i ; tokens_i] with padding on one side.

    prefix [b, m, d] with its real rows first (prefix_len [b]); tokens [b, n, d] with its real
    tokens first (token_len [b]). Returns embeds [b, t, d] and mask [b, t] (long), t rounded up to
    `multiple` so shapes fall into buckets. Left padding (decoder-only) puts every row's last real
    token at position t-1; right padding (T5 encoder) starts every row at 0.
    """
    batch, _, d = tokens.shape
    if prefix is None:
        prefix = tokens.new_zeros(batch, 0, d)
        prefix_len = torch.zeros(batch, dtype=torch.long, device=tokens.device)
    m = prefix.shape[1]
    source = torch.cat([prefix, tokens, tokens.new_zeros(batch, 1, d)], dim=1)  # [b, m+n+1, d]; last = pad
    pad_index = source.shape[1] - 1
    total = prefix_len + token_len  # [b]
    t = int(total.max())
    t = -(-t // multiple) * multiple
    pos = torch.arange(t, device=tokens.device).unsqueeze(0)  # [1, t]
    offset = (t - total).unsqueeze(1) if left_pad else torch.zeros_like(total).unsqueeze(1)
    rel = pos - offset  # position within the row's real content, [b, t]
    plen = prefix_len.unsqueeze(1)
    real = (rel >= 0) & (rel < total.unsqueeze(1))
    index = torch.where(rel < plen, rel, m + rel - plen)  # prefix rows, then token rows
    index = torch.where(real, index, torch.full_like(index, pad_index))
    embeds = source.gather(1, index.unsqueeze(-1).expand(batch, t, d))
    return embeds, real.long()
