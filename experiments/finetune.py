"""Adapt a shared pretrained model across owners: full fine-tune, head only, and three LoRA rules, side by side.

    python -m experiments.finetune --out results/finetune        # a few minutes on a small CPU

1. Pretrain a tiny ViT (transformers) on Fashion-MNIST classes 0-4 in one process; save it with save_pretrained.
2. Four owners (a real gloo group per method) adapt it to classes 5-9 with label skew (owner i holds mostly
   classes 5+i and 5+(i+1) mod 5), each loading the saved folder with from_pretrained and a new 5-class head:
     full_avg       every weight trains, avg                   head_only   only the new head trains, avg
     lora_separate  peft LoRA (query, value; r 4) + head, A and B averaged apart (FlowerTune)
     lora_exact     the same, the residual folded into the base: exactly base + mean(B_i A_i)
     lora_ffa       the same with A frozen, only B (and the head) averaged
3. Per round: unified test accuracy (classes 5-9 of the test set), bytes per owner, unify time. JSON, a
   markdown table and a plot in --out.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

__all__ = ["METHODS", "main"]

METHODS = ("full_avg", "head_only", "lora_separate", "lora_exact", "lora_ffa")


def _fashion(train: bool, classes: range) -> tuple[torch.Tensor, torch.Tensor]:
    from torchvision.datasets import FashionMNIST

    root = os.environ.get("UNIFY_DIST_DATA_ROOT") or ".data"
    ds = FashionMNIST(root, train=train, download=False)
    x = (ds.data.float().div(255).sub(0.2860).div(0.3530)).unsqueeze(1)
    keep = torch.isin(ds.targets, torch.tensor(list(classes)))
    return x[keep], ds.targets[keep] - classes.start


def _vit(num_labels: int):
    from transformers import ViTConfig, ViTForImageClassification

    config = ViTConfig(image_size=28, patch_size=7, num_channels=1, hidden_size=48, num_hidden_layers=3,
                       num_attention_heads=4, intermediate_size=96, num_labels=num_labels)  # fmt: skip
    return ViTForImageClassification(config)


def pretrain(out: Path, images: int, epochs: int) -> float:
    """Classes 0-4, one process; returns its test accuracy on them. Saved with save_pretrained to `out`."""
    torch.manual_seed(0)
    x, y = _fashion(True, range(0, 5))
    x, y = x[:images], y[:images]
    model = _vit(5)
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3)
    for _ in range(epochs):
        model.train()
        order = torch.randperm(len(x))
        for i in range(0, len(x), 64):
            b = order[i : i + 64]
            opt.zero_grad()
            nn.functional.cross_entropy(model(pixel_values=x[b]).logits, y[b]).backward()
            opt.step()
    model.save_pretrained(out)
    tx, ty = _fashion(False, range(0, 5))
    return _accuracy(lambda v: model(pixel_values=v).logits, tx[:1000], ty[:1000])


@torch.no_grad()
def _accuracy(forward, x: torch.Tensor, y: torch.Tensor) -> float:
    return sum(int((forward(x[i : i + 500]).argmax(1) == y[i : i + 500]).sum()) for i in range(0, len(x), 500)) / len(y)


def _owner_data(rank: int, per_owner: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    x, y = _fashion(True, range(5, 10))
    g = torch.Generator().manual_seed(1000 * seed + rank)
    mine = torch.isin(y, torch.tensor([rank % 5, (rank + 1) % 5]))
    skewed = torch.nonzero(mine).flatten()[torch.randperm(int(mine.sum()), generator=g)[: int(0.8 * per_owner)]]
    rest = torch.nonzero(~mine).flatten()[torch.randperm(int((~mine).sum()), generator=g)[: per_owner - len(skewed)]]
    idx = torch.cat([skewed, rest])
    return x[idx], y[idx]


class _Logits(nn.Module):
    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(pixel_values=x).logits


def _model(method: str, pretrained: Path) -> nn.Module:
    from transformers import ViTForImageClassification

    base = ViTForImageClassification.from_pretrained(pretrained, num_labels=5, ignore_mismatched_sizes=True)
    if method == "full_avg":
        return _Logits(base)
    if method == "head_only":
        for name, p in base.named_parameters():
            p.requires_grad_(name.startswith("classifier."))
        return _Logits(base)
    from peft import LoraConfig, get_peft_model

    targets = ["q_proj", "v_proj", "query", "value"]  # transformers 5 / 4.x names of the attention's query and value
    config = LoraConfig(r=4, lora_alpha=8, target_modules=targets, modules_to_save=["classifier"])
    return _Logits(get_peft_model(base, config))


def _owner(rank: int, world: int, out: str, method: str, pretrained: str, cfg: dict) -> None:
    import unify_dist as ud

    torch.set_num_threads(1)
    # rendezvous through a file in the method's own folder: no free port to pick, so no other program on the
    # machine can take it between the pick and the bind (a run lost an owner that way once, SIGABRT)
    dist.init_process_group("gloo", init_method=f"file://{Path(out, 'rendezvous')}", rank=rank, world_size=world,
                            timeout=timedelta(seconds=900))  # fmt: skip
    torch.manual_seed(1000 * cfg["seed"] + rank)
    model = _model(method, Path(pretrained))
    ud.same_start(model)
    rule = method if method.startswith("lora_") else "avg"
    unifier = ud.Unifier(model, rule=rule)
    lr = 3e-4 if method == "full_avg" else 3e-3
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=lr)
    x, y = _owner_data(rank, cfg["per_owner"], cfg["seed"])
    tx, ty = _fashion(False, range(5, 10))
    tx, ty = tx[: cfg["test"]], ty[: cfg["test"]]
    rows = []
    for round_ in range(1, cfg["rounds"] + 1):
        model.train()
        g = torch.Generator().manual_seed(10**6 * cfg["seed"] + 1000 * round_ + rank)
        order = torch.randperm(len(x), generator=g)
        for i in range(0, len(x), 32):
            b = order[i : i + 32]
            opt.zero_grad()
            nn.functional.cross_entropy(model(x[b]), y[b]).backward()
            opt.step()
        outcome = unifier.unify(weight=len(x))
        model.eval()
        acc = _accuracy(model, tx, ty) if rank == 0 else None
        rows.append({"round": round_, "test_acc": acc, "bytes": outcome.bytes_sent, "unify_s": outcome.seconds,
                     "digest": outcome.digest})  # fmt: skip
    if rank == 0:
        Path(out, "rows.json").write_text(json.dumps({"rows": rows, "unified_bytes": 4 * unifier.flat.numel,
                                                      "roles": {k: len(v) for k, v in unifier.flat.roles.summary().items()}}))  # fmt: skip
    dist.destroy_process_group()


def run_method(method: str, pretrained: Path, owners: int, cfg: dict) -> dict[str, Any]:
    with tempfile.TemporaryDirectory() as out:
        t0 = time.perf_counter()
        mp.spawn(_owner, args=(owners, out, method, str(pretrained), cfg), nprocs=owners, join=True)
        result = json.loads(Path(out, "rows.json").read_text())
    result["wall_s"] = time.perf_counter() - t0
    return result


def _table(results: dict[str, dict]) -> str:
    lines = ["| method | unified tensors | bytes per owner per round | test acc, round 1 | last round | unify ms (median) |",
             "| --- | ---: | ---: | ---: | ---: | ---: |"]  # fmt: skip
    for method, r in results.items():
        rows = r["rows"]
        ms = sorted(x["unify_s"] for x in rows)[len(rows) // 2] * 1e3
        lines.append(f"| {method} | {r['unified_bytes'] / 1024:,.1f} KiB | {rows[-1]['bytes'] / 1024:,.1f} KiB | "
                     f"{rows[0]['test_acc']:.2%} | {rows[-1]['test_acc']:.2%} | {ms:.1f} |")  # fmt: skip
    return "\n".join(lines)


def _plot(results: dict[str, dict], path: Path) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    fig, ax = plt.subplots(figsize=(6, 4))
    for method, r in results.items():
        ax.plot([x["round"] for x in r["rows"]], [x["test_acc"] for x in r["rows"]], marker="o", label=method)
    ax.set_xlabel("round")
    ax.set_ylabel("unified test accuracy (classes 5-9)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, default=Path("results/finetune"))
    p.add_argument("--owners", type=int, default=4)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--per-owner", type=int, default=600)
    p.add_argument("--test", type=int, default=1000)
    p.add_argument("--pretrain-images", type=int, default=8000)
    p.add_argument("--pretrain-epochs", type=int, default=2)
    p.add_argument("--methods", default=",".join(METHODS))
    p.add_argument("--seed", type=int, default=0, help="owners' data draw, order and head init (pretraining: seed 0)")
    args = p.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(max(1, (os.cpu_count() or 1)))
    if (args.out / "pretrained" / "config.json").exists():  # the same seed-0 pretraining: reuse it
        acc = json.loads((args.out / "pretrain_acc.json").read_text())["acc"]
    else:
        acc = pretrain(args.out / "pretrained", args.pretrain_images, args.pretrain_epochs)
        (args.out / "pretrain_acc.json").write_text(json.dumps({"acc": acc}))
    print(f"pretrained on classes 0-4: test accuracy {acc:.2%}", flush=True)
    cfg = {"rounds": args.rounds, "per_owner": args.per_owner, "test": args.test, "seed": args.seed}
    results = {}
    for method in args.methods.split(","):
        results[method] = run_method(method, args.out / "pretrained", args.owners, cfg)
        print(method, [f"{x['test_acc']:.3f}" for x in results[method]["rows"]], f"{results[method]['wall_s']:.0f} s", flush=True)
    name = "finetune" if args.seed == 0 else f"finetune_seed{args.seed}"
    (args.out / f"{name}.json").write_text(json.dumps({"pretrain_acc": acc, "settings": vars(args) | {"out": str(args.out)},
                                                        "results": results}, indent=1))  # fmt: skip
    table = _table(results)
    (args.out / f"{name}.md").write_text(table + "\n")
    _plot(results, args.out / f"{name}.png")
    print(table)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
