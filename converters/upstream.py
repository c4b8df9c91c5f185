"""Open an upstream checkpoint: ``params`` (flax msgpack) plus, when present, ``config.gin``."""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from typing import Any

import numpy as np

from converters import celo, flax_msgpack, mulo, small_fc_lopt, velo
from converters.errors import CheckpointError
from converters.gin_config import GinConfig, read_gin
from lopt_port.limits import MAX_FILE_BYTES

#: One mapping module per optimizer kind. A mapping module provides ``KIND``,
#: ``UPSTREAM_CLASS``, ``NO_CONFIG_DEFAULTS`` (upstream's loader choices for tuple-rooted
#: checkpoints without ``config.gin``), ``CHAIN_ALIASES`` (older key chains of a leaf -> its
#: canonical chain), ``matches(theta)``, ``config_defaults()``,
#: ``resolve_hparams(given, theta, upstream_defaults)``,
#: ``theta_to_state_dict(theta, hparams, file, root)``, ``state_dict_to_leaves(sd, hparams)``
#: (canonical chains), ``resolve_torch_hparams(given, shapes, upstream_defaults)``,
#: ``check_state_dict(sd, hparams, origin)`` and ``gin_bindings(hparams)``; optionally
#: ``UPSTREAM_FILE`` (the theta file's name in a folder, default ``params``), ``RAW_ROOT``
#: (theta may sit at the document's root, default False) and ``WRITES_GIN`` (the folder has a
#: ``config.gin``, default True).
MAPPINGS: dict[str, Any] = {m.KIND: m for m in (small_fc_lopt, velo.VELO, celo.CELO,
                                                celo.CELO_ADAM, mulo)}
#: ``run_train.lopt`` class of a ``config.gin`` -> kind (kinds saved with a config only).
CLASS_TO_KIND = {m.UPSTREAM_CLASS: kind for kind, m in MAPPINGS.items()
                 if getattr(m, "WRITES_GIN", True)}
#: Names of the theta file in a checkpoint folder, in the order they are looked for.
THETA_FILES = tuple(dict.fromkeys(getattr(m, "UPSTREAM_FILE", "params")
                                  for m in MAPPINGS.values()))

WRAPPER_KEYS = ("params", "gen_id", "step")
TUPLE_KEYS = ("0", "1", "2")


@dataclass
class UpstreamCheckpoint:
    """A decoded upstream checkpoint.

    ``tree`` is theta (the meta-parameters) as a nested dict of numpy arrays; ``root`` is the
    whole decoded msgpack document and ``theta_path`` where theta sits in it (``("params",)``
    for ``{params, gen_id, step}`` roots, ``("0",)`` for the older tuple roots, ``()`` for
    theta at the root, as the Celo authors save it).
    """

    path: str
    kind: str
    hparams: dict[str, Any]
    tree: dict[str, Any]
    gen_id: str | None
    step: int | None
    root: dict[str, Any]
    theta_path: tuple[str, ...]
    raw: bytes
    sha256: str
    config: GinConfig | None
    reencodes_exactly: bool


def _native(value: Any) -> Any:
    if isinstance(value, flax_msgpack.ScalarLeaf):
        value = value.value
    if isinstance(value, np.ndarray) and value.ndim == 0:
        return value.item()
    return value


def _split_root(root: dict[str, Any], file: str) -> tuple[tuple[str, ...], Any, Any]:
    keys = set(root)
    if keys == set(WRAPPER_KEYS):
        theta_key, gen_key, step_key = WRAPPER_KEYS
    elif keys == set(TUPLE_KEYS):
        theta_key, gen_key, step_key = TUPLE_KEYS
    else:  # theta at the root: allowed for kinds whose mapping says so (load_upstream)
        return (), None, None
    theta = root[theta_key]
    if not isinstance(theta, dict):
        raise CheckpointError("theta is not a map", file=file, key_path=[theta_key])
    gen_id, step = _native(root[gen_key]), _native(root[step_key])
    if gen_id is not None and not isinstance(gen_id, str):
        raise CheckpointError(f"gen_id is a {type(gen_id).__name__}, expected a string",
                              file=file, key_path=[gen_key])
    if step is not None and (isinstance(step, bool) or not isinstance(step, int)):
        raise CheckpointError(f"step is a {type(step).__name__}, expected an integer",
                              file=file, key_path=[step_key])
    return (theta_key,), gen_id, step


