"""A data owner's own package for unify-dist, on tabular data (scikit-learn's breast cancer set).

Three pieces, each named from the run's config (examples/tabular/owners.toml):
  - `tabular_owner.split`: cuts the dataset into one file per owner (owner0.npz, owner1.npz, ...), as if each
    hospital already held its own records;
  - `tabular_owner.data:owner_data`: the data factory; an owner reads only its own file and standardises
    the features with statistics of its own training rows;
  - `tabular_owner.model:build`: the owner's MLP, built from the input shape and class count.
"""

import os
from pathlib import Path

__all__ = ["owners_dir"]

DIR_ENV = "TABULAR_OWNER_DATA"
"""Environment variable naming the folder of owner files; by default `owners/` beside this package's source."""


def owners_dir() -> Path:
    """Where the owners' files live: TABULAR_OWNER_DATA, else examples/tabular/owners in the source tree."""
    return Path(os.environ.get(DIR_ENV) or Path(__file__).resolve().parent.parent / "owners")
