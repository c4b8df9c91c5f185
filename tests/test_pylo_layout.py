"""pylo's published weights folders: built from the bundled fixtures by the mapping table in
reverse (as pylo's PyTorchModelHubMixin would store them), read back bit for bit."""

from __future__ import annotations

import json
import os

import pytest
import torch
from safetensors.torch import save_file

import converters
from converters import cli
from lopt_port import (
    SmallFCLOpt,
    VeLO,
    WeightsError,
    from_pretrained,
    load_pretrained,
    load_pylo,
    load_weights,
)
from lopt_port import pylo_layout as pl
from lopt_port.provenance import ORIGIN_KEY
from lopt_port.weights import LoadedWeights
from tests.conftest import checkpoint_dir


def _save(folder, tensors: dict[str, torch.Tensor], config: dict) -> None:
    """``PyTorchModelHubMixin.save_pretrained``'s two files: the module's state dict (with
    the ``{"format": "pt"}`` header safetensors' ``save_model`` writes) and its config."""
    os.makedirs(folder, exist_ok=True)
    save_file({k: v.contiguous() for k, v in tensors.items()},
              os.path.join(folder, pl.WEIGHTS_NAME), metadata={"format": "pt"})
    with open(os.path.join(folder, pl.CONFIG_NAME), "w") as f:
        json.dump(config, f)


def _pylo_velo(folder, sd: dict[str, torch.Tensor], **rnn_config) -> str:
    """VeLORNN's and VeLOMLP's folders for a VeLO state dict (ff_hidden_layers = L)."""
    rnn = {pylo: sd[ours] for pylo, ours in pl.VELO_RNN_STATE.items()}
    rnn.update({f"{pylo}.{leaf}": sd[f"{ours}.{leaf}"] for pylo, ours in pl.VELO_RNN_MODULES.items()
                for leaf in ("weight", "bias")})
    hid, width = sd["rnn.input.weight"].shape
    _save(os.path.join(folder, pl.VELO_RNN_DIR), rnn,
          {"input_size": width, "lstm_hidden_size": hid,
           "param_inits": sd["rnn.controls.weight"].shape[0], "mix_layers": True, **rnn_config})
    last = max(int(k[4:]) for k in sd if k.startswith("ff.w") and "__" not in k)
    n = last - 1
    bank = torch.cat([sd[f"ff.w0__{j}"].transpose(1, 2) for j in range(len(pl.VELO_FF_WIDTHS))],
                     dim=2)
    k, h, inputs = bank.shape
    mlp = {"input_weights_": bank, "input_bias_": sd["ff.b0"],
           "output_weights_": sd[f"ff.w{last}"].transpose(1, 2), "output_bias_": sd[f"ff.b{last}"]}
    for i in range(n):
        mlp[f"hidden_weights_.{i}"] = sd[f"ff.w{i + 1}"].transpose(1, 2)
        mlp[f"hidden_bias_.{i}"] = sd[f"ff.b{i + 1}"]
    # pylo's scratch copies hold whatever they last held (randn at construction): ignored.
    gen = torch.Generator().manual_seed(1)
    scratch = {"input_weights": (h, inputs), "input_bias": (h,), "output_weights": (3, h),
               "output_bias": (3,), **{f"hidden_weights.{i}": (h, h) for i in range(n)},
               **{f"hidden_bias.{i}": (h,) for i in range(n)}}
    mlp.update({name: torch.randn(shape, generator=gen) for name, shape in scratch.items()})
    _save(os.path.join(folder, pl.VELO_MLP_DIR), mlp,
          {"param_inits": k, "input_size": inputs, "hidden_size": h, "hidden_layers": n,
           "output_size": 3})
    return str(folder)


def _pylo_meta_mlp(folder, sd: dict[str, torch.Tensor]) -> str:
    n = sum(1 for k in sd if k.startswith("mlp.") and k.endswith(".weight")) - 2
    tensors = {f"{pylo}.{leaf}": sd[f"{ours}.{leaf}"] for pylo, ours in pl.meta_mlp_names(n).items()
               for leaf in ("weight", "bias")}
    hidden, width = sd["mlp.0.weight"].shape
    _save(folder, tensors, {"input_size": width, "hidden_size": hidden, "hidden_layers": n})
    return str(folder)


