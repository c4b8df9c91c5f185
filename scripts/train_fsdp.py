"""Train a small transformer under FSDP2 (``fully_shard``) with VeLO.

Run with torchrun, one process per device (CPU processes with gloo, or GPUs with nccl)::

    .venv/bin/torchrun --nproc-per-node 2 scripts/train_fsdp.py --backend gloo --steps 30
    torchrun --nproc-per-node 8 scripts/train_fsdp.py --backend nccl --weights velo.safetensors

The task is synthetic next-token prediction: sequences that count up by a per-sequence stride
modulo the vocabulary. Every rank sees its own batches; FSDP2 averages the gradients, and
VeLO's whole-tensor statistics of the sharded parameters are completed with a few batched
all_reduces per step. Rank 0 prints the loss (averaged over ranks) and the collectives VeLO
issued per step.

The bundled ``checkpoints/velo_small`` is upstream-format but not meta-trained (it exists to
test faithfulness), so with it the loss is not expected to fall; pass converted, meta-trained
VeLO weights with ``--weights`` to train.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

import torch
import torch.distributed as dist
from torch import nn

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


class SmallTransformer(nn.Module):
    """Token and position embeddings, ``layers`` pre-norm encoder blocks with a causal mask,
    and an output projection."""

    def __init__(self, vocab: int, width: int, layers: int, heads: int, length: int) -> None:
        super().__init__()
        self.tokens = nn.Embedding(vocab, width)
        self.positions = nn.Parameter(torch.randn(length, width) * 0.02)
        self.blocks = nn.ModuleList(
            nn.TransformerEncoderLayer(width, heads, 4 * width, dropout=0.0, batch_first=True,
                                       norm_first=True) for _ in range(layers))
        self.norm = nn.LayerNorm(width)
        self.out = nn.Linear(width, vocab)
        self.register_buffer("mask", nn.Transformer.generate_square_subsequent_mask(length),
                             persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.tokens(x) + self.positions[: x.shape[1]]
        for block in self.blocks:
            h = block(h, src_mask=self.mask[: x.shape[1], : x.shape[1]], is_causal=True)
        return self.out(self.norm(h))


def batch(gen: torch.Generator, size: int, length: int, vocab: int,
          device: torch.device) -> torch.Tensor:
    start = torch.randint(0, vocab, (size, 1), generator=gen)
    stride = torch.randint(1, 4, (size, 1), generator=gen)
    return ((start + stride * torch.arange(length + 1)) % vocab).to(device)


def default_weights() -> str:
    """The bundled VeLO checkpoint, converted into a temporary file."""
    import converters
    path = os.path.join(tempfile.mkdtemp(prefix="lopt-fsdp-"), "velo_small.safetensors")
    converters.convert(os.path.join(ROOT, "checkpoints", "velo_small")).save(path)
    return path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backend", choices=["gloo", "nccl"], default="gloo")
    parser.add_argument("--weights", help="converted VeLO weights (default: the bundled "
                        "checkpoints/velo_small, converted on rank 0)")
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--batch", type=int, default=16, help="sequences per rank and step")
    parser.add_argument("--vocab", type=int, default=64)
    parser.add_argument("--width", type=int, default=64)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--length", type=int, default=16)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    import lopt_port

    dist.init_process_group(args.backend)
    rank, world = dist.get_rank(), dist.get_world_size()
    if args.backend == "nccl":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
    try:
        weights = [args.weights or (default_weights() if rank == 0 else None)]
        dist.broadcast_object_list(weights, src=0)
        torch.manual_seed(args.seed)  # the same initial model on every rank
        model = SmallTransformer(args.vocab, args.width, args.layers, 4, args.length).to(device)
        mesh = init_device_mesh(device.type, (world,))
        for block in model.blocks:
            fully_shard(block, mesh=mesh)
        fully_shard(model, mesh=mesh)
        opt = lopt_port.from_pretrained(weights[0], model.parameters(), num_steps=args.steps)
        gen = torch.Generator().manual_seed(args.seed + 1 + rank)  # each rank its own data
        calls = []
        all_reduce = dist.all_reduce

        def counting(*a, **k):
            calls.append(1)
            return all_reduce(*a, **k)

        if rank == 0:
            params = sum(p.numel() for p in model.parameters())
            print(f"{world} ranks ({args.backend}), {params:,} parameters, "
                  f"{type(opt).__name__} from {weights[0]}")
        start = time.perf_counter()
        for step in range(args.steps):
            seq = batch(gen, args.batch, args.length, args.vocab, device)
            logits = model(seq[:, :-1])
            loss = nn.functional.cross_entropy(logits.reshape(-1, args.vocab),
                                               seq[:, 1:].reshape(-1))
            opt.zero_grad()
            loss.backward()
            mean_loss = loss.detach().clone()
            dist.all_reduce(mean_loss)
            mean_loss /= world
            calls.clear()
            dist.all_reduce = counting
            try:
                opt.step(loss=mean_loss)
            finally:
                dist.all_reduce = all_reduce
            if rank == 0:
                print(f"step {step + 1:4d}  loss {float(mean_loss):.4f}  "
                      f"optimizer collectives {len(calls)}")
        if rank == 0:
            print(f"{args.steps} steps in {time.perf_counter() - start:.1f} s")
    finally:
        dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
