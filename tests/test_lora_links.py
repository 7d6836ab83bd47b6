"""benchmarks/lora_links.py's synthetic adapter: LLaMA-7B's LoRA shapes, peft's names, no base weights."""

from __future__ import annotations

import torch

from benchmarks.lora_links import LLAMA7B, adapter_model
from unify_dist.lora import lora_pairs


def test_the_adapter_has_llama_7b_shapes_and_peft_names():
    model = adapter_model(**LLAMA7B, dtype=torch.bfloat16)
    params = dict(model.named_parameters())
    assert sum(p.numel() for p in params.values()) == 8_388_608  # 32 layers x q, v x (16x4096 + 4096x16)
    assert params["model.layers.31.self_attn.v_proj.lora_A.default.weight"].shape == (16, 4096)
    assert params["model.layers.0.self_attn.q_proj.lora_B.default.weight"].shape == (4096, 16)
    assert all(p.dtype == torch.bfloat16 and p.requires_grad for p in params.values())
    pairs = lora_pairs(model)  # what the LoRA rules unify
    assert len(pairs) == 64 and {p.scaling for p in pairs} == {2.0}
    again = adapter_model(**LLAMA7B, dtype=torch.bfloat16)  # the same start on every owner: seeded
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), again.parameters()))
