"""A data owner's package for unify-dist that adapts a shared pretrained model (transformers + peft).

  - `finetune_owner.pretrain`: makes the shared starting point, a tiny ViTForImageClassification saved with
    `save_pretrained` (in practice: a model every owner already downloaded);
  - `finetune_owner.model:build`: the model factory: `from_pretrained(FINETUNE_PRETRAINED)`, a new head for
    this task's classes, wrapped with peft LoRA on the attention's query and value;
  - `finetune_owner.data:owner_data`: the data factory: small synthetic images, each owner skewed to its
    own classes;
  - `finetune_owner.loop`: the same, in the owner's own training loop through the public API, ending with
    the unified adapter saved by peft (`save_pretrained`) and the merged weights as safetensors.
"""

import os
from pathlib import Path

__all__ = ["pretrained_dir", "PRETRAINED_ENV"]

PRETRAINED_ENV = "FINETUNE_PRETRAINED"
"""Environment variable naming the folder the shared pretrained model was saved in."""


def pretrained_dir() -> Path:
    """The shared pretrained model's folder: FINETUNE_PRETRAINED, else runs/finetune/pretrained."""
    return Path(os.environ.get(PRETRAINED_ENV) or "runs/finetune/pretrained")
