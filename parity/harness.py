"""The parity harness: the PyTorch optimizer against a JAX reference, step by step.

Lockstep (:func:`lockstep`): at every step both sides start from the same params and the same
optimizer state (the reference's, mapped into lopt_port's layout: teacher forcing) and get the
same gradients and loss. Then every intermediate, the update, the new params and every state
leaf are compared per tensor, as errors relative to the quantity's scale (definitions in
:mod:`parity.errors`):

==================  ========================================================================
quantity            error
==================  ========================================================================
``update``          :func:`~parity.errors.update_error`: relative to ``step_mult *
                    max|MLP output|`` of the tensor (the size of what the step is made from)
``features_raw``    :func:`~parity.errors.relative_per_column`: per feature column
``mlp_input``       the same with a floor of 1: a normalized column has unit root mean
                    square (absolute error), but one outlier element can carry it to sqrt(n)
                    (42 in a 2,472-element tensor, where float32's ulp is 3.8e-6), where the
                    error is measured against the column's largest value
``params``          :func:`~parity.errors.relative` with the pre-step params: relative to
                    the larger of the tensor's max before and after the step
``mlp_*``,          :func:`~parity.errors.relative`: relative to the tensor's max
``fac_g``,
``state/*``
==================  ========================================================================

Teacher forcing keeps each step's comparison exact: nothing is inherited from earlier
rounding.

Free running (:func:`free_running`): both sides train the same model from the same weights on
the same batches, each computing its own gradients, for N steps; the loss curves and final
params are compared.

The reference is ``builtin`` (:mod:`parity.reference`) or ``upstream`` (the real package,
:mod:`parity.upstream`; it exposes no intermediates, so only params and state are compared).
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Iterable, Iterator
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

import jax
import jax.numpy as jnp
import numpy as np
import torch

import converters
from lopt_port import Celo, CeloAdam, SmallFCLOpt, VeLO, extension
from lopt_port.weights import LoadedWeights, WeightsError
from parity import tolerances
from parity.errors import (
    relative,
    relative_per_column,
    update_error,
)
from parity.state_map import small_fc_state_errors, small_fc_state_from_upstream
from parity.tasks import REAL_TASKS, RealTask, Task, make_task

Reference = Literal["builtin", "upstream"]
Impl = Literal["eager", "fused", "cuda-emulated"]
#: ``eager``: the optimizer's torch path; ``fused``: its fused path (the extension's backend
#: for CPU tensors, the CPU kernels unless ``LOPT_PORT_FUSED_BACKEND`` says otherwise);
#: ``cuda-emulated``: the fused path with ``LOPT_PORT_FUSED_BACKEND=cuda-emulated`` for the
#: run, so the CUDA kernels (``csrc/*.cu``) run on CPU tensors under emulation.
IMPLS: tuple[str, ...] = ("eager", "fused", "cuda-emulated")
CELO_KINDS = ("celo", "celo_adam")
INTERMEDIATES = ("features_raw", "mlp_input", "fac_g", "mlp_pre0", "mlp_pre1", "mlp_pre2",
                 "mlp_output", "update")


class HarnessError(ValueError):
    """Bad input to the harness (unreadable source, unknown option, unavailable side)."""


BACKEND_ENV = "LOPT_PORT_FUSED_BACKEND"


@contextlib.contextmanager
def fused_backend_for(impl: str) -> Iterator[None]:
    """Select the fused backend ``impl`` needs while the block runs.

    ``cuda-emulated`` sets ``LOPT_PORT_FUSED_BACKEND=cuda-emulated`` (read by
    :mod:`lopt_port.extension` when an optimizer is built and at every fused step) and
    restores the previous value, or its absence, on exit, also when the block raises. Other
    implementations leave the environment as it is. Nesting is allowed.
    """
    if impl != "cuda-emulated":
        yield
        return
    previous = os.environ.get(BACKEND_ENV)
    os.environ[BACKEND_ENV] = "cuda-emulated"
    try:
        yield
    finally:
        if previous is None:
            os.environ.pop(BACKEND_ENV, None)
        else:
            os.environ[BACKEND_ENV] = previous


@dataclass
class ErrorRecord:
    """One error value: where it was measured and how large it was."""

    task: str
    step: int
    tensor: str
    quantity: str
    error: float
    kind: str = "small_fc_lopt"

    @property
    def tolerance(self) -> float:
        return tolerances.lockstep_tolerance(self.quantity, self.kind)

    @property
    def violates(self) -> bool:
        return not self.error <= self.tolerance  # NaN violates too


@dataclass
class FreeResult:
    """A free-running comparison: loss curves of both sides and final-state differences."""

    task: str
    steps: int
    loss_torch: list[float]
    loss_reference: list[float]
    final_loss_error: float
    final_params_error: float

    @property
    def violates(self) -> bool:
        return not self.final_loss_error <= tolerances.FREE["final_loss"]


@dataclass
class Sides:
    """Both sides of a comparison: the reference, a PyTorch factory, and a description.

    The reference is stateless (``init``/``step`` are pure), so one serves every task.
    """

    reference: Any
    make_torch: Callable[..., torch.optim.Optimizer]  # (params, num_steps) -> optimizer
    info: dict[str, Any]


def build_sides(src: str | os.PathLike, reference: Reference = "builtin",
                impl: Impl = "eager", variant: str | None = None) -> Sides:
    """Both sides from one upstream checkpoint folder or converted weights file.

    For a fused ``impl``, the optimizer is built once here so that an unavailable fused
    path fails early with its reason; ``info["fused_backend"]`` names the extension backend
    that runs the fused steps (``LOPT_PORT_FUSED_BACKEND``; ``None`` for ``eager`` and for
    Celo-Adam, whose fused path is torch ops).
    """
    if impl not in IMPLS:
        raise HarnessError(f"unknown implementation {impl!r} ({', '.join(IMPLS)})")
    with fused_backend_for(impl):
        sides = _build_sides(src, reference, impl, variant)
        backend = None
        if impl != "eager" and sides.info["kind"] != "celo_adam":
            try:
                backend = extension.fused_backend()
            except extension.ExtensionUnavailable as e:
                raise HarnessError(f"--impl {impl}: {e}") from None
        sides.info["fused_backend"] = backend
    return sides


def _build_sides(src: str | os.PathLike, reference: Reference, impl: Impl,
                 variant: str | None) -> Sides:
    try:
        conv = converters.convert(src)
        if conv.kind not in ("small_fc_lopt", "velo", "mulo", *CELO_KINDS):
            raise HarnessError(f"{src}: lopt-parity supports small_fc_lopt, velo, mulo, celo "
                               f"and celo_adam, not {conv.kind}")
        root = conv.upstream_tree()
    except (converters.CheckpointError, WeightsError) as e:
        raise HarnessError(str(e)) from None
    theta = (root["params"] if {"params", "gen_id"} <= set(root)
             else root["0"] if set(root) == {"0", "1", "2"} else root)
    info: dict[str, Any] = {"source": os.fspath(src), "kind": conv.kind, "impl": impl,
                            "reference": reference, "hparams": conv.hparams,
                            "jax": jax.__version__, "torch": torch.__version__,
                            "matmul_precision": "highest (JAX), no TF32 (torch)"}
    weights = LoadedWeights(conv.kind, conv.hparams, conv.state_dict, conv.metadata)
    torch.backends.cuda.matmul.allow_tf32 = False  # pitfalls #1: true float32 matmuls
    if conv.kind == "velo":
        return _velo_sides(theta, weights, reference, impl, info)
    if conv.kind in CELO_KINDS:
        return _celo_sides(theta, weights, reference, impl, info)
    if conv.kind == "mulo":
        return _mulo_sides(theta, weights, reference, impl, info)
    if reference == "upstream":
        from parity import upstream
        try:
            ref = upstream.UpstreamSmallFC(theta, conv.hparams)
        except upstream.UpstreamUnavailable as e:
            raise HarnessError(f"reference 'upstream' is unavailable: {e}") from None
        variant = ref.variant
        info["upstream"] = ref.source
    elif reference == "builtin":
        from parity.reference import SmallFCLOptReference
        variant = variant or conv.hparams["variant"]
        ref = SmallFCLOptReference(theta, conv.hparams, variant=variant)
    else:
        raise HarnessError(f"unknown reference {reference!r} (builtin, upstream)")
    info["variant"] = variant

    def make_torch(params: list[torch.Tensor], num_steps: int = 1) -> SmallFCLOpt:
        return SmallFCLOpt(params, weights, variant=variant, fused=impl != "eager")

    return _checked_sides(ref, make_torch, impl, info)


def _checked_sides(ref: Any, make_torch: Callable[..., torch.optim.Optimizer], impl: Impl,
                   info: dict[str, Any]) -> Sides:
    """The sides, once an optimizer was built: ``--impl fused`` (or ``cuda-emulated``) fails
    early, with the reason, where the fused path cannot run."""
    if impl != "eager":
        try:
            make_torch([torch.zeros(1)])
        except RuntimeError as e:
            raise HarnessError(f"--impl {impl}: {e}") from None
    return Sides(ref, make_torch, info)


def _velo_sides(theta: dict[str, Any], weights: LoadedWeights, reference: Reference,
                impl: Impl, info: dict[str, Any]) -> Sides:
    if reference != "builtin":
        raise HarnessError("reference 'upstream': the 0.0.1 wheel has no HyperV2; VeLO is "
                           "compared with upstream through the golden vectors "
                           "(tests/test_velo_golden.py) and here with the builtin JAX reference")
    from parity.reference import VeLOReference
    ref = VeLOReference(theta, weights.hparams)
    info["variant"] = None

    def make_torch(params: list[torch.Tensor], num_steps: int = 1) -> VeLO:
        return VeLO(params, weights, num_steps=num_steps, fused=impl != "eager")

    return _checked_sides(ref, make_torch, impl, info)


def _mulo_sides(theta: dict[str, Any], weights: LoadedWeights, reference: Reference,
                impl: Impl, info: dict[str, Any], clip_grad: bool = False) -> Sides:
    """μLO's sides (:mod:`parity.harness_mulo`); lockstep and free running are
    small_fc_lopt's."""
    from parity.harness_mulo import mulo_sides
    try:
        ref, make_torch = mulo_sides(theta, weights, reference, impl, info, clip_grad=clip_grad)
        if impl != "eager":
            make_torch([torch.zeros(1)])
    except (ValueError, RuntimeError) as e:
        raise HarnessError(str(e)) from None
    return Sides(ref, make_torch, info)


