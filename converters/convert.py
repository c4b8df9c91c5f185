"""Upstream checkpoint -> PyTorch weights (safetensors / pt) -> upstream, losslessly."""

from __future__ import annotations

import io
import json
import os
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import torch

from converters import flax_msgpack, mulo, origin
from converters.atomic import atomic_target, write_files_atomic
from converters.errors import CheckpointError
from converters.upstream import MAPPINGS, UpstreamCheckpoint, load_upstream
from lopt_port import pylo_layout
from lopt_port.provenance import NOTE_KEY, ORIGIN_KEY, origin_of
from lopt_port.value_rules import check_real_dense
from lopt_port.version import __version__
from lopt_port.weights import (
    CONFIG_NAME,
    FORMAT_NAME,
    FORMAT_VERSION,
    WEIGHTS_NAME,
    WeightsError,
    is_pretrained_folder,
    load_pylo,
    load_weights,
    loads_json,
    metadata_to_config,
    safetensors_bytes,
    state_dict_with_metadata,
)

Format = Literal["safetensors", "pt", "hf", "upstream", "pickle"]
#: ``pickle``: μLO's release format (``pickle.dump(theta)``, kind ``mulo`` only).
FORMATS: tuple[str, ...] = ("safetensors", "pt", "hf", "upstream", "pickle")
WEIGHTS_SUFFIXES = (".safetensors", ".pt")


def _skeleton(node: Any, path: tuple[str, ...], theta_path: tuple[str, ...]) -> Any:
    """JSON description of the msgpack document with theta's arrays replaced by references.

    A reference is the array's key chain under theta as read, so structural facts such as
    which encoding of a namedtuple the file used survive; other values (strings of a flax
    namedtuple envelope, ``gen_id``, ``step``) are stored as they are.
    """
    is_array = isinstance(node, (np.ndarray, flax_msgpack.ScalarLeaf))
    if isinstance(node, dict):
        return {"m": [[k, _skeleton(v, (*path, k), theta_path)] for k, v in node.items()]}
    if is_array and path[:len(theta_path)] == theta_path:
        return {"a": list(path[len(theta_path):])}
    if is_array:
        code = flax_msgpack.EXT_NPSCALAR if isinstance(node, flax_msgpack.ScalarLeaf) else 1
        arr = node.value if isinstance(node, flax_msgpack.ScalarLeaf) else node
        return {"x": [code, list(arr.shape), arr.dtype.name, arr.tobytes().hex()]}
    return {"v": node}


def _rebuild(skel: Any, leaves: Mapping[tuple[str, ...], np.ndarray], used: set,
             aliases: Mapping[tuple[str, ...], tuple[str, ...]]) -> Any:
    """Inverse of :func:`_skeleton`; a reference is looked up under its canonical chain."""
    if not isinstance(skel, dict) or len(skel) != 1:
        raise ValueError("malformed upstream_layout node")
    (tag, body), = skel.items()
    if tag == "m":
        return {k: _rebuild(v, leaves, used, aliases) for k, v in body}
    if tag == "a":
        chain = aliases.get(tuple(body), tuple(body))
        if chain not in leaves:
            raise ValueError(f"upstream_layout names a leaf the weights lack: "
                             f"{' > '.join(chain)}")
        used.add(chain)
        return leaves[chain]
    if tag == "x":
        code, shape, dtype, data = body
        arr = np.frombuffer(bytes.fromhex(data), dtype=np.dtype(dtype)).reshape(shape).copy()
        return flax_msgpack.ScalarLeaf(arr) if code == flax_msgpack.EXT_NPSCALAR else arr
    if tag == "v":
        return body
    raise ValueError(f"malformed upstream_layout tag {tag!r}")


def _nest(leaves: Mapping[tuple[str, ...], np.ndarray]) -> dict[str, Any]:
    tree: dict[str, Any] = {}
    for chain, value in leaves.items():
        node = tree
        for key in chain[:-1]:
            node = node.setdefault(key, {})
        node[chain[-1]] = value
    return tree


