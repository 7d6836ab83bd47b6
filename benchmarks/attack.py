"""A simulated hostile owner, for measuring how unify rules stand up to one (`make robust`).

Run the program through this module instead of `unify_dist`, with `--set attack.KEY=VALUE` options:

    torchrun --nproc_per_node=4 -m benchmarks.attack train --config configs/paper_v.toml --set attack.owner=3

The hostile owner trains like everybody else, then, right before every unify of the round (side-by-side
candidates and `auto` included), replaces what it sends:

    kind = "scale"   its weights times `scale` (default -10: large, and pointing the wrong way)
    kind = "noise"   Gaussian noise with standard deviation `noise_std` in place of its weights

It is a round hook (unify_dist.app.loop): the library and the round loop know nothing of it.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from dataclasses import dataclass

import torch

from unify_dist.app.cli import main as cli_main
from unify_dist.app.cli import say
from unify_dist.app.config import build_section, parse_overrides
from unify_dist.config import choice
from unify_dist.errors import UserError
from unify_dist.flat import FlatState
from unify_dist.unifier import Unifier

__all__ = ["AttackConfig", "HostileOwner", "corrupt_", "main"]


@dataclass(frozen=True)
class AttackConfig:
    owner: int = -1
    """Simulate a hostile owner: this rank corrupts what it sends before every unify (-1: nobody)."""
    kind: str = "scale"
    """scale (its weights times `scale`) or noise (Gaussian noise of std `noise_std` instead of its weights)."""
    scale: float = -10.0
    """For kind = scale: the factor applied to the hostile owner's weights."""
    noise_std: float = 1.0
    """For kind = noise: standard deviation of the noise the hostile owner sends."""
    from_round: int = 1
    """The first round in which the hostile owner attacks."""

    def problems(self) -> list[str]:
        out = []
        if self.kind not in ("scale", "noise"):
            out.append(choice("attack.kind", self.kind, ("scale", "noise")))
        if self.owner < -1:
            out.append(f"attack.owner is a rank (or -1 for nobody), got {self.owner}")
        if self.noise_std <= 0 or self.from_round < 1:
            out.append("attack.noise_std must be > 0 and attack.from_round >= 1")
        return out


def corrupt_(flat: FlatState, cfg: AttackConfig, rank: int, round_: int) -> bool:
    """Overwrite this owner's weights with the attack if it is the hostile one; True when it did."""
    if cfg.owner != rank or round_ < cfg.from_round:
        return False
    values = flat.values
    if cfg.kind == "scale":
        values.mul_(cfg.scale)
    else:
        g = torch.Generator(device=values.device)
        g.manual_seed(1_000_003 * round_ + rank)  # reproducible runs; nothing secret about the attack
        values.normal_(0.0, cfg.noise_std, generator=g)
    return True


class HostileOwner:
    """The round hook: corrupts the hostile owner's weights before the round's unifies."""

    def __init__(self, cfg: AttackConfig):
        self.cfg = cfg
        self.rank = -1

    def start(self, rank: int, world_size: int, say: Callable[[str], None]) -> None:
        if self.cfg.owner >= world_size:
            raise UserError(
                f"attack.owner = {self.cfg.owner} but there are only {world_size} owners "
                f"(ranks 0-{world_size - 1}); pick one of them, or -1 for no attack"
            )
        self.rank = rank
        if self.cfg.owner >= 0:
            c = self.cfg
            say(f"attack simulation: owner {c.owner} sends corrupted weights ({c.kind}) from round {c.from_round}")

    def before_unify(self, round_: int, unifier: Unifier) -> None:
        corrupt_(unifier.flat, self.cfg, self.rank, round_)


def split_attack_sets(argv: list[str]) -> tuple[list[str], list[str]]:
    """Separate `--set attack.K=V` items (ours) from the rest of the command line (the program's)."""
    rest, ours, i = [], [], 0
    while i < len(argv):
        if argv[i] == "--set" and i + 1 < len(argv) and argv[i + 1].startswith("attack."):
            ours.append(argv[i + 1].removeprefix("attack."))
            i += 2
        else:
            rest.append(argv[i])
            i += 1
    return ours, rest


def main(argv: list[str] | None = None) -> int:
    ours, rest = split_attack_sets(sys.argv[1:] if argv is None else list(argv))
    try:
        cfg = build_section(AttackConfig, parse_overrides(ours), "attack.")
        problems = cfg.problems()
        if problems:
            raise UserError("; ".join(problems))
    except UserError as e:
        say(f"unify-dist: error: {e}")
        return 2
    return cli_main(rest, hooks=[HostileOwner(cfg)])


if __name__ == "__main__":
    raise SystemExit(main())
