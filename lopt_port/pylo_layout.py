"""pylo's published weights folders, read as lopt-port weights (origin ``pylo-copy``).

pylo (Belilovsky-Lab/pylo) publishes each network as a Hugging Face folder written by
``PyTorchModelHubMixin``: ``model.safetensors`` (the module's ``state_dict()``, names as below)
and, depending on the ``huggingface_hub`` version that wrote it, a ``config.json`` of the
module's constructor arguments. Its VeLO loads two such folders (``VeLORNN.from_pretrained
("Pauljanson002/VeLO_RNN")``, ``VeLOMLP.from_pretrained("Pauljanson002/VeLO_MLP")``); its
AdafacLO and MuLO load one ``MetaMLP`` folder (``btherien/mulo``). These names, shapes and
transposes are read from pylo's model classes (``pylo/models``) and the order in which its
optimizers use them; the mapping reproduces upstream's math, which pylo's modules do (same
gate order ``i, g, f, o``, the same first mixing layer computed and discarded, the same 14
feature groups in the same order).

**VeLO** (a folder holding ``VeLO_RNN/`` and ``VeLO_MLP/``, each with ``model.safetensors``;
``H``, ``K``, ``h``: LSTM width, param inits, MLP width; ``F = 30``; pylo's ``hidden_layers = n``
is upstream's ``ff_hidden_layers = L = n + 1``):

==================================  =====================================  ==================
pylo name (shape)                   lopt-port name (shape)                 transform
==================================  =====================================  ==================
``lstm_init_state.0`` (1,H)         ``lstm_init_state.hidden`` (1,H)       none
``lstm_init_state.1`` (1,H)         ``lstm_init_state.cell`` (1,H)         none
``mix_layer1.{weight,bias}``        ``rnn.dead_linear.*`` (H,F)            none
``mix_layer2.*``                    ``rnn.mix.*`` (H,F)                    none
``final_mix_layer.*``               ``rnn.input.*`` (H,F)                  none
``lstm.linear.*`` (4H,2H)           ``rnn.lstm.*`` (4H,2H)                 none
``rnn_to_controls.*`` (K,H)         ``rnn.controls.*`` (K,H)               none
``step_size.*`` (1,H)               ``rnn.step_size.*`` (1,H)              none
``input_weights_`` (K,h,F)          ``ff.w0__0`` .. ``ff.w0__13`` (K,n_j,h)  split the last axis
                                                                           by the 14 feature
                                                                           groups, swap the
                                                                           last two axes
``input_bias_`` (K,h)               ``ff.b0``                              none
``hidden_weights_.{i}`` (K,h,h)     ``ff.w{i+1}``                          swap last two axes
``hidden_bias_.{i}`` (K,h)          ``ff.b{i+1}``                          none
``output_weights_`` (K,3,h)         ``ff.w{L}`` (K,h,3)                    swap last two axes
``output_bias_`` (K,3)              ``ff.b{L}``                            none
``input_weights``, ``input_bias``,  (none)                                 ignored: pylo's
``hidden_weights.{i}``,                                                    scratch copies,
``hidden_bias.{i}``,                                                       overwritten from the
``output_weights``, ``output_bias``                                        bank before each use
==================================  =====================================  ==================

**MetaMLP** (small_fc_lopt / μLO; ``n`` hidden layers in pylo is ``hidden_layers = n + 1``):
``network.input.*`` -> ``mlp.0.*``, ``network.linear_{i}.*`` -> ``mlp.{i+1}.*``,
``network.output.*`` -> ``mlp.{n+1}.*``; both are ``nn.Linear``, no transpose.

What pylo's folders lack, and what is assumed (recorded in the metadata's ``hparams``):

* VeLO: the hyperparameters that cannot be read off the shapes are those pylo's VeLO applies
  (its constructor defaults and its code: ``exp_mult = step_mult = 0.001``, upstream's
  initial decays, logspaced loss half-lives, the fixed LSTM state), :data:`VELO_HPARAMS`,
  which equal the released VeLO's ``config.gin`` bindings. pylo's modules are fixed at
  ``F = 30`` and ``mix_layers=True``; anything else is refused.
* MetaMLP: the optimizer is not stored (pylo's AdafacLO runs it as small_fc_lopt, its MuLO as
  μLO): the caller names it. The learned decay offsets are not stored (pylo hard-codes μLO's,
  :data:`PYLO_DECAY_OFFSETS`): the caller gives them, or asks for pylo's explicitly. The
  hyperparameters are pylo's AdafacLO defaults, :data:`META_MLP_HPARAMS` (``step_mult=0.01``).

Nothing in these folders names the upstream checkpoint they came from: the metadata says
``weights_origin = pylo-copy`` and records the sha256 of each file read (``pylo_files``).
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Mapping, Sequence
from typing import Any

import torch

from lopt_port import velo_config
from lopt_port.constants import UPSTREAM_DECAYS
from lopt_port.limits import MAX_CONFIG_BYTES, json_depth_problem
from lopt_port.provenance import NOTE_KEY, ORIGIN_KEY
from lopt_port.version import __version__

WEIGHTS_NAME = "model.safetensors"
CONFIG_NAME = "config.json"
VELO_RNN_DIR = "VeLO_RNN"
VELO_MLP_DIR = "VeLO_MLP"

#: VeLORNN: pylo module -> lopt-port module (``.weight``, ``.bias``; no transpose).
VELO_RNN_MODULES = {"mix_layer1": "rnn.dead_linear", "mix_layer2": "rnn.mix",
                    "final_mix_layer": "rnn.input", "lstm.linear": "rnn.lstm",
                    "rnn_to_controls": "rnn.controls", "step_size": "rnn.step_size"}
#: VeLORNN's ``nn.ParameterList`` of the initial LSTM state (pylo reads ``[0]`` as ``h``).
VELO_RNN_STATE = {"lstm_init_state.0": "lstm_init_state.hidden",
                  "lstm_init_state.1": "lstm_init_state.cell"}
#: VeLOMLP's per-step copies, recomputed from the bank before every use: not weights.
VELO_MLP_SCRATCH = ("input_weights", "input_bias", "hidden_weights", "hidden_bias",
                    "output_weights", "output_bias")
#: pylo's LSTM input width and per-parameter feature width (the default decays').
VELO_WIDTH = velo_config.lstm_input_width(3, 1)
VELO_FF_WIDTHS = velo_config.ff_input_widths(3, 1, 3)

_DEFAULT_DECAYS = {k: list(v) for k, v in UPSTREAM_DECAYS.items()}
#: What pylo's VeLO applies to its weights (``VeLO_naive.__init__`` defaults and its code).
VELO_HPARAMS: dict[str, Any] = {"exp_mult": 0.001, "step_mult": 0.001, **_DEFAULT_DECAYS,
                                "use_bugged_loss_features": False,
                                "use_bugged_next_lstm_state": False}
#: What pylo's AdafacLO (and MuLO, which wraps it) applies: ``AdafacLO_naive`` defaults.
META_MLP_HPARAMS: dict[str, Any] = {"exp_mult": 0.001, "step_mult": 0.01, **_DEFAULT_DECAYS}
#: pylo's hard-coded learned decay offsets (μLO's; ``AdafacLO_naive`` defaults).
PYLO_DECAY_OFFSETS: dict[str, tuple[float, ...]] = {
    "momentum_decay_offsets": (0.15216392, 0.14245212, 0.06812963),
    "rms_decay_offsets": (0.01079706,),
    "adafactor_decay_offsets": (0.18621896, -0.10864615, -0.06185547),
}
META_MLP_KINDS = ("small_fc_lopt", "mulo")


class PyloLayoutError(ValueError):
    """A pylo folder that cannot be read unambiguously (the message says what is missing)."""


def meta_mlp_names(n: int) -> dict[str, str]:
    """MetaMLP with ``n`` hidden layers: pylo module -> lopt-port module."""
    names = {"network.input": "mlp.0"}
    names.update({f"network.linear_{i}": f"mlp.{i + 1}" for i in range(n)})
    names["network.output"] = f"mlp.{n + 1}"
    return names


def layout_of(path: str | os.PathLike) -> str | None:
    """``"velo"`` for a pylo VeLO folder, ``"meta_mlp"`` for a pylo MetaMLP folder, else None
    (a lopt-port pretrained folder, whose ``config.json`` names lopt-port's format, is not; nor
    is a folder whose ``config.json`` cannot be read: its reader reports why)."""
    name = os.fspath(path)
    if not os.path.isdir(name):
        return None
    if all(os.path.isfile(os.path.join(name, d, WEIGHTS_NAME))
           for d in (VELO_RNN_DIR, VELO_MLP_DIR)):
        return "velo"
    weights = os.path.join(name, WEIGHTS_NAME)
    if not os.path.isfile(weights):
        return None
    try:
        if _read_config(name).get("format") is not None:
            return None
    except PyloLayoutError:
        return None
    from safetensors import safe_open
    with safe_open(weights, framework="pt") as f:
        keys = list(f.keys())
    return "meta_mlp" if keys and all(k.startswith("network.") for k in keys) else None


def _read_config(folder: str) -> dict[str, Any]:
    path = os.path.join(folder, CONFIG_NAME)
    if not os.path.isfile(path):
        return {}
    try:
        if os.path.getsize(path) > MAX_CONFIG_BYTES:
            raise PyloLayoutError(f"{path}: larger than MAX_CONFIG_BYTES = {MAX_CONFIG_BYTES:,}")
        with open(path, encoding="utf-8") as f:
            text = f.read()
        problem = json_depth_problem(text)
        if problem is not None:
            raise PyloLayoutError(f"{path}: {problem}")
        config = json.loads(text)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise PyloLayoutError(f"{path}: not a readable JSON file ({e})") from None
    if not isinstance(config, dict):
        raise PyloLayoutError(f"{path}: expected a JSON object")
    return config


def _read(folder: str) -> tuple[dict[str, torch.Tensor], str]:
    """A pylo folder's tensors and the sha256 of its weights file."""
    from safetensors.torch import load_file
    path = os.path.join(folder, WEIGHTS_NAME)
    try:
        tensors = load_file(path)
    except Exception as e:  # safetensors raises its own error types for corrupt headers
        raise PyloLayoutError(f"{path}: not a readable safetensors file ({e})") from None
    with open(path, "rb") as f:
        sha = hashlib.sha256(f.read()).hexdigest()
    return tensors, sha


