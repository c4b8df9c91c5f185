"""The readers' limits (lopt_port/limits.py, issue 19): files built to exhaust time, memory or
the recursion limit are refused quickly with the readers' own error types, and the CLI exits 2
with one line naming the file and the limit."""

from __future__ import annotations

import json
import os
import pickle
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from converters import cli, mulo
from converters.convert import convert
from converters.errors import CheckpointError
from converters.gin_config import parse_gin
from lopt_port import from_pretrained, limits
from lopt_port.limits import MAX_GIN_DEPTH, MAX_JSON_DEPTH, MAX_TREE_DEPTH, json_depth_problem
from lopt_port.weights import (
    CONFIG_NAME,
    WeightsError,
    load_weights,
    safetensors_bytes,
    state_dict_with_metadata,
)
from tests.conftest import CHECKPOINTS, ROOT, checkpoint_dir

SRC = checkpoint_dir("small_fc_h32_sm0p01")
with open(os.path.join(SRC, "config.gin"), encoding="utf-8") as _f:
    GIN = _f.read()

#: ~1 KB of macros expanding ten-fold per level: 10**8 strings of 10 characters.
BOMB = "\n".join(["A0 = 'xxxxxxxxxx'"] + [f"A{i} = [{', '.join([f'%A{i - 1}'] * 10)}]"
                                         for i in range(1, 9)])
CHAIN = "\n".join(["A0 = 0.9"] + [f"A{i} = %A{i - 1}" for i in range(1, 3000)])
DEEP_JSON = '{"a": ' + "[" * 3000 + "]" * 3000 + "}"


def _checkpoint_with(tmp_path, extra: str) -> str:
    folder = tmp_path / "ckpt"
    shutil.copytree(SRC, folder)
    (folder / "config.gin").write_text(GIN + extra + "\n", encoding="utf-8")
    return str(folder)


def _one_line_error(capsys, *needles: str) -> None:
    err = capsys.readouterr().err
    assert err.startswith("lopt-convert: error: ") and err.count("\n") == 1, err
    assert "Traceback" not in err
    for needle in needles:
        assert needle in err, err


def test_gin_expansion_bomb_is_refused_fast_and_small(tmp_path):
    src = _checkpoint_with(tmp_path, BOMB + "\nAdafacMLPLOpt.initial_momentum_decays = %A8")
    assert len(BOMB) < 1100
    script = ("import resource, time\n"
              "from converters import cli\n"
              "rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss\n"
              "t = time.perf_counter()\n"
              f"rc = cli.main([{src!r}, '-o', {str(tmp_path / 'w.safetensors')!r}])\n"
              "print(rc, time.perf_counter() - t, "
              "resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss)\n")
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          cwd=ROOT, env={**os.environ, "PYTHONPATH": ROOT}, timeout=120)
    rc, seconds, peak_growth_kb = proc.stdout.split()
    assert int(rc) == 2
    assert float(seconds) < 5
    assert int(peak_growth_kb) < 100 * 1024  # peak RSS beyond the imports (torch: ~270 MB)
    assert proc.stderr.count("\n") == 1 and "Traceback" not in proc.stderr
    assert "config.gin" in proc.stderr and "%A5" in proc.stderr
    assert "MAX_GIN_EXPANSION = 1,000,000" in proc.stderr
    assert not (tmp_path / "w.safetensors").exists()


def test_gin_expansion_limit_counts_all_bindings_together():
    # each binding alone is within the limit (A4: 111,111), ten of them are not
    args = "\n".join(f"AdafacMLPLOpt.a{i} = %A4" for i in range(10))
    with pytest.raises(CheckpointError, match="the values read expand to more than"):
        parse_gin(BOMB + "\n" + GIN + args)