def _gin_literal(value: Any) -> str:
    if isinstance(value, tuple):
        inner = ", ".join(_gin_literal(v) for v in value)
        return f"({inner},)" if len(value) == 1 else f"({inner})"
    return repr(value)


@dataclass
class Converted:
    """A converted learned optimizer: PyTorch state dict plus provenance metadata."""

    kind: str
    state_dict: dict[str, torch.Tensor]
    config: dict[str, Any]
    metadata: dict[str, str]

    @property
    def hparams(self) -> dict[str, Any]:
        return self.config["hparams"]

    def upstream_tree(self) -> dict[str, Any]:
        """The upstream msgpack document (root map) these weights came from or map to."""
        mapping = MAPPINGS[self.kind]
        arrays = {k: v.detach().cpu().numpy() for k, v in self.state_dict.items()}
        leaves = mapping.state_dict_to_leaves(arrays, self.hparams)
        layout = self.metadata.get("upstream_layout")
        if layout is None and getattr(mapping, "RAW_ROOT", False):
            return _nest(leaves)
        if layout is None:
            gen_id = loads_json(self.metadata.get("upstream_gen_id", '""'), "metadata",
                                "upstream_gen_id")
            step = loads_json(self.metadata.get("upstream_step", "0"), "metadata",
                              "upstream_step")
            return {"params": _nest(leaves), "gen_id": gen_id or "", "step": step or 0}
        used: set = set()
        try:
            skeleton = loads_json(layout, "metadata", "upstream_layout")
            root = _rebuild(skeleton, leaves, used, mapping.CHAIN_ALIASES)
        except (ValueError, TypeError, KeyError) as e:
            raise CheckpointError(f"metadata upstream_layout is unusable: {e}") from None
        if used != set(leaves):
            missing = sorted(" > ".join(c) for c in set(leaves) - used)
            raise CheckpointError(f"metadata upstream_layout lacks leaves: {missing[:5]}")
        return root

    def upstream_bytes(self) -> bytes:
        """The upstream theta file's contents (flax msgpack; ``params`` or ``theta.state``)."""
        return flax_msgpack.encode(self.upstream_tree())

    def upstream_config_text(self) -> str:
        """The original ``config.gin`` when known, else a minimal one naming the class."""
        text = self.metadata.get("upstream_config_gin")
        if text is not None:
            return text
        mapping = MAPPINGS[self.kind]
        cls = mapping.UPSTREAM_CLASS
        lines = [f"# Written by lopt-port {__version__} ({self.kind}).",
                 f"run_train.lopt = @{cls}()"]
        for k, v in sorted(mapping.gin_bindings(self.hparams).items()):
            lines.append(f"{cls}.{k} = {_gin_literal(v)}")
        return "\n".join(lines) + "\n"

    def save(self, path: str | os.PathLike, format: Format = "safetensors", *,
             overwrite: bool = False) -> list[str]:
        """Write the weights atomically; returns the written paths.

        ``safetensors`` and ``pt`` write one file; ``hf`` a pretrained folder (``config.json``
        and ``model.safetensors``, the Hugging Face convention); ``upstream`` a folder with
        ``params`` and ``config.gin``. The bytes depend only on the tensors and the metadata
        (keys sorted). A new output is created exclusively; ``overwrite`` replaces an existing
        one as a whole; on any error nothing is left behind (:mod:`converters.atomic`).
        """
        target = os.fspath(path)
        if format in ("safetensors", "hf"):
            data = safetensors_bytes(self.state_dict, self.metadata)

            def write_weights(p: str) -> None:
                with open(p, "wb") as f:
                    f.write(data)

            if format == "safetensors":
                with atomic_target(target, overwrite) as tmp:
                    write_weights(tmp)
                return [target]
            config = json.dumps(metadata_to_config(self.metadata), indent=2, sort_keys=True)

            def write_hf_config(p: str) -> None:
                with open(p, "w", encoding="utf-8") as f:
                    f.write(config + "\n")

            return write_files_atomic(target, {CONFIG_NAME: write_hf_config,
                                               WEIGHTS_NAME: write_weights}, overwrite)
        if format == "pt":
            buffer = io.BytesIO()
            torch.save(state_dict_with_metadata(dict(sorted(self.state_dict.items())),
                                                dict(sorted(self.metadata.items()))), buffer)
            with atomic_target(target, overwrite) as tmp, open(tmp, "wb") as f:
                f.write(buffer.getvalue())
            return [target]
        if format == "pickle":
            if self.kind != mulo.KIND:
                raise CheckpointError(f"format 'pickle' is μLO's release format; these weights "
                                      f"are {self.kind!r}")
            data = mulo.pickle_bytes(self.upstream_tree()["params"])
            with atomic_target(target, overwrite) as tmp, open(tmp, "wb") as f:
                f.write(data)
            return [target]
        if format == "upstream":
            data = self.upstream_bytes()
            text = self.upstream_config_text()

            def write_params(p: str) -> None:
                with open(p, "wb") as f:
                    f.write(data)

            def write_config(p: str) -> None:
                with open(p, "w", encoding="utf-8") as f:
                    f.write(text)

            mapping = MAPPINGS[self.kind]
            files = {getattr(mapping, "UPSTREAM_FILE", "params"): write_params}
            if getattr(mapping, "WRITES_GIN", True):
                files["config.gin"] = write_config
            return write_files_atomic(target, files, overwrite)
        raise CheckpointError(f"unknown format {format!r} (one of {', '.join(FORMATS)})")


