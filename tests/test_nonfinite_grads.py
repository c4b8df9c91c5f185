"""Non-finite gradients: the optimizers do what upstream does, and ``GradScaler`` keeps them
out of mixed-precision training (issue 19, item 4; docs/optimizers.md, "Non-finite
gradients").

Upstream has no guard: one NaN element of a gradient reaches every element of that tensor
(its factored second moments and its features' normalizers are NaN), and small_fc_lopt turns
one ``+inf`` or ``-inf`` into NaN as well; μLO's ``nan_to_num`` makes a NaN 0 but an infinity
float32's largest value, which its global-norm clip turns into NaN; VeLO and Celo clip
gradients to ``[-1000, 1000]`` first, so infinities stay finite, while NaN passes the clip and
reaches the whole tensor and, through VeLO's per-tensor LSTM, other tensors a step later.
Each case runs against upstream's own code (small_fc_lopt: the 2022 wheel) or the JAX
references (MuLO, VeLO, Celo): which elements are NaN, and the finite values, must agree.
"""

from __future__ import annotations

import io
import warnings

import jax.numpy as jnp
import numpy as np
import pytest
import torch

from parity.errors import relative
from parity.harness import HarnessError, build_sides
from parity.tolerances import LOCKSTEP
from tests.conftest import checkpoint_dir
from tests.test_optimizer_conventions import OPTIMIZERS

pytestmark = pytest.mark.slow

SOURCES = {"small_fc_lopt": ("small_fc_h32_sm0p01", "upstream"),
           "mulo": ("mulo_h32_sm0p01", "builtin"), "velo": ("velo_small", "builtin"),
           "celo": ("celo", "builtin")}
STEPS = 3


@pytest.fixture(scope="module", params=sorted(SOURCES))
def sides(request):
    name, reference = SOURCES[request.param]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            return build_sides(checkpoint_dir(name), reference=reference)
        except HarnessError as e:
            pytest.skip(f"the {reference} reference is unavailable here: {e}")


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf], ids=["nan", "+inf", "-inf"])
def test_non_finite_gradients_as_upstream(sides, bad):
    rng = np.random.default_rng(0)
    params = {"w": rng.standard_normal((8, 6)).astype(np.float32),
              "b": rng.standard_normal((5,)).astype(np.float32)}
    grads = [{k: rng.standard_normal(v.shape).astype(np.float32) for k, v in params.items()}
             for _ in range(STEPS)]
    grads[0]["w"][2, 3] = bad  # one element, in the first step only
    ref, ref_params = sides.reference, {k: jnp.asarray(v) for k, v in params.items()}
    ref_state = ref.init(ref_params, 50)
    tensors = {k: torch.tensor(v) for k, v in params.items()}
    opt = sides.make_torch(list(tensors.values()), 50)
    for t in range(STEPS):
        ref_params, ref_state = ref.step(ref_state, ref_params,
                                         {k: jnp.asarray(v) for k, v in grads[t].items()},
                                         1.0)[:2]
        for k, p in tensors.items():
            p.grad = torch.tensor(grads[t][k])
        opt.step(loss=1.0)
        for k, p in tensors.items():
            ours, theirs = p.numpy(), np.asarray(ref_params[k])
            assert np.array_equal(np.isnan(ours), np.isnan(theirs)), (t, k)
            assert np.isfinite(ours[~np.isnan(ours)]).all()
            finite = ~np.isnan(theirs)
            if finite.any():
                # the parity gate's bound for parameters after a step (parity/tolerances.py)
                assert relative(ours[finite], theirs[finite]) <= LOCKSTEP["params"], (t, k)


def _state_bytes(opt):
    buffer = io.BytesIO()
    torch.save(opt.state_dict(), buffer)
    return buffer.getvalue()


@pytest.mark.parametrize("name", ["small_fc_lopt-eager", "small_fc_lopt-fused", "velo-eager",
                                  "velo-fused", "celo-eager", "celo_adam-eager", "mulo-eager"])
def test_grad_scaler_skips_a_step_with_non_finite_gradients(name):
    """``GradScaler`` finds the inf, skips ``step()`` (parameters and optimizer state
    untouched) and halves its scale; the run then goes on bit for bit as if that batch had not
    been (scales are powers of two, so scaling and unscaling are exact), the skipped batch's
    observed loss retired by the next ``zero_grad()``."""
    make = OPTIMIZERS[name]
    runs = []
    for with_bad_batch in (True, False):
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(6, 5), torch.nn.Tanh(), torch.nn.Linear(5, 1))
        opt = make(model.parameters())
        scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 10)
        data = torch.Generator().manual_seed(1)
        for i in range(4):
            x = torch.randn(8, 6, generator=data)
            if i == 1 and not with_bad_batch:
                continue
            loss = model(x).pow(2).mean()
            opt.zero_grad()
            opt.observe_loss(loss)
            scaler.scale(loss).backward()
            if i == 1:
                model[0].weight.grad[0, 0] = float("inf")  # an overflow in half precision
                params, state = [p.detach().clone() for p in model.parameters()], _state_bytes(opt)
            scaler.step(opt)
            scaler.update()
            if i == 1:
                assert scaler.get_scale() == 2.0 ** 9  # found the inf: skipped, scale halved
                for p, q in zip(model.parameters(), params, strict=True):
                    assert torch.equal(p, q)
                assert _state_bytes(opt) == state
        runs.append([p.detach().clone() for p in model.parameters()])
    for x, y in zip(*runs, strict=True):
        assert torch.equal(x, y)
