"""VeLO in the parity harness: lockstep (teacher forced) against the JAX reference.

The first step starts from each side's own initial state (so the initial LSTM state and loss
buffer, which depend on the horizon and ``use_bugged_loss_features``, are compared too);
every later step starts both sides from the reference's params and state (mapped into
lopt_port's layout). Both get the same gradients and loss; then every intermediate is
compared:

====================  ======================================================================
quantity              error
====================  ======================================================================
``loss_features``     absolute (in [-1, 1])
``lstm_input``        absolute (bounded: tanh, clipped logs, one-hot)
``controls``,         :func:`~parity.errors.relative` over the step's tensors
``lr_mult``,
``lstm_state``
``ff_params``         relative, worst leaf of the tensor's interpolated MLP weights
``features_raw``      per column, relative
``mlp_input``         per column, relative to max(1, the column's max) (unit scale, but a
                      normalized column's max grows like sqrt(n) with an outlier)
``fac_g``             relative to the tensor's max
``mlp_pre*``,         relative to what the layer sums (:func:`~parity.golden_velo.
``mlp_output``        mlp_abs_scales`: the absolute forward pass |W| |x| + |b|)
``update``            :func:`parity.golden_velo.velo_update_error` (over ``max|lr_mult|`` x
                      param scale x what the output layer sums ...)
``params``            relative to the larger of the params' scale before and after the step
``state/*``           relative, per state leaf (per tensor and the global loss buffer)
====================  ======================================================================
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax.numpy as jnp
import numpy as np
import torch

from parity.errors import absolute, relative, relative_per_column
from parity.golden_velo import (
    load_velo_state,
    mlp_abs_scales,
    mlp_errors,
    tree_leaf,
    velo_state_errors,
    velo_update_error,
)
from parity.tasks import Task


def _pair(ours: torch.Tensor, theirs: Any) -> tuple[np.ndarray, np.ndarray]:
    """Both as numpy; a scalar parameter's quantities are (1, ...) on one side and (...) on
    the other (upstream expands scalars only inside the MLP), so equal sizes are reshaped."""
    ref = np.asarray(theirs)
    got = ours.detach().cpu().numpy()
    return (got.reshape(ref.shape) if got.size == ref.size else got), ref


def velo_lockstep(sides: Any, task: Task, num_steps: int,
                  record: Callable[[str, int, str, str, float], None]) -> None:
    """Teacher-forced comparison of every step of ``task``; ``record(task, step, tensor,
    quantity, error)`` receives every error value."""
    ref = sides.reference
    names = list(task.params)
    ref_params = {k: jnp.asarray(v) for k, v in task.params.items()}
    ref_state = ref.init(ref_params, num_steps)
    tensors = {n: torch.tensor(task.params[n]) for n in names}
    opt = sides.make_torch(list(tensors.values()), num_steps)
    hp = opt.hparams
    fused = sides.info["impl"] != "eager"  # fused or cuda-emulated
    for t in range(task.steps):
        before = ref_params
        for n, p in tensors.items():
            p.copy_(torch.from_numpy(np.array(ref_params[n])))
            p.grad = torch.tensor(task.grads[t][n])
        if t:  # the first step starts from each side's own initial state: init is compared
            load_velo_state(opt, tensors, tree_leaf(ref_state))
        loss = float(task.losses[t])
        if fused:
            opt.step(loss=loss)
        else:
            with opt.capture_intermediates() as cap:
                opt.step(loss=loss)
        ref_params, ref_state, inter = ref.step(
            ref_state, ref_params, {k: jnp.asarray(v) for k, v in task.grads[t].items()},
            jnp.float32(loss))

        def add(tensor: str, quantity: str, error: float, step: int = t + 1) -> None:
            record(task.name, step, tensor, quantity, error)

        if fused:  # the kernels keep their intermediates: params and every state leaf
            for n, p in tensors.items():
                add(n, "params", relative(p.numpy(), np.asarray(ref_params[n]),
                                          np.asarray(before[n])))
            for key, err in velo_state_errors(opt, tensors, tree_leaf(ref_state)).items():
                add(key.split("/")[0] if "/" in key else "-", f"state/{key.split('/')[-1]}",
                    err)
            continue

        ours, theirs = cap["step"], inter
        add("-", "loss_features", absolute(ours["loss_features"].numpy(),
                                           np.asarray(theirs["loss_features"])))
        add("-", "lstm_input", absolute(ours["lstm_input"].numpy(),
                                        np.asarray(theirs["lstm_input"])))
        for q in ("controls", "lr_mult"):
            if q in theirs:  # Celo-Adam has no controls
                add("-", q, relative(ours[q].numpy(), np.asarray(theirs[q])))
        for part in ("hidden", "cell"):
            add("-", "lstm_state", relative(ours["lstm_state_out"][part].numpy(),
                                            np.asarray(theirs["lstm_state_out"][part])))
        lr_mult = np.asarray(theirs["lr_mult"])
        for row, (n, p) in enumerate(tensors.items()):
            got, want = cap["tensors"][p], theirs["tensors"][n]
            if "ff_params" not in want:  # Celo-Adam: Adam's moments and step
                for q in ("m_hat", "v_hat", "update"):
                    add(n, q, relative(*_pair(got[q], want[q])))
                add(n, "params", relative(p.numpy(), np.asarray(ref_params[n]),
                                          np.asarray(before[n])))
                continue
            add(n, "ff_params", max(relative(v.numpy(), np.asarray(want["ff_params"][k]))
                                    for k, v in got["ff_params"].items()))
            add(n, "features_raw", relative_per_column(*_pair(got["features_raw"],
                                                              want["features_raw"])))
            add(n, "mlp_input", relative_per_column(*_pair(got["mlp_input"],
                                                            want["mlp_input"]), floor=1.0))
            add(n, "fac_g", relative(*_pair(got["fac_g"], want["fac_g"])))
            ff_ref = {k: np.asarray(v) for k, v in want["ff_params"].items()}
            for q, err in mlp_errors(got, lambda q, want=want: want[q], ff_ref).items():
                add(n, q, err)
            add(n, "update", velo_update_error(
                got["update"].numpy(), np.asarray(want["mlp_output"]),
                np.asarray(want["param_scale"]), lr_mult, row, hp["exp_mult"],
                hp["step_mult"], mlp_abs_scales(want["mlp_input"], ff_ref)[-1]))
            add(n, "params", relative(p.numpy(), np.asarray(ref_params[n]),
                                      np.asarray(before[n])))
        for key, err in velo_state_errors(opt, tensors, tree_leaf(ref_state)).items():
            add(key.split("/")[0] if "/" in key else "-", f"state/{key.split('/')[-1]}", err)
