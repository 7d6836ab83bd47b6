"""Adapter-only FedAvg (FlowerTune's recipe) for `make bench-links`' LoRA case: run config task = "lora7b".

The model is benchmarks/lora_links.py's: LLaMA-7B's LoRA shapes (r=16 on q and v, 32 layers of width
4096), adapters only, 8,388,608 fp32 elements; the frozen base never travels and is never built. The
server sends the adapter to every client, each client moves it as unify-dist's owners do (seeded noise,
timed as train_s) and sends it back, and FedAvg averages A and B apart, as lora_separate does. No
federated evaluation: unify-dist's side evaluates nothing either.
"""

from __future__ import annotations

import time

import torch

from benchmarks.lora_links import LLAMA7B, adapter_model

__all__ = ["initial_adapter", "train_adapter"]


def initial_adapter() -> dict[str, torch.Tensor]:
    """The adapter every owner starts from (the same seed as unify-dist's owners)."""
    return adapter_model(**LLAMA7B, dtype=torch.float32).state_dict()


def train_adapter(state: dict[str, torch.Tensor], owner: int, round_: int) -> tuple[dict[str, torch.Tensor], dict]:
    """One owner's "local training" of the adapter: its own seeded move of every tensor, as in lora_links."""
    torch.set_num_threads(1)
    g = torch.Generator().manual_seed(1000 * round_ + owner)
    start, t0 = time.time(), time.perf_counter()
    out = {k: v + 1e-3 * torch.randn(v.shape, generator=g) for k, v in state.items()}
    metrics = {"train_s": time.perf_counter() - t0, "train_start": start, "train_end": time.time(), "num-examples": 1}
    return out, metrics
