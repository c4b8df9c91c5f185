"""lopt-convert: exit codes, one-line errors, summaries, nothing written on failure."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from converters import cli
from tests.conftest import ROOT, checkpoint_dir

SRC = checkpoint_dir("small_fc_h32_sm0p01")
with open(os.path.join(SRC, "params"), "rb") as _f:
    GOOD = _f.read()


def test_convert_and_back(tmp_path, capsys):
    out = tmp_path / "w.safetensors"
    assert cli.main([SRC, "-o", str(out)]) == 0
    text = capsys.readouterr().out
    assert "kind      small_fc_lopt" in text
    assert "mlp.0.weight             (32, 39)" in text
    assert "9 tensors, 2,409 values, 9,636 bytes" in text
    assert "3abb8bbe49645d26d579b684222e438729da6d3b135797d38db55ca0ea08da9c" in text
    assert cli.main([str(out), "--format", "upstream", "-o", str(tmp_path / "up")]) == 0
    assert (tmp_path / "up" / "params").read_bytes() == GOOD


def test_default_output_name(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert cli.main([SRC]) == 0
    assert cli.main([SRC, "--format", "pt"]) == 0
    assert cli.main(["small_fc_h32_sm0p01.safetensors", "--format", "upstream"]) == 0
    assert sorted(os.listdir(tmp_path)) == ["small_fc_h32_sm0p01.pt",
                                            "small_fc_h32_sm0p01.safetensors",
                                            "small_fc_h32_sm0p01_upstream"]


def test_set_and_existing_output(tmp_path, capsys):
    out = tmp_path / "w.safetensors"
    assert cli.main([SRC, "-o", str(out), "--set", "variant='pypi-0.0.1'"]) == 0
    assert "variant=pypi-0.0.1" in capsys.readouterr().out
    assert cli.main([SRC, "-o", str(out)]) == 2
    assert "output exists" in capsys.readouterr().err
    assert cli.main([SRC, "-o", str(out), "--force"]) == 0


@pytest.mark.parametrize("args, needle", [
    (["--set", "hidden_size=8"], "contradicts"),
    (["--set", "nonsense"], "name=value"),
    (["--kind", "small_fc_lopt", "--set", "step_mult='x'"], "step_mult must be a float"),
])
def test_bad_input_exit_2_one_line(tmp_path, capsys, args, needle):
    out = tmp_path / "w.safetensors"
    assert cli.main([SRC, "-o", str(out), *args]) == 2
    err = capsys.readouterr().err
    assert needle in err and err.count("\n") == 1 and "Traceback" not in err
    assert not out.exists()


def test_debug_shows_traceback(tmp_path, capsys):
    assert cli.main([str(tmp_path / "missing"), "--debug"]) == 2
    assert "Traceback" in capsys.readouterr().err


@pytest.mark.slow
def test_console_script_runs():
    exe = os.path.join(os.path.dirname(sys.executable), "lopt-convert")
    r = subprocess.run([exe, "--help"], capture_output=True, text=True, cwd=ROOT)
    assert r.returncode == 0 and "--format" in r.stdout


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow,
                                                                 HealthCheck.function_scoped_fixture])
@given(cut=st.integers(0, len(GOOD) - 1), flip=st.integers(0, 255))
def test_fuzzed_checkpoint_exit_2_and_no_output(tmp_path, cut, flip):
    folder = tmp_path / f"ck_{cut}_{flip}"
    folder.mkdir()
    data = bytearray(GOOD[:cut] + GOOD[cut + 1:]) if flip == 0 else bytearray(GOOD)
    if flip:
        data[cut] ^= flip
    (folder / "params").write_bytes(bytes(data))
    out = tmp_path / f"out_{cut}_{flip}.safetensors"
    code = cli.main([str(folder), "-o", str(out)])
    assert code in (0, 2)
    if code == 2:
        assert not out.exists()
    assert not [f for f in os.listdir(tmp_path) if f.startswith(".lopt-tmp")]