def test_gin_macro_chain_is_refused(tmp_path, capsys):
    text = CHAIN + "\n" + GIN + "AdafacMLPLOpt.exp_mult = %A2999\n"
    with pytest.raises(CheckpointError, match=f"MAX_GIN_DEPTH = {MAX_GIN_DEPTH}"):
        parse_gin(text)
    src = _checkpoint_with(tmp_path, CHAIN + "\nAdafacMLPLOpt.exp_mult = %A2999")
    assert cli.main([src, "-o", str(tmp_path / "w.safetensors")]) == 2
    _one_line_error(capsys, "config.gin", "MAX_GIN_DEPTH", "macro %A")
    assert cli.main([src, "-o", str(tmp_path / "w.safetensors"), "--debug"]) == 2
    assert "Traceback" in capsys.readouterr().err


def test_gin_deep_containers_are_refused():
    for depth in (MAX_GIN_DEPTH + 1, 100_000):  # gin's parser would recurse 100,000 deep
        nested = "[" * depth + "]" * depth
        with pytest.raises(CheckpointError, match=f"brackets nest deeper than MAX_GIN_DEPTH = "
                           f"{MAX_GIN_DEPTH} levels at line 2"):
            parse_gin(f"# ((( in a comment\nAdafacMLPLOpt.exp_mult = {nested}\n" + GIN)
    # within the bracket limit, but macros add levels
    nested = "[" * (MAX_GIN_DEPTH - 1) + "]" * (MAX_GIN_DEPTH - 1)
    with pytest.raises(CheckpointError, match="nests deeper than MAX_GIN_DEPTH"):
        parse_gin(f"B0 = {nested}\nB1 = %B0\nB2 = [%B1]\n" + GIN
                  + "AdafacMLPLOpt.exp_mult = %B2\n")
    # a short chain and a few containers stay well within the limits
    cfg = parse_gin("B0 = (0.9, [1, 2])\nB1 = %B0\n" + GIN
                    + "AdafacMLPLOpt.initial_rms_decays = %B1\n")
    assert cfg.bindings["initial_rms_decays"] == (0.9, [1, 2])


def test_json_depth_scan_ignores_brackets_in_strings():
    assert json_depth_problem('{"a": "' + "[{" * 500 + '\\"]"}') is None
    assert json_depth_problem("[" * MAX_JSON_DEPTH + "]" * MAX_JSON_DEPTH) is None
    problem = json_depth_problem("[" * (MAX_JSON_DEPTH + 1))
    assert problem is not None and f"MAX_JSON_DEPTH = {MAX_JSON_DEPTH}" in problem


def test_every_limit_is_documented():
    text = (Path(ROOT) / "docs" / "conversion.md").read_text(encoding="utf-8")
    names = [n for n in dir(limits) if n.startswith("MAX_")]
    assert len(names) == 8
    for name in names:
        assert f"| `{name}` |" in text, name


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    """The small checkpoint converted: ``(tensors, metadata)``."""
    path = tmp_path_factory.mktemp("conv") / "w.safetensors"
    convert(SRC).save(str(path), "safetensors")
    loaded = load_weights(str(path))
    return loaded.state_dict, loaded.metadata


def _params() -> list[torch.Tensor]:
    return [torch.zeros(3, requires_grad=True)]


@pytest.mark.parametrize("suffix", [".safetensors", ".pt"])
def test_deep_json_in_hparams_metadata(tmp_path, capsys, converted, suffix):
    tensors, meta = converted
    meta = {**meta, "hparams": DEEP_JSON}
    path = tmp_path / f"w{suffix}"
    if suffix == ".pt":
        torch.save(state_dict_with_metadata(tensors, meta), path)
    else:
        path.write_bytes(safetensors_bytes(tensors, meta))
    with pytest.raises(WeightsError, match=f"{path.name}: metadata 'hparams': JSON nests "
                       f"deeper than MAX_JSON_DEPTH = {MAX_JSON_DEPTH}"):
        from_pretrained(str(path), _params())
    assert cli.main([str(path), "-o", str(tmp_path / "out.pt"), "--format", "pt"]) == 2
    _one_line_error(capsys, path.name, "'hparams'", "MAX_JSON_DEPTH")


