"""pack_rows lays rows out exactly; BatchContext leaves untouched rows at the identity."""

from __future__ import annotations

import torch

from server.batch import BatchContext, pack_rows


def test_pack_rows_left_and_right() -> None:
    d = 2
    prefix = torch.arange(2 * 3 * d, dtype=torch.float32).view(2, 3, d) + 100  # row 0 uses 3, row 1 uses 1
    prefix_len = torch.tensor([3, 1])
    tokens = torch.arange(2 * 4 * d, dtype=torch.float32).view(2, 4, d)  # row 0 uses 2, row 1 uses 4
    token_len = torch.tensor([2, 4])
    for left in (True, False):
        embeds, mask = pack_rows(prefix, prefix_len, tokens, token_len, left_pad=left, multiple=4)
        assert embeds.shape == (2, 8, d)  # 5 real positions rounded up to a multiple of 4
        for row in range(2):
            want = torch.cat([prefix[row, : prefix_len[row]], tokens[row, : token_len[row]]])
            n = len(want)
            got = embeds[row, -n:] if left else embeds[row, :n]
            assert torch.equal(got, want)
            real = mask[row].bool()
            assert real.sum() == n and torch.equal(embeds[row][real], want)
            assert torch.all(embeds[row][~real] == 0)


def test_untouched_rows_keep_identity() -> None:
    ctx = BatchContext(3, 4, 2, torch.device("cpu"), torch.float32)
    ctx.add_prefix(torch.tensor([1]), torch.ones(1, 5, 4))
    ctx.add_hidden_scale(torch.tensor([2]), torch.full((1, 2, 4), 0.5))
    ctx.add_adapters([0], torch.tensor([0]), torch.tensor([0]), torch.ones(1, 1, 4, 3), torch.ones(1, 1, 3), torch.ones(1, 1, 3, 4), torch.ones(1, 1, 4))
    ctx.assemble()
    assert ctx.prefix_len.tolist() == [0, 5, 0]
    assert torch.all(ctx.hidden_scale[:, [0, 1]] == 1) and torch.all(ctx.hidden_scale[:, 2] == 1.5)
    adapter = ctx.adapters[0]
    assert adapter.slot.tolist() == [1, 0, 0]
    out = adapter(torch.ones(3, 2, 4))
    assert torch.all(out[1:] == 0) and torch.all(out[0] == 16)  # ReLU(4·1 + 1) = 5 per unit; 3·5 + 1


def test_adapters_of_different_bottlenecks_share_a_site_exactly() -> None:
    """Two methods may write adapters of different widths on one FFN site (e.g. PHA's and a
    plugin's): each row gets exactly its own writer's A(x), rows nobody wrote get 0."""
    torch.manual_seed(0)
    d = 6
    ctx = BatchContext(4, d, 1, torch.device("cpu"), torch.float32)
    tables = {}
    for rows, width in (([0, 2], 2), ([1], 5)):
        down, down_bias, up, up_bias = torch.randn(1, 1, d, width), torch.randn(1, 1, width), torch.randn(1, 1, width, d), torch.randn(1, 1, d)
        ctx.add_adapters([0], torch.tensor(rows), torch.zeros(len(rows), dtype=torch.long), down, down_bias, up, up_bias)
        tables[tuple(rows)] = (down[0, 0], down_bias[0, 0], up[0, 0], up_bias[0, 0])
    x = torch.randn(4, 3, d)  # [batch, seq, d]
    out = ctx.assemble().adapters[0](x)
    for rows, (down, down_bias, up, up_bias) in tables.items():
        for r in rows:
            want = torch.relu(x[r] @ down + down_bias) @ up + up_bias
            assert torch.allclose(out[r], want, atol=1e-6)
    assert torch.equal(out[3], torch.zeros(3, d))
