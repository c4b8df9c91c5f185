"""μLO (``MuAdafacMLPLOpt``): theta <-> PyTorch state dict, and μLO's pickle release format.

Theta is ``AdafacMLPLOpt``'s (spec A.3), so names, shapes and transposes are those of
:mod:`converters.small_fc_lopt`; the hyperparameters follow :mod:`lopt_port.mulo_config`
(``step_mult`` is never defaulted). Three sources:

* **the μLO release format** (``global_step{N}.pickle``): ``pickle.dump(theta)`` of a dict of
  ``jax.Array`` (spec A.3). :func:`read_pickle` reads it with numpy alone and **never
  unpickles arbitrary objects**: its unpickler resolves only the globals such a file needs
  (:data:`ALLOWED_GLOBALS`: jax's array reconstructor, rebuilt as a numpy array; numpy's
  ndarray reconstruction and dtype; haiku's ``FlatMap``/``FlatMapping``/``frozendict``,
  read as dicts; ``_codecs.encode`` for protocol-2 byte strings) and refuses every other
  global with a :class:`~converters.errors.CheckpointError`. :func:`pickle_bytes` writes the
  same format back (arrays that unpickle as ``jax.Array`` where jax is installed);
* **flax msgpack** ``params`` + ``config.gin`` with ``run_train.lopt = @MuAdafacMLPLOpt()``,
  read by :func:`converters.upstream.load_upstream` as for the other kinds;
* **PyLO's PyTorch layout** (``btherien/mulo``: ``network.{input,linear_0,output}.{weight,
  bias}``): :func:`from_pylo_state_dict`. Those files lack the learned decay offsets; PyLO's
  hard-coded ones (:data:`PYLO_DECAY_OFFSETS`) are used only when asked for explicitly. A
  published PyLO folder (``model.safetensors`` + ``config.json``) is read by
  :func:`lopt_port.load_pylo` and ``lopt-convert --kind mulo --pylo-decay-offsets ...``.

μLO's theta has exactly small_fc_lopt's leaves, so a checkpoint cannot be told apart by
them: :func:`matches` is always False, and the kind comes from ``config.gin``, the pickle
format or ``--kind mulo``.
"""

from __future__ import annotations

import io
import os
import pickle
import re
from collections.abc import Mapping
from typing import Any, ClassVar

import numpy as np

from converters import small_fc_lopt as base
from converters.errors import CheckpointError
from lopt_port import mulo_config as cfg
from lopt_port import pylo_layout
from lopt_port.limits import MAX_FILE_BYTES, MAX_TREE_DEPTH

KIND = cfg.KIND
UPSTREAM_CLASS = cfg.UPSTREAM_CLASS
NO_CONFIG_DEFAULTS: dict[str, Any] = {}
CHAIN_ALIASES: dict[tuple[str, ...], tuple[str, ...]] = {}

PICKLE_SUFFIXES = (".pickle", ".pkl")
_STEP_IN_NAME = re.compile(r"global_step(\d+)\.pickle$")


def matches(theta: Mapping[str, Any]) -> bool:
    """Always False: μLO's theta is indistinguishable from small_fc_lopt's."""
    del theta
    return False


def config_defaults() -> dict[str, Any]:
    """Upstream's constructor defaults for unbound gin arguments, without ``step_mult``."""
    return {k: v for k, v in cfg.UPSTREAM_DEFAULTS.items() if k != "step_mult"}


def resolve_hparams(given: Mapping[str, Any], theta: Mapping[str, Any],
                    upstream_defaults: bool) -> dict[str, Any]:
    """Complete and validate hyperparameters against the theta tree's shapes."""
    return cfg.resolve_hparams(given, base.leaf_shapes_as_torch(theta),
                               upstream_defaults=upstream_defaults)


def theta_to_state_dict(theta: Mapping[str, Any], hparams: Mapping[str, Any], file: str,
                        root: tuple[str, ...]) -> dict[str, np.ndarray]:
    """Theta leaves -> PyTorch state dict (small_fc_lopt's table)."""
    return base.theta_to_state_dict(theta, hparams, file, root)


