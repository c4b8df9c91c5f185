"""Write ``legacy_states.pt``: each optimizer's ``state_dict()`` after two steps, and the
parameters its third step gives, as the lopt_port on the path computes them.

It was run once with the code before the optimizers shared one base class (commit 992ff35,
``PYTHONPATH=<that checkout> python tests/data/make_legacy_states.py``), so that
``tests/test_state_compatibility.py`` checks that such a state still loads and continues to
the very same bits. Rerunning it with the current code writes the current format.
"""

from __future__ import annotations

import copy
import os
import sys

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
CHECKPOINTS = os.path.join(os.path.dirname(os.path.dirname(HERE)), "checkpoints")
#: Shapes that reach every kind of state: a factored matrix, a rank-3 tensor, a vector, a
#: scalar.
SHAPES = [(6, 4), (3, 2, 5), (7,), ()]
#: Optimizer, checkpoint folder and constructor options.
CASES = {
    "small_fc_lopt": ("SmallFCLOpt", "small_fc_h32_sm0p01", {}),
    "mulo": ("MuLO", "mulo_h32_sm0p01", {"default_scale": 0.5}),
    "velo": ("VeLO", "velo_small", {"num_steps": 20, "weight_decay": 0.01}),
    "celo": ("Celo", "celo", {"num_steps": 20}),
    "celo_adam": ("CeloAdam", "celo_adam", {"num_steps": 20}),
}


def tensors(seed: int) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(s, generator=g) for s in SHAPES]


def run(name: str) -> dict:
    import converters
    import lopt_port
    from lopt_port.weights import LoadedWeights

    cls_name, folder, options = CASES[name]
    c = converters.convert(os.path.join(CHECKPOINTS, folder))
    weights = LoadedWeights(c.kind, c.hparams, c.state_dict, c.metadata)
    params = tensors(0)
    opt = getattr(lopt_port, cls_name)(params, weights, fused=False, **options)
    for t in range(3):
        for p, g in zip(params, tensors(100 + t), strict=True):
            p.grad = g
        if t == 2:
            # a deep copy: state_dict() shares the state tensors the next step updates in place
            saved = {"state_dict": copy.deepcopy(opt.state_dict()),
                     "params": [p.clone() for p in params]}
        if opt.requires_loss:
            opt.step(loss=float(3.0 - t))
        else:
            opt.step()
    saved["after"] = [p.clone() for p in params]
    return saved


def main() -> None:
    out = {name: run(name) for name in CASES}
    torch.save(out, os.path.join(HERE, "legacy_states.pt"))
    print(f"wrote {os.path.join(HERE, 'legacy_states.pt')} with {sorted(out)}", file=sys.stderr)


if __name__ == "__main__":
    main()
