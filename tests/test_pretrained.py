"""One-line loading: from_pretrained over converted files, pretrained folders and hub ids."""

from __future__ import annotations

import json
import os
import sys
import types

import pytest
import torch

import converters
from converters.cli import main as convert_main
from lopt_port import (
    Celo,
    CeloAdam,
    MuLO,
    SmallFCLOpt,
    VeLO,
    WeightsError,
    from_pretrained,
    load_pretrained,
)
from lopt_port.weights import CONFIG_NAME, WEIGHTS_NAME, load_weights, safetensors_bytes
from tests.conftest import checkpoint_dir

CHECKPOINTS = {"small_fc_lopt": "small_fc_h32_sm0p01", "velo": "velo_small",
               "mulo": "mulo_h32_sm0p01", "celo": "celo", "celo_adam": "celo_adam"}
CLASSES = {"small_fc_lopt": SmallFCLOpt, "velo": VeLO, "mulo": MuLO, "celo": Celo,
           "celo_adam": CeloAdam}
KWARGS = {"small_fc_lopt": {}, "velo": {"num_steps": 20}, "mulo": {"default_scale": 0.5},
          "celo": {"num_steps": 20}, "celo_adam": {"num_steps": 20}}


def _params(seed: int = 0) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    params = [torch.randn(5, 7, generator=gen), torch.randn(4, generator=gen)]
    for p in params:
        p.grad = torch.randn(p.shape, generator=gen)
    return params


def _step(opt: torch.optim.Optimizer) -> None:
    if opt.requires_loss:
        opt.step(loss=1.0)
    else:
        opt.step()


def _write_layouts(kind: str, tmp_path) -> tuple[str, str]:
    converted = converters.convert(checkpoint_dir(CHECKPOINTS[kind]))
    single = str(tmp_path / f"{kind}.safetensors")
    folder = str(tmp_path / f"{kind}_hf")
    converted.save(single)
    converted.save(folder, "hf")
    return single, folder


@pytest.mark.parametrize("kind", sorted(CHECKPOINTS))
def test_from_pretrained_picks_the_class_and_round_trips_both_layouts(kind, tmp_path):
    single, folder = _write_layouts(kind, tmp_path)
    assert sorted(os.listdir(folder)) == [CONFIG_NAME, WEIGHTS_NAME]
    a, b = load_pretrained(single), load_pretrained(folder)
    assert a.kind == b.kind == kind
    assert a.hparams == b.hparams and a.metadata == b.metadata
    assert a.state_dict.keys() == b.state_dict.keys()
    for name in a.state_dict:
        assert torch.equal(a.state_dict[name], b.state_dict[name]), name
    # The folder converts back to the single file byte for byte.
    again = str(tmp_path / "again.safetensors")
    converters.convert(folder).save(again)
    with open(single, "rb") as f, open(again, "rb") as g:
        assert f.read() == g.read()
    # Both layouts build the same optimizer, which steps exactly as the class built by hand.
    results = []
    for source in (single, folder, None):
        params = _params()
        opt = (CLASSES[kind](params, single, **KWARGS[kind]) if source is None
               else from_pretrained(source, params, **KWARGS[kind]))
        assert type(opt) is CLASSES[kind]
        _step(opt)
        results.append(params)
    for other in results[1:]:
        for p, q in zip(results[0], other, strict=True):
            # exact: the same weights and hyperparameters run the same float32 operations
            torch.testing.assert_close(p, q, rtol=0, atol=0)


def test_from_pretrained_passes_constructor_arguments(tmp_path):
    single, _ = _write_layouts("small_fc_lopt", tmp_path)
    opt = from_pretrained(single, _params(), lr=0.5, fused=False)
    assert opt.param_groups[0]["lr"] == 0.5 and opt.fused is False
    velo_single, _ = _write_layouts("velo", tmp_path / "v")
    with pytest.raises(TypeError, match="num_steps"):  # VeLO's horizon has no default
        from_pretrained(velo_single, _params())


def _edit_config(folder: str, **changes) -> None:
    path = os.path.join(folder, CONFIG_NAME)
    with open(path) as f:
        config = json.load(f)
    config.update(changes)
    with open(path, "w") as f:
        json.dump(config, f)


def test_unknown_metadata_version_fails_clearly(tmp_path):
    _, folder = _write_layouts("small_fc_lopt", tmp_path)
    _edit_config(folder, format_version="2")
    with pytest.raises(WeightsError, match=r"format_version '2' is not supported"):
        from_pretrained(folder, _params())
    converted = converters.convert(checkpoint_dir(CHECKPOINTS["small_fc_lopt"]))
    converted.metadata["format_version"] = "99"
    single = str(tmp_path / "future.safetensors")
    converted.save(single)
    with pytest.raises(WeightsError, match=r"format_version '99' is not supported"):
        from_pretrained(single, _params())


