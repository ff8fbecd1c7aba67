"""The torch backend on a CPU: every target step after the prefill runs CPU_WIDTH rows, its linears weight-major."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from mtpkit.model import layers
from mtpkit.model.layers import linear, weight_major
from mtpkit.runtime.torch_backend import CPU_WIDTH, TorchBackend
from tests.conftest import tiny_drafter, tiny_target


def test_weight_major_linear_is_the_same_product_and_only_inside_its_block():
    x, w = torch.randn(2, 3, 40), torch.randn(24, 40)
    with weight_major():
        got = linear(x, w)
    assert got.shape == (2, 3, 24)
    torch.testing.assert_close(got, F.linear(x, w), rtol=1e-5, atol=1e-5)
    with pytest.raises(RuntimeError), weight_major():
        raise RuntimeError
    assert layers._weight_major is False  # restored after an exception too


@pytest.mark.parametrize("n", [1, 3, CPU_WIDTH, CPU_WIDTH + 3, 2 * CPU_WIDTH + 1])
def test_a_verify_row_is_bitwise_a_plain_step(n):
    """Verify n tokens (in steps of CPU_WIDTH rows, the last padded), then the same tokens one plain step each:
    logits and hidden equal bit for bit, the cache as long, so greedy speculative output equals plain exactly."""
    target = tiny_target(3)
    be = TorchBackend(target, tiny_drafter(target, 3), max_len=96, max_draft=2 * CPU_WIDTH)
    assert be.width == CPU_WIDTH and not be.cuda_graphs
    prompt, more = [2, 30, 31, 32, 7], [40 + i for i in range(n)]
    be.start(prompt)
    lv, hv = be.verify(be.ops.tokens(more))
    assert lv.shape[0] == hv.shape[0] == n and be.length == len(prompt) + n
    be.rollback(len(prompt))
    rows = [be.verify(be.ops.tokens([t])) for t in more]
    assert torch.equal(lv, torch.cat([r[0] for r in rows])) and torch.equal(hv, torch.cat([r[1] for r in rows]))
    assert be.length == len(prompt) + n
