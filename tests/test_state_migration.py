"""JAX optimizer-state migration: a run started in JAX (7 steps) continues in PyTorch.

The state after step 7 is serialized with flax (what ``checkpoints.save_state`` writes),
migrated onto torch parameter names (two of them in torch's layout: an ``nn.Linear``-style
transpose and a conv kernel ``[kh, kw, in, out] -> [out, in, kh, kw]``), and steps 8-12 run in
both; params must agree within the parity gate's lockstep tolerance every step.
"""

from __future__ import annotations

import json
import os

import flax.serialization
import jax.numpy as jnp
import numpy as np
import pytest
import torch

import converters
from converters import CheckpointError
from converters.state import MigratedState, migrate_state
from lopt_port import SmallFCLOpt, VeLO
from parity import upstream
from parity.errors import relative
from parity.reference import SmallFCLOptReference, VeLOReference
from parity.tolerances import LOCKSTEP
from tests.conftest import checkpoint_dir

SHAPES = {"dense": (6, 9), "conv": (3, 3, 4, 8), "bias": (9,), "scale": ()}
# torch name -> upstream param (path, permutation into the torch layout)
NAMES = {"fc.weight": {"path": "dense", "permute": [1, 0]},
         "conv.weight": {"path": "conv", "permute": [3, 2, 0, 1]},
         "fc.bias": "bias", "gain": ["scale"]}
PERMS = {"fc.weight": (1, 0), "conv.weight": (3, 2, 0, 1), "fc.bias": (0,), "gain": ()}
UPSTREAM = {"fc.weight": "dense", "conv.weight": "conv", "fc.bias": "bias", "gain": "scale"}
STEPS_JAX, STEPS_TORCH, HORIZON = 7, 5, 40


def _task(seed: int = 3):
    rng = np.random.default_rng(seed)
    params = {k: rng.normal(size=s).astype(np.float32) for k, s in SHAPES.items()}
    grads = [{k: (rng.normal(size=s) * 10.0 ** rng.uniform(-3, 0)).astype(np.float32)
              for k, s in SHAPES.items()} for _ in range(STEPS_JAX + STEPS_TORCH)]
    losses = rng.uniform(0.5, 2.0, size=STEPS_JAX + STEPS_TORCH).astype(np.float32)
    return params, grads, losses


def _torch_layout(name: str, value) -> torch.Tensor:
    return torch.from_numpy(np.transpose(np.asarray(value), PERMS[name]).copy())


def _run_jax(ref, state, params, grads, losses, steps):
    history = []
    for t in steps:
        g = {k: jnp.asarray(v) for k, v in grads[t].items()}
        params, state, _ = ref.step(state, params, g, float(losses[t]))
        history.append(params)
    return params, state, history


def _continue_in_torch(opt_cls, weights, migrated, grads, losses, history, **kwargs):
    params = {name: torch.zeros(_torch_layout(name, np.zeros(SHAPES[UPSTREAM[name]])).shape)
              for name in NAMES}
    named = list(params.items())
    migrated.copy_params_(named)
    opt = opt_cls([p for _, p in named], weights, **kwargs)
    opt.load_state_dict(migrated.optimizer_state_dict(opt, named))
    worst = 0.0
    for i, t in enumerate(range(STEPS_JAX, STEPS_JAX + STEPS_TORCH)):
        before = {n: p.clone() for n, p in named}
        for name, p in named:
            p.grad = _torch_layout(name, grads[t][UPSTREAM[name]])
        opt.step(loss=float(losses[t])) if opt_cls is VeLO else opt.step()
        for name, p in named:
            ref = _torch_layout(name, history[i][UPSTREAM[name]]).numpy()
            err = relative(p.numpy(), ref, before[name].numpy())
            worst = max(worst, err)
            # The gate's lockstep bound for params (float32 roundings of the same operations).
            assert err <= LOCKSTEP["params"], (name, t + 1, err)
    return worst


def _save(tmp_path, tree) -> str:
    path = os.path.join(tmp_path, "state.msgpack")
    with open(path, "wb") as f:
        f.write(flax.serialization.to_bytes(tree))
    return path


@pytest.mark.slow
@pytest.mark.parametrize("fused", [False, True])
def test_small_fc_state_from_the_upstream_package_continues_in_torch(tmp_path, fused):
    ckpt = SmallFCLOptReference.from_checkpoint(checkpoint_dir("small_fc_h32_sm0p01"))
    up = upstream.UpstreamSmallFC(ckpt.theta, ckpt.hparams)
    params0, grads, losses = _task()
    params = {k: jnp.asarray(v) for k, v in params0.items()}
    params, state, _ = _run_jax(up, up.init(params, HORIZON), params, grads, losses,
                                range(STEPS_JAX))
    # The real AdafacMLPLOptState, serialized as save_state writes it.
    path = _save(tmp_path, up._from_dict(state, params))
    _, _, history = _run_jax(up, state, params, grads, losses,
                             range(STEPS_JAX, STEPS_JAX + STEPS_TORCH))
    migrated = migrate_state(path, NAMES)
    assert migrated.kind == "small_fc_lopt" and migrated.iteration == STEPS_JAX
    weights = converters.convert(checkpoint_dir("small_fc_h32_sm0p01"))
    weights_file = str(tmp_path / "w.safetensors")
    weights.save(weights_file)
    _continue_in_torch(SmallFCLOpt, weights_file, migrated, grads, losses, history,
                       variant=up.variant, fused=fused)


