"""Forward hooks that apply a BatchContext inside the frozen backbone.

Installed ONCE when an engine is built (never per request); each hook reads the context of the
batch being run and returns at once when there is none or it carries nothing for its site. Per-row
tensors are gathered once per batch by `BatchContext.assemble()`, so a hook is one fused op:
- block sites: h ← h ∘ (1 + I_m)  == h + h∘I_m (seed 000 eq 3);
- FFN sites:   y ← FFN(LN x) + A(LN x) with per-row adapters as a gathered bmm (seed 003 eq 8);
- feature site: keep the output for PHA's retriever (training).
And the position-wise modules (`Backbone.position_wise`: attention projections, FFNs) of a first
pass with padding run on its real positions only while the runner names them (`ctx.real_positions`):
rows of different lengths in one pass — mixed tasks' templates, few-shot examples — pay for their
padding in attention scores only, not in a layer's products.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager

from torch import Tensor, nn

from server.backbone import Backbone
from server.batch import BatchContext


class ContextHooks:
    """Owns the hooks on one backbone and the context they currently read."""

    def __init__(self, backbone: Backbone) -> None:
        self.ctx: BatchContext | None = None
        self.ffn_sites: list[nn.Module] = backbone.encoder_ffns + backbone.decoder_ffns
        self._handles = [site.register_forward_hook(self._block_hook(i)) for i, site in enumerate(backbone.block_sites)]
        self._handles += [site.register_forward_hook(self._ffn_hook(i)) for i, site in enumerate(self.ffn_sites)]
        self._handles.append(backbone.feature_site.register_forward_hook(self._feature_hook))
        self.position_wise: list[nn.Module] = backbone.position_wise
        for module in self.position_wise:  # an instance attribute over the class's forward; the hooks above still run around it
            module.forward = self._unpadded(module.forward)

    @contextmanager
    def use(self, ctx: BatchContext | None) -> Iterator[BatchContext | None]:
        previous, self.ctx = self.ctx, ctx
        try:
            yield ctx
        finally:
            self.ctx = previous

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []
        for module in self.position_wise:
            module.__dict__.pop("forward", None)

    def _block_hook(self, site: int):
        def hook(module: nn.Module, args: tuple, output: Tensor | tuple) -> Tensor | tuple | None:
            ctx = self.ctx
            if ctx is None or ctx.hidden_scale is None:
                return None
            scale = ctx.hidden_scale[site]  # [batch, 1, d]
            if isinstance(output, tuple):
                return (output[0] * scale, *output[1:])
            return output * scale

        return hook

    def _unpadded(self, forward: Callable[[Tensor], Tensor]) -> Callable[[Tensor], Tensor]:
        def run(x: Tensor) -> Tensor:  # x [b, t, d_in]
            ctx = self.ctx
            if ctx is None or ctx.real_positions is None or tuple(x.shape[:-1]) != ctx.pass_shape:
                return forward(x)
            flat = x.reshape(-1, x.shape[-1])  # [b·t, d_in]
            out = forward(flat[ctx.real_positions])  # [T, d_out]: real positions only
            return out.new_zeros(flat.shape[0], out.shape[-1]).index_copy(0, ctx.real_positions, out).view(*x.shape[:-1], out.shape[-1])  # padding: 0; out's dtype (autocast)

        return run

    def _ffn_hook(self, site: int):
        def hook(module: nn.Module, args: tuple, output: Tensor) -> Tensor | None:
            ctx = self.ctx
            adapter = None if ctx is None else ctx.adapters.get(site)
            if adapter is None:
                return None
            return output + adapter(args[0])

        return hook

    def _feature_hook(self, module: nn.Module, args: tuple, output: Tensor | tuple) -> None:
        ctx = self.ctx
        if ctx is not None and ctx.capture_features:
            ctx.features = output[0] if isinstance(output, tuple) else output