def locate(path: str | os.PathLike) -> tuple[str, str | None]:
    """``(theta_file, config_file_or_None)`` for a checkpoint folder (holding ``params`` or
    ``theta.state``) or a theta file."""
    name = os.fspath(path)
    if os.path.isdir(name):
        found = [os.path.join(name, f) for f in THETA_FILES
                 if os.path.isfile(os.path.join(name, f))]
        if not found:
            raise CheckpointError(f"folder has no {' or '.join(map(repr, THETA_FILES))} file",
                                  file=name)
        params = found[0]
    elif os.path.isfile(name):
        params = name
    else:
        raise CheckpointError("no such file or folder", file=name)
    config = os.path.join(os.path.dirname(os.path.abspath(params)), "config.gin")
    return params, (config if os.path.isfile(config) else None)


def _kind_from_tree(theta: dict[str, Any], file: str, at_root: bool) -> str:
    kinds = [kind for kind, m in MAPPINGS.items() if m.matches(theta)]
    if len(kinds) != 1 and at_root:
        raw = [kind for kind, m in MAPPINGS.items() if getattr(m, "RAW_ROOT", False)]
        raise CheckpointError(
            f"root keys {sorted(theta)[:8]} are neither {{params, gen_id, step}}, nor the "
            f"tuple form {{0, 1, 2}}, nor the theta of a kind saved at the root "
            f"({', '.join(raw)})", file=file)
    if len(kinds) != 1:
        raise CheckpointError(
            "no config.gin and the optimizer kind cannot be told from the leaves (top-level "
            f"keys {sorted(theta)[:8]}); pass it (--kind, one of: {', '.join(MAPPINGS)})",
            file=file)
    return kinds[0]


def load_upstream(path: str | os.PathLike, kind: str | None = None, *,
                  upstream_defaults: bool = False, max_bytes: int = MAX_FILE_BYTES,
                  **hparams: Any) -> UpstreamCheckpoint:
    """Read an upstream checkpoint folder (``params`` + ``config.gin``) or ``params`` file.

    The kind and hyperparameters come from ``config.gin`` (``run_train.lopt`` and its
    bindings; unbound constructor arguments take upstream's defaults, as upstream's loader
    does). Keyword ``hparams`` override the config. Without a config the caller names the
    kind (or it is told from the leaf names) and the hyperparameters that cannot be read off
    the shapes; ``upstream_defaults=True`` fills those with upstream's constructor defaults,
    except that a tuple-rooted file (upstream's ``no_config`` checkpoints) first takes the
    choices of upstream's loader for such files (the mapping's ``NO_CONFIG_DEFAULTS``; for VeLO
    ``use_bugged_next_lstm_state=True, use_bugged_loss_features=True``). Keyword ``hparams``
    override those defaults too.
    """
    params_file, config_file = locate(path)
    root, raw = flax_msgpack.read_file(params_file, max_bytes)
    theta_path, gen_id, step = _split_root(root, params_file)
    theta = root[theta_path[0]] if theta_path else root
    config = read_gin(config_file) if config_file else None
    if config is not None:
        cls_kind = CLASS_TO_KIND.get(config.lopt_class)
        if cls_kind is None:
            raise CheckpointError(f"run_train.lopt is @{config.lopt_class}(), which lopt-port "
                                  f"does not support (supported: {', '.join(CLASS_TO_KIND)})",
                                  file=config_file)
        if kind is not None and kind != cls_kind:
            raise CheckpointError(f"kind {kind!r} contradicts the config, which names "
                                  f"{config.lopt_class} ({cls_kind})", file=config_file)
        kind = cls_kind
    elif kind is None:
        kind = _kind_from_tree(theta, params_file, theta_path == ())
    if kind not in MAPPINGS:
        raise CheckpointError(f"unknown kind {kind!r} (supported: {', '.join(MAPPINGS)})",
                              file=params_file)
    mapping = MAPPINGS[kind]
    if theta_path == () and not getattr(mapping, "RAW_ROOT", False):
        raise CheckpointError(
            f"root keys {sorted(root)[:8]} are neither {{params, gen_id, step}} nor the tuple "
            f"form {{0, 1, 2}} ({kind} checkpoints keep theta under one of them)",
            file=params_file)
    try:
        if config is not None:
            given = {**mapping.config_defaults(), **config.bindings, **hparams}
        elif upstream_defaults and theta_path == TUPLE_KEYS[:1]:
            given = {**mapping.NO_CONFIG_DEFAULTS, **hparams}
        else:
            given = dict(hparams)
        resolved = mapping.resolve_hparams(given, theta, upstream_defaults)
    except ValueError as e:
        raise CheckpointError(str(e), file=config_file or params_file) from None
    return UpstreamCheckpoint(
        path=params_file, kind=kind, hparams=resolved, tree=theta, gen_id=gen_id, step=step,
        root=root, theta_path=theta_path, raw=raw, sha256=hashlib.sha256(raw).hexdigest(),
        config=config, reencodes_exactly=flax_msgpack.reencodes_exactly(root, raw))
