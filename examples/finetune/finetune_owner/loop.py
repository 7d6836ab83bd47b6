"""The owner's own training loop through the public API: adapt the shared pretrained ViT, unify the adapters.

    torchrun --standalone --nproc_per_node=3 -m finetune_owner.loop --rounds 5 --rule lora_exact --out DIR

Each owner prints one line per round (its digest, equal on every owner); owner 0 saves the unified adapter
with peft's save_pretrained (DIR/adapter) and the merged weights as safetensors (DIR/merged.safetensors).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

import unify_dist as ud
from finetune_owner.data import CLASSES, owner_data
from finetune_owner.model import Logits, adapted, save_unified
from unify_dist.data import Owner

__all__ = ["run"]


def run(rounds: int = 3, rule: str = "lora_exact", out: Path | None = None, pretrained: Path | None = None,
        dtype: torch.dtype | None = None, lr: float = 3e-3) -> dict:  # fmt: skip
    """Train and unify for `rounds` rounds in an initialised process group; returns this owner's figures."""
    rank, world = dist.get_rank(), dist.get_world_size()
    data = owner_data(Owner(rank, world, seed=0, name=f"rank{rank}"))
    peft_model = adapted(CLASSES, path=pretrained, dtype=dtype)
    model = Logits(peft_model)
    ud.same_start(model)  # collective: the new head's random start, rank 0's everywhere
    unifier = ud.Unifier(model, rule=rule)  # the adapters and the head unified; the pretrained base frozen
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=lr)  # lora_ffa froze A
    x, y = data.train.tensors
    figures = []
    for round_ in range(1, rounds + 1):
        model.train()
        for start in range(0, len(x), 32):
            optimizer.zero_grad()
            nn.functional.cross_entropy(model(x[start : start + 32]).float(), y[start : start + 32]).backward()
            optimizer.step()
        outcome = unifier.unify(weight=len(x))  # collective: every owner now holds the same bits
        accuracy = _accuracy(model, *data.test.tensors)
        figures.append({"round": round_, "digest": outcome.digest, "bytes": outcome.bytes_sent, "acc": accuracy})
        print(f"owner {rank} round {round_} digest {outcome.digest} unified_acc {accuracy:.4f}", flush=True)
    if rank == 0 and out is not None:
        save_unified(peft_model, Path(out))
    return {"figures": figures, "state": {k: v.clone() for k, v in model.state_dict().items()},
            "roles": unifier.flat.roles.summary()}  # fmt: skip


@torch.no_grad()
def _accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    model.eval()
    return float((model(x).argmax(1) == y).float().mean())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--rule", default="lora_exact")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    dist.init_process_group("gloo")
    try:
        run(args.rounds, args.rule, args.out)
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
