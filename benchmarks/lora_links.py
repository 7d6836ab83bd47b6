"""One owner of the LLaMA-7B-shaped adapter bench over shaped links (launch/netns_bench_lora_links.sh).

    python -m benchmarks.lora_links --rank R --world W --master IP:PORT --dtype fp32 --rounds N --out DIR

A synthetic model with LLaMA-7B's LoRA shapes and nothing else: rank-16 adapters on q_proj and v_proj of
32 layers of width 4096, named as peft names them ('model.layers.3.self_attn.q_proj.lora_A.default.weight'),
8,388,608 trainable elements. The frozen base (6.7B weights) is never allocated: lora_separate and lora_ffa
never read it, so the adapters alone are the model the Unifier sees. Each round an owner moves its adapter
as local training would (seeded noise: the "training", timed), then unifies with the Unifier over gloo.

Every rank appends one JSON line per round to DIR/rounds_rank{R}.jsonl: train_start, train_end,
unify_start, unify_end (time.time()), unify_s (the Unifier's own clock), unify_bytes (its ring estimate)
and wire_bytes (what this host's veth sent during the unify: payload plus TCP/IP and gloo headers).
Rank 0 writes DIR/meta.json: dtype, rule, owners, elements, payload bytes and the link's rate.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

__all__ = ["adapter_model", "LLAMA7B", "main"]

LLAMA7B = {"layers": 32, "width": 4096, "rank": 16, "targets": ("q_proj", "v_proj"), "alpha": 32}
"""LLaMA-7B's shapes with the usual LoRA recipe (r=16 on q and v): 8,388,608 adapter elements."""
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def _adapted(width: int, rank: int, scaling: float, dtype: torch.dtype) -> nn.Module:
    """One adapted projection as peft lays it out (lora_A / lora_B under the adapter's name), no base layer."""
    m = nn.Module()
    m.lora_A = nn.ModuleDict({"default": nn.Linear(width, rank, bias=False, dtype=dtype)})
    m.lora_B = nn.ModuleDict({"default": nn.Linear(rank, width, bias=False, dtype=dtype)})
    m.scaling = {"default": scaling}
    return m


def adapter_model(
    layers: int, width: int, rank: int, targets: tuple[str, ...], alpha: float, dtype: torch.dtype
) -> nn.Module:
    """The adapters of a decoder with these shapes, seeded (the same start on every owner)."""
    torch.manual_seed(0)
    model, blocks = nn.Module(), nn.ModuleList()
    for _ in range(layers):
        attn = nn.Module()
        for t in targets:
            setattr(attn, t, _adapted(width, rank, alpha / rank, dtype))
        block = nn.Module()
        block.self_attn = attn
        blocks.append(block)
    model.model = nn.Module()
    model.model.layers = blocks
    with torch.no_grad():
        for p in model.parameters():  # peft zeroes B; nonzero here so every round's numbers are generic
            p.copy_(0.01 * torch.randn(p.shape))
    return model


def _tx_bytes(dev: str) -> int:
    """What this host's veth has sent (ip netns exec mounts the namespace's own /sys)."""
    path = Path(f"/sys/class/net/{dev}/statistics/tx_bytes")
    return int(path.read_text()) if path.exists() else 0


def main(argv: list[str] | None = None) -> int:
    import unify_dist as ud

    p = argparse.ArgumentParser(prog="benchmarks.lora_links", description=__doc__.splitlines()[0])
    p.add_argument("--rank", type=int, required=True)
    p.add_argument("--world", type=int, required=True)
    p.add_argument("--master", required=True, help="IP:PORT of rank 0")
    p.add_argument("--dtype", choices=tuple(DTYPES), default="fp32")
    p.add_argument("--rule", default="lora_separate")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--chunk-elements", type=int, default=0, help="unify.chunk_elements (0: the default)")
    p.add_argument("--rate-bits", type=float, default=100e6, help="the shaped link's rate, for meta.json")
    p.add_argument("--out", type=Path, required=True)
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    dev = os.environ.get("GLOO_SOCKET_IFNAME", "")
    dist.init_process_group("gloo", init_method=f"tcp://{args.master}", rank=args.rank, world_size=args.world,
                            timeout=timedelta(seconds=600))  # fmt: skip
    model = adapter_model(**LLAMA7B, dtype=DTYPES[args.dtype])
    options = {"chunk_elements": args.chunk_elements} if args.chunk_elements else {}
    unifier = ud.Unifier(model, rule=args.rule, **options)  # collective: same structure, roles, weights
    elements = sum(e.numel for e in unifier.flat.roles.entries if e.role == "unified")
    args.out.mkdir(parents=True, exist_ok=True)
    if args.rank == 0:
        meta = {"dtype": args.dtype, "rule": args.rule, "owners": args.world, "elements": elements,
                "payload_bytes": unifier.flat.roles.bytes(), "chunk_elements": unifier.cfg.chunk_elements, "rate_bits": args.rate_bits, **LLAMA7B}  # fmt: skip
        (args.out / "meta.json").write_text(json.dumps(meta) + "\n")
    log = args.out / f"rounds_rank{args.rank}.jsonl"
    log.unlink(missing_ok=True)
    g = torch.Generator().manual_seed(1000 + args.rank)
    trained = [p for p in model.parameters() if p.requires_grad]
    for round_ in range(1, args.rounds + 1):
        train_start = time.time()
        with torch.no_grad():  # "local training": this owner's own move of every adapter it trains
            for p_ in trained:
                p_.add_(1e-3 * torch.randn(p_.shape, generator=g).to(p_.dtype))
        train_end = time.time()
        dist.barrier()  # every owner ready: the unify's clock measures the unify, not a late owner
        sent0, t0 = _tx_bytes(dev), time.time()
        outcome = unifier.unify(verify=False)  # collective
        t1 = time.time()
        row = {"round": round_, "train_start": train_start, "train_end": train_end, "unify_start": t0, "unify_end": t1,
               "unify_s": outcome.seconds, "unify_bytes": outcome.bytes_sent, "wire_bytes": _tx_bytes(dev) - sent0}  # fmt: skip
        with log.open("a") as f:
            f.write(json.dumps(row) + "\n")
    digest = unifier.unify(verify=True).digest  # collective: one verified unify, the same bits on every owner
    if args.rank == 0:
        print(f"lora_links: {args.world} owners, {args.dtype}, {elements:,} elements; digest {digest} on every owner")
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
