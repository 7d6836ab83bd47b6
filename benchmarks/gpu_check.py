"""CUDA paths against the CPU reference, for a machine with one GPU (the CI machines have none).

    python -m benchmarks.gpu_check OUT_DIR

1. Two gloo ranks sharing the GPU unify a CUDA model with avg, max, absmax (integer keys) and median (gather):
   the result equals the pure rule over the owners' states, computed on the CPU (bit for bit for max and
   absmax, within float tolerance for the averages), and both ranks hold the same bits.
2. absmax's key transform on CUDA (GPU-sized steps) equals the CPU transform bit for bit on 40M floats.
3. The program through torchrun with NCCL: one owner, generated image folders, 2 rounds.
4. Two owners training on the GPU, unifying over gloo through pinned host memory (dist.device = cuda), trust
   off and on (when `cryptography` is installed), and the cost of staging a resnet18-sized all_reduce.
Prints and writes OUT_DIR/gpu_check.json.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from torch import nn

RULES = ("avg", "max", "absmax", "median")


def _unify_on_cuda(rank: int, world: int) -> dict:
    import unify_dist as ud

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 256), nn.BatchNorm1d(256), nn.Linear(256, 10)).cuda()
    ud.same_start(model)
    out = {}
    for rule in [r for r in RULES if not r.startswith("lora_")]:  # the LoRA rules need adapters
        unifier = ud.Unifier(model, rule=rule, chunk_elements=4096)
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(rank)).cuda() * (rank + 1))
        local = [p.detach().cpu().clone() for p in model.parameters()]
        outcome = unifier.unify()
        out[rule] = {"local": local, "unified": [p.detach().cpu().clone() for p in model.parameters()],
                     "digest": outcome.digest}  # fmt: skip
    return out


def check_rules() -> dict:
    from tests.world import run_world
    from unify_dist.rules import RULES as REFERENCE

    results = run_world(_unify_on_cuda, 2)
    report = {}
    for rule in [r for r in RULES if not r.startswith("lora_")]:
        exact = rule in ("max", "absmax")
        worst, same_bits = 0.0, True
        for i in range(len(results[0][rule]["local"])):
            stacked = torch.stack([r[rule]["local"][i] for r in results])
            want = REFERENCE[rule](stacked, torch.ones(2))
            got = results[0][rule]["unified"][i]
            same_bits &= torch.equal(got, results[1][rule]["unified"][i])
            worst = max(worst, float((got - want).abs().max()))
            if exact:
                assert torch.equal(got, want), f"{rule} on CUDA differs from the reference"
        assert same_bits and worst < 1e-5, (rule, worst)
        report[rule] = {"max_abs_diff_vs_reference": worst, "ranks_identical": same_bits,
                        "digests_equal": results[0][rule]["digest"] == results[1][rule]["digest"]}  # fmt: skip
    return report


def check_keys() -> dict:
    from unify_dist.collectives import in_chunks, key_chunk
    from unify_dist.rules import absmax_keys_, absmax_unkeys_

    x = torch.randn(40_000_000, generator=torch.Generator().manual_seed(1))
    x[:4] = torch.tensor([0.0, -0.0, 1e-45, -1e-45])
    cpu = x.clone().view(torch.int32)
    in_chunks(absmax_keys_, cpu, torch.empty(key_chunk(torch.device("cpu")), dtype=torch.int32))
    gpu = x.cuda().view(torch.int32)
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    in_chunks(absmax_keys_, gpu, torch.empty(key_chunk(gpu.device), dtype=torch.int32, device=gpu.device))
    torch.cuda.synchronize()
    seconds = time.perf_counter() - t0
    same = torch.equal(gpu.cpu(), cpu)
    in_chunks(absmax_unkeys_, gpu, torch.empty(key_chunk(gpu.device), dtype=torch.int32, device=gpu.device))
    back = torch.equal(gpu.view(torch.float32).cpu().view(torch.int32), x.view(torch.int32))
    assert same and back
    return {"elements": x.numel(), "keys_equal_cpu": same, "round_trip_exact": back, "gpu_key_seconds": seconds}


def check_program(out: Path) -> dict:
    import numpy as np
    from PIL import Image

    root = Path(tempfile.mkdtemp())
    rng = np.random.default_rng(0)
    for c, name in enumerate(("bars", "dots", "ring")):
        (root / "owner0" / name).mkdir(parents=True)
        for i in range(60):
            img = rng.integers(0, 60, size=(16, 16)) + 150 * ((np.indices((16, 16))[c % 2] % (c + 2)) == 0)
            Image.fromarray(img.astype(np.uint8), mode="L").save(root / "owner0" / name / f"{i}.png")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=1", "-m", "unify_dist",
           "train", "--set", "data.dataset=folder", "--set", "data.partition=folder",
           "--set", f"data.folder={root}/owner{{rank}}", "--set", "data.image_size=16", "--set", "model.name=mlp",
           "--set", "train.max_rounds=2", "--set", "dist.backend=nccl", "--set", f"output.dir={out / 'run'}",
           "--set", "output.progress=false"]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    records = [json.loads(x) for x in (out / "run" / "metrics.jsonl").read_text().splitlines()] if proc.returncode == 0 else []
    return {"returncode": proc.returncode, "backend_line": next((x for x in proc.stdout.splitlines() if "backend" in x), ""),
            "rounds": len(records), "test_acc": records[-1]["unified_test_acc"] if records else None,
            "stderr_tail": proc.stderr[-800:] if proc.returncode else ""}  # fmt: skip


def _owner_folders(root: Path, owners: int) -> None:
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    for o in range(owners):
        for c, name in enumerate(("bars", "dots", "ring")):
            (root / f"owner{o}" / name).mkdir(parents=True)
            for i in range(60):
                img = rng.integers(0, 60, size=(16, 16)) + 150 * ((np.indices((16, 16))[c % 2] % (c + 2)) == 0)
                Image.fromarray(img.astype(np.uint8), mode="L").save(root / f"owner{o}" / name / f"{i}.png")


def _trust_sets(root: Path) -> list[str]:
    """Keys for owner0 and owner1 made with `unify-dist keygen`, a roster, and the --set values for them."""
    lines = ["[owners]"]
    for o in range(2):
        done = subprocess.run([sys.executable, "-m", "unify_dist", "keygen", "--out", str(root / f"owner{o}.key"),
                               "--name", f"owner{o}"], capture_output=True, text=True, check=True)  # fmt: skip
        lines.append(done.stdout.splitlines()[-1].split(": ", 1)[1])
    (root / "roster.toml").write_text("\n".join(lines) + "\n")
    sets = ["trust.enabled=true", f"trust.roster={root / 'roster.toml'}", f"trust.key={root}/owner{{rank}}.key",
            "trust.owner=owner{rank}"]  # fmt: skip
    return [x for v in sets for x in ("--set", v)]


def check_gpu_owners(out: Path) -> dict:
    """Issue 12 item 4: 2 owners train on the GPU, unify over gloo staged through pinned host memory,
    with trust off and (where `cryptography` is installed) on. Both runs must end with equal digests on
    both owners every round; with 2 owners a sum has one order, so the final models should match too."""
    root = Path(tempfile.mkdtemp())
    _owner_folders(root, 2)
    base = ["train", "--set", "data.dataset=folder", "--set", "data.partition=folder",
            "--set", f"data.folder={root}/owner{{rank}}", "--set", "data.image_size=16", "--set", "model.name=mlp",
            "--set", "train.max_rounds=3", "--set", "dist.backend=gloo", "--set", "dist.device=cuda",
            "--set", "output.progress=false"]  # fmt: skip
    try:
        import cryptography  # noqa: F401

        modes = {"off": [], "on": _trust_sets(root)}
    except ImportError:
        modes = {"off": []}
    result: dict = {}
    for mode, extra in modes.items():
        run = out / f"gpu_owners_trust_{mode}"
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "unify_dist",
               *base, *extra, "--set", f"output.dir={run}"]  # fmt: skip
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
        records = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()] if proc.returncode == 0 else []
        text = proc.stdout + proc.stderr
        result[mode] = {
            "returncode": proc.returncode,
            "backend_line": next((x for x in text.splitlines() if "backend" in x), ""),
            "trust_line": next((x for x in text.splitlines() if "trust:" in x), ""),
            "rounds": len(records),
            "digests_equal_every_round": all(len({o["digest"] for o in r["owners"]}) == 1 for r in records) and bool(records),
            "final_digest": records[-1]["owners"][0]["digest"] if records else None,
            "unify_s": [max(o["unify_s"] for o in r["owners"]) for r in records],
            "test_acc": records[-1]["unified_test_acc"] if records else None,
            "stderr_tail": proc.stderr[-1200:] if proc.returncode else "",
        }
    if "on" in result:
        result["same_final_digest_on_and_off"] = result["on"]["final_digest"] == result["off"]["final_digest"]
    return result


def _staging_timing(rank: int, world: int) -> dict:
    import time

    import torch.distributed as dist

    from unify_dist.staging import HostStaged

    n = 11_700_000  # resnet18's float state
    gpu = torch.full((n,), float(rank + 1), device="cuda")
    cpu = gpu.cpu()
    staged = HostStaged()
    ways = {"gloo_on_host_tensor": lambda: dist.all_reduce(cpu), "gloo_on_cuda_tensor": lambda: dist.all_reduce(gpu),
            "host_staged_cuda_tensor": lambda: staged.all_reduce(gpu)}  # fmt: skip
    times = {}
    for name, fn in ways.items():
        fn()
        torch.cuda.synchronize()
        laps = []
        for _ in range(5):
            dist.barrier()
            t = time.perf_counter()
            fn()
            torch.cuda.synchronize()
            laps.append(time.perf_counter() - t)
        times[name] = sorted(laps)[2]
    return times


def check_staging_cost() -> dict:
    """Median of 5 all_reduce SUMs of resnet18's 11.7M floats, 2 gloo ranks on this machine's loopback."""
    from tests.world import run_world

    times = run_world(_staging_timing, 2)[0]
    base = times["gloo_on_host_tensor"]
    return {"seconds": times, "ratio_to_host_tensor": {k: v / base for k, v in times.items()}}


def main() -> int:
    out = Path(sys.argv[1] if len(sys.argv) > 1 else ".")
    out.mkdir(parents=True, exist_ok=True)
    report = {"torch": torch.__version__, "device": torch.cuda.get_device_name(0), "python": sys.version.split()[0]}
    for name, check in (("rules_gloo_cuda", check_rules), ("absmax_keys_cuda", check_keys)):
        try:
            report[name] = check()
        except Exception as e:  # report every check, even after one fails
            report[name] = {"error": f"{type(e).__name__}: {e}"[:600]}
    report["program_nccl"] = check_program(out)
    report["gpu_owners_over_gloo"] = check_gpu_owners(out)
    try:
        report["staging_cost"] = check_staging_cost()
    except Exception as e:
        report["staging_cost"] = {"error": f"{type(e).__name__}: {e}"[:600]}
    text = json.dumps(report, indent=1)
    print(text)
    (out / "gpu_check.json").write_text(text)
    return 0


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "4")
    raise SystemExit(main())
