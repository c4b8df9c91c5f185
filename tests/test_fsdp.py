"""FSDP2: parameters sharded by ``fully_shard`` over 2 CPU processes (gloo, loopback) train
exactly as the same model in one process, with a constant number of collectives per step."""

from __future__ import annotations

import pytest

import converters
from tests import fsdp_worker
from tests.conftest import checkpoint_dir, slow_except

pytestmark = pytest.mark.fsdp

# Rounds of batched all_reduce per step, whatever the number of tensors:
# small_fc_lopt: factored row/column means, the row-column mean of v_row, the feature sums
# of squares; VeLO: mean p^2, the old momentum and rms means, their variances (the LSTM
# inputs), then the same three as small_fc_lopt; MuLO: small_fc_lopt's; Celo: VeLO's
# per-parameter three and mean p^2 (param_scale; its LSTM inputs are global); Celo-Adam:
# none (elementwise).
EXPECTED_COLLECTIVES = {"small_fc_lopt": 3, "velo": 6, "mulo": 3, "celo": 4, "celo_adam": 0}
CHECKPOINTS = {"small_fc_lopt": "small_fc_h32_sm0p01", "velo": "velo_small",
               "mulo": "mulo_h32_sm0p01", "celo": "celo", "celo_adam": "celo_adam"}


@pytest.mark.parametrize("kind", slow_except(sorted(EXPECTED_COLLECTIVES),
                                             lambda kind: kind == "velo"))
def test_fully_sharded_training_matches_one_process(kind, tmp_path):
    weights = str(tmp_path / "w.safetensors")
    converters.convert(checkpoint_dir(CHECKPOINTS[kind])).save(weights)
    result = fsdp_worker.spawn(kind, weights, str(tmp_path))
    # Params after every step within 1e-6 relative of the one-process run (asserted in the
    # workers; sums over shards round differently from one sum, ~1e-7).
    assert result["worst"] <= 1e-6
    assert result["collectives"] == [EXPECTED_COLLECTIVES[kind]] * fsdp_worker.STEPS
