"""Save the shared starting point: a tiny ViTForImageClassification (a stand-in for a downloaded checkpoint).

    python -m finetune_owner.pretrain --out DIR [--labels 10] [--image-size 16] [--dtype float32]
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

__all__ = ["tiny_vit", "save_tiny_vit"]


def tiny_vit(num_labels: int = 10, image_size: int = 16, channels: int = 1, seed: int = 0):
    """A ViT small enough for a CPU test: 2 layers, width 32, 4x4 patches."""
    from transformers import ViTConfig, ViTForImageClassification

    config = ViTConfig(image_size=image_size, patch_size=4, num_channels=channels, hidden_size=32,
                       num_hidden_layers=2, num_attention_heads=4, intermediate_size=64, num_labels=num_labels)  # fmt: skip
    torch.manual_seed(seed)
    return ViTForImageClassification(config)


def save_tiny_vit(out: Path, num_labels: int = 10, image_size: int = 16, dtype: str = "float32") -> Path:
    """Build and save it (safetensors); returns the folder."""
    model = tiny_vit(num_labels, image_size).to(getattr(torch, dtype))
    model.save_pretrained(out)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--labels", type=int, default=10)
    parser.add_argument("--image-size", type=int, default=16)
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    args = parser.parse_args()
    print(save_tiny_vit(args.out, args.labels, args.image_size, args.dtype))


if __name__ == "__main__":
    main()
