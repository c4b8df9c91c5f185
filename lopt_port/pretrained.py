"""One-line loading: ``from_pretrained(weights, params, **kwargs)`` builds the optimizer that a
converted file's metadata names.

``weights`` may be

* a converted ``.safetensors`` / ``.pt`` file (``lopt-convert``'s default output);
* a pretrained folder, ``config.json`` + ``model.safetensors`` (the Hugging Face convention,
  ``lopt-convert --format hf``);
* a Hugging Face Hub repository id, ``"owner/name"`` or ``"owner/name@revision"``, when no
  local path of that name exists: the two files of a pretrained folder are downloaded with
  ``huggingface_hub``, which is used only when it is installed (it is never a dependency);
* a local copy of pylo's VeLO weights: a folder holding ``VeLO_RNN/`` and ``VeLO_MLP/`` (its two
  Hub repositories, downloaded side by side; :func:`~lopt_port.weights.load_pylo`, origin
  ``pylo-copy``); a pylo MetaMLP folder needs its kind and decay offsets, so it goes through
  ``load_pylo(path, kind=..., decay_offsets=...)`` first;
* a :class:`~lopt_port.weights.LoadedWeights`, or a state dict carrying lopt-port metadata.

The optimizer class comes from the metadata's ``kind`` and its hyperparameters from the
metadata's ``hparams``; ``kwargs`` go to the constructor (``lr``, ``fused``, VeLO's
``num_steps``, ``hparams`` overrides, ...). Metadata of an unknown format or version, an
unknown kind, or no metadata at all raise :class:`~lopt_port.weights.WeightsError`.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterable, Mapping
from typing import Any

import torch

from lopt_port.celo import Celo
from lopt_port.celo_adam import CeloAdam
from lopt_port.mulo import MuLO
from lopt_port.small_fc_lopt import SmallFCLOpt
from lopt_port.velo import VeLO
from lopt_port.weights import (
    CONFIG_NAME,
    WEIGHTS_NAME,
    LoadedWeights,
    WeightsError,
    load_weights,
)

#: The optimizer class of each ``kind`` in the metadata.
OPTIMIZERS: dict[str, type[torch.optim.Optimizer]] = {
    "small_fc_lopt": SmallFCLOpt,
    "velo": VeLO,
    "mulo": MuLO,
    "celo": Celo,
    "celo_adam": CeloAdam,
}

_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+(@[\w./-]+)?$")


def _download_from_hub(repo: str) -> str:
    """The local folder of hub repository ``owner/name[@revision]`` (its two files)."""
    repo_id, _, revision = repo.partition("@")
    try:
        import huggingface_hub
    except ImportError:
        raise WeightsError(
            f"{repo!r} is not a local file or folder; to download it from the Hugging Face "
            f"Hub, install huggingface_hub (it is optional), or pass a local path") from None
    try:
        return huggingface_hub.snapshot_download(
            repo_id, revision=revision or None, allow_patterns=[CONFIG_NAME, WEIGHTS_NAME])
    except Exception as e:  # the hub client raises its own errors (offline, not found, ...)
        raise WeightsError(f"{repo!r}: could not download from the Hugging Face Hub "
                           f"({type(e).__name__}: {e})") from None


def load_pretrained(weights: str | os.PathLike | Mapping[str, torch.Tensor] | LoadedWeights
                    ) -> LoadedWeights:
    """Load ``weights`` as :func:`from_pretrained` does, without building an optimizer."""
    if isinstance(weights, str) and not os.path.exists(weights) and _HUB_ID.match(weights):
        weights = _download_from_hub(weights)
    return load_weights(weights)


def from_pretrained(weights: str | os.PathLike | Mapping[str, torch.Tensor] | LoadedWeights,
                    params: Iterable[torch.Tensor] | Iterable[dict[str, Any]],
                    **kwargs: Any) -> torch.optim.Optimizer:
    """The optimizer named by the metadata of ``weights``, over ``params``.

    ``from_pretrained("velo.safetensors", model.parameters(), num_steps=10_000)`` is
    ``VeLO(model.parameters(), "velo.safetensors", num_steps=10_000)``.
    """
    loaded = load_pretrained(weights)
    if loaded.kind is None:
        names = ", ".join(sorted(c.__name__ for c in OPTIMIZERS.values()))
        raise WeightsError("the weights carry no lopt-port metadata, so the optimizer is not "
                           f"known: construct one of {names} directly")
    cls = OPTIMIZERS.get(loaded.kind)
    if cls is None:
        raise WeightsError(f"the weights are for {loaded.kind!r}, which this lopt-port does not "
                           f"provide (known: {', '.join(sorted(OPTIMIZERS))})")
    return cls(params, loaded, **kwargs)
