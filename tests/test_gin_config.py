"""config.gin reading with gin-config's parser."""

from __future__ import annotations

import os

import pytest

from converters import CheckpointError
from converters.gin_config import parse_gin, read_gin
from tests.conftest import checkpoint_dir


def test_golden_config():
    cfg = read_gin(os.path.join(checkpoint_dir("small_fc_h32_sm0p01"), "config.gin"))
    assert cfg.lopt_class == "AdafacMLPLOpt"
    assert cfg.bindings["step_mult"] == 0.01
    assert cfg.bindings["hidden_size"] == 32
    assert cfg.bindings["initial_rms_decays"] == (0.999,)
    assert "learning_rate" not in cfg.bindings  # Adam's binding is not the optimizer's


def test_scopes_macros_and_module_selectors():
    text = """
    import some.module
    STEP = 0.25
    run_train.lopt = @meta/AdafacMLPLOpt()
    AdafacMLPLOpt.step_mult = 0.5
    meta/AdafacMLPLOpt.step_mult = %STEP
    other/AdafacMLPLOpt.exp_mult = 9.0
    a.b.AdafacMLPLOpt.hidden_size = \\
        7
    """
    cfg = parse_gin(text)
    assert cfg.lopt_class == "AdafacMLPLOpt"
    assert cfg.bindings == {"step_mult": 0.25, "hidden_size": 7}


@pytest.mark.parametrize("text, needle", [
    ("AdafacMLPLOpt.step_mult = 0.1\n", "no 'run_train.lopt"),
    ("run_train.lopt = 3\n", "not a configurable reference"),
    ("run_train.lopt = @X()\nX.a = %UNDEFINED\n", "not defined"),
    ("run_train.lopt = @X()\nX.a = @Y()\n", "only literal values"),
    ("run_train.lopt = @X(\n", "gin"),
    ("run_train.lopt = @X()\nX.a = [1,\n", "gin"),
])
def test_bad_configs(text, needle):
    with pytest.raises(CheckpointError, match=needle):
        parse_gin(text, "cfg.gin")


def test_unreadable_config(tmp_path):
    p = tmp_path / "config.gin"
    p.write_bytes(b"\xff\xfe\x00run")
    with pytest.raises(CheckpointError, match="UTF-8"):
        read_gin(p)
