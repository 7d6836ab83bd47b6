"""A simulated hostile owner, for measuring how unify rules stand up to one (config section [attack]).

The hostile owner trains like everybody else, then, right before every unify of the round (side-by-side
candidates and `auto` included), replaces what it sends:

    kind = "scale"   its weights times `scale` (default -10: large, and pointing the wrong way)
    kind = "noise"   Gaussian noise with standard deviation `noise_std` in place of its weights

It is an experiment switch: off (owner = -1) by default, and it never touches the honest owners.
"""

from __future__ import annotations

import torch

from unify_dist.config import AttackConfig
from unify_dist.flat import FlatState

__all__ = ["corrupt_"]


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
