"""FSDP2: parameters sharded by ``fully_shard`` over 2 or 4 CPU processes (gloo, loopback)
train as the same model in one process, on the eager and on the fused path, with a constant
number of collectives per step; a run resumed from its sharded state is bit-exact."""

from __future__ import annotations

import pytest

import converters
from tests import fsdp_worker
from tests.conftest import checkpoint_dir, needs_emulation, slow_except

pytestmark = pytest.mark.fsdp

# Rounds of batched all_reduce per step, whatever the number of tensors. Eager:
# small_fc_lopt: factored row/column means, the row-column mean of v_row, the feature sums
# of squares; VeLO: mean p^2, the old momentum and rms means, their variances (the LSTM
# inputs), then the same three as small_fc_lopt; MuLO: its global-norm clip, then
# small_fc_lopt's; Celo: VeLO's per-parameter three and mean p^2 (param_scale; its LSTM
# inputs are global); Celo-Adam: none (elementwise).
EXPECTED_COLLECTIVES = {"small_fc_lopt": 3, "velo": 6, "mulo": 4, "celo": 4, "celo_adam": 0}
# Fused (lopt_port/fused_shards.py): the factored means, the row-column means, and the
# kernels' per-tensor sums (VeLO's and Celo's moments with the feature sums of squares in the
# same round, so mean p^2 needs none of its own); MuLO's clip one more; Celo-Adam none.
EXPECTED_FUSED = {"small_fc_lopt": 3, "velo": 3, "mulo": 4, "celo": 3, "celo_adam": 0}
CHECKPOINTS = {"small_fc_lopt": "small_fc_h32_sm0p01", "velo": "velo_small",
               "mulo": "mulo_h32_sm0p01", "celo": "celo", "celo_adam": "celo_adam"}
# Params after every step against the one-process run on the same path, relative to the
# tensor's largest value. float32: sums over shards round differently from one sum (each
# rank's share, then the ranks), ~1e-7 of a statistic, which moves a step by as much.
FLOAT32_BOUND = 1e-6
# bfloat16: the step is the float32 one within ~1e-7, but a value that lands within that of
# a rounding boundary of bfloat16 (8 bits) rounds the other way: one bfloat16 ulp, 2^-8 of
# the value, which the later steps carry on (each such flip changes that element's features).
BFLOAT16_BOUND = 2.0 ** -6


def _weights(kind: str, tmp_path) -> str:
    weights = str(tmp_path / "w.safetensors")
    converters.convert(checkpoint_dir(CHECKPOINTS[kind])).save(weights)
    return weights


@pytest.mark.parametrize("kind", slow_except(sorted(EXPECTED_COLLECTIVES),
                                             lambda kind: kind == "velo"))
def test_fully_sharded_training_matches_one_process(kind, tmp_path):
    result = fsdp_worker.spawn(kind, _weights(kind, tmp_path), str(tmp_path),
                               tolerance=FLOAT32_BOUND)
    assert result["worst"] <= FLOAT32_BOUND
    assert result["collectives"] == [EXPECTED_COLLECTIVES[kind]] * fsdp_worker.STEPS


@pytest.mark.parametrize("kind_dtype", slow_except(
    [(kind, dtype) for kind in sorted(EXPECTED_FUSED) for dtype in ("float32", "bfloat16")],
    lambda case: case == ("velo", "float32")), ids=lambda case: "-".join(case))
def test_fused_sharded_training_matches_one_process(kind_dtype, tmp_path):
    kind, dtype = kind_dtype
    bound = FLOAT32_BOUND if dtype == "float32" else BFLOAT16_BOUND
    result = fsdp_worker.spawn(kind, _weights(kind, tmp_path), str(tmp_path), fused=True,
                               dtype=dtype, tolerance=bound)
    assert result["ops"] == "lopt_port"
    assert result["worst"] <= bound
    assert result["collectives"] == [EXPECTED_FUSED[kind]] * fsdp_worker.STEPS


@pytest.mark.slow
def test_fused_velo_on_four_ranks(tmp_path):
    """4 ranks: the (5, 12) and (1, 5) parameters leave empty shards on 1 and 3 ranks."""
    result = fsdp_worker.spawn("velo", _weights("velo", tmp_path), str(tmp_path), world=4,
                               fused=True, tolerance=FLOAT32_BOUND)
    assert result["worst"] <= FLOAT32_BOUND
    assert result["collectives"] == [EXPECTED_FUSED["velo"]] * fsdp_worker.STEPS


@needs_emulation
@pytest.mark.emulated
@pytest.mark.parametrize("kind", slow_except(["small_fc_lopt", "velo"],
                                             lambda kind: kind == "velo"))
def test_fused_sharded_training_on_the_emulated_cuda_kernels(kind, tmp_path, monkeypatch):
    """The same run with every fused op on the emulated CUDA backend (the CUDA kernels'
    sources, run on the CPU): the launchers take local shards, empty ones excluded."""
    monkeypatch.setenv("LOPT_PORT_FUSED_BACKEND", "cuda-emulated")
    result = fsdp_worker.spawn(kind, _weights(kind, tmp_path), str(tmp_path), fused=True,
                               tolerance=FLOAT32_BOUND)
    assert result["ops"] == "lopt_port_emulated"
    assert result["worst"] <= FLOAT32_BOUND
    assert result["collectives"] == [EXPECTED_FUSED[kind]] * fsdp_worker.STEPS


def test_other_layouts_are_refused_by_name(tmp_path):
    """A DTensor split along axis 1 (tensor parallelism's layout) on a 1-D mesh: fused=True
    refuses it naming the layout, and the eager path raises ValueError naming it."""
    import torch
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard, distribute_tensor

    from lopt_port import SmallFCLOpt

    weights = _weights("small_fc_lopt", tmp_path)
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'init'}", rank=0,
                            world_size=1)
    try:
        mesh = init_device_mesh("cpu", (1,))
        p = torch.nn.Parameter(distribute_tensor(torch.randn(4, 6), mesh, [Shard(1)]))
        p.grad = distribute_tensor(torch.randn(4, 6), mesh, [Shard(1)])
        with pytest.raises(RuntimeError, match=r"fused=True, but .*Shard\(dim=1\).*no tensor "
                                               r"parallelism"):
            SmallFCLOpt([p], weights, fused=True).step()
        with pytest.raises(ValueError, match=r"Shard\(0\) or Replicate\(\)"):
            SmallFCLOpt([p], weights, fused=False).step()
    finally:
        dist.destroy_process_group()