def _assert_same_tensors(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for name in a:
        assert a[name].dtype == b[name].dtype and torch.equal(a[name], b[name]), name


def _params(seed: int = 0) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    params = [torch.randn(6, 5, generator=gen), torch.randn(5, generator=gen),
              torch.randn(3, 4, 2, generator=gen)]
    for p in params:
        p.grad = torch.randn(p.shape, generator=gen)
    return params


def _loaded(converted: converters.Converted) -> LoadedWeights:
    return LoadedWeights(converted.kind, converted.hparams, converted.state_dict,
                         converted.metadata)


def _one_step(opt: torch.optim.Optimizer, params: list[torch.Tensor]) -> list[torch.Tensor]:
    opt.step(loss=1.5) if opt.requires_loss else opt.step()
    return params


def test_pylo_velo_folders_read_as_the_direct_conversion(tmp_path, capsys):
    direct = converters.convert(checkpoint_dir("velo_small"))
    folder = _pylo_velo(tmp_path / "velo_pylo", direct.state_dict)
    loaded = load_pretrained(folder)
    _assert_same_tensors(loaded.state_dict, direct.state_dict)
    assert loaded.kind == "velo" and loaded.origin == "pylo-copy"
    assert "no upstream provenance" in loaded.origin_note
    assert set(json.loads(loaded.metadata["pylo_files"])) == {"VeLO_RNN/model.safetensors",
                                                              "VeLO_MLP/model.safetensors"}
    out = tmp_path / "velo.safetensors"
    assert cli.main([folder, "-o", str(out)]) == 0
    assert "origin    pylo-copy: converted from pylo's copy" in capsys.readouterr().out
    converted = load_weights(str(out))
    _assert_same_tensors(converted.state_dict, direct.state_dict)
    assert converted.hparams == direct.hparams  # pylo's assumptions are velo_small's bindings
    # One step from either is the direct conversion's, bit for bit.
    for source in (folder, str(out)):
        a, b = _params(), _params()
        opt = from_pretrained(source, a, num_steps=20)
        assert opt.weights_origin == "pylo-copy"
        ref = VeLO(b, _loaded(direct), num_steps=20)
        for p, q in zip(_one_step(opt, a), _one_step(ref, b), strict=True):
            assert torch.equal(p, q)


def test_pylo_meta_mlp_folder_needs_its_kind_and_decay_offsets(tmp_path, capsys):
    direct = converters.convert(checkpoint_dir("small_fc_h32_sm0p01"))
    folder = _pylo_meta_mlp(tmp_path / "mulo_pylo", direct.state_dict)
    offsets = {k: direct.state_dict[k].tolist() for k in pl.PYLO_DECAY_OFFSETS}
    with pytest.raises(WeightsError, match="stores neither its optimizer nor its learned decay"):
        from_pretrained(folder, _params())
    with pytest.raises(WeightsError, match="name the kind, one of small_fc_lopt, mulo"):
        load_pylo(folder, decay_offsets=offsets)
    with pytest.raises(WeightsError, match="holds no learned decay offsets"):
        load_pylo(folder, kind="small_fc_lopt")
    loaded = load_pylo(folder, kind="small_fc_lopt", decay_offsets=offsets)
    _assert_same_tensors(loaded.state_dict, direct.state_dict)
    assert loaded.origin == "pylo-copy"
    assert "decay offsets given at conversion" in loaded.origin_note
    # One step from the pylo folder is the direct conversion's, bit for bit (step_mult=0.01 is
    # both pylo's AdafacLO default and this fixture's).
    a, b = _params(), _params()
    opt_a = from_pretrained(loaded, a)
    opt_b = SmallFCLOpt(b, _loaded(direct))
    assert opt_a.hparams == opt_b.hparams
    for p, q in zip(_one_step(opt_a, a), _one_step(opt_b, b), strict=True):
        assert torch.equal(p, q)
    out = tmp_path / "w.safetensors"
    assert cli.main([folder, "-o", str(out), "--kind", "small_fc_lopt",
                     "--pylo-decay-offsets", json.dumps(offsets)]) == 0
    _assert_same_tensors(load_weights(str(out)).state_dict, direct.state_dict)
    assert cli.main([folder, "-o", str(tmp_path / "p.safetensors"), "--kind", "mulo",
                     "--pylo-decay-offsets", "pylo"]) == 0
    hard = load_weights(str(tmp_path / "p.safetensors"))
    assert hard.kind == "mulo" and hard.metadata[ORIGIN_KEY] == "pylo-copy"
    assert hard.state_dict["rms_decay_offsets"].tolist() == [
        torch.tensor(0.01079706, dtype=torch.float32).item()]
    capsys.readouterr()
    assert cli.main([folder, "-o", str(tmp_path / "x.safetensors"), "--kind", "mulo"]) == 2
    assert "--pylo-decay-offsets pylo" in capsys.readouterr().err


def test_contradicting_or_unsupported_pylo_configs_are_refused(tmp_path):
    sd = converters.convert(checkpoint_dir("velo_small")).state_dict
    wrong = _pylo_velo(tmp_path / "wrong", sd, lstm_hidden_size=512)
    with pytest.raises(WeightsError, match=r"lstm_hidden_size=512 \(the weights imply 32\)"):
        load_pylo(wrong)
    unmixed = _pylo_velo(tmp_path / "unmixed", sd, mix_layers=False)
    with pytest.raises(WeightsError, match="mix_layers=True only"):
        load_pylo(unmixed)
    with pytest.raises(WeightsError, match="no kind or decay offsets apply"):
        load_pylo(_pylo_velo(tmp_path / "ok", sd), kind="mulo")
