"""Models by name. Every owner builds the same architecture; rank 0's initial weights are broadcast."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from unify_dist.config import ModelConfig

__all__ = ["MODELS", "build_model", "PaperCNN"]


class PaperCNN(nn.Module):
    """The paper's CNN: two conv+ReLU+max-pool blocks, then two linear layers (225,034 weights on 28x28)."""

    def __init__(self, in_channels: int, num_classes: int, image_size: int, hidden: int = 128):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(in_channels, 32, 3), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(32, 64, 3), nn.ReLU(), nn.MaxPool2d(2),
        )  # fmt: skip
        side = ((image_size - 2) // 2 - 2) // 2
        self.classifier = nn.Sequential(
            nn.Flatten(), nn.Linear(64 * side * side, hidden), nn.ReLU(), nn.Linear(hidden, num_classes)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))


def _mlp(in_channels: int, num_classes: int, image_size: int, hidden: int) -> nn.Module:
    return nn.Sequential(
        nn.Flatten(),
        nn.Linear(in_channels * image_size * image_size, hidden), nn.ReLU(),
        nn.Linear(hidden, hidden), nn.ReLU(),
        nn.Linear(hidden, num_classes),
    )  # fmt: skip


def _resnet18(in_channels: int, num_classes: int, image_size: int, hidden: int) -> nn.Module:
    """torchvision's resnet18 for small images: a 3x3 stride-1 stem and no max-pool (the CIFAR variant)."""
    from torchvision.models import resnet18

    model = resnet18(num_classes=num_classes)
    model.conv1 = nn.Conv2d(in_channels, 64, kernel_size=3, stride=1, padding=1, bias=False)
    model.maxpool = nn.Identity()
    return model


MODELS: dict[str, Callable[[int, int, int, int], nn.Module]] = {
    "paper_cnn": lambda c, k, s, h: PaperCNN(c, k, s, h),
    "mlp": _mlp,
    "resnet18": _resnet18,
}


def build_model(cfg: ModelConfig, in_channels: int, num_classes: int, image_size: int) -> nn.Module:
    return MODELS[cfg.name](in_channels, num_classes, image_size, cfg.hidden)
