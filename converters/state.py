"""Upstream optimizer *state* -> lopt_port optimizer state, so a run started in JAX continues in
PyTorch.

Reads the flax-serialized state that ``learned_optimization.checkpoints.save_state`` (or
``flax.serialization.to_bytes``) writes for

* small_fc_lopt, ``AdafacMLPLOptState``: ``params``, ``state``, ``mom_rolling {m, t}``,
  ``rms_rolling {rms, t}``, ``fac_rolling_features {v_col, v_row, v_diag}``, ``num_steps``,
  ``iteration``;
* VeLO, ``hyper_v2.State``: the same accumulators (``fac_rolling``), ``iteration``,
  ``num_steps``, ``lstm_hidden_state {hidden, cell}`` (row i belongs to the i-th leaf of the
  params tree in JAX's order: keys sorted at every level) and ``loss_buffer {means,
  iteration, running_min, decays}``.

Each torch parameter is named by the caller and mapped to an upstream parameter path (the keys
under the params tree, as a tuple or joined with ``" > "``: haiku module names contain
``/``), optionally with an axis permutation (``torch = upstream.permute(perm)``, e.g. ``(1, 0)``
for an ``nn.Linear`` weight, which haiku stores as ``[in, out]``). Every upstream parameter must
be mapped: VeLO's per-tensor network sees all tensors at once.
"""

from __future__ import annotations

import io
import os
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from converters import flax_msgpack
from converters.errors import CheckpointError
from lopt_port.state_layout import factored_dims

STATE_FORMAT = "lopt-port-state"
STATE_FORMAT_VERSION = "1"
KINDS = ("small_fc_lopt", "velo")
#: the field holding the factored accumulators, which also tells the kind
_FACTORED_FIELD = {"small_fc_lopt": "fac_rolling_features", "velo": "fac_rolling"}
#: VeLO's global state names <- upstream ``loss_buffer`` keys
_LOSS_BUFFER = {"loss_means": "means", "loss_running_min": "running_min",
                "loss_decays": "decays"}

Path = tuple[str, ...]


@dataclass(frozen=True)
class ParamMap:
    """Where a torch parameter lives upstream: its key path and the axis permutation with
    ``torch_value = upstream_value.permute(permute)`` (``None``: the same layout)."""

    path: Path
    permute: tuple[int, ...] | None = None

    @classmethod
    def parse(cls, value: Any, name: str) -> ParamMap:
        """A path string (``"a > b"``), a sequence of keys, or an object
        ``{"path": ..., "permute": [...]}``."""
        if isinstance(value, ParamMap):
            return value
        permute = None
        if isinstance(value, Mapping):
            unknown = set(value) - {"path", "permute"}
            if unknown or "path" not in value:
                raise CheckpointError(f"mapping for {name!r}: expected keys 'path' and "
                                      f"optionally 'permute', found {sorted(value)}")
            permute = tuple(int(a) for a in value["permute"]) if value.get("permute") else None
            value = value["path"]
        if isinstance(value, str):
            path = tuple(k.strip() for k in value.split(" > "))
        elif isinstance(value, Sequence) and all(isinstance(k, str) for k in value):
            path = tuple(value)
        else:
            raise CheckpointError(f"mapping for {name!r}: expected a path string, a list of "
                                  f"keys or an object, found {value!r}")
        return cls(path, permute)