def _celo_sides(theta: dict[str, Any], weights: LoadedWeights, reference: Reference,
                impl: Impl, info: dict[str, Any]) -> Sides:
    if reference != "builtin":
        raise HarnessError("reference 'upstream': the Celo authors' package is not installed "
                           "here; Celo is compared with their code through their golden runs "
                           "(tests/test_celo.py) and here with the builtin JAX reference")
    if impl == "cuda-emulated" and weights.kind == "celo_adam":
        raise HarnessError("--impl cuda-emulated: Celo-Adam has no CUDA kernels to emulate (its "
                           "fused path is multi-tensor torch ops, the same on every device); "
                           "use --impl fused")
    from parity.reference import CeloReference
    ref = CeloReference(theta, weights.kind, weights.hparams)
    info["variant"] = None
    cls = Celo if weights.kind == "celo" else CeloAdam

    def make_torch(params: list[torch.Tensor], num_steps: int = 1) -> VeLO:
        return cls(params, weights, num_steps=num_steps, fused=impl != "eager")

    return _checked_sides(ref, make_torch, impl, info)


def _as_jax(tree: dict[str, np.ndarray]) -> dict[str, jnp.ndarray]:
    return {k: jnp.asarray(v) for k, v in tree.items()}


def _upstream_leaf(state: dict[str, Any], name: str) -> Callable[[str], np.ndarray]:
    def leaf(path: str) -> np.ndarray:
        field_, sub = path.split("/")
        return np.asarray(state[field_][sub][name])
    return leaf


