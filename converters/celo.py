"""Celo and Celo-Adam: the authors' ``theta.state`` <-> PyTorch state dict.

The tree is HyperV2's (:mod:`converters.velo`: same renames and transposes) with an LSTM input
width of 18; Celo-Adam's has no ``rnn_to_controls`` and no ``ff_mod_stack``. The authors save
theta with ``checkpoints.save_state(path, theta)``: raw flax msgpack with theta at the root (no
``params``/``gen_id``/``step`` wrapper; a wrapped file is unwrapped) in a file named
``theta.state``, and no ``config.gin`` (the factory settings, :data:`lopt_port.celo_config.
DEFAULTS`, define each checkpoint). Writing back reproduces the file byte for byte.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from converters.velo import HyperV2Tree, Schema, lstm_input_width
from lopt_port import celo_config as cfg

#: The file name the authors save theta under (``checkpoints.save_state(path, theta)``).
THETA_FILE = "theta.state"

_TOP = {"celo": {"lstm_init_state", "rnn_params", "ff_mod_stack"},
        "celo_adam": {"lstm_init_state", "rnn_params"}}


def _schema(kind: str) -> Schema:
    def matches(theta: Mapping[str, Any]) -> bool:
        return set(theta) == _TOP[kind] and lstm_input_width(theta) == cfg.LSTM_INPUT_WIDTH

    def resolve(given: Mapping[str, Any], shapes: Mapping[str, tuple[int, ...]],
                upstream_defaults: bool) -> dict[str, Any]:
        # The factory settings define the checkpoint: they always fill what is not given.
        return cfg.resolve_hparams(kind, given, shapes)

    return Schema(kind=kind, upstream_class=cfg.UPSTREAM_CLASS,
                  shapes=lambda hp: cfg.state_dict_shapes(kind, hp), resolve=resolve,
                  describe=lambda hp: cfg.describe(kind, hp),
                  check=lambda sd, hp, origin: cfg.check_state_dict(kind, sd, hp, origin),
                  matches=matches, defaults=cfg.DEFAULTS[kind], upstream_file=THETA_FILE,
                  raw_root=True, writes_gin=False)


CELO = HyperV2Tree(_schema("celo"))
CELO_ADAM = HyperV2Tree(_schema("celo_adam"))