def test_unknown_kind_and_missing_metadata_fail_clearly(tmp_path):
    _, folder = _write_layouts("small_fc_lopt", tmp_path)
    _edit_config(folder, kind="adam_lopt")
    with pytest.raises(WeightsError, match="'adam_lopt', which this lopt-port does not provide"):
        from_pretrained(folder, _params())
    bare = dict(load_weights(_write_layouts("velo", tmp_path / "v")[0]).state_dict)
    with pytest.raises(WeightsError, match="no lopt-port metadata"):
        from_pretrained(bare, _params())


def test_broken_pretrained_folders_fail_clearly(tmp_path):
    _, folder = _write_layouts("small_fc_lopt", tmp_path)
    os.remove(os.path.join(folder, WEIGHTS_NAME))
    with pytest.raises(WeightsError, match=r"needs model\.safetensors"):
        load_pretrained(folder)
    with open(os.path.join(folder, CONFIG_NAME), "w") as f:
        f.write("{not json")
    with pytest.raises(WeightsError, match="not a readable JSON file"):
        load_pretrained(folder)
    with open(os.path.join(folder, CONFIG_NAME), "w") as f:
        json.dump({"format": "lopt-port-weights", "hparams": "a string"}, f)
    with pytest.raises(WeightsError, match="'hparams' must be a JSON object"):
        load_pretrained(folder)


def test_hub_ids_need_huggingface_hub(monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setitem(sys.modules, "huggingface_hub", None)  # import raises ImportError
    with pytest.raises(WeightsError, match="install huggingface_hub"):
        load_pretrained("someone/velo-weights")


def test_hub_ids_download_the_pretrained_folder(monkeypatch, tmp_path):
    _, folder = _write_layouts("velo", tmp_path)
    monkeypatch.chdir(tmp_path)
    calls = []

    def snapshot_download(repo_id, revision=None, allow_patterns=None):
        calls.append((repo_id, revision, tuple(allow_patterns)))
        if repo_id == "offline/repo":
            raise ConnectionError("no network")
        return folder

    fake = types.ModuleType("huggingface_hub")
    fake.snapshot_download = snapshot_download
    monkeypatch.setitem(sys.modules, "huggingface_hub", fake)
    opt = from_pretrained("someone/velo-weights@v1", _params(), num_steps=20)
    assert type(opt) is VeLO
    assert calls == [("someone/velo-weights", "v1", (CONFIG_NAME, WEIGHTS_NAME))]
    with pytest.raises(WeightsError, match=r"could not download.*ConnectionError: no network"):
        load_pretrained("offline/repo")


def test_cli_writes_a_pretrained_folder(tmp_path, capsys):
    out = str(tmp_path / "velo_hf")
    assert convert_main([checkpoint_dir("velo_small"), "--format", "hf", "-o", out]) == 0
    assert "config.json" in capsys.readouterr().out
    with open(os.path.join(out, CONFIG_NAME)) as f:
        config = json.load(f)
    assert config["kind"] == "velo" and isinstance(config["hparams"], dict)
    assert convert_main([checkpoint_dir("velo_small"), "--format", "hf", "-o", out]) == 2
    assert "output exists" in capsys.readouterr().err


def test_safetensors_files_are_deterministic_and_readable(tmp_path):
    from safetensors import safe_open
    from safetensors.torch import load_file

    tensors = {"w": torch.arange(6, dtype=torch.bfloat16).reshape(2, 3),
               "a": torch.tensor(1.5), "empty": torch.zeros(0, 4),
               "h": torch.linspace(-2, 2, 3, dtype=torch.float16),
               "i": torch.arange(5), "flag": torch.tensor([True, False])}
    meta = {"z": "1", "a": "two"}
    data = safetensors_bytes(tensors, meta)
    assert data == safetensors_bytes(dict(reversed(tensors.items())), meta)
    assert int.from_bytes(data[:8], "little") % 8 == 0
    path = tmp_path / "t.safetensors"
    path.write_bytes(data)
    loaded = load_file(str(path))
    assert loaded.keys() == tensors.keys()
    for name, t in tensors.items():
        assert loaded[name].dtype == t.dtype and torch.equal(loaded[name], t), name
    with safe_open(str(path), framework="pt") as f:
        assert f.metadata() == meta
    with pytest.raises(TypeError, match="no safetensors code"):
        safetensors_bytes({"c": torch.zeros(2, dtype=torch.complex64)}, {})
    with pytest.raises(TypeError, match="map str to str"):
        safetensors_bytes({}, {"n": 1})