def _check_config(folder: str, implied: Mapping[str, Any]) -> None:
    """The folder's ``config.json`` (when present) must agree with ``implied``, the
    constructor arguments its weights' shapes imply."""
    config = _read_config(folder)
    wrong = [f"{k}={config[k]!r} (the weights imply {v!r})" for k, v in implied.items()
             if k in config and config[k] != v]
    if wrong:
        raise PyloLayoutError(f"{os.path.join(folder, CONFIG_NAME)}: " + "; ".join(wrong)
                              + (" (lopt-port implements mix_layers=True only)"
                                 if "mix_layers" in config and not config["mix_layers"] else ""))


def _take(tensors: dict[str, torch.Tensor], name: str, origin: str) -> torch.Tensor:
    if name not in tensors:
        raise PyloLayoutError(f"{origin}: missing {name}, found {sorted(tensors)[:8]}")
    return tensors.pop(name)


def _velo(folder: str) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    rnn_dir, mlp_dir = (os.path.join(folder, d) for d in (VELO_RNN_DIR, VELO_MLP_DIR))
    rnn, rnn_sha = _read(rnn_dir)
    mlp, mlp_sha = _read(mlp_dir)
    ours: dict[str, torch.Tensor] = {}
    for pylo, name in VELO_RNN_STATE.items():
        ours[name] = _take(rnn, pylo, rnn_dir)
    for pylo, name in VELO_RNN_MODULES.items():
        for leaf in ("weight", "bias"):
            ours[f"{name}.{leaf}"] = _take(rnn, f"{pylo}.{leaf}", rnn_dir)
    if rnn:
        raise PyloLayoutError(f"{rnn_dir}: unexpected {sorted(rnn)[:8]}")
    hid, width = ours["rnn.input.weight"].shape
    if width != VELO_WIDTH:
        raise PyloLayoutError(f"{rnn_dir}: LSTM input width {width}; pylo's VeLO (and this "
                              f"mapping) is fixed at {VELO_WIDTH}, the default decays'")
    n = sum(1 for k in mlp if k.startswith("hidden_weights_."))
    bank = _take(mlp, "input_weights_", mlp_dir)
    k, h = bank.shape[:2]
    if tuple(bank.shape) != (k, h, sum(VELO_FF_WIDTHS)):
        raise PyloLayoutError(f"{mlp_dir}: input_weights_ {tuple(bank.shape)}, expected "
                              f"(K, h, {sum(VELO_FF_WIDTHS)})")
    for j, part in enumerate(torch.split(bank, VELO_FF_WIDTHS, dim=2)):
        ours[f"ff.w0__{j}"] = part.transpose(1, 2).contiguous()
    ours["ff.b0"] = _take(mlp, "input_bias_", mlp_dir)
    for i in range(n):
        ours[f"ff.w{i + 1}"] = _take(mlp, f"hidden_weights_.{i}", mlp_dir).transpose(1, 2)
        ours[f"ff.b{i + 1}"] = _take(mlp, f"hidden_bias_.{i}", mlp_dir)
    ours[f"ff.w{n + 1}"] = _take(mlp, "output_weights_", mlp_dir).transpose(1, 2)
    ours[f"ff.b{n + 1}"] = _take(mlp, "output_bias_", mlp_dir)
    unexpected = [name for name in mlp if name.split(".")[0] not in VELO_MLP_SCRATCH]
    if unexpected:
        raise PyloLayoutError(f"{mlp_dir}: unexpected {sorted(unexpected)[:8]}")
    _check_config(rnn_dir, {"input_size": width, "lstm_hidden_size": hid, "param_inits": k,
                            "mix_layers": True})
    _check_config(mlp_dir, {"param_inits": k, "input_size": sum(VELO_FF_WIDTHS),
                            "hidden_size": h, "hidden_layers": n, "output_size": 3})
    ours = {name: t.contiguous() for name, t in ours.items()}
    files = {f"{VELO_RNN_DIR}/{WEIGHTS_NAME}": rnn_sha, f"{VELO_MLP_DIR}/{WEIGHTS_NAME}": mlp_sha}
    note = ("converted from pylo's copy, no upstream provenance (pylo's VeLO folders name no "
            "source checkpoint); hyperparameters assumed: those pylo's VeLO applies, equal to "
            "the released VeLO's config.gin bindings")
    return ours, _metadata(velo_config.KIND, VELO_HPARAMS, files, note)


