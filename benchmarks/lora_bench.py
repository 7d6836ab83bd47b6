"""`make bench`, section lora: the LoRA rules against mean(B_i @ A_i), and the bytes each owner sends.

W owners (a real gloo group each) hold the same frozen base of `layers` Linear(d, d) layers adapted with rank
r (peft's naming, by hand: no transformers needed) and a trainable head; each owner moves its adapter as
local training would (seeded noise), then unifies once with each rule. Per rule and owner count:

  rel_error       max over layers of ||dW - s mean(B_i @ A_i)||_F / ||s mean(B_i @ A_i)||_F, where dW is what
                  the unified model adds to the starting base (the folded residual included)
  sent_bytes      what one owner put on the wire (UnifyOutcome.bytes_sent, ring estimate)
  vs_unified      sent_bytes / the unified tensors' bytes (one owner's adapters + head in fp32)
  vs_adapter      sent_bytes / one owner's adapter bytes (all A and B)
"""

from __future__ import annotations

import os
import socket
import tempfile
import time
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

__all__ = ["lora_section", "RULES"]

RULES = ("lora_separate", "lora_exact", "lora_ffa")


class _LoraLinear(nn.Module):
    def __init__(self, d: int, rank: int):
        super().__init__()
        self.base_layer = nn.Linear(d, d).requires_grad_(False)
        self.lora_A = nn.ModuleDict({"default": nn.Linear(d, rank, bias=False)})
        self.lora_B = nn.ModuleDict({"default": nn.Linear(rank, d, bias=False)})
        self.scaling = {"default": 2.0}


def _model(layers: int, d: int, rank: int) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(*[_LoraLinear(d, rank) for _ in range(layers)], nn.Linear(d, 10))


def _owner(rank: int, world: int, port: int, out: str, shape: tuple[int, int, int]) -> None:
    import unify_dist as ud

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world, timeout=timedelta(seconds=600))
    result: dict[str, Any] = {}
    for rule in RULES:
        model = _model(*shape)
        ud.same_start(model)
        unifier = ud.Unifier(model, rule=rule)
        start = {k: v.clone() for k, v in model.state_dict().items()}
        g = torch.Generator().manual_seed(100 + rank)
        with torch.no_grad():
            for p in model.parameters():
                if p.requires_grad:
                    p.add_(0.05 * torch.randn(p.shape, generator=g))
        local = {k: v.clone() for k, v in model.state_dict().items() if ".lora_" in k}
        dist.barrier()
        t0 = time.perf_counter()
        outcome = unifier.unify(verify=False)
        seconds = time.perf_counter() - t0
        end = {k: v.clone() for k, v in model.state_dict().items()}
        result[rule] = {"start": start, "local": local, "end": end, "sent": outcome.bytes_sent, "s": seconds,
                        "unified_bytes": 4 * unifier.flat.numel}  # fmt: skip
    dist.destroy_process_group()
    torch.save(result, Path(out) / f"rank{rank}.pt")


def _errors(results: list[dict], layers: int) -> float:
    from unify_dist.lora import delta_w, relative_error

    worst = 0.0
    for i in range(layers):
        a = torch.stack([r["local"][f"{i}.lora_A.default.weight"] for r in results])
        b = torch.stack([r["local"][f"{i}.lora_B.default.weight"] for r in results])
        end, start = results[0]["end"], results[0]["start"]
        folded = (end[f"{i}.base_layer.weight"].double() - start[f"{i}.base_layer.weight"].double()) / 2.0
        dw = delta_w(end[f"{i}.lora_A.default.weight"], end[f"{i}.lora_B.default.weight"], 2.0, folded)
        worst = max(worst, relative_error(dw, a, b, 2.0))
    return worst


def lora_section(owners: list[int], quick: bool) -> list[dict[str, Any]]:
    """One row per (rule, owner count); see the module docstring."""
    layers, d, rank = (2, 64, 4) if quick else (6, 256, 8)
    adapter_bytes = layers * 2 * d * rank * 4
    rows = []
    for world in owners:
        with tempfile.TemporaryDirectory() as out:
            with socket.socket() as s:
                s.bind(("127.0.0.1", 0))
                port = s.getsockname()[1]
            mp.spawn(_owner, args=(world, port, out, (layers, d, rank)), nprocs=world, join=True)
            ranks = [torch.load(Path(out) / f"rank{r}.pt", weights_only=False) for r in range(world)]
        for rule in RULES:
            per = [r[rule] for r in ranks]
            sent = max(p["sent"] for p in per)
            rows.append({"rule": rule, "owners": world, "layers": layers, "d": d, "rank": rank,
                         "rel_error": _errors(per, layers), "sent_bytes": sent, "unified_bytes": per[0]["unified_bytes"],
                         "adapter_bytes": adapter_bytes, "vs_unified": sent / per[0]["unified_bytes"],
                         "vs_adapter": sent / adapter_bytes, "unify_s": max(p["s"] for p in per)})  # fmt: skip
    return rows