def state_dict_to_leaves(sd: Mapping[str, np.ndarray], hparams: Mapping[str, Any]
                         ) -> dict[tuple[str, ...], np.ndarray]:
    """Inverse of :func:`theta_to_state_dict`."""
    return base.state_dict_to_leaves(sd, hparams)


def resolve_torch_hparams(given: Mapping[str, Any], shapes: Mapping[str, tuple[int, ...]],
                          upstream_defaults: bool) -> dict[str, Any]:
    """Hyperparameters for a PyTorch state dict."""
    return cfg.resolve_hparams(given, shapes, upstream_defaults=upstream_defaults)


#: Strict name/shape check of a PyTorch state dict, ``(sd, hparams, origin)``; ``ValueError``
#: lists every mismatch.
check_state_dict = cfg.check_state_dict


def gin_bindings(hparams: Mapping[str, Any]) -> dict[str, Any]:
    """Constructor arguments of ``MuAdafacMLPLOpt`` for a generated ``config.gin``."""
    return base.gin_bindings(hparams)


# ---------------------------------------------------------------------------------------
# The pickle release format.

def _ndarray_reconstruct(cls: Any, shape: Any, dtype: Any) -> np.ndarray:
    """numpy's ``_reconstruct``, for plain ndarrays only."""
    if cls is not np.ndarray:
        raise CheckpointError(f"pickle: array reconstruction of {cls!r} refused")
    return np.ndarray(shape, dtype)


def _jax_array(fun: Any, args: Any, arr_state: Any, aval_state: Any) -> np.ndarray:
    """``jax._src.array._reconstruct_array`` without jax: the numpy value it wraps."""
    del aval_state  # weak_type only: no bearing on the values
    if fun is not _ndarray_reconstruct or not isinstance(args, tuple):
        raise CheckpointError("pickle: a jax array whose value is not a numpy array")
    arr = fun(*args)
    arr.__setstate__(arr_state)
    return arr


def _dtype(name: Any, align: Any = False, copy: Any = False) -> np.dtype:
    dt = np.dtype(name, align=bool(align), copy=bool(copy))
    if dt.hasobject:
        raise CheckpointError("pickle: object arrays refused")
    return dt


def _as_dict(mapping: Any = ()) -> dict[str, Any]:
    """haiku's ``FlatMap``/``FlatMapping``/``frozendict``, read as a plain dict."""
    out = dict(mapping)
    if not all(isinstance(k, str) for k in out):
        raise CheckpointError("pickle: a haiku mapping with non-string keys")
    return out


def _encode(text: Any, encoding: str = "utf-8") -> bytes:
    """``_codecs.encode`` as protocol-2 pickles use it for byte strings (latin-1)."""
    if not isinstance(text, str) or encoding != "latin1":
        raise CheckpointError("pickle: _codecs.encode is allowed for latin1 byte strings only")
    return text.encode("latin1")


#: ``(module, name)`` -> what the unpickler puts in its place. Everything else is refused.
ALLOWED_GLOBALS: dict[tuple[str, str], Any] = {
    ("jax._src.array", "_reconstruct_array"): _jax_array,
    ("numpy._core.multiarray", "_reconstruct"): _ndarray_reconstruct,
    ("numpy.core.multiarray", "_reconstruct"): _ndarray_reconstruct,
    ("numpy", "ndarray"): np.ndarray,
    ("numpy", "dtype"): _dtype,
    ("haiku._src.data_structures", "FlatMap"): _as_dict,
    ("haiku._src.data_structures", "FlatMapping"): _as_dict,
    ("haiku._src.data_structures", "frozendict"): _as_dict,
    ("_codecs", "encode"): _encode,
}


class _RestrictedUnpickler(pickle.Unpickler):
    """An unpickler that resolves only :data:`ALLOWED_GLOBALS`."""

    def __init__(self, file: io.BytesIO, origin: str) -> None:
        super().__init__(file)
        self.origin = origin

    def find_class(self, module: str, name: str) -> Any:
        try:
            return ALLOWED_GLOBALS[(module, name)]
        except KeyError:
            raise CheckpointError(f"pickle refers to {module}.{name}, which a μLO theta "
                                  f"pickle never needs; refused (not loaded)",
                                  file=self.origin) from None

    def persistent_load(self, pid: Any) -> Any:
        raise CheckpointError("pickle uses persistent ids; refused", file=self.origin)


