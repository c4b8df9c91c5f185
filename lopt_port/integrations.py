"""Hand the training loss to a learned optimizer from loops that call ``step()`` without it.

VeLO, Celo and Celo-Adam read the training loss at every step. A plain loop passes it
(``opt.step(loss)``); loops that own the ``step()`` call (``GradScaler.step(opt)``, timm's
``NativeScaler``, accelerate, Hugging Face's ``Trainer``, Lightning) need one added line:

- :func:`track_loss` ``(model, opt)``: a forward hook that observes the ``loss`` a model returns
  (attribute or key, as Hugging Face models return it) in training forwards;
- :data:`LightningLossCallback`: a Lightning callback that observes the loss Lightning
  backpropagates, with the loss scaling and the accumulation divisor undone.

Both call :meth:`~lopt_port.optimizer.LearnedOptimizer.observe_loss`; the frameworks are
imported only when these are used (none is a dependency of lopt-port).
"""

from __future__ import annotations

import importlib
from collections.abc import Mapping
from typing import Any

import torch
from torch.utils.hooks import RemovableHandle

from lopt_port.optimizer import LearnedOptimizer


def learned_optimizer(optimizer: Any) -> LearnedOptimizer:
    """The :class:`~lopt_port.optimizer.LearnedOptimizer` inside ``optimizer``, following the
    ``.optimizer`` attribute of wrappers (accelerate's ``AcceleratedOptimizer``, Lightning's
    ``LightningOptimizer``); ``TypeError`` if there is none."""
    seen = optimizer
    for _ in range(8):  # wrappers nest one or two deep; a cycle must not loop forever
        if isinstance(seen, LearnedOptimizer):
            return seen
        seen = getattr(seen, "optimizer", None)
        if seen is None:
            break
    raise TypeError(f"{type(optimizer).__name__} is not a lopt-port learned optimizer, nor a "
                    f"wrapper (.optimizer) around one")


def _output_loss(output: Any) -> torch.Tensor | None:
    """The ``loss`` of a model's output: a key of a mapping (``ModelOutput`` is one, and
    leaves out keys whose value is ``None``), else an attribute; ``None`` if absent."""
    loss = output.get("loss") if isinstance(output, Mapping) else getattr(output, "loss", None)
    return loss if isinstance(loss, torch.Tensor) else None


def track_loss(model: torch.nn.Module, optimizer: Any) -> RemovableHandle:
    """Observe, for ``optimizer``'s next step, the ``loss`` that ``model``'s forward returns.

    Only training forwards count (``model.training`` and gradients enabled), so evaluation
    passes are ignored. A forward called with ``num_items_in_batch`` (Hugging Face's
    ``Trainer`` passes it to models that normalize their loss by the token count of the whole
    accumulation window) returns a share of the window's loss: those shares are summed
    (``observe_loss(..., combine="sum")``); other losses are averaged over the window.

    Returns the hook's handle: ``handle.remove()`` stops tracking.
    """
    target = learned_optimizer(optimizer)

    def observe(module: torch.nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any],
                output: Any) -> None:
        if not (module.training and torch.is_grad_enabled()):
            return
        loss = _output_loss(output)
        if loss is not None:
            share = kwargs.get("num_items_in_batch") is not None
            target.observe_loss(loss, combine="sum" if share else "mean")

    return model.register_forward_hook(observe, with_kwargs=True)


def _true_lightning_loss(trainer: Any, loss: torch.Tensor) -> torch.Tensor:
    """The loss of one micro-batch as the training step returned it, from the tensor Lightning
    passes to ``on_before_backward``: Lightning divided it by ``accumulate_grad_batches``
    (``ClosureResult.from_training_step_output``) and, under ``16-mixed``, multiplied it by
    the ``GradScaler``'s scale (``MixedPrecision.pre_backward``).

    The scale is a power of two, so dividing by it is exact (barring overflow); multiplying
    back by ``accumulate_grad_batches`` is exact when that is a power of two and otherwise
    within half an ulp of the loss."""
    true = loss.detach()
    scaler = getattr(trainer.precision_plugin, "scaler", None)
    if scaler is not None and scaler.is_enabled():
        # scale() of a one is the current scale as a tensor: no host sync, public API.
        true = true / scaler.scale(torch.ones((), device=true.device))
    accumulate = int(trainer.accumulate_grad_batches)
    return true * accumulate if accumulate != 1 else true


def _lightning_callback_class() -> type:
    """``LightningLossCallback``, built on the first use against the installed Lightning
    (``pytorch_lightning``, else the unified ``lightning`` package)."""
    for name in ("pytorch_lightning", "lightning.pytorch"):
        try:
            base = importlib.import_module(name).Callback
            break
        except ImportError:
            continue
    else:
        raise ImportError("LightningLossCallback needs Lightning (pip install "
                          "pytorch-lightning)")

    class LightningLossCallback(base):  # type: ignore[misc, valid-type]
        """Observes, for every lopt-port optimizer of the ``Trainer``, the loss of each
        micro-batch (``on_before_backward``), scaling and accumulation undone; a step then
        takes the mean over its accumulation window, under 32-bit, ``16-mixed`` and
        ``bf16-mixed`` precision alike."""

        def on_before_backward(self, trainer: Any, pl_module: Any, loss: torch.Tensor) -> None:
            targets = []
            for opt in trainer.optimizers:
                try:
                    targets.append(learned_optimizer(opt))
                except TypeError:
                    continue
            if targets:
                true = _true_lightning_loss(trainer, loss)
                for opt in targets:
                    opt.observe_loss(true)

    LightningLossCallback.__module__ = __name__
    return LightningLossCallback


def __getattr__(name: str) -> Any:
    if name == "LightningLossCallback":
        cls = _lightning_callback_class()
        globals()[name] = cls
        return cls
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
