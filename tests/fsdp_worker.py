"""One rank of the FSDP2 test (tests/test_fsdp.py): a small model under ``fully_shard`` trained
with a learned optimizer (eager or fused, float32 or bfloat16 parameters) beside a
single-process copy of itself on the same path, compared after every step; one more parameter
is a replicated DTensor; halfway, the sharded optimizer is rebuilt from its own state dict,
and at the end a second sharded copy that never stopped must hold the very same bits; its
state then goes through torch.distributed.checkpoint."""

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


def _optimizer(kind: str, params, weights: str, fused: bool) -> torch.optim.Optimizer:
    from lopt_port import Celo, CeloAdam, MuLO, SmallFCLOpt, VeLO
    if kind in ("velo", "celo", "celo_adam"):
        cls = {"velo": VeLO, "celo": Celo, "celo_adam": CeloAdam}[kind]
        return cls(params, weights, num_steps=STEPS, fused=fused)
    if kind == "mulo":  # one scale for all: the sharding must not care which; the clip's
        # global norm is one more sum over the shards
        return MuLO(params, weights, default_scale=0.25, clip_grad=True, fused=fused)
    return SmallFCLOpt(params, weights, fused=fused)


def _step(opt: torch.optim.Optimizer, loss: torch.Tensor) -> None:
    if opt.requires_loss:
        opt.step(loss=loss.detach())
    else:
        opt.step()


def run(rank: int, world: int, init_file: str, kind: str, weights: str, out: str,
        fused: bool = False, dtype: str = "float32", tolerance: float = 1e-6) -> None:
    """One rank. ``tolerance``: the largest error allowed after any step, relative to the
    tensor's largest value; tests/test_fsdp.py passes its stated bounds (the default, 1e-6,
    is its float32 bound: sums over shards round differently from one sum, ~1e-7)."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import Replicate, distribute_tensor

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank,
                            world_size=world)
    try:
        torch.manual_seed(0)
        param_dtype = getattr(torch, dtype)
        model = Tiny().to(param_dtype)
        reference = copy.deepcopy(model)
        unbroken = copy.deepcopy(model)  # sharded too, never resumed
        mesh = init_device_mesh("cpu", (world,))
        for m in (model, unbroken):
            for module in (m.emb, m.fc1, m.fc2):
                fully_shard(module, mesh=mesh)
            fully_shard(m, mesh=mesh)
        # Beside the sharded model, one parameter every rank holds whole (DTensor Replicate).
        whole = torch.randn(4, 3).to(param_dtype)
        replicated = nn.Parameter(distribute_tensor(whole.clone(), mesh, [Replicate()]))
        plain = nn.Parameter(whole.clone())
        unbroken_replicated = nn.Parameter(distribute_tensor(whole.clone(), mesh, [Replicate()]))
        model.register_parameter("replicated", replicated)  # not sharded: fully_shard is done
        reference.register_parameter("replicated", plain)
        unbroken.register_parameter("replicated", unbroken_replicated)
        named = list(model.named_parameters())
        ref_params = list(reference.parameters())
        opt = _optimizer(kind, [p for _, p in named], weights, fused)
        ref_opt = _optimizer(kind, ref_params, weights, fused)
        unbroken_opt = _optimizer(kind, list(unbroken.parameters()), weights, fused)
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
                opt = _optimizer(kind, [p for _, p in named], weights, fused)
                opt.load_state_dict(saved)
            tokens = torch.randint(0, 11, (16,), generator=gen)
            target = torch.randn(16, 5, generator=gen).to(param_dtype)
            for m, o in ((model, opt), (reference, ref_opt), (unbroken, unbroken_opt)):
                o.zero_grad()
                loss = torch.mean((m(tokens) - target) ** 2)
                loss.backward()
                grad = torch.randn(4, 3, generator=torch.Generator().manual_seed(step))
                grad = grad.to(param_dtype)
                if m is model:
                    replicated.grad = distribute_tensor(grad, mesh, [Replicate()])
                elif m is unbroken:
                    unbroken_replicated.grad = distribute_tensor(grad, mesh, [Replicate()])
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
                full = p.full_tensor().detach().float()
                q = q.detach().float()
                err = float((full - q).abs().max() / q.abs().max())
                worst = max(worst, err)
                assert err <= tolerance, (kind, name, err)
        # Resuming from the sharded state dict changed no bit.
        for (name, p), u in zip(named, unbroken.parameters(), strict=True):
            assert torch.equal(p.to_local(), u.to_local()), (kind, name, "resume")
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
        fresh = _optimizer(kind, [p for _, p in named], weights, fused)
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
                from lopt_port import extension
                json.dump({"worst": worst, "collectives": per_step,
                           "ops": extension.ops().name if fused else None}, f)
    finally:
        dist.destroy_process_group()


def spawn(kind: str, weights: str, folder: str, world: int = 2, *, fused: bool = False,
          dtype: str = "float32", tolerance: float = 1e-6) -> dict:
    """Run ``world`` ranks; returns rank 0's measurements (``tolerance``: as :func:`run`)."""
    import torch.multiprocessing as mp
    init_file = os.path.join(folder, "init")
    out = os.path.join(folder, "result.json")
    mp.spawn(run, args=(world, init_file, kind, weights, out, fused, dtype, tolerance),
             nprocs=world, join=True)
    with open(out) as f:
        return json.load(f)
