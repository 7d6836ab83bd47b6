"""The owner's model (`model.factory = "tabular_owner.model:build"`): a small MLP for rows of features."""

from __future__ import annotations

from torch import nn

__all__ = ["build"]


def build(in_shape: tuple[int, ...], num_classes: int) -> nn.Module:
    """Every owner calls this with the same shapes, so every owner builds the same architecture."""
    (features,) = in_shape  # one item is one row: a vector of features
    return nn.Sequential(
        nn.Linear(features, 32), nn.ReLU(), nn.Dropout(0.1),
        nn.Linear(32, 16), nn.ReLU(),
        nn.Linear(16, num_classes),
    )  # fmt: skip