def lockstep(sides: Sides, task: Task, num_steps: int = 1000) -> list[ErrorRecord]:
    """Teacher-forced comparison of every step of ``task``; returns all error values.

    ``num_steps`` is the training horizon given to both sides (VeLO uses it). The fused
    backend of the sides' implementation is selected while it runs (:func:`fused_backend_for`).
    """
    with fused_backend_for(sides.info["impl"]):
        return _lockstep(sides, task, num_steps)


def _lockstep(sides: Sides, task: Task, num_steps: int) -> list[ErrorRecord]:
    if sides.info["kind"] in ("velo", *CELO_KINDS):
        from parity.harness_velo import velo_lockstep
        out: list[ErrorRecord] = []
        velo_lockstep(sides, task, num_steps,
                      lambda *r: out.append(ErrorRecord(*r, kind=sides.info["kind"])))
        return out
    ref = sides.reference
    names = list(task.params)
    ref_params = _as_jax(task.params)
    ref_state = ref.init(ref_params, num_steps)
    tensors = {n: torch.tensor(task.params[n]) for n in names}
    opt = sides.make_torch(list(tensors.values()))
    records: list[ErrorRecord] = []
    for t in range(task.steps):
        iteration = int(ref_state["iteration"])
        before = ref_params
        for n, p in tensors.items():
            p.copy_(torch.from_numpy(np.array(ref_params[n])))
            p.grad = torch.tensor(task.grads[t][n])
            opt.state[p] = small_fc_state_from_upstream(opt, p, _upstream_leaf(ref_state, n),
                                                        iteration)
        # The fused kernels keep their intermediates in registers: fused runs compare the
        # params and every state leaf.
        fused = sides.info["impl"] != "eager"
        with contextlib.nullcontext({}) if fused else opt.capture_intermediates() as captured:
            opt.step()
        ref_params, ref_state, inter = ref.step(ref_state, ref_params,
                                                _as_jax(task.grads[t]), task.losses[t])

        def add(tensor: str, quantity: str, error: float, step: int = t + 1) -> None:
            records.append(ErrorRecord(task.name, step, tensor, quantity, error,
                                       kind=sides.info["kind"]))

        for n, p in tensors.items():
            ours = captured.get(p, {})
            for q in INTERMEDIATES:
                if q in ours and n in inter and q in inter[n]:
                    theirs = np.asarray(inter[n][q])
                    if q == "features_raw":
                        err = relative_per_column(ours[q].numpy(), theirs)
                    elif q == "mlp_input":
                        err = relative_per_column(ours[q].numpy(), theirs, floor=1.0)
                    elif q == "update":
                        # μLO scales each tensor's step by s: the update's scale includes it
                        s = opt.scale_of(p) if hasattr(opt, "scale_of") else 1.0
                        err = update_error(ours[q].numpy(), theirs, inter[n]["mlp_output"],
                                           opt.hparams["exp_mult"], opt.hparams["step_mult"] * s)
                    else:
                        err = relative(ours[q].numpy(), theirs)
                    add(n, q, err)
            add(n, "params", relative(p.numpy(), np.asarray(ref_params[n]),
                                      np.asarray(before[n])))
            for q, err in small_fc_state_errors(opt.state[p], _upstream_leaf(ref_state, n),
                                                int(ref_state["iteration"])).items():
                add(n, q, err)
    return records