def _check_tree(node: Any, path: tuple[str, ...], origin: str) -> dict[str, Any]:
    if len(path) > MAX_TREE_DEPTH:
        raise CheckpointError(f"nesting deeper than MAX_TREE_DEPTH = {MAX_TREE_DEPTH} levels",
                              file=origin, key_path=list(path))
    if not isinstance(node, dict):
        raise CheckpointError(f"expected a dict, found {type(node).__name__}", file=origin,
                              key_path=list(path))
    out: dict[str, Any] = {}
    for key, value in node.items():
        if not isinstance(key, str):
            raise CheckpointError(f"non-string key {key!r}", file=origin, key_path=list(path))
        if isinstance(value, dict):
            out[key] = _check_tree(value, (*path, key), origin)
        elif isinstance(value, np.ndarray) and value.dtype.kind == "f":
            out[key] = np.ascontiguousarray(value)
        else:
            raise CheckpointError(f"leaf is {type(value).__name__} "
                                  f"{getattr(value, 'dtype', '')}, expected a float array",
                                  file=origin, key_path=[*path, key])
    return out


def read_pickle(path: str | os.PathLike, max_bytes: int = MAX_FILE_BYTES
                ) -> tuple[dict[str, Any], bytes]:
    """Theta (nested dict of numpy arrays) and the raw bytes of a μLO theta pickle."""
    name = os.fspath(path)
    size = os.path.getsize(name)
    if size > max_bytes:
        raise CheckpointError(f"file is {size:,} bytes, above the limit of {max_bytes:,} "
                              f"(max_bytes; by default MAX_FILE_BYTES)",
                              file=name)
    with open(name, "rb") as f:
        raw = f.read()
    try:
        tree = _RestrictedUnpickler(io.BytesIO(raw), name).load()
    except CheckpointError as e:  # the reconstruction helpers do not know the file
        if e.file is not None:
            raise
        raise CheckpointError(e.detail, file=name, key_path=e.key_path) from None
    except Exception as e:  # truncated or malformed pickles raise many error types
        raise CheckpointError(f"not a readable pickle ({type(e).__name__}: {e})",
                              file=name) from None
    return _check_tree(tree, (), name), raw


def load_pickle(path: str | os.PathLike, kind: str | None = None, *,
                upstream_defaults: bool = False, **hparams: Any) -> Any:
    """A μLO ``global_step{N}.pickle`` as an :class:`~converters.upstream.UpstreamCheckpoint`
    (``step`` from the file name; no ``gen_id``, no config: ``step_mult`` must be given)."""
    import hashlib

    from converters.upstream import UpstreamCheckpoint
    name = os.fspath(path)
    if kind not in (None, KIND):
        raise CheckpointError(f"a pickle is μLO's release format, not {kind!r}", file=name)
    theta, raw = read_pickle(name)
    try:
        resolved = resolve_hparams(hparams, theta, upstream_defaults)
    except ValueError as e:
        raise CheckpointError(str(e), file=name) from None
    found = _STEP_IN_NAME.search(os.path.basename(name))
    step = int(found.group(1)) if found else None
    root = {"params": theta, "gen_id": None, "step": step}
    return UpstreamCheckpoint(
        path=name, kind=KIND, hparams=resolved, tree=theta, gen_id=None, step=step, root=root,
        theta_path=("params",), raw=raw, sha256=hashlib.sha256(raw).hexdigest(), config=None,
        reencodes_exactly=False)


class _Global:
    """A global reference written by name (the writer needs no jax)."""

    def __init__(self, module: str, name: str) -> None:
        self.module, self.name = module, name

    def __call__(self, *args: Any) -> Any:  # pickle's reduce protocol wants a callable
        raise TypeError(f"{self.module}.{self.name} is written by name, never called")