def _offsets(decay_offsets: Mapping[str, Sequence[float]] | str | None,
             origin: str) -> tuple[dict[str, torch.Tensor], str]:
    if decay_offsets is None:
        raise PyloLayoutError(
            f"{origin}: pylo's MetaMLP folder holds no learned decay offsets (pylo hard-codes "
            f"μLO's in its optimizer): give them (momentum_decay_offsets, rms_decay_offsets, "
            f"adafactor_decay_offsets), or ask for pylo's hard-coded ones explicitly "
            f"(decay_offsets='pylo'; lopt-convert --pylo-decay-offsets pylo)")
    if decay_offsets == "pylo":
        values, how = PYLO_DECAY_OFFSETS, "pylo's hard-coded (μLO's) decay offsets"
    elif isinstance(decay_offsets, Mapping) and set(decay_offsets) == set(PYLO_DECAY_OFFSETS):
        values, how = decay_offsets, "decay offsets given at conversion"
    else:
        found = sorted(decay_offsets) if isinstance(decay_offsets, Mapping) else decay_offsets
        raise PyloLayoutError(f"{origin}: decay offsets must be 'pylo' or name exactly "
                              f"{sorted(PYLO_DECAY_OFFSETS)}, found {found!r}")
    return {k: torch.as_tensor(values[k], dtype=torch.float32).reshape(-1).clone()
            for k in PYLO_DECAY_OFFSETS}, how


