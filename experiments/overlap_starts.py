"""Where each owner of an overlapped run starts its next round (issue 19, overlap's accuracy on label skew).

    python -m experiments.overlap_starts RUN_DIR [--round R]

Under unify.overlap an owner's model between rounds holds the unified state a_R (identical on every owner,
what the round evaluates), while the owner's own weights x = a_R + its round-R progress not yet unified sit
in the overlapped unifier's checkpointed state; x is where the owner's next round starts. This reads both
from each owner's round-R checkpoint of a 2-owner Fashion-MNIST run with the paper CNN and prints their
accuracy on the whole official test set, per class. Read-only; checkpoints are this program's own files.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from unify_dist.config import DataConfig, ModelConfig
from unify_dist.data import _normalise, _read_torchvision, prepare_dataset
from unify_dist.errors import UserError
from unify_dist.flat import FlatState
from unify_dist.models import build_model

FASHION_MEAN, FASHION_STD = (0.2860,), (0.3530,)  # unify_dist.data's normalisation for fashion_mnist


def per_class(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> list[float]:
    """The model's test accuracy on each class, in percent."""
    model.eval()
    with torch.no_grad():
        pred = torch.cat([model(x[i : i + 1000]).argmax(1) for i in range(0, len(x), 1000)])
    return [(pred[y == c] == c).float().mean().item() * 100 for c in range(10)]


def row(name: str, acc: list[float], counts: torch.Tensor) -> str:
    whole = sum(a * n for a, n in zip(acc, counts.tolist())) / counts.sum().item()
    return (f"{name:18s} all {whole:5.2f}%  classes 0-4 {sum(acc[:5]) / 5:5.1f}%  5-9 {sum(acc[5:]) / 5:5.1f}%  "
            "per class " + " ".join(f"{a:.0f}" for a in acc))  # fmt: skip


def starts(run_dir: Path, round_: int) -> tuple[dict[str, torch.Tensor], list[torch.Tensor]] | str:
    """The unified model state of `round_` and each owner's own weights x (flat, in FlatState's order), read from
    the two owners' checkpoints; a one-line reason instead when they are not there or not from an overlapped run."""
    paths = [run_dir / "checkpoints" / f"rank{r}" / f"round_{round_:05d}.pt" for r in (0, 1)]
    missing = [str(p) for p in paths if not p.exists()]
    if missing:
        return f"no checkpoint {missing[0]}; give the run dir of an overlapped run and a round it kept (the newest 3)"
    unified, own = {}, []
    for path in paths:
        state = torch.load(path, map_location="cpu", weights_only=True)  # our own file: tensors and plain types
        if state["unifier"].get("overlap_own") is None:
            return f"{path} is not from a run with unify.overlap = true"
        unified = unified or state["model"]  # identical on every owner (the digests proved it)
        own.append(state["unifier"]["overlap_own"])
    return unified, own


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="experiments.overlap_starts", description=__doc__.splitlines()[0])
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("--round", type=int, default=30)
    args = parser.parse_args(argv)
    found = starts(args.run_dir, args.round)
    if isinstance(found, str):
        print(f"overlap_starts: {found}", file=sys.stderr)
        return 2
    data = DataConfig(dataset="fashion_mnist")
    try:
        prepare_dataset(data)  # one line naming the data root when the files are not there
    except UserError as e:
        print(f"overlap_starts: {e}", file=sys.stderr)
        return 2
    x, y = _read_torchvision(data, train=False)
    x = _normalise(x, FASHION_MEAN, FASHION_STD, torch.device("cpu"))
    counts = torch.bincount(y, minlength=10)
    unified, own = found
    model = build_model(ModelConfig(name="paper_cnn"), (1, 28, 28), 10)
    model.load_state_dict(unified)
    print(row(f"unified a_{args.round}", per_class(model, x, y), counts))
    flat = FlatState(model)
    for rank, values in enumerate(own):
        flat.values.copy_(values[: flat.values.numel()])  # the overlapped unifier's copy may carry the tail
        print(row(f"owner {rank}'s own x", per_class(model, x, y), counts))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