@pytest.mark.slow
@pytest.mark.parametrize("fused", [False, True])
def test_velo_state_from_the_jax_reference_continues_in_torch(tmp_path, fused):
    ref = VeLOReference.from_upstream(checkpoint_dir("velo_small"))
    params0, grads, losses = _task(5)
    params = {k: jnp.asarray(v) for k, v in params0.items()}
    params, state, _ = _run_jax(ref, ref.init(params, HORIZON), params, grads, losses,
                                range(STEPS_JAX))
    # hyper_v2.State's fields, with the params and the (absent) model state.
    path = _save(tmp_path, {"params": params, "state": None, **state})
    _, _, history = _run_jax(ref, state, params, grads, losses,
                             range(STEPS_JAX, STEPS_JAX + STEPS_TORCH))
    migrated = migrate_state(path, NAMES, kind="velo")
    assert migrated.global_state["num_steps"] == HORIZON
    saved = str(tmp_path / "migrated.pt")
    migrated.save(saved)
    weights_file = str(tmp_path / "velo.safetensors")
    converters.convert(checkpoint_dir("velo_small")).save(weights_file)
    _continue_in_torch(VeLO, weights_file, MigratedState.load(saved), grads, losses, history,
                       num_steps=HORIZON, fused=fused)


def test_migration_refuses_what_it_cannot_map(tmp_path):
    ref = SmallFCLOptReference.from_checkpoint(checkpoint_dir("small_fc_h32_sm0p01"))
    params0, _, _ = _task()
    params = {k: jnp.asarray(v) for k, v in params0.items()}
    path = _save(tmp_path, {"params": params, "state": None, **ref.init(params, HORIZON)})
    partial = {k: v for k, v in NAMES.items() if k != "gain"}
    with pytest.raises(CheckpointError, match="without a torch name: \\['scale'\\]"):
        migrate_state(path, partial)
    with pytest.raises(CheckpointError, match="small_fc_lopt state, not velo"):
        migrate_state(path, NAMES, kind="velo")
    with pytest.raises(CheckpointError, match="no key 'dense2'"):
        migrate_state(path, {**NAMES, "x": "dense2"})
    with pytest.raises(CheckpointError, match="not a permutation"):
        migrate_state(path, {**NAMES, "fc.weight": {"path": "dense", "permute": [0, 0]}})
    square = {"w": np.ones((5, 5), np.float32)}
    os.makedirs(tmp_path / "sq")
    sq_path = _save(tmp_path / "sq", {"params": square, "state": None,
                                      **ref.init(square, HORIZON)})
    with pytest.raises(CheckpointError, match="would swap roles"):
        migrate_state(sq_path, {"w": {"path": "w", "permute": [1, 0]}})
    migrated = migrate_state(path, NAMES)
    weights_file = str(tmp_path / "w.safetensors")
    converters.convert(checkpoint_dir("small_fc_h32_sm0p01")).save(weights_file)
    opt = SmallFCLOpt([torch.zeros(2, 3)], weights_file)
    with pytest.raises(CheckpointError, match="not among the named parameters"):
        migrated.optimizer_state_dict(opt, [])
    with pytest.raises(CheckpointError, match="migrated shape"):
        migrated.copy_params_([("fc.weight", torch.zeros(6, 9))])


def test_cli_migrates_a_state_file(tmp_path, capsys):
    from converters.cli import main as convert_main

    ref = VeLOReference.from_upstream(checkpoint_dir("velo_small"))
    params = {k: jnp.asarray(v) for k, v in _task()[0].items()}
    path = _save(tmp_path, {"params": params, "state": None, **ref.init(params, HORIZON)})
    names = tmp_path / "names.json"
    names.write_text(json.dumps(NAMES))
    out = str(tmp_path / "migrated.pt")
    assert convert_main([path, "--state", str(names), "-o", out]) == 0
    printed = capsys.readouterr().out
    assert "kind      velo" in printed and "iteration 0" in printed
    migrated = MigratedState.load(out)
    assert sorted(migrated.state) == sorted(NAMES)
    assert tuple(migrated.params["conv.weight"].shape) == (8, 4, 3, 3)
    names.write_text(json.dumps({"fc.weight": "dense"}))
    assert convert_main([path, "--state", str(names), "-o", out, "--force"]) == 2
    assert "without a torch name" in capsys.readouterr().err
