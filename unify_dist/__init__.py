"""unify-dist: one model trained by data owners who keep their data, unified after every local epoch.

The library in three calls, from any training loop (see unify_dist.unifier for the full example)::

    import unify_dist as ud
    ud.same_start(model)                        # collective: rank 0's weights everywhere, proven identical
    unifier = ud.Unifier(model, rule="absmax")  # any registered rule, any UnifyConfig option
    outcome = unifier.unify(weight=n_samples)   # collective, after each local epoch: digest, skipped, time

`ud.register_rule` adds a rule (a pure function of the owners' stacked tensors) from user code.
The program (`unify-dist train`, unify_dist.app) is one user of this surface.
"""

__version__ = "0.2.0"

from unify_dist.collectives import DivergenceError, NonFiniteError
from unify_dist.config import UnifyConfig
from unify_dist.errors import UserError
from unify_dist.rules import RULES, register_rule
from unify_dist.unifier import Unifier, UnifyOutcome, same_start
from unify_dist.hierarchy import HierarchicalUnifier, OwnerGroups, average_gradients, owner_groups

__all__ = [
    "__version__",
    "same_start",
    "Unifier",
    "UnifyOutcome",
    "UnifyConfig",
    "register_rule",
    "owner_groups",
    "OwnerGroups",
    "HierarchicalUnifier",
    "average_gradients",
    "RULES",
    "NonFiniteError",
    "DivergenceError",
    "UserError",
]
