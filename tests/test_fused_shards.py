"""The torch side of the sharded fused path (``lopt_port/fused_shards.py``) against the kernels'
own finishing, on whole tensors (no process group: nothing to complete), so that a sharded
step differs from one process only by the order of its sums over the ranks."""

from __future__ import annotations

import math

import torch

from lopt_port import extension
from lopt_port.constants import VELO_GRAD_CLIP
from lopt_port.fused_shards import LocalStep, finish_factored, velo_stats
from lopt_port.small_fc_lopt_fused import state_lists
from lopt_port.state_layout import factored_dims, factored_state_shapes

# Factored axes of every kind (d0 or d1 on axis 0, neither), a vector, a scalar.
SHAPES = [(37, 20), (20, 37), (3, 50, 41), (6, 5, 4, 3), (300,), ()]
K = 3
DECAYS = torch.tensor([0.5, 0.9, 0.99, 0.999, 0.1, 0.5, 0.9], dtype=torch.float32)


def _tensors(seed: int) -> tuple[list, list, list]:
    """Parameters, gradients and a state three steps old (every accumulator non-zero)."""
    g = torch.Generator().manual_seed(seed)
    params = [torch.randn(s, generator=g) for s in SHAPES]
    grads = [torch.randn(s, generator=g) * 0.1 for s in SHAPES]
    states = []
    for p in params:
        dims = factored_dims(p.shape, "stable")
        s = {"momentum": torch.randn((*p.shape, K), generator=g),
             "rms": torch.rand((*p.shape, 1), generator=g),
             "factored_dims": dims or ()}
        for name, shape in factored_state_shapes(p.shape, dims, K).items():
            s[name] = torch.rand(shape, generator=g) + 0.1
        states.append(s)
    return params, grads, states


def _clone(states: list) -> list:
    return [{k: v.clone() if isinstance(v, torch.Tensor) else v for k, v in s.items()}
            for s in states]


def test_factored_finish_matches_the_kernels():
    """``factored_sums`` then :func:`finish_factored` against the kernels' own phase 1
    (``small_fc_reduce``): the moving averages bit for bit (the same fma on the same sums);
    the row factors within 1 ulp (the row-column mean's float64 sum runs in another order,
    which its rounding to float32 almost always hides), the column factors bit for bit."""
    ops = extension.ops()
    params, grads, states = _tensors(0)
    kernel_states = _clone(states)
    kernel = state_lists(params, kernel_states, grads)
    ops.small_fc_reduce(*kernel, DECAYS)
    step = LocalStep.of(params, grads, states)
    ours = state_lists(step.params, step.states, step.grads)
    finish_factored(step, ops, ours, DECAYS, [0.0] * len(params), math.inf)
    for i, s in enumerate(states):
        if not s["factored_dims"]:
            continue
        for name in ("v_row", "v_col"):
            assert torch.equal(s[name], kernel_states[i][name]), (SHAPES[i], name)
        assert torch.equal(ours[8][i], kernel[8][i]), (SHAPES[i], "col_factor")
        ulps = (ours[7][i].view(torch.int32) - kernel[7][i].view(torch.int32)).abs().max()
        assert int(ulps) <= 1, (SHAPES[i], "row_factor", int(ulps))


def test_velo_stats_match_the_kernels():
    """:func:`velo_stats` from ``velo_accumulate``'s raw sums (its sharded mode) against the
    statistics the kernel forms itself, and the sums of squares against its sumsq: bit for
    bit (the same float64 operations in the same order, one cast)."""
    ops = extension.ops()
    params, grads, states = _tensors(1)
    whole, sharded = _clone(states), _clone(states)
    # Weight decay on the tensors that are not factored: the factored statistics below come
    # from small_fc_reduce, which takes none (gradients within the clip: none applies).
    wd = [0.0, 0.0, 0.0, 0.0, 0.01, 0.1]
    stats, sumsq, _ = ops.velo_accumulate(*state_lists(params, whole, grads), DECAYS, wd,
                                          VELO_GRAD_CLIP, False)
    # The sharded mode expects this step's factored statistics formed: by the kernels here.
    lists = state_lists(params, sharded, grads)
    ops.small_fc_reduce(*lists, DECAYS)
    _, _, sums = ops.velo_accumulate(*lists, DECAYS, wd, VELO_GRAD_CLIP, True)
    moments = 3 + 2 * K
    counts = [p.numel() for p in params]
    assert torch.equal(velo_stats(sums[:, :moments], counts, K), stats)
    assert torch.equal(sums[:, moments:].to(torch.float32), sumsq)