def free_running(sides: Sides, real: RealTask, steps: int) -> FreeResult:
    """Train ``real`` on both sides for ``steps`` steps; compare losses and final params
    (with the fused backend of the sides' implementation selected, as :func:`lockstep`)."""
    with fused_backend_for(sides.info["impl"]):
        return _free_running(sides, real, steps)


def _free_running(sides: Sides, real: RealTask, steps: int) -> FreeResult:
    ref = sides.reference
    ref_params = _as_jax(real.init_params)
    ref_state = ref.init(ref_params, steps)
    value_and_grad = jax.jit(jax.value_and_grad(real.jax_loss))
    params = {k: torch.tensor(v, requires_grad=True) for k, v in real.init_params.items()}
    opt = sides.make_torch(list(params.values()), steps)
    loss_t, loss_r = [], []
    for t in range(steps):
        x, y = real.batch(t)
        opt.zero_grad()
        loss = real.torch_loss(params, x, y)
        loss.backward()
        if getattr(opt, "requires_loss", False):
            opt.step(loss=loss.detach())
        else:
            opt.step()
        loss_t.append(float(loss.detach()))
        lr_, grads = value_and_grad(ref_params, jnp.asarray(x), jnp.asarray(y))
        ref_params, ref_state, _ = ref.step(ref_state, ref_params, grads, lr_)
        loss_r.append(float(lr_))
    final_loss = relative(np.asarray(loss_t[-1]), np.asarray(loss_r[-1]))
    final_params = max(relative(params[k].detach().numpy(), np.asarray(ref_params[k]))
                       for k in params)
    return FreeResult(real.name, steps, loss_t, loss_r, final_loss, final_params)