@dataclass
class MigratedState:
    """An upstream state in lopt_port's terms, keyed by torch parameter name.

    ``params``: the parameters' values at that step (torch layout, the upstream dtype), when
    the file holds them; ``state``: each parameter's lopt_port optimizer state;
    ``global_state``: VeLO's step-wide state (empty for small_fc_lopt); ``iteration``: the
    number of updates upstream had applied.
    """

    kind: str
    iteration: int
    params: dict[str, torch.Tensor] = field(default_factory=dict)
    state: dict[str, dict[str, Any]] = field(default_factory=dict)
    global_state: dict[str, Any] = field(default_factory=dict)

    def optimizer_state_dict(self, optimizer: torch.optim.Optimizer,
                             named_params: Iterable[tuple[str, torch.Tensor]]
                             ) -> dict[str, Any]:
        """A ``state_dict`` for ``optimizer.load_state_dict``: ``named_params`` (e.g.
        ``model.named_parameters()``) names the optimizer's parameters; each must be migrated
        here, with the shape it had upstream after ``permute``."""
        names = {id(p): name for name, p in named_params}
        saved = optimizer.state_dict()
        params = [p for g in optimizer.param_groups for p in g["params"]]
        ids = [i for g in saved["param_groups"] for i in g["params"]]
        out: dict[Any, Any] = {}
        for index, p in zip(ids, params, strict=True):
            name = names.get(id(p))
            if name is None:
                raise CheckpointError(f"optimizer parameter {index} (shape {tuple(p.shape)}) "
                                      f"is not among the named parameters")
            if name not in self.state:
                raise CheckpointError(f"parameter {name!r} has no migrated state (migrated: "
                                      f"{sorted(self.state)[:8]})")
            if name in self.params and tuple(self.params[name].shape) != tuple(p.shape):
                raise CheckpointError(f"parameter {name!r}: the migrated state is for shape "
                                      f"{tuple(self.params[name].shape)}, the parameter has "
                                      f"{tuple(p.shape)}")
            out[index] = dict(self.state[name])
        if self.global_state:  # VeLO keeps it in its first parameter's state
            from lopt_port.state_layout import GLOBAL_STATE
            out[ids[0]][GLOBAL_STATE] = self.global_state
        return {"state": out, "param_groups": saved["param_groups"]}

    @torch.no_grad()
    def copy_params_(self, named_params: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Copy the migrated parameter values into ``named_params`` (every one must be
        migrated, with the same shape); nothing is written if any check fails."""
        pairs = list(named_params)
        for name, p in pairs:
            if name not in self.params:
                raise CheckpointError(f"parameter {name!r} has no migrated value")
            if tuple(self.params[name].shape) != tuple(p.shape):
                raise CheckpointError(f"parameter {name!r}: migrated shape "
                                      f"{tuple(self.params[name].shape)}, parameter "
                                      f"{tuple(p.shape)}")
        for name, p in pairs:
            p.copy_(self.params[name])

    def to_dict(self) -> dict[str, Any]:
        """The content written by :meth:`save` (loads with ``torch.load(weights_only=True)``)."""
        return {"format": STATE_FORMAT, "format_version": STATE_FORMAT_VERSION,
                "kind": self.kind, "iteration": self.iteration, "params": self.params,
                "state": self.state, "global_state": self.global_state}

    def save(self, path: str | os.PathLike, *, overwrite: bool = False) -> str:
        """Write atomically as a torch file; returns the path."""
        from converters.atomic import atomic_target
        target = os.fspath(path)
        buffer = io.BytesIO()
        torch.save(self.to_dict(), buffer)
        with atomic_target(target, overwrite) as tmp, open(tmp, "wb") as f:
            f.write(buffer.getvalue())
        return target

    @classmethod
    def load(cls, path: str | os.PathLike) -> MigratedState:
        """Read a file written by :meth:`save` (no pickle of arbitrary objects)."""
        name = os.fspath(path)
        try:
            obj = torch.load(name, map_location="cpu", weights_only=True)
        except Exception as e:  # weights_only refuses arbitrary objects
            raise CheckpointError(f"not a readable state file ({e})", file=name) from None
        if not isinstance(obj, dict) or obj.get("format") != STATE_FORMAT:
            raise CheckpointError(f"not a migrated state (format {STATE_FORMAT!r})", file=name)
        if obj.get("format_version") != STATE_FORMAT_VERSION:
            raise CheckpointError(f"format_version {obj.get('format_version')!r} is not "
                                  f"supported (supported: {STATE_FORMAT_VERSION})", file=name)
        return cls(obj["kind"], int(obj["iteration"]), obj["params"], obj["state"],
                   obj["global_state"])


def _array(node: Any) -> np.ndarray:
    return node.value if isinstance(node, flax_msgpack.ScalarLeaf) else np.asarray(node)


def _at(tree: Any, path: Path, file: str, what: str) -> Any:
    node = tree
    for i, key in enumerate(path):
        if not isinstance(node, Mapping) or key not in node:
            raise CheckpointError(f"{what}: no key {key!r}", file=file, key_path=path[:i + 1])
        node = node[key]
    return node


def _leaf_paths(tree: Any, prefix: Path = ()) -> list[Path]:
    """Leaf paths in JAX's tree order (dict keys sorted at every level)."""
    if isinstance(tree, Mapping):
        out: list[Path] = []
        for key in sorted(tree):
            out += _leaf_paths(tree[key], (*prefix, key))
        return out
    return [prefix]


def _kind(root: Mapping[str, Any], file: str) -> str:
    found = [k for k in KINDS if _FACTORED_FIELD[k] in root
             and (k == "velo") == ("lstm_hidden_state" in root)]
    if len(found) != 1:
        raise CheckpointError(f"not an AdafacMLPLOptState or hyper_v2.State (root keys "
                              f"{sorted(root)})", file=file)
    return found[0]


def _permuted_dims(shape: tuple[int, ...], perm: tuple[int, ...], up_dims: tuple[int, int],
                   tie_break: str, name: str) -> tuple[int, int]:
    """The torch tensor's factored dims, which must delete the same physical axes."""
    torch_shape = tuple(shape[a] for a in perm)
    dims = factored_dims(torch_shape, tie_break)  # type: ignore[arg-type]
    if dims is None or (perm[dims[0]], perm[dims[1]]) != up_dims:
        raise CheckpointError(
            f"parameter {name!r}: upstream factors axes (d1, d0) = {up_dims} of shape {shape}, "
            f"but in the torch layout {torch_shape} the factored axes are {dims} (physical "
            f"{None if dims is None else (perm[dims[0]], perm[dims[1]])}): row and column "
            f"statistics would swap roles (equal dims?); migrate without the permutation")
    return dims


def _reduced_permutation(rank: int, perm: tuple[int, ...], up_deleted: int,
                         torch_deleted: int) -> list[int]:
    """Axes of a reduced accumulator of a rank-``rank`` tensor (one axis deleted, the decay
    axis last), torch's from upstream's; ``perm[torch_deleted] == up_deleted``."""
    up_axes = [a for a in range(rank) if a != up_deleted]
    return [up_axes.index(perm[j]) for j in range(rank) if j != torch_deleted] + [rank - 1]


def migrate_state(path: str | os.PathLike, names: Mapping[str, Any], *,
                  kind: str | None = None, tie_break: str = "numpy") -> MigratedState:
    """Read an upstream optimizer state file and map it onto torch parameter names.

    ``names``: torch parameter name -> upstream parameter (see :class:`ParamMap`). ``kind``
    is told from the fields when not given. ``tie_break`` is the optimizer's (for factored
    dims of tie shapes). Raises :class:`CheckpointError` naming the file and key path.
    """
    file = os.fspath(path)
    root, _ = flax_msgpack.read_file(file)
    found = _kind(root, file)
    if kind is not None and kind != found:
        raise CheckpointError(f"the state is a {found} state, not {kind}", file=file)
    maps = {name: ParamMap.parse(v, name) for name, v in names.items()}
    fac_field = _FACTORED_FIELD[found]
    moms = _at(root, ("mom_rolling", "m"), file, "momentum")
    leaves = _leaf_paths(moms)
    mapped = {m.path for m in maps.values()}
    missing = [p for p in leaves if p not in mapped]
    if missing:
        raise CheckpointError(f"upstream parameters without a torch name: "
                              f"{[' > '.join(p) for p in missing[:8]]}", file=file)
    iteration = int(_array(_at(root, ("iteration",), file, "iteration")))
    params_tree = root.get("params")
    out = MigratedState(found, iteration)
    if found == "velo":
        lstm = _at(root, ("lstm_hidden_state",), file, "LSTM state")
        hidden = _array(_at(lstm, ("hidden",), file, "LSTM hidden"))
        cell = _array(_at(lstm, ("cell",), file, "LSTM cell"))
        if hidden.shape[0] != len(leaves) or cell.shape != hidden.shape:
            raise CheckpointError(f"LSTM state rows {hidden.shape} / {cell.shape} do not fit "
                                  f"{len(leaves)} parameters", file=file)
        buf = _at(root, ("loss_buffer",), file, "loss buffer")
        buf_iter = int(_array(_at(buf, ("iteration",), file, "loss buffer")))
        if buf_iter != iteration:
            raise CheckpointError(f"loss_buffer iteration {buf_iter} differs from the state's "
                                  f"iteration {iteration}", file=file)
        out.global_state = {
            "iteration": torch.tensor(iteration, dtype=torch.int64),
            "num_steps": int(_array(_at(root, ("num_steps",), file, "num_steps"))),
            **{ours: torch.from_numpy(np.array(_array(_at(buf, (key,), file, "loss buffer")),
                                               dtype=np.float32))
               for ours, key in _LOSS_BUFFER.items()}}
    for name, pm in maps.items():
        where = f"parameter {name!r} ({' > '.join(pm.path)})"
        m = _array(_at(moms, pm.path, file, where))
        rms = _array(_at(root, ("rms_rolling", "rms", *pm.path), file, where))
        fac = {key: _array(_at(root, (fac_field, key, *pm.path), file, where))
               for key in ("v_row", "v_col", "v_diag")}
        shape = tuple(m.shape[:-1])
        rank = len(shape)
        perm = pm.permute or tuple(range(rank))
        if sorted(perm) != list(range(rank)):
            raise CheckpointError(f"{where}: permute {perm} is not a permutation of the "
                                  f"{rank} axes of shape {shape}", file=file)

        def tensor(a: np.ndarray, axes: Sequence[int]) -> torch.Tensor:
            # ndarray.copy() is C-ordered and keeps 0-d arrays 0-d (ascontiguousarray would not)
            return torch.from_numpy(np.transpose(np.asarray(a, dtype=np.float32), axes).copy())

        per_element = [*perm, rank]
        st: dict[str, Any] = {"momentum": tensor(m, per_element),
                              "rms": tensor(rms, per_element)}
        if fac["v_diag"].size or rank < 2:
            st["v_diag"] = tensor(fac["v_diag"], per_element)
            st["factored_dims"] = ()
        else:
            up_dims = _factored_dims_of(shape, fac, tie_break, where, file)
            dims = _permuted_dims(shape, perm, up_dims, tie_break, name)
            st["v_row"] = tensor(fac["v_row"],
                                 _reduced_permutation(rank, perm, up_dims[1], dims[1]))
            st["v_col"] = tensor(fac["v_col"],
                                 _reduced_permutation(rank, perm, up_dims[0], dims[0]))
            st["factored_dims"] = dims
        if found == "small_fc_lopt":
            st["step"] = torch.tensor(float(iteration), dtype=torch.float32)
        else:
            row = leaves.index(pm.path)
            st["lstm_hidden"] = torch.from_numpy(np.array(hidden[row], dtype=np.float32))
            st["lstm_cell"] = torch.from_numpy(np.array(cell[row], dtype=np.float32))
        out.state[name] = st
        if params_tree is not None:
            value = _array(_at(params_tree, pm.path, file, where))
            if tuple(value.shape) != shape:
                raise CheckpointError(f"{where}: params shape {value.shape}, accumulators "
                                      f"{shape}", file=file)
            out.params[name] = torch.from_numpy(np.transpose(value, perm).copy())
    return out


def _factored_dims_of(shape: tuple[int, ...], fac: Mapping[str, np.ndarray], tie_break: str,
                      where: str, file: str) -> tuple[int, int]:
    """Upstream's (d1, d0) for this tensor, read off the v_row / v_col shapes (the rule's
    choice where several pairs fit, i.e. for ties)."""
    k = fac["v_row"].shape[-1]

    def fits(d1: int, d0: int) -> bool:
        return (fac["v_row"].shape == (*np.delete(shape, d0), k)
                and fac["v_col"].shape == (*np.delete(shape, d1), k))

    rule = factored_dims(shape, tie_break)  # type: ignore[arg-type]
    if rule is not None and fits(*rule):
        return rule
    pairs = [(d1, d0) for d0 in range(len(shape)) for d1 in range(len(shape))
             if d0 != d1 and fits(d1, d0)]
    if len(pairs) != 1:
        raise CheckpointError(f"{where}: v_row {fac['v_row'].shape} and v_col "
                              f"{fac['v_col'].shape} do not identify the factored axes of "
                              f"shape {shape}", file=file)
    return pairs[0]