def _from_upstream(ckpt: UpstreamCheckpoint, declared: str | None) -> Converted:
    mapping = MAPPINGS[ckpt.kind]
    arrays = mapping.theta_to_state_dict(ckpt.tree, ckpt.hparams, ckpt.path, ckpt.theta_path)
    state_dict = {k: torch.from_numpy(np.array(v)) for k, v in arrays.items()}
    metadata = {
        "format": FORMAT_NAME,
        "format_version": FORMAT_VERSION,
        "kind": ckpt.kind,
        "hparams": json.dumps(ckpt.hparams, sort_keys=True),
        "lopt_port_version": __version__,
        "source_file": os.path.basename(ckpt.path),
        "source_sha256": ckpt.sha256,
        "upstream_gen_id": json.dumps(ckpt.gen_id),
        "upstream_step": json.dumps(ckpt.step),
        "upstream_layout": json.dumps(_skeleton(ckpt.root, (), ckpt.theta_path)),
        "upstream_roundtrip": "exact" if ckpt.reencodes_exactly else "inexact",
    }
    if ckpt.config is not None:
        metadata["upstream_config_gin"] = ckpt.config.text
    try:
        metadata.update(origin.classify(ckpt.sha256, ckpt.kind, ckpt.hparams, len(ckpt.raw),
                                        ckpt.config is not None, declared))
    except ValueError as e:
        raise CheckpointError(str(e), file=ckpt.path) from None
    converted = Converted(ckpt.kind, state_dict, {"kind": ckpt.kind, "hparams": ckpt.hparams},
                          metadata)
    if ckpt.reencodes_exactly and converted.upstream_bytes() != ckpt.raw:
        raise CheckpointError("internal error: the converted weights do not map back to the "
                              "original bytes", file=ckpt.path)
    return converted


def _recorded_origin(metadata: Mapping[str, str], declared: str | None,
                     path: str) -> dict[str, str]:
    """The origin fields of converted weights being re-saved: as recorded (or, for files
    written before the field existed, as :func:`~lopt_port.provenance.origin_of` infers it),
    or as ``declared`` where nothing contradicts that."""
    recorded, note = origin_of(metadata)
    if declared is None:
        return {ORIGIN_KEY: recorded, NOTE_KEY: note or "not recorded at conversion"}
    if declared not in origin.DECLARABLE:
        raise CheckpointError(f"origin {declared!r} cannot be declared (one of "
                              f"{', '.join(origin.DECLARABLE)})", file=path)
    if recorded not in ("unknown", declared):
        raise CheckpointError(f"origin declared {declared!r}, but the weights are recorded as "
                              f"{recorded!r}: {note}", file=path)
    if recorded == declared:
        return {ORIGIN_KEY: recorded, NOTE_KEY: note}
    return {ORIGIN_KEY: declared,
            NOTE_KEY: "declared by the user at conversion (lopt-convert --origin)"}


