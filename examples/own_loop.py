"""A plain PyTorch training loop that becomes a data owner with three lines of unify_dist (marked below).

Run, from the repository root (each process is one owner):

    torchrun --standalone --nproc_per_node=2 examples/own_loop.py

Each owner keeps its own share of scikit-learn's handwritten digits (8x8 images), trains its own small CNN
with BatchNorm using its own optimizer, and after every local epoch unifies the weights with the other
owners: parameters and BatchNorm's running statistics alike. Delete the three marked lines and this is an
ordinary single-process loop; nothing else about it changes.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
import torch.distributed as dist
from sklearn.datasets import load_digits
from torch import Tensor, nn

import unify_dist as ud


def make_model() -> nn.Module:
    """The owner's own model: BatchNorm on purpose, since its running statistics must be unified too."""
    return nn.Sequential(
        nn.Conv2d(1, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
        nn.Conv2d(16, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(), nn.MaxPool2d(2),
        nn.Flatten(), nn.Linear(32 * 4 * 4, 10),
    )  # fmt: skip


def owner_data(rank: int, owners: int) -> tuple[tuple[Tensor, Tensor], tuple[Tensor, Tensor]]:
    """This owner's (train, test) rows: a fixed shuffle dealt out by rank, standing in for private data."""
    digits = load_digits()
    x = torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 16.0  # pixels are 0..16
    y = torch.tensor(digits.target)
    mine = torch.randperm(len(y), generator=torch.Generator().manual_seed(0))[rank::owners]
    cut = len(mine) * 4 // 5
    return (x[mine[:cut]], y[mine[:cut]]), (x[mine[cut:]], y[mine[cut:]])


def train_epoch(model: nn.Module, optimizer: torch.optim.Optimizer, x: Tensor, y: Tensor, gen: torch.Generator) -> None:
    model.train()
    for idx in torch.randperm(len(y), generator=gen).split(32):
        optimizer.zero_grad()
        nn.functional.cross_entropy(model(x[idx]), y[idx]).backward()
        optimizer.step()


@torch.no_grad()
def accuracy(model: nn.Module, x: Tensor, y: Tensor) -> float:
    model.eval()
    return (model(x).argmax(1) == y).float().mean().item()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rounds", type=int, default=8, help="local epochs, each followed by a unify")
    p.add_argument("--rule", default="avg", help=f"a registered rule: {', '.join(ud.RULES)}")
    p.add_argument("--save", type=Path, help="folder to save each owner's final weights in (owner{rank}.pt)")
    args = p.parse_args()

    dist.init_process_group("gloo")  # torchrun set RANK, WORLD_SIZE and the rendezvous address
    rank, owners = dist.get_rank(), dist.get_world_size()
    torch.manual_seed(rank)  # owners start from different random weights; same_start makes them one
    (x, y), (x_test, y_test) = owner_data(rank, owners)
    model = make_model()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    gen = torch.Generator().manual_seed(rank)

    ud.same_start(model)  # unify_dist (collective): rank 0's initial weights on every owner
    unifier = ud.Unifier(model, rule=args.rule)  # unify_dist (collective): checks every owner agrees

    for round_ in range(1, args.rounds + 1):
        train_epoch(model, optimizer, x, y, gen)
        local = accuracy(model, x_test, y_test)
        outcome = unifier.unify(weight=len(y))  # unify_dist (collective): one model again, digests compared
        unified = accuracy(model, x_test, y_test)
        line = f"owner {rank} round {round_} digest {outcome.digest} local_acc {local:.4f} unified_acc {unified:.4f}\n"
        print(line, end="", flush=True)  # one write per line, so the owners' lines do not interleave

    if args.save:
        args.save.mkdir(parents=True, exist_ok=True)
        torch.save(model.state_dict(), args.save / f"owner{rank}.pt")
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
