"""Sealed vs plain unify on the loopback, and the cipher's throughput on one core (issue 12's figures).

    python -m benchmarks.trust_bench [--owners 2] [--reps 5]

Times one all_reduce SUM of a flat float32 buffer the size of paper_cnn's and resnet18's state: gloo's
(plain) against unify_dist.trust.SealedRing (AES-256-GCM sealed ring), median of --reps, one thread per
owner; prints one JSON object.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import numpy as np
import torch
import torch.distributed as dist
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from tests.trust_keys import fresh_keys, key, roster_of
from tests.world import run_world
from unify_dist.config import ModelConfig
from unify_dist.models import build_model
from unify_dist.trust import SealedRing, admit


def cipher_mb_s(megabytes: int = 4, reps: int = 10) -> dict[str, float]:
    """AES-256-GCM on one thread: MB/s of plaintext sealed, opened, and sealed + opened."""
    aead, data = AESGCM(AESGCM.generate_key(256)), np.random.bytes(megabytes << 20)
    plain = np.frombuffer(data, np.uint8)
    sealed, back = np.empty(plain.size + 16, np.uint8), np.empty(plain.size, np.uint8)
    t_seal = t_open = 0.0
    for i in range(reps):
        nonce = i.to_bytes(12, "big")
        t0 = time.perf_counter()
        aead.encrypt_into(nonce, plain, b"", sealed)
        t1 = time.perf_counter()
        aead.decrypt_into(nonce, sealed, b"", back)
        t_seal, t_open = t_seal + t1 - t0, t_open + time.perf_counter() - t1
    mb = megabytes * reps * 1.048576
    return {"seal_MB_s": mb / t_seal, "open_MB_s": mb / t_open, "seal_and_open_MB_s": mb / (t_seal + t_open)}


def _time(rank: int, world: int, raws: list[bytes], sizes: dict[str, int], reps: int) -> dict[str, dict[str, float]]:
    torch.set_num_threads(1)
    ring = SealedRing(admit(key(raws[rank]), f"owner{rank}", roster_of(raws), run_id="bench"))
    out = {}
    for name, n in sizes.items():
        buffer = torch.randn(n)
        times: dict[str, list[float]] = {"plain": [], "sealed": []}
        for _ in range(reps + 1):  # the first of each is a warm-up
            for how, reduce in (("plain", lambda t: dist.all_reduce(t)), ("sealed", ring.all_reduce)):
                dist.barrier()
                t0 = time.perf_counter()
                reduce(buffer)
                times[how].append(time.perf_counter() - t0)
        out[name] = {how: statistics.median(ts[1:]) for how, ts in times.items()}
    return out


def measure(owners: int, models: list[str], reps: int) -> dict[str, dict[str, float]]:
    """model -> {floats, plain_s, sealed_s, ratio}: `owners` ranks, one all_reduce SUM of the model's state size."""
    sizes = {}
    for name in models:
        model = build_model(ModelConfig(name=name), (1, 28, 28), 10)
        sizes[name] = sum(t.numel() for t in model.state_dict().values() if t.is_floating_point())
    timings = run_world(_time, owners, fresh_keys(owners), sizes, reps)[0]  # rank 0's clock
    return {name: {"floats": sizes[name], "plain_s": t["plain"], "sealed_s": t["sealed"], "ratio": t["sealed"] / t["plain"]}
            for name, t in timings.items()}  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--owners", type=int, default=2)
    parser.add_argument("--reps", type=int, default=5)
    args = parser.parse_args()
    report = {"owners": args.owners, "cipher_one_core": cipher_mb_s(), **measure(args.owners, ["paper_cnn", "resnet18"], args.reps)}
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