class _JaxArray:
    """A numpy array to be written as jax pickles it (``_reconstruct_array``)."""

    def __init__(self, value: np.ndarray) -> None:
        self.value = value

    def __reduce__(self) -> tuple[Any, ...]:
        fun, args, state = self.value.__reduce__()
        module = fun.__module__
        return (_Global("jax._src.array", "_reconstruct_array"),
                (_Global(module, fun.__name__), args, state, {"weak_type": False}))


class _Writer(pickle._Pickler):  # the pure-Python pickler lets a type be saved by name
    def save_named_global(self, obj: _Global) -> None:
        self.save(obj.module)
        self.save(obj.name)
        self.write(pickle.STACK_GLOBAL)
        self.memoize(obj)

    dispatch: ClassVar[dict] = {**pickle._Pickler.dispatch, _Global: save_named_global}


def pickle_bytes(theta: Mapping[str, Any]) -> bytes:
    """``pickle.dumps(theta)`` as μLO writes it (arrays as ``jax.Array`` pickles, float32,
    protocol 4), written without jax."""
    def wrap(node: Any) -> Any:
        if isinstance(node, Mapping):
            return {k: wrap(v) for k, v in node.items()}
        return _JaxArray(np.ascontiguousarray(node, dtype=np.float32))

    buffer = io.BytesIO()
    _Writer(buffer, protocol=4).dump(wrap(theta))
    return buffer.getvalue()


# ---------------------------------------------------------------------------------------
# PyLO's PyTorch layout.

#: PyLO's hard-coded learned decay offsets for μLO (spec A.3, [external]): the released
#: ``btherien/mulo`` weights do not contain them (:mod:`lopt_port.pylo_layout`).
PYLO_DECAY_OFFSETS = pylo_layout.PYLO_DECAY_OFFSETS
_PYLO_NAMES = pylo_layout.meta_mlp_names(1)


def from_pylo_state_dict(sd: Mapping[str, Any], *,
                         decay_offsets: Mapping[str, Any] | None = None,
                         use_pylo_decay_offsets: bool = False) -> dict[str, np.ndarray]:
    """PyLO's MetaMLP state dict -> lopt-port's μLO state dict (same ``[out, in]`` layout).

    The learned decay offsets come from ``decay_offsets`` (PyLO's ``convert_to_pytorch``
    output holds them under ``"decays"``, named as upstream's theta) or, only with
    ``use_pylo_decay_offsets=True``, from :data:`PYLO_DECAY_OFFSETS`.
    """
    expected = {f"{k}.{w}" for k in _PYLO_NAMES for w in ("weight", "bias")}
    if set(sd) != expected:
        raise CheckpointError(f"not PyLO's MetaMLP layout: expected {sorted(expected)}, found "
                              f"{sorted(sd)[:8]}")
    if (decay_offsets is None) == (not use_pylo_decay_offsets):
        raise CheckpointError("PyLO's μLO weights carry no decay offsets: pass decay_offsets "
                              "or opt in to PyLO's hard-coded ones (use_pylo_decay_offsets="
                              "True), not both")
    out: dict[str, np.ndarray] = {}
    if decay_offsets is None:
        offsets = PYLO_DECAY_OFFSETS
    else:
        names = {"momentum_decays": "momentum_decay_offsets", "rms_decays": "rms_decay_offsets",
                 "adafactor_decays": "adafactor_decay_offsets"}
        offsets = {names.get(k, k): v for k, v in decay_offsets.items()}
        if set(offsets) != set(PYLO_DECAY_OFFSETS):
            raise CheckpointError(f"decay_offsets must name {sorted(names)}, found "
                                  f"{sorted(decay_offsets)}")
    for name in PYLO_DECAY_OFFSETS:
        out[name] = np.asarray(offsets[name], dtype=np.float32)
    for pylo, ours in _PYLO_NAMES.items():
        for w in ("weight", "bias"):
            value = sd[f"{pylo}.{w}"]
            value = value.detach().cpu().numpy() if hasattr(value, "detach") else value
            out[f"{ours}.{w}"] = np.ascontiguousarray(value, dtype=np.float32)
    return out