def _meta_mlp(folder: str, kind: str | None,
              decay_offsets: Mapping[str, Sequence[float]] | str | None
              ) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    if kind not in META_MLP_KINDS:
        raise PyloLayoutError(
            f"{folder}: a pylo MetaMLP folder does not say which optimizer it is for (pylo's "
            f"AdafacLO runs it as small_fc_lopt, its MuLO as μLO): name the kind, one of "
            f"{', '.join(META_MLP_KINDS)} (lopt-convert --kind), not {kind!r}")
    tensors, sha = _read(folder)
    n = sum(1 for k in tensors if k.startswith("network.linear_") and k.endswith(".weight"))
    ours, how = _offsets(decay_offsets, folder)
    for pylo, name in meta_mlp_names(n).items():
        for leaf in ("weight", "bias"):
            ours[f"{name}.{leaf}"] = _take(tensors, f"{pylo}.{leaf}", folder)
    if tensors:
        raise PyloLayoutError(f"{folder}: unexpected {sorted(tensors)[:8]}")
    hidden, width = ours["mlp.0.weight"].shape
    _check_config(folder, {"input_size": width, "hidden_size": hidden, "hidden_layers": n})
    note = (f"converted from pylo's copy, no upstream provenance (pylo's MetaMLP folder names no "
            f"source checkpoint); {how}; hyperparameters assumed: pylo's AdafacLO defaults")
    return ours, _metadata(kind, META_MLP_HPARAMS, {WEIGHTS_NAME: sha}, note)