@pytest.mark.parametrize("key", ["hparams", "upstream_layout"])
def test_lopt_parity_refuses_deep_json(tmp_path, capsys, converted, key):
    from parity import cli as parity_cli  # imports jax: only here
    tensors, meta = converted
    path = tmp_path / "w.safetensors"
    path.write_bytes(safetensors_bytes(tensors, {**meta, key: DEEP_JSON}))
    assert parity_cli.main([str(path), "--tasks", "1", "--steps", "1"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("lopt-parity: error: ") and err.count("\n") == 1, err
    assert key in err and "MAX_JSON_DEPTH" in err


def test_pt_metadata_that_is_not_a_string(tmp_path, converted):
    tensors, meta = converted
    nested: list = []
    for _ in range(50):  # torch.save recurses too deeply to write much more
        nested = [nested]
    path = tmp_path / "w.pt"
    torch.save(state_dict_with_metadata(tensors, {**meta, "hparams": nested}), path)
    with pytest.raises(WeightsError, match="'hparams' must be a string of JSON, found list"):
        from_pretrained(str(path), _params())


def test_deep_json_in_config_json(tmp_path, capsys):
    folder = tmp_path / "hf"
    assert cli.main([SRC, "-o", str(folder), "--format", "hf"]) == 0
    capsys.readouterr()
    config = json.loads((folder / CONFIG_NAME).read_text())
    text = json.dumps(config)[:-1] + ', "deep": ' + DEEP_JSON + "}"
    (folder / CONFIG_NAME).write_text(text)
    with pytest.raises(WeightsError, match=f"{CONFIG_NAME}: JSON nests deeper than "
                       f"MAX_JSON_DEPTH"):
        from_pretrained(str(folder), _params())
    assert cli.main([str(folder), "-o", str(tmp_path / "out.safetensors")]) == 2
    _one_line_error(capsys, CONFIG_NAME, "MAX_JSON_DEPTH")


def test_deep_json_on_the_command_line(tmp_path, capsys):
    names = tmp_path / "names.json"
    names.write_text(DEEP_JSON)
    assert cli.main([SRC, "--state", str(names)]) == 2
    _one_line_error(capsys, "names mapping", "names.json", "MAX_JSON_DEPTH")
    assert cli.main([SRC, "-o", str(tmp_path / "w.pt"), "--pylo-decay-offsets", DEEP_JSON]) == 2
    _one_line_error(capsys, "--pylo-decay-offsets", "MAX_JSON_DEPTH")


def test_deep_pickle_tree_is_refused(tmp_path):
    tree: dict = {}
    for _ in range(MAX_TREE_DEPTH * 4):
        tree = {"k": tree}
    path = tmp_path / "global_step1.pickle"
    path.write_bytes(pickle.dumps(tree))
    with pytest.raises(CheckpointError, match=f"MAX_TREE_DEPTH = {MAX_TREE_DEPTH}"):
        mulo.read_pickle(path)
    # 5,000 levels, too deep for pickle.dumps to write: EMPTY_DICT, key 'k', ..., then SETITEMs
    path.write_bytes(b"\x80\x02" + b"}X\x01\x00\x00\x00k" * 5000 + b"}" + b"s" * 5000 + b".")
    with pytest.raises(CheckpointError, match=f"MAX_TREE_DEPTH = {MAX_TREE_DEPTH}"):
        mulo.read_pickle(path)


@pytest.mark.parametrize("name", sorted(
    d for d in os.listdir(CHECKPOINTS)
    if os.path.isdir(os.path.join(CHECKPOINTS, d)) and d != "golden"))
def test_bundled_checkpoints_still_convert(name):
    start = time.perf_counter()
    conv = convert(checkpoint_dir(name))
    assert conv.state_dict and conv.kind
    assert time.perf_counter() - start < 60
