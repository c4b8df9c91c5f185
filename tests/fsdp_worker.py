"""One rank of the FSDP2 test (tests/test_fsdp.py): a small model under ``fully_shard`` trained
with a learned optimizer beside a single-process copy of itself, compared after every step;
one more parameter is a replicated DTensor; halfway, the sharded optimizer is rebuilt from
its own state dict; at the end its state goes through torch.distributed.checkpoint."""

from __future__ import annotations

import copy
import json
import os

import torch
import torch.distributed as dist
from torch import nn

STEPS = 10


class Tiny(nn.Module):
    """Shapes chosen to cover every sharded case on 2 ranks: uneven shards (11, 5 rows), an
    empty shard (the (1, 5) row), factored axes 0 and 1 (row statistics over the sharded axis,
    and a row-column mean over it), vectors."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(11, 6)
        self.norm = nn.LayerNorm(6)
        self.fc1 = nn.Linear(6, 12)
        self.fc2 = nn.Linear(12, 5)
        self.row = nn.Parameter(torch.randn(1, 5) * 0.1)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        h = self.fc1(self.norm(self.emb(tokens)))
        return self.fc2(torch.nn.functional.gelu(h)) + self.row


def _optimizer(kind: str, params, weights: str) -> torch.optim.Optimizer:
    from lopt_port import Celo, CeloAdam, MuLO, SmallFCLOpt, VeLO
    if kind in ("velo", "celo", "celo_adam"):
        cls = {"velo": VeLO, "celo": Celo, "celo_adam": CeloAdam}[kind]
        return cls(params, weights, num_steps=STEPS, fused=False)
    if kind == "mulo":  # one scale for all: the sharding must not care which
        return MuLO(params, weights, default_scale=0.25, fused=False)
    return SmallFCLOpt(params, weights, fused=False)


def _step(opt: torch.optim.Optimizer, loss: torch.Tensor) -> None:
    if opt.requires_loss:
        opt.step(loss=loss.detach())
    else:
        opt.step()


def run(rank: int, world: int, init_file: str, kind: str, weights: str, out: str) -> None:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import Replicate, distribute_tensor

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank,
                            world_size=world)
    try:
        torch.manual_seed(0)
        model = Tiny()
        reference = copy.deepcopy(model)
        mesh = init_device_mesh("cpu", (world,))
        for module in (model.emb, model.fc1, model.fc2):
            fully_shard(module, mesh=mesh)
        fully_shard(model, mesh=mesh)
        # Beside the sharded model, one parameter every rank holds whole (DTensor Replicate).
        whole = torch.randn(4, 3)
        replicated = nn.Parameter(distribute_tensor(whole.clone(), mesh, [Replicate()]))
        plain = nn.Parameter(whole.clone())
        model.register_parameter("replicated", replicated)  # not sharded: fully_shard is done
        reference.register_parameter("replicated", plain)
        named = list(model.named_parameters())
        ref_params = list(reference.parameters())
        opt = _optimizer(kind, [p for _, p in named], weights)
        ref_opt = _optimizer(kind, ref_params, weights)
        calls = []
        all_reduce = dist.all_reduce

        def counting(*args, **kwargs):
            calls.append(args[0].numel())
            return all_reduce(*args, **kwargs)

        gen = torch.Generator().manual_seed(1)
        worst, per_step = 0.0, []
        for step in range(STEPS):
            if step == STEPS // 2:  # resume: a new optimizer from the sharded state dict
                saved = opt.state_dict()
                opt = _optimizer(kind, [p for _, p in named], weights)
                opt.load_state_dict(saved)
            tokens = torch.randint(0, 11, (16,), generator=gen)
            target = torch.randn(16, 5, generator=gen)
            for m, o in ((model, opt), (reference, ref_opt)):
                o.zero_grad()
                loss = torch.mean((m(tokens) - target) ** 2)
                loss.backward()
                grad = torch.randn(4, 3, generator=torch.Generator().manual_seed(step))
                if o is opt:
                    replicated.grad = distribute_tensor(grad, mesh, [Replicate()])
                else:
                    plain.grad = grad
                if o is opt:
                    calls.clear()
                    dist.all_reduce = counting
                    try:
                        _step(o, loss)
                    finally:
                        dist.all_reduce = all_reduce
                    per_step.append(len(calls))
                else:
                    _step(o, loss)
            for (name, p), q in zip(named, ref_params, strict=True):
                full = p.full_tensor().detach()
                err = float((full - q.detach()).abs().max() / q.detach().abs().max())
                worst = max(worst, err)
                assert err <= 1e-6, (kind, name, err)
        # torch.distributed.checkpoint: save the sharded optimizer state, load it into a new
        # optimizer (whose state DCP first initializes with a zero-gradient, lr-0 step).
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import (
            get_optimizer_state_dict,
            set_optimizer_state_dict,
        )
        folder = os.path.join(os.path.dirname(out), "dcp")
        dcp.save({"optim": get_optimizer_state_dict(model, opt)}, checkpoint_id=folder)
        model.zero_grad(set_to_none=True)
        replicated.grad = None
        fresh = _optimizer(kind, [p for _, p in named], weights)
        target = {"optim": get_optimizer_state_dict(model, fresh)}
        dcp.load(target, checkpoint_id=folder)
        set_optimizer_state_dict(model, fresh, target["optim"])
        for p in (p for _, p in named if p.requires_grad):
            for key, value in opt.state[p].items():
                loaded = fresh.state[p][key]
                if isinstance(value, torch.Tensor):
                    assert torch.equal(value.full_tensor() if hasattr(value, "full_tensor")
                                       else value, loaded.full_tensor()
                                       if hasattr(loaded, "full_tensor") else loaded), key
        if rank == 0:
            with open(out, "w") as f:
                json.dump({"worst": worst, "collectives": per_step}, f)
    finally:
        dist.destroy_process_group()


def spawn(kind: str, weights: str, folder: str, world: int = 2) -> dict:
    """Run ``world`` ranks; returns rank 0's measurements."""
    import torch.multiprocessing as mp
    init_file = os.path.join(folder, "init")
    out = os.path.join(folder, "result.json")
    mp.spawn(run, args=(world, init_file, kind, weights, out), nprocs=world, join=True)
    with open(out) as f:
        return json.load(f)