def _from_weights(path: str, kind: str | None, upstream_defaults: bool, declared: str | None,
                  hparams: Mapping[str, Any], pylo_decay_offsets: Any = None) -> Converted:
    try:
        if pylo_layout.layout_of(path) is not None:
            loaded = load_pylo(path, kind=kind, decay_offsets=pylo_decay_offsets)
        else:
            loaded = load_weights(path)
    except WeightsError as e:
        raise CheckpointError(str(e)) from None
    kind = kind or loaded.kind
    if kind is None:
        raise CheckpointError("weights carry no metadata: name the kind", file=path)
    if loaded.kind not in (None, kind):
        raise CheckpointError(f"weights are {loaded.kind!r}, not {kind!r}", file=path)
    if kind not in MAPPINGS:
        raise CheckpointError(f"unknown kind {kind!r} (supported: {', '.join(MAPPINGS)})",
                              file=path)
    mapping = MAPPINGS[kind]
    shapes = {k: tuple(v.shape) for k, v in loaded.state_dict.items()}
    try:
        check_real_dense(loaded.state_dict, os.path.basename(path))
        resolved = mapping.resolve_torch_hparams({**loaded.hparams, **hparams}, shapes,
                                                 upstream_defaults)
        mapping.check_state_dict(loaded.state_dict, resolved, os.path.basename(path))
    except ValueError as e:
        raise CheckpointError(str(e), file=path) from None
    metadata = dict(loaded.metadata)
    metadata.update({"format": FORMAT_NAME, "format_version": FORMAT_VERSION, "kind": kind,
                     "hparams": json.dumps(resolved, sort_keys=True)})
    metadata.setdefault("lopt_port_version", __version__)
    metadata.update(_recorded_origin(metadata, declared, path))
    return Converted(kind, dict(loaded.state_dict), {"kind": kind, "hparams": resolved}, metadata)


def convert(path: str | os.PathLike, kind: str | None = None, *,
            upstream_defaults: bool = False, origin: str | None = None,
            pylo_decay_offsets: Mapping[str, Any] | str | None = None,
            **hparams: Any) -> Converted:
    """Convert an upstream checkpoint (folder or ``params`` file) to PyTorch weights.

    ``path`` may also be a converted ``.safetensors``/``.pt`` file or pretrained folder, to
    change its format or write it back to upstream. ``kind`` and ``hparams`` follow
    :func:`load_upstream`. The metadata records the weights' origin
    (:mod:`converters.origin`); ``origin`` declares it (``fixture``, ``release`` or
    ``unknown``) where lopt-port cannot recognise the file, and is refused where it
    contradicts what lopt-port knows.

    ``path`` may also be one of pylo's published weights folders
    (:func:`lopt_port.load_pylo`; origin ``pylo-copy``); a MetaMLP folder needs ``kind`` and
    ``pylo_decay_offsets`` (the three offsets by lopt-port name, or ``"pylo"``).
    """
    name = os.fspath(path)
    if pylo_layout.layout_of(name) is not None:
        return _from_weights(name, kind, upstream_defaults, origin, hparams, pylo_decay_offsets)
    if pylo_decay_offsets is not None:
        raise CheckpointError("pylo decay offsets apply to a pylo MetaMLP folder only",
                              file=name)
    if (os.path.isfile(name) and name.endswith(WEIGHTS_SUFFIXES)) or (
            os.path.isdir(name) and is_pretrained_folder(name)):
        return _from_weights(name, kind, upstream_defaults, origin, hparams)
    if os.path.isfile(name) and name.endswith(mulo.PICKLE_SUFFIXES):
        return _from_upstream(mulo.load_pickle(name, kind, upstream_defaults=upstream_defaults,
                                               **hparams), origin)
    return _from_upstream(load_upstream(name, kind, upstream_defaults=upstream_defaults,
                                        **hparams), origin)