def _metadata(kind: str, hparams: Mapping[str, Any], files: Mapping[str, str],
              note: str) -> dict[str, str]:
    return {"kind": kind, "hparams": json.dumps(dict(hparams), sort_keys=True),
            "lopt_port_version": __version__, "pylo_files": json.dumps(dict(files)),
            ORIGIN_KEY: "pylo-copy", NOTE_KEY: note}


def read_pylo_folder(path: str | os.PathLike, *, kind: str | None = None,
                     decay_offsets: Mapping[str, Sequence[float]] | str | None = None
                     ) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """The lopt-port state dict and metadata (without ``format``/``format_version``) of a pylo
    folder (:func:`layout_of`), by the tables above. ``kind`` and ``decay_offsets`` (a mapping
    of the three lopt-port offset names, or ``"pylo"`` for pylo's hard-coded ones) are needed
    for a MetaMLP folder only. Raises :class:`PyloLayoutError`."""
    name = os.fspath(path)
    layout = layout_of(name)
    if layout == "velo":
        if kind not in (None, velo_config.KIND) or decay_offsets is not None:
            raise PyloLayoutError(f"{name}: a pylo VeLO folder is kind 'velo' and stores "
                                  f"everything it needs; no kind or decay offsets apply")
        return _velo(name)
    if layout == "meta_mlp":
        return _meta_mlp(name, kind, decay_offsets)
    raise PyloLayoutError(f"{name}: not a pylo folder ({VELO_RNN_DIR}/ + {VELO_MLP_DIR}/, or "
                          f"a MetaMLP {WEIGHTS_NAME})")
