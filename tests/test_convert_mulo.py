"""μLO checkpoints: the pickle release format (read without unpickling arbitrary objects),
msgpack + config.gin, PyLO's layout, and the round trips through lopt-convert."""

from __future__ import annotations

import os
import pickle

import haiku as hk
import jax.numpy as jnp
import numpy as np
import pytest
import torch

import converters
from converters import cli, mulo
from converters.flax_msgpack import flatten
from lopt_port import MuLO
from tests.conftest import checkpoint_dir

SRC = checkpoint_dir("mulo_h32_sm0p01")
HPARAMS = {"step_mult": 0.01}


@pytest.fixture(scope="module")
def theta():
    return converters.convert(SRC).upstream_tree()["params"]


def _jax_tree(node):
    if isinstance(node, dict):
        return {k: _jax_tree(v) for k, v in node.items()}
    return jnp.asarray(node)


def _same_leaves(a, b):
    fa, fb = flatten(a), flatten(b)
    return set(fa) == set(fb) and all(np.array_equal(np.asarray(fa[k]), fb[k]) for k in fa)


@pytest.mark.parametrize("protocol", [2, 4, 5])
def test_reads_a_pickle_of_jax_arrays(tmp_path, theta, protocol):
    path = tmp_path / "global_step1500.pickle"
    path.write_bytes(pickle.dumps(_jax_tree(theta), protocol=protocol))
    read, _ = mulo.read_pickle(path)
    assert _same_leaves(read, theta)
    conv = converters.convert(path, upstream_defaults=True, **HPARAMS)
    assert conv.kind == "mulo" and conv.metadata["upstream_step"] == "1500"
    assert conv.metadata["source_file"] == "global_step1500.pickle"
    reference = converters.convert(SRC)
    assert all(torch.equal(conv.state_dict[k], v) for k, v in reference.state_dict.items())


def test_reads_haiku_flatmaps(tmp_path, theta):
    """Older haiku returned FlatMaps, which pickle as haiku's FlatMapping."""
    path = tmp_path / "global_step1.pickle"
    flat = hk.data_structures.to_immutable_dict({"~": {"w": jnp.ones(2)}})
    path.write_bytes(pickle.dumps({**_jax_tree(theta), "nn": flat}))
    read, _ = mulo.read_pickle(path)
    assert np.array_equal(read["nn"]["~"]["w"], np.ones(2, np.float32))


def test_a_malicious_pickle_is_refused_unexecuted(tmp_path):
    marker = tmp_path / "executed"

    class Payload:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    path = tmp_path / "global_step1.pickle"
    path.write_bytes(pickle.dumps({"momentum_decays": Payload()}))
    with pytest.raises(converters.CheckpointError, match=r"system.*refused"):
        converters.convert(path, upstream_defaults=True, **HPARAMS)
    assert not marker.exists()
    path.write_bytes(pickle.dumps({"a": np.array([object()], dtype=object)}))
    with pytest.raises(converters.CheckpointError, match="refused"):
        mulo.read_pickle(path)


def test_step_mult_is_never_defaulted(tmp_path, theta):
    path = tmp_path / "global_step1.pickle"
    path.write_bytes(mulo.pickle_bytes(theta))
    with pytest.raises(converters.CheckpointError, match=r"0\.01"):
        converters.convert(path, upstream_defaults=True)


def test_round_trips(tmp_path, theta):
    src = tmp_path / "global_step3.pickle"
    src.write_bytes(mulo.pickle_bytes(theta))
    assert _same_leaves(pickle.loads(src.read_bytes()), theta)  # jax.Arrays where jax is
    conv = converters.convert(src, upstream_defaults=True, **HPARAMS)
    st = tmp_path / "mulo.safetensors"
    conv.save(st)
    again = converters.convert(st)
    assert again.kind == "mulo" and again.hparams == conv.hparams
    again.save(tmp_path / "back.pickle", "pickle")
    assert (tmp_path / "back.pickle").read_bytes() == src.read_bytes()
    again.save(tmp_path / "up", "upstream")
    assert "@MuAdafacMLPLOpt()" in (tmp_path / "up" / "config.gin").read_text()
    from_folder = converters.convert(tmp_path / "up")
    assert from_folder.kind == "mulo" and from_folder.hparams == conv.hparams
    assert all(torch.equal(from_folder.state_dict[k], v) for k, v in conv.state_dict.items())
    opt = MuLO([torch.zeros(3)], st, default_scale=1.0)
    assert opt.hparams["step_mult"] == 0.01
    with pytest.raises(converters.CheckpointError, match="pickle"):
        converters.convert(checkpoint_dir("small_fc_h32_sm0p01")).save(tmp_path / "x.pickle",
                                                                        "pickle")


def test_cli(tmp_path, theta, capsys):
    src = tmp_path / "global_step9.pickle"
    src.write_bytes(mulo.pickle_bytes(theta))
    out = tmp_path / "m.safetensors"
    assert cli.main([str(src), "-o", str(out), "--upstream-defaults", "--set",
                     "step_mult=0.01"]) == 0
    assert "kind      mulo" in capsys.readouterr().out
    assert cli.main([str(out), "-o", str(tmp_path / "m.pickle"), "--format", "pickle"]) == 0
    assert cli.main([str(src), "-o", str(tmp_path / "n.safetensors")]) == 2
    assert "step_mult" in capsys.readouterr().err


def test_pylo_layout_needs_explicit_decays(theta):
    ours = converters.convert(SRC).state_dict
    pylo = {f"network.{n}.{w}": ours[f"mlp.{i}.{w}"]
            for i, n in enumerate(("input", "linear_0", "output")) for w in ("weight", "bias")}
    with pytest.raises(converters.CheckpointError, match="no decay offsets"):
        mulo.from_pylo_state_dict(pylo)
    decays = {k: theta[k] for k in ("momentum_decays", "rms_decays", "adafactor_decays")}
    sd = mulo.from_pylo_state_dict(pylo, decay_offsets=decays)
    assert all(np.array_equal(sd[k], v.numpy()) for k, v in ours.items())
    hard = mulo.from_pylo_state_dict(pylo, use_pylo_decay_offsets=True)
    assert hard["rms_decay_offsets"].tolist() == [np.float32(0.01079706)]
