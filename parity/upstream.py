"""Run the real upstream ``learned_optimization`` code, code that this project did not write.

Two sources, in this order:

1. an upstream source checkout named by ``LOPT_UPSTREAM_SRC`` (the repository root, holding
   the ``learned_optimization`` package): upstream HEAD;
2. the PyPI wheel ``learned-optimization==0.0.1`` (2022), installed ``--no-deps`` beside
   dm-haiku and gin-config (``make test`` does this).

Neither imports cleanly under a modern JAX, so a small compatibility shim runs first:

* the top-level ``jax.tree_map``/``tree_multimap``/``tree_leaves``/``tree_flatten``/
  ``tree_unflatten``/``tree_structure`` and ``jax.ShapedArray``, removed from JAX, are aliased
  to their ``jax.tree_util``/``jax.core`` equivalents (only where missing);
* TensorFlow (imported by ``summary.py`` and, at HEAD, ``filesystem.py``, for summaries and
  file I/O we never use) and ``flax.metrics.tensorboard`` are stubbed *only while the
  optimizer module is imported*, then removed again so that flax/etils do not see a fake TF.

The shim changes no numerics: it only lets the modules import. When neither source imports,
:func:`status` says why in one line and :class:`UpstreamSmallFC` raises
:class:`UpstreamUnavailable`.
"""

from __future__ import annotations

import contextlib
import importlib
import inspect
import os
import sys
import types
from collections.abc import Iterator, Mapping
from typing import Any

import jax
import jax.numpy as jnp

from lopt_port import small_fc_lopt_config as cfg

ENV_SOURCE = "LOPT_UPSTREAM_SRC"

_JAX_ALIASES = {
    "tree_map": "tree_map", "tree_multimap": "tree_map", "tree_leaves": "tree_leaves",
    "tree_flatten": "tree_flatten", "tree_unflatten": "tree_unflatten",
    "tree_structure": "tree_structure",
}
_STUBBED = ("tensorflow", "tensorflow.compat", "tensorflow.compat.v2", "tensorboard",
            "flax.metrics.tensorboard", "tensorflow_datasets")


class UpstreamUnavailable(RuntimeError):
    """The upstream package cannot be imported here; the message says why."""


def _alias_removed_jax_names() -> None:
    for name, target in _JAX_ALIASES.items():
        if not hasattr(jax, name):
            setattr(jax, name, getattr(jax.tree_util, target))
    if not hasattr(jax, "ShapedArray"):
        jax.ShapedArray = jax.core.ShapedArray


@contextlib.contextmanager
def _tensorflow_stubbed() -> Iterator[None]:
    """Fake TensorFlow/TensorBoard modules for the duration of an import."""
    present = {name: sys.modules[name] for name in _STUBBED if name in sys.modules}
    try:
        import tensorflow  # noqa: F401  (a real TensorFlow needs no stub)
        yield
        return
    except ImportError:
        pass
    tf = types.ModuleType("tensorflow")
    compat = types.ModuleType("tensorflow.compat")
    v2 = types.ModuleType("tensorflow.compat.v2")
    v2.enable_v2_behavior = lambda: None
    tf.compat, compat.v2, tf.io = compat, v2, types.SimpleNamespace(gfile=None)
    board = types.ModuleType("flax.metrics.tensorboard")

    class SummaryWriter:
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            raise RuntimeError("tensorboard is stubbed by lopt-port's upstream shim")

    board.SummaryWriter = SummaryWriter
    stubs = {"tensorflow": tf, "tensorflow.compat": compat, "tensorflow.compat.v2": v2,
             "tensorboard": types.ModuleType("tensorboard"),
             "flax.metrics.tensorboard": board,
             "tensorflow_datasets": types.ModuleType("tensorflow_datasets")}
    sys.modules.update(stubs)
    try:
        yield
    finally:
        for name in stubs:
            sys.modules.pop(name, None)
        sys.modules.update(present)