@dataclass
class ParityResult:
    """Everything one harness run measured."""

    info: dict[str, Any]
    records: list[ErrorRecord] = field(default_factory=list)
    free: list[FreeResult] = field(default_factory=list)

    def worst(self) -> dict[str, ErrorRecord]:
        """The largest error per quantity (NaN counts as largest)."""
        out: dict[str, ErrorRecord] = {}
        for r in self.records:
            best = out.get(r.quantity)
            if best is None or not r.error <= best.error:
                out[r.quantity] = r
        return dict(sorted(out.items()))

    def violations(self) -> list[str]:
        """One line per gate violation."""
        lines = [f"{r.task} step {r.step} {r.tensor} {r.quantity}: {r.error:.3g} > "
                 f"{r.tolerance:g}" for r in self.records if r.violates]
        lines += [f"free-running {f.task} ({f.steps} steps) final loss: "
                  f"{f.final_loss_error:.3g} > {tolerances.FREE['final_loss']:g}"
                  for f in self.free if f.violates]
        return lines

    def to_json(self) -> dict[str, Any]:
        """The report as JSON-ready data (``parity/report_schema.json``; NaN/inf -> null)."""
        worst = {q: {"error": r.error, "tolerance": r.tolerance, "task": r.task,
                     "step": r.step, "tensor": r.tensor} for q, r in self.worst().items()}
        return _finite_or_none({
            "schema": "lopt-parity-report/1",
            "info": self.info,
            "passed": not self.violations(),
            "violations": self.violations(),
            "worst": worst,
            "records": [asdict(r) for r in self.records],
            "free_running": [{**asdict(f), "violates": f.violates} for f in self.free],
        })


def _finite_or_none(obj: Any) -> Any:
    if isinstance(obj, float):
        return obj if np.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: _finite_or_none(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_finite_or_none(v) for v in obj]
    return obj


def run(src: str | os.PathLike, *, tasks: int = 16, steps: int = 20, seed: int = 0,
        reference: Reference = "builtin", impl: Impl = "eager", variant: str | None = None,
        free_steps: int = 200, free_task: str = "mlp", num_steps: int = 50,
        progress: Callable[[str, int, int], None] | None = None) -> ParityResult:
    """Lockstep ``tasks`` random tasks of ``steps`` steps (training horizon ``num_steps``,
    used by VeLO), then one free-running task (horizon ``free_steps``).

    ``impl="cuda-emulated"`` runs the fused path with ``LOPT_PORT_FUSED_BACKEND=cuda-emulated``
    set for the whole run and restored afterwards, even on error (:func:`fused_backend_for`).
    """
    if tasks < 0 or steps < 1 or free_steps < 0 or num_steps < 1:
        raise HarnessError("--tasks must be >= 0, --steps >= 1, --free-steps >= 0, "
                           "--num-steps >= 1")
    if free_task not in REAL_TASKS:
        raise HarnessError(f"unknown free-running task {free_task!r} "
                           f"({', '.join(REAL_TASKS)})")
    with fused_backend_for(impl):
        return _run(src, tasks, steps, seed, reference, impl, variant, free_steps, free_task,
                    num_steps, progress)


def _run(src: str | os.PathLike, tasks: int, steps: int, seed: int, reference: Reference,
         impl: Impl, variant: str | None, free_steps: int, free_task: str, num_steps: int,
         progress: Callable[[str, int, int], None] | None) -> ParityResult:
    sides = build_sides(src, reference, impl, variant)
    info = {**sides.info, "tasks": tasks, "steps": steps, "seed": seed, "num_steps": num_steps,
            "free_task": free_task if free_steps else None, "free_steps": free_steps}
    result = ParityResult(info)
    task_list: Iterable[Task] = (make_task(seed * 100_003 + i, steps) for i in range(tasks))
    for i, task in enumerate(task_list):
        result.records.extend(lockstep(sides, task, num_steps))
        if progress:
            progress("lockstep", i + 1, tasks)
    if free_steps:
        result.free.append(free_running(sides, REAL_TASKS[free_task](seed), free_steps))
        if progress:
            progress("free-running", 1, 1)
    return result
