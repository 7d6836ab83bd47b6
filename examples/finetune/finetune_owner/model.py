"""The model factory (`model.factory = "finetune_owner.model:build"`): the shared pretrained ViT, adapted with LoRA."""

from __future__ import annotations

import torch
from torch import nn

from finetune_owner import pretrained_dir

__all__ = ["build", "Logits", "adapted", "save_unified"]


class Logits(nn.Module):
    """A transformers classifier as unify-dist's loop calls it: images in, logits out."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(pixel_values=x).logits


def adapted(num_classes: int, rank: int = 4, path=None, dtype: torch.dtype | None = None) -> nn.Module:
    """from_pretrained(the shared folder) with a new head of num_classes, wrapped with peft LoRA.

    The base stays frozen (peft sets requires_grad False), so unify-dist's roles make it frozen: proven equal
    once, never sent; the adapters and the new head (modules_to_save) train and are unified.
    """
    from peft import LoraConfig, get_peft_model
    from transformers import ViTForImageClassification

    base = ViTForImageClassification.from_pretrained(
        path or pretrained_dir(), num_labels=num_classes, ignore_mismatched_sizes=True, dtype=dtype
    )
    # the attention's query and value: q_proj / v_proj in transformers 5, query / value in 4.x
    targets = ["q_proj", "v_proj", "query", "value"]
    config = LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=targets, modules_to_save=["classifier"])
    return get_peft_model(base, config)


def build(in_shape: tuple[int, ...], num_classes: int) -> nn.Module:
    """Every owner loads the same pretrained folder, so every owner builds the same architecture."""
    return Logits(adapted(num_classes))


def save_unified(peft_model: nn.Module, out) -> None:
    """The unified adapter with peft's save_pretrained (PeftModel.from_pretrained loads it), and the merged
    weights (base + LoRA) as model.safetensors in out/merged."""
    import copy

    from safetensors.torch import save_file

    peft_model.save_pretrained(out / "adapter")
    merged = copy.deepcopy(peft_model).merge_and_unload()
    save_file({k: v.contiguous() for k, v in merged.state_dict().items()}, str(out / "merged.safetensors"))