def _import_adafac() -> tuple[types.ModuleType, str]:
    source = os.environ.get(ENV_SOURCE)
    if source:
        if not os.path.isdir(os.path.join(source, "learned_optimization")):
            raise UpstreamUnavailable(f"{ENV_SOURCE}={source} has no learned_optimization "
                                      f"package")
        if source not in sys.path:
            sys.path.insert(0, source)
        where = f"source checkout {source}"
    else:
        where = "PyPI wheel learned-optimization"
    _alias_removed_jax_names()
    try:
        with _tensorflow_stubbed():
            module = importlib.import_module(
                "learned_optimization.learned_optimizers.adafac_mlp_lopt")
    except ImportError as e:
        raise UpstreamUnavailable(
            f"learned_optimization does not import ({e}); install it with "
            f"'pip install --no-deps learned-optimization==0.0.1 dm-haiku gin-config' or set "
            f"{ENV_SOURCE} to an upstream checkout") from None
    if source and not os.path.abspath(module.__file__).startswith(os.path.abspath(source)):
        raise UpstreamUnavailable(f"{ENV_SOURCE} is set but learned_optimization was imported "
                                  f"from {module.__file__}")
    return module, f"{where} ({os.path.dirname(os.path.dirname(module.__file__))})"


def status() -> str:
    """One line: which upstream code would run, or why none can."""
    try:
        module, where = _import_adafac()
    except UpstreamUnavailable as e:
        return f"upstream unavailable: {e}"
    return f"upstream {_variant_of(module)}: {where}"


def _variant_of(module: types.ModuleType) -> str:
    """HEAD adds 1e-6 inside the non-factored fac_mom_mult; the 2022 wheel does not."""
    return "head" if "fac_vec_v + 1e-6" in inspect.getsource(module) else "pypi-0.0.1"


class UpstreamSmallFC:
    """Upstream ``AdafacMLPLOpt`` behind the interface of the JAX reference.

    ``step`` returns ``(params', state', {})``: upstream exposes no intermediates, so runs
    against it compare parameters and every state leaf. ``variant`` is the code's own
    (``head`` for a HEAD checkout, ``pypi-0.0.1`` for the wheel).
    """

    def __init__(self, theta: Mapping[str, Any], hparams: Mapping[str, Any]) -> None:
        module, self.source = _import_adafac()
        self.module = module
        self.variant = _variant_of(module)
        self.hparams = cfg.normalize_hparams({**hparams, "variant": self.variant})
        args = {k: (tuple(v) if isinstance(v, list) else v)
                for k, v in self.hparams.items() if k in cfg.UPSTREAM_DEFAULTS}
        lopt = module.AdafacMLPLOpt(**args)
        theta = jax.tree_util.tree_map(lambda a: jnp.asarray(a, jnp.float32), dict(theta))
        self.opt = lopt.opt_fn(theta)
        self._update = jax.jit(self.opt.update)
        self._common = importlib.import_module(
            "learned_optimization.learned_optimizers.common")

    def init(self, params: Mapping[str, Any], num_steps: int = 1) -> dict[str, Any]:
        return self._to_dict(self.opt.init(dict(params), num_steps=num_steps))

    def step(self, state: Mapping[str, Any], params: Mapping[str, Any],
             grads: Mapping[str, Any], loss: Any = 0.0) -> tuple[dict, dict, dict]:
        new = self._update(self._from_dict(state, params), dict(grads),
                           jnp.asarray(loss, jnp.float32))
        return dict(new.params), self._to_dict(new), {}

    @staticmethod
    def _to_dict(s: Any) -> dict[str, Any]:
        fac = s.fac_rolling_features
        return {
            "mom_rolling": {"m": dict(s.mom_rolling.m), "t": s.mom_rolling.t},
            "rms_rolling": {"rms": dict(s.rms_rolling.rms), "t": s.rms_rolling.t},
            "fac_rolling_features": {"v_col": dict(fac.v_col), "v_row": dict(fac.v_row),
                                     "v_diag": dict(fac.v_diag)},
            "num_steps": s.num_steps,
            "iteration": s.iteration,
        }

    def _from_dict(self, d: Mapping[str, Any], params: Mapping[str, Any]) -> Any:
        c = self._common
        fac = d["fac_rolling_features"]
        return self.module.AdafacMLPLOptState(
            params=dict(params), state=None,
            mom_rolling=c.MomAccumulator(m=dict(d["mom_rolling"]["m"]),
                                         t=d["mom_rolling"]["t"]),
            rms_rolling=c.RMSAccumulator(rms=dict(d["rms_rolling"]["rms"]),
                                         t=d["rms_rolling"]["t"]),
            fac_rolling_features=c.FactoredAccum(v_col=dict(fac["v_col"]),
                                                 v_row=dict(fac["v_row"]),
                                                 v_diag=dict(fac["v_diag"])),
            num_steps=d["num_steps"], iteration=d["iteration"])
