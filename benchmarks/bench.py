"""`make bench` (python -m benchmarks.bench): how fast unify and a local epoch are, each as a ratio against a baseline timed
in the same run.

Absolute times on a shared CPU say little; a ratio against the obvious alternative, timed in the same
processes and interleaved with it repeat by repeat, says whether the tool adds cost. Every figure is a
median over repeats after warm-up; a collective's time per repeat is its slowest rank's. The unify
measurements spawn their own gloo groups on 127.0.0.1 (one thread per owner), so no torchrun is needed.

Extra memory is the rise of the process's peak resident set (VmHWM, reset through /proc/self/clear_refs)
over its resident set just before the first call, so it includes what gloo allocates; the buffers the
implementation itself allocates are reported beside it.

The trust section times the sealed ring (trust on: AES-256-GCM over gloo point-to-point) against gloo's
all_reduce of the same bytes, with the cipher's throughput on one core beside it. The records section
times `unify-dist verify` over 1,000 signed rounds of 8 owners and what signing costs an owner per round
(benchmarks/record_bench.py); its targets are absolute (seconds, bytes), not ratios.
"""

from __future__ import annotations

import argparse
import copy
import gc
import itertools
import json
import math
import os
import platform
import socket
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch import Tensor, nn

from benchmarks.lora_bench import lora_section
from unify_dist.config import COMPRESS_MODES as _MODES, ModelConfig, UnifyConfig
from unify_dist.data import TORCHVISION_SETS, Split
from unify_dist.app.cli import say
from unify_dist.errors import UserError
from unify_dist.flat import FlatState
from unify_dist.models import MODELS, build_model
from unify_dist.train import count_correct, epoch_generator, train_epoch
from unify_dist.rules import absmax_keys_, absmax_unkeys_
from unify_dist.collectives import in_chunks, key_chunk, tail_size
from unify_dist.unifier import Unifier

COMPRESS_MODES = tuple(m for m in _MODES if m != "none")

__all__ = ["main", "build_parser", "peak_extra_bytes", "collective_cost", "NoiseImages", "stream_rss_child"]

TARGETS = {  # (op, bound): measured / baseline must satisfy it
    "avg_vs_all_reduce": ("<=", 1.10),
    "avg_vs_average_parameters": ("<=", 0.80),
    "absmax_reduce_vs_avg": ("<=", 2.20),
    "train_epoch_vs_plain_loop": (">=", 0.95),
    "stream_epoch_vs_dataloader": (">=", 0.95),
    "stream_rss_100n_vs_n": ("<=", 1.05),
    "sealed_vs_plain_loopback": ("<=", 2.00),
}
SECTIONS = ("unify", "absmax_memory", "diagnosis", "compression", "scaling", "collective_cost", "epoch", "stream", "trust",
            "records", "lora")
FULL = dict(repeats=11, warmup=2, sizes="1e5,1e6,1e7", epoch_images=5000, epoch_repeats=3, stream_items=1000)
QUICK = dict(repeats=3, warmup=1, sizes="1e4,1e5", epoch_images=512, epoch_repeats=1, stream_items=64)


# ---------------------------------------------------------------- options


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m benchmarks.bench", description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="few repeats and small sizes (seconds; for tests)")
    p.add_argument("--out", default="results/bench.json", help="JSON file to write (default results/bench.json)")
    p.add_argument("--owners", default="2,4", help="owner counts for the model benchmarks (default 2,4)")
    p.add_argument("--models", default="paper_cnn,resnet18", help=f"models to unify, of {', '.join(MODELS)}")
    p.add_argument("--scaling-owners", default="2,3,4", help="owner counts for the growth table (default 2,3,4)")
    p.add_argument("--sizes", default=None, help="flat model sizes (floats) for the growth table (default 1e5,1e6,1e7)")
    p.add_argument("--repeats", type=int, default=None, help="timed repeats per measurement (default 11; quick 3)")
    p.add_argument("--warmup", type=int, default=None, help="untimed warm-up calls (default 2; quick 1)")
    p.add_argument("--chunk-elements", type=int, default=UnifyConfig.chunk_elements, help="gather chunk size")
    p.add_argument("--epoch-images", type=int, default=None, help="Fashion-MNIST images per epoch (default 5000)")
    p.add_argument("--epoch-repeats", type=int, default=None, help="timed epochs per loop (default 3; quick 1)")
    p.add_argument("--data-root", default=None, help="holds FashionMNIST/raw (default UNIFY_DIST_DATA_ROOT, else data)")
    p.add_argument("--skip-epoch", action="store_true", help="leave out the local epoch section")
    p.add_argument("--stream-items", type=int, default=None,
                   help="N for the streamed epoch's memory at N, 10N, 100N generated items (default 1000; quick 64)")
    p.add_argument("--skip-stream", action="store_true", help="leave out the streamed epoch section")
    p.add_argument("--skip-trust", action="store_true", help="leave out the sealed (trust on) vs plain unify section")
    p.add_argument("--skip-records", action="store_true", help="leave out the signed records section (verify, signing)")
    p.add_argument("--skip-lora", action="store_true", help="leave out the LoRA rules' error and bytes section")
    return p


def _ints(text: str, what: str) -> list[int]:
    try:
        values = [int(float(v)) for v in text.split(",") if v.strip()]
    except ValueError:
        raise UserError(f"{what} must be comma-separated numbers, got '{text}'") from None
    if not values or min(values) < 1:
        raise UserError(f"{what} must be positive numbers, got '{text}'")
    return values


def _settings(argv: list[str]) -> argparse.Namespace:
    args = build_parser().parse_args(argv[1:] if argv[:1] == ["--"] else argv)
    for key, value in (QUICK if args.quick else FULL).items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    args.owners = _ints(args.owners, "--owners")
    args.scaling_owners = _ints(args.scaling_owners, "--scaling-owners")
    args.sizes = _ints(args.sizes, "--sizes")
    args.models = [m.strip() for m in args.models.split(",") if m.strip()]
    problems = [f"unknown model '{m}' (known: {', '.join(MODELS)})" for m in args.models if m not in MODELS]
    counts = ("repeats", "epoch_images", "epoch_repeats", "chunk_elements", "stream_items")
    problems += [f"--{k.replace('_', '-')} must be >= 1" for k in counts if getattr(args, k) < 1]
    if min(args.owners + args.scaling_owners) < 2:
        problems.append("owner counts must be >= 2: a unify needs two owners")
    problems += ["--warmup must be >= 0"] if args.warmup < 0 else []
    if problems:
        raise UserError("; ".join(problems))
    return args


# ---------------------------------------------------------------- measuring


MIN_SAMPLE_S = 0.005
"""Shortest timed sample: an op faster than this is called several times back to back per sample, so a
sub-millisecond collective is not measured at the resolution of scheduler noise."""


def _timed(fn: Callable[[], object], calls: int = 1) -> float:
    dist.barrier()  # everyone starts together, so a collective's time is not time spent waiting for a peer
    t0 = time.perf_counter()
    for _ in range(calls):
        fn()
    return (time.perf_counter() - t0) / calls


def time_ops(ops: dict[str, Callable[[], object]], repeats: int, warmup: int) -> dict[str, float]:
    """Median seconds per call of each op; ops interleaved per repeat, so load drift on a shared CPU hits all alike.

    A collective: every rank calls it with the same ops. Per repeat the slowest rank's time counts,
    because a collective is only done when its last owner is. Each sample lasts at least MIN_SAMPLE_S
    (an op's calls per sample come from its slowest warm-up call, agreed over ranks).
    """
    for _ in range(warmup):
        for fn in ops.values():
            _timed(fn)
    first = torch.tensor([_timed(fn) for fn in ops.values()], dtype=torch.float64)
    dist.all_reduce(first, dist.ReduceOp.MAX)  # every rank must make the same number of calls
    calls = [max(1, math.ceil(MIN_SAMPLE_S / max(t, 1e-9))) for t in first.tolist()]
    times = torch.tensor([[_timed(fn, k) for fn, k in zip(ops.values(), calls)] for _ in range(repeats)],
                         dtype=torch.float64)  # fmt: skip
    dist.all_reduce(times, dist.ReduceOp.MAX)
    return {name: statistics.median(times[:, i].tolist()) for i, name in enumerate(ops)}


def _status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def peak_extra_bytes(fn: Callable[[], object]) -> int | None:
    """Peak resident memory `fn` adds to this process (Linux VmHWM after a reset); None where unsupported."""
    gc.collect()
    try:
        Path("/proc/self/clear_refs").write_text("5")  # 5: reset the peak RSS to the current RSS
        before = _status_kib("VmRSS")
    except (OSError, RuntimeError):
        fn()
        return None
    fn()
    return max(0, _status_kib("VmHWM") - before) * 1024


def collective_cost(rule: str, impl: str, n: int, n_ints: int, world: int, chunk: int) -> dict[str, Any]:
    """Collectives per unify and bytes one owner hands to them, from what unify.py sends (fp32).

    `sent_bytes` estimates what each owner puts on the wire with ring algorithms: 2(W-1)/W of an
    all_reduce's buffer, (W-1) times its own part of an all_gather.
    """
    if impl == "gather":
        chunks = math.ceil(n / min(chunk, max(n, 1)))
        payload = 4 * n + 16 + 8 * n_ints  # its values chunk by chunk, (flag, weight) in float64, int64 counters
        sent = (world - 1) * (4 * n + 16) + 2 * (world - 1) / world * 8 * n_ints
        count = 1 + chunks + (1 if n_ints else 0)
    else:  # one all_reduce: values (absmax's as int32 keys) and a tail of flags, weight and every owner's counters
        elements = n + world + 1 + 2 * n_ints * world
        # secure_avg sends int64 fixed point (8 bytes); its pairwise secrets are exchanged once per process
        payload, count = (8 if rule == "secure_avg" else 4) * elements, 1
        sent = 2 * (world - 1) / world * payload
    return {"rule": rule, "impl": impl, "collectives": count, "payload_bytes": payload, "sent_bytes": int(sent)}


# ---------------------------------------------------------------- one owner's work (in spawned processes)


def _twin_params(model: nn.Module, name: str) -> list[nn.Parameter]:
    """Parameters of a separate copy of `model`: average_parameters re-points .data, which would break FlatState."""
    twin = build_model(ModelConfig(name=name), 1, 10, 28)
    twin.load_state_dict(model.state_dict())
    return list(twin.parameters())


def _key_transform(keys: Tensor, scratch: Tensor) -> None:
    """absmax's local work around its all_reduce, as unify.py does it: keys out and back, in cache-sized steps."""
    in_chunks(absmax_keys_, keys, scratch)
    in_chunks(absmax_unkeys_, keys, scratch)


def _model_case(name: str, world: int, args: argparse.Namespace) -> dict[str, Any]:
    from torch.distributed.algorithms.model_averaging.utils import average_parameters

    torch.manual_seed(dist.get_rank())  # owners differ, as after local training
    model = build_model(ModelConfig(name=name), 1, 10, 28)
    twin = _twin_params(model, name)
    flat = FlatState(model, tail=tail_size(world, model))
    n = flat.numel
    fast = Unifier.over(flat, UnifyConfig())
    gather = Unifier.over(flat, UnifyConfig(absmax_impl="gather", chunk_elements=args.chunk_elements))
    same_bytes = torch.zeros(n)  # zeros: float adds cost the same for any finite non-denormal value
    keys = flat.values.clone().view(torch.int32)  # absmax's payload: n int32 keys
    key_scratch = torch.empty(min(key_chunk(torch.device("cpu")), n), dtype=torch.int32)  # as unify's
    # verify=False: the digest check is the round loop's proof, not unify's work (UnifyOutcome.seconds leaves it out)
    fast.unify(rule="avg", verify=False)  # gloo's first collective of a size sets up buffers: not what is measured
    memory = {  # first calls, smallest expected first; each measured from a reset peak
        "avg": peak_extra_bytes(lambda: fast.unify(rule="avg", verify=False)),
        "absmax_gather": peak_extra_bytes(lambda: gather.unify(rule="absmax", verify=False)),
        "absmax_reduce": peak_extra_bytes(lambda: fast.unify(rule="absmax", verify=False)),
    }
    compressed = {mode: Unifier.over(flat, UnifyConfig(compress=mode)) for mode in COMPRESS_MODES}
    sent = {"none": fast.unify(rule="avg", verify=False).bytes_sent}
    sent |= {mode: u.unify(verify=False).bytes_sent for mode, u in compressed.items()}
    halving = itertools.cycle([0.5, 2.0])  # exact both ways, so the values keep their magnitude
    ops = {
        "all_reduce": lambda: dist.all_reduce(same_bytes),
        "avg": lambda: fast.unify(rule="avg", verify=False),
        "average_parameters": lambda: average_parameters(iter(twin), None),
        "absmax_reduce": lambda: fast.unify(rule="absmax", verify=False),
        "absmax_gather": lambda: gather.unify(rule="absmax", verify=False),
        **{f"avg_{mode}": (lambda u=u: u.unify(verify=False)) for mode, u in compressed.items()},
        # the pieces of avg besides its all_reduce, to explain a ratio above target: its one local pass
        # (check and scale in cache-sized steps), and the two whole-buffer passes that pass replaced
        "check_and_scale": lambda: fast.core._scale_and_check(next(halving)),
        "nonfinite_check": lambda: bool(torch.isfinite(flat.values.sum())),
        "divide": lambda: flat.values.mul_(1.0),
        "ints_all_reduce": lambda: dist.all_reduce(flat.ints, dist.ReduceOp.MAX) if flat.ints.numel() else None,
        # and of absmax: its MAX all_reduce over n int32 keys, and the key transform out and back
        "max_all_reduce_keys": lambda: dist.all_reduce(keys, dist.ReduceOp.MAX),
        "key_transform": lambda: _key_transform(keys, key_scratch),
    }
    times = time_ops(ops, args.repeats, args.warmup)
    peak = torch.tensor([-1 if v is None else v for v in memory.values()], dtype=torch.float64)
    dist.all_reduce(peak, dist.ReduceOp.MAX)  # the hungriest owner
    return {"model": name, "owners": world, "params": n, "ints": flat.ints.numel(), "times": times, "sent_bytes": sent,
            "peak_extra_bytes": {k: (None if v < 0 else int(v)) for k, v in zip(memory, peak.tolist())},
            "scratch_bytes": {"avg": 0, "absmax_reduce": key_scratch.nbytes,
                              "absmax_gather": 4 * world * min(args.chunk_elements, n)}}  # fmt: skip


class _Flat(nn.Module):
    """A model that is one flat parameter of `size` floats: unify cost without architecture noise."""

    def __init__(self, size: int):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(size) * 0.01)


def _scaling_case(size: int, world: int, args: argparse.Namespace) -> dict[str, Any]:
    torch.manual_seed(dist.get_rank())
    flat = FlatState(_Flat(size), tail=tail_size(world))
    fast = Unifier.over(flat, UnifyConfig())
    same_bytes = torch.zeros(size)
    times = time_ops({"all_reduce": lambda: dist.all_reduce(same_bytes), "avg": lambda: fast.unify(rule="avg", verify=False)},
                     args.repeats, args.warmup)  # fmt: skip
    return {"params": size, "owners": world, "times": times}


def _owner(rank: int, world: int, port: int, out: str, args: argparse.Namespace) -> None:
    os.environ["GLOO_SOCKET_IFNAME"] = os.environ.get("GLOO_SOCKET_IFNAME", "lo")
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                            timeout=timedelta(seconds=600))  # fmt: skip
    try:
        models = [_model_case(m, world, args) for m in args.models] if world in args.owners else []
        scaling = [_scaling_case(s, world, args) for s in args.sizes] if world in args.scaling_owners else []
    finally:
        dist.destroy_process_group()
    if rank == 0:
        Path(out).write_text(json.dumps({"models": models, "scaling": scaling}))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run_owners(world: int, args: argparse.Namespace) -> dict[str, Any]:
    with tempfile.TemporaryDirectory() as tmp:
        out = str(Path(tmp) / "owners.json")
        mp.spawn(_owner, args=(world, _free_port(), out, args), nprocs=world, join=True)
        return json.loads(Path(out).read_text())


# ---------------------------------------------------------------- rows (pure)


def _ratio_row(section: str, case: str, owners: int | None, params: int | None, what: str, t: float,
               base: str, tb: float, target: str | None) -> dict[str, Any]:  # fmt: skip
    ratio = t / tb if tb > 0 else float("nan")
    row = {"section": section, "case": case, "owners": owners, "params": params, "measured": what, "value": t,
           "baseline": base, "baseline_value": tb, "ratio": ratio, "target": None, "pass": None}  # fmt: skip
    if target:
        op, bound = TARGETS[target]
        row["target"] = f"{op} {bound:.2f}"
        row["pass"] = bool(ratio <= bound if op == "<=" else ratio >= bound)
    return row


def _unify_rows(case: dict[str, Any]) -> list[dict[str, Any]]:
    t, name, w, n = case["times"], case["model"], case["owners"], case["params"]
    return [
        _ratio_row("unify", name, w, n, "avg unify", t["avg"], "all_reduce same bytes", t["all_reduce"],
                   "avg_vs_all_reduce"),  # fmt: skip
        _ratio_row("unify", name, w, n, "avg unify", t["avg"], "average_parameters", t["average_parameters"],
                   "avg_vs_average_parameters"),  # fmt: skip
        _ratio_row("unify", name, w, n, "absmax reduce", t["absmax_reduce"], "avg unify", t["avg"],
                   "absmax_reduce_vs_avg"),  # fmt: skip
        _ratio_row("unify", name, w, n, "absmax gather", t["absmax_gather"], "avg unify", t["avg"], None),
    ]


def _memory_rows(case: dict[str, Any]) -> list[dict[str, Any]]:
    t = case["times"]
    return [{"model": case["model"], "owners": case["owners"], "params": case["params"], "impl": impl,
             "time_s": t[impl], "ratio_vs_avg": t[impl] / t["avg"], "scratch_bytes": case["scratch_bytes"][impl],
             "peak_extra_bytes": case["peak_extra_bytes"][impl]}
            for impl in ("avg", "absmax_reduce", "absmax_gather")]  # fmt: skip


def _diagnosis_row(case: dict[str, Any]) -> dict[str, Any]:
    t = case["times"]
    over = t["avg"] - t["all_reduce"]
    ints = t["ints_all_reduce"] if case["ints"] else 0.0
    return {"model": case["model"], "owners": case["owners"], "params": case["params"], "avg_s": t["avg"],
            "all_reduce_s": t["all_reduce"], "overhead_s": over, "overhead_ratio": t["avg"] / t["all_reduce"],
            "check_and_scale_s": t["check_and_scale"], "ints_all_reduce_s": ints,
            "rest_s": over - t["check_and_scale"] - ints,
            "replaced_check_s": t["nonfinite_check"], "replaced_scale_s": t["divide"],
            "absmax_s": t["absmax_reduce"], "max_all_reduce_keys_s": t["max_all_reduce_keys"],
            "key_transform_s": t["key_transform"]}  # fmt: skip


def _compression_rows(case: dict[str, Any]) -> list[dict[str, Any]]:
    """unify.compress: bytes this owner sends per avg unify (UnifyOutcome.bytes_sent) and time, against none."""
    t, sent = case["times"], case["sent_bytes"]
    return [{"model": case["model"], "owners": case["owners"], "compress": mode, "sent_bytes": sent[mode],
             "bytes_vs_none": sent[mode] / sent["none"], "time_s": t["avg" if mode == "none" else f"avg_{mode}"],
             "time_vs_none": t["avg" if mode == "none" else f"avg_{mode}"] / t["avg"]}
            for mode in ("none", *COMPRESS_MODES)]  # fmt: skip


def _scaling_rows(cases: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [{"params": c["params"], "owners": c["owners"], "avg_s": c["times"]["avg"],
             "all_reduce_s": c["times"]["all_reduce"], "ratio": c["times"]["avg"] / c["times"]["all_reduce"],
             "avg_ns_per_param": 1e9 * c["times"]["avg"] / c["params"]} for c in cases]  # fmt: skip


COST_CASES = (("avg", "reduce"), ("weighted_avg", "reduce"), ("max", "reduce"), ("absmax", "reduce"),
              ("absmax", "gather"), ("secure_avg", "reduce"), ("median", "gather"), ("trimmed_mean", "gather"),
              ("ties", "gather"))  # fmt: skip
"""Every rule's collective path; space = delta, update_norm_bound, server momentum and DP add no collective,
train.scaffold adds one all_reduce of the parameters per round."""


def _cost_rows(cases: list[dict[str, Any]], chunk: int) -> list[dict[str, Any]]:
    rows = []
    for c in cases:
        for rule, impl in COST_CASES:
            cost = collective_cost(rule, impl, c["params"], c["ints"], c["owners"], chunk)
            rows.append({"model": c["model"], "owners": c["owners"], **cost})
    return rows


# ---------------------------------------------------------------- local epoch (this process, 1 thread)


def _fashion_subset(root: Path, count: int) -> tuple[Any, Tensor]:
    """The torchvision dataset (PIL per sample) and a seeded subset of `count` indices."""
    from torchvision.datasets import FashionMNIST

    from unify_dist.config import DataConfig
    from unify_dist.data import prepare_dataset

    # The same preparation as training: unpacks official .gz files offline, downloads when online.
    prepare_dataset(DataConfig(dataset="fashion_mnist", root=str(root)))
    ds = FashionMNIST(str(root), train=True, download=False)
    if count > len(ds):
        raise UserError(f"--epoch-images {count} > {len(ds)} Fashion-MNIST training images")
    return ds, torch.randperm(len(ds), generator=torch.Generator().manual_seed(0))[:count]


def _plain_loop(model: nn.Module, opt: torch.optim.Optimizer, x: Tensor, y: Tensor, bs: int,
                g: torch.Generator) -> None:  # fmt: skip
    """The baseline: the loop anyone would write over in-memory tensors."""
    model.train()
    order = torch.randperm(len(y), generator=g)
    for start in range(0, len(y), bs):
        idx = order[start : start + bs]
        opt.zero_grad()
        F.cross_entropy(model(x[idx]), y[idx]).backward()
        opt.step()


def _loader_loop(model: nn.Module, opt: torch.optim.Optimizer, loader: Any) -> None:
    model.train()
    for xb, yb in loader:
        opt.zero_grad()
        F.cross_entropy(model(xb), yb).backward()
        opt.step()


def _epoch_section(args: argparse.Namespace) -> dict[str, Any]:
    from torch.utils.data import DataLoader, Subset
    from torchvision import transforms

    torch.set_num_threads(1)
    mean, std = TORCHVISION_SETS["fashion_mnist"][5:7]
    root = Path(args.data_root or os.environ.get("UNIFY_DIST_DATA_ROOT") or "data").expanduser()
    os.environ["UNIFY_DIST_DATA_ROOT"] = str(root)  # so data preparation below uses this root too
    ds, idx = _fashion_subset(root, args.epoch_images)
    x = ds.data[idx].unsqueeze(1).float().div_(255).sub_(mean[0]).div_(std[0])
    data = Split(x, ds.targets[idx].long())
    ds.transform = transforms.Compose([transforms.ToTensor(), transforms.Normalize(mean, std)])
    loader = DataLoader(Subset(ds, idx.tolist()), batch_size=64, shuffle=True, num_workers=0,
                        generator=torch.Generator().manual_seed(0))  # fmt: skip
    torch.manual_seed(0)
    start = build_model(ModelConfig(name="paper_cnn"), 1, 10, 28)
    loops = {
        "train_epoch": lambda m, o, e: train_epoch(m, o, data, 64, epoch_generator(0, 0, 0, e)),
        "plain_loop": lambda m, o, e: _plain_loop(m, o, data.x, data.y, 64, epoch_generator(0, 0, 0, e)),
        "dataloader": lambda m, o, e: _loader_loop(m, o, loader),
        # the same model in torch's default layout (model.channels_last = false): what the layout buys
        "contiguous": lambda m, o, e: train_epoch(m.to(memory_format=torch.contiguous_format), o, data, 64,
                                                  epoch_generator(0, 0, 0, e)),  # fmt: skip
    }
    med = median_rates(loops, start, len(data), args.epoch_repeats)
    evals = _eval_rates(start, data, args.epoch_repeats)
    rows = [
        _ratio_row("epoch", "paper_cnn bs 64", 1, len(data), "train_epoch img/s", med["train_epoch"],
                   "plain loop img/s", med["plain_loop"], "train_epoch_vs_plain_loop"),
        _ratio_row("epoch", "paper_cnn bs 64", 1, len(data), "train_epoch img/s", med["train_epoch"],
                   "DataLoader+ToTensor img/s", med["dataloader"], None),
        _ratio_row("epoch", "paper_cnn bs 64, layout", 1, len(data), "channels_last img/s", med["train_epoch"],
                   "contiguous img/s", med["contiguous"], None),
        _ratio_row("epoch", "paper_cnn evaluation", 1, len(data), "count_correct img/s", evals["count_correct"],
                   "contiguous, batches of 2048 img/s", evals["contiguous_2048"], None),
    ]  # fmt: skip
    return {"images": len(data), "images_per_s": med, "eval_images_per_s": evals, "rows": rows}


def _eval_rates(start: nn.Module, data: Split, repeats: int) -> dict[str, float]:
    """Images per second of evaluation: count_correct (channels_last, CPU batches of 128) against the same
    model in the default layout predicting in batches of 2048 (what evaluation did before); best of repeats."""
    fast, slow = copy.deepcopy(start).eval(), copy.deepcopy(start).eval().to(memory_format=torch.contiguous_format)

    def old_way() -> None:
        with torch.no_grad():
            for begin in range(0, len(data), 2048):
                slow(data.x[begin : begin + 2048]).argmax(1)

    rates: dict[str, float] = {}
    for name, fn in (("count_correct", lambda: count_correct(fast, data)), ("contiguous_2048", old_way)):
        fn()  # warm-up
        best = min(_seconds(fn) for _ in range(max(1, repeats)))
        rates[name] = len(data) / best
    return rates


def _seconds(fn: Callable[[], object]) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


# ---------------------------------------------------------------- streamed epoch (Stream through a DataLoader)


class NoiseImages(torch.utils.data.Dataset):
    """`n` seeded noise images made on the fly from the index: a dataset that never exists in memory."""

    def __init__(self, n: int, shape: tuple[int, ...] = (1, 28, 28), classes: int = 10):
        self.n, self.shape, self.classes = n, shape, classes

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> tuple[Tensor, int]:
        g = torch.Generator().manual_seed(i)
        return torch.randn(self.shape, generator=g), i % self.classes


def _trust_section(args: argparse.Namespace) -> dict[str, Any]:
    """Sealed ring (trust on) against gloo's all_reduce of the same bytes, each model and owner count,
    and AES-256-GCM's throughput on one core beside it (benchmarks/trust_bench.py)."""
    try:
        from benchmarks.trust_bench import cipher_mb_s, measure
    except ImportError as e:  # GPU images without `cryptography`
        return {"skipped": f"trust needs the cryptography package ({e})"}
    rows = []
    for w in args.owners:
        for name, t in measure(w, args.models, args.repeats).items():
            rows.append(_ratio_row("trust", name, w, t["floats"], "sealed all_reduce", t["sealed_s"],
                                   "gloo all_reduce same bytes", t["plain_s"], "sealed_vs_plain_loopback"))  # fmt: skip
    return {"rows": rows, "cipher_one_core": cipher_mb_s(reps=3 if args.quick else 10)}


def _records_section(args: argparse.Namespace) -> dict[str, Any]:
    """`unify-dist verify` over 1,000 signed rounds of 8 owners (quick: 100), and sign_round per owner per
    round in real groups of each --owners count: time, bytes sent (sealed) and bytes added to the record."""
    try:
        from benchmarks.record_bench import TARGETS as RECORD_TARGETS, signing_cost, verify_seconds
    except ImportError as e:  # GPU images without `cryptography`
        return {"skipped": f"signed records need the cryptography package ({e})"}
    verify = verify_seconds(100 if args.quick else 1000, 8, args.repeats)
    verify["target_s"] = RECORD_TARGETS["verify_s"] * verify["rounds"] / 1000
    verify["pass"] = verify["verify_s"] <= verify["target_s"] and verify["problems"] == 0
    signing = []
    for w in args.owners:
        row = signing_cost(w, args.repeats)
        row["pass"] = (row["sign_s"] <= RECORD_TARGETS["sign_s_per_owner_round"]
                       and max(row["sent_bytes"], row["stored_bytes"]) <= RECORD_TARGETS["sign_bytes_per_owner_round"])  # fmt: skip
        signing.append(row)
    return {"verify": [verify], "signing": signing}


def _stream_section(args: argparse.Namespace) -> dict[str, Any]:
    """The streamed path against the DataLoader loop anyone would write, and its memory at N, 10N, 100N items."""
    rate = _stream_throughput(args.epoch_images, args.epoch_repeats)
    n = args.stream_items
    memory = [_stream_rss_in_fresh_process(k * n) for k in (1, 10, 100)]
    rows = [
        _ratio_row("stream", "paper_cnn bs 64", 1, args.epoch_images, "streamed train_epoch img/s", rate["stream"],
                   "plain DataLoader loop img/s", rate["dataloader"], "stream_epoch_vs_dataloader"),
        _ratio_row("stream", "mlp bs 64, epoch peak RSS", 1, 100 * n, f"{100 * n:,} items MiB",
                   _epoch_peak(memory[2]) / 2**20, f"{n:,} items MiB", _epoch_peak(memory[0]) / 2**20,
                   "stream_rss_100n_vs_n"),
    ]  # fmt: skip
    return {"images": args.epoch_images, "images_per_s": rate, "memory": memory, "rows": rows}


def _epoch_peak(m: dict[str, Any]) -> int:
    return m["epoch_peak_rss_bytes"] if m["epoch_peak_rss_bytes"] is not None else m["maxrss_bytes"]


def _stream_throughput(images: int, repeats: int) -> dict[str, float]:
    """Images per second of train_epoch over a Stream and of a plain DataLoader loop, same items and model."""
    from torch.utils.data import DataLoader

    from unify_dist.data import Stream

    torch.set_num_threads(1)
    ds = NoiseImages(images)
    torch.manual_seed(0)
    start = build_model(ModelConfig(name="paper_cnn"), 1, 10, 28)
    loops = {
        "stream": lambda m, o, e: train_epoch(m, o, Stream(ds), 64, epoch_generator(0, 0, 0, e)),
        "dataloader": lambda m, o, e: _loader_loop(
            m, o, DataLoader(ds, batch_size=64, shuffle=True, generator=torch.Generator().manual_seed(e))),
    }  # fmt: skip
    return median_rates(loops, start, images, repeats)


def median_rates(loops: dict[str, Callable], start: nn.Module, images: int, repeats: int) -> dict[str, float]:
    """Images per second of each training loop, median over `repeats` epochs after one warm-up, each epoch
    from a fresh copy of `start`; the loops take turns within an epoch, so drifting load hits them alike."""
    rates: dict[str, list[float]] = {k: [] for k in loops}
    for epoch in range(1 + repeats):
        for name, loop in loops.items():
            model = copy.deepcopy(start)
            opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
            t0 = time.perf_counter()
            loop(model, opt, epoch)
            if epoch:
                rates[name].append(images / (time.perf_counter() - t0))
    return {k: statistics.median(v) for k, v in rates.items()}


def _stream_rss_in_fresh_process(items: int) -> dict[str, Any]:
    """Run one streamed epoch over `items` generated images in a new interpreter; its peak RSS, untouched by ours."""
    import subprocess

    code = f"from benchmarks.bench import stream_rss_child; stream_rss_child({items})"
    repo = Path(__file__).resolve().parents[1]
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=repo, check=False,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})  # fmt: skip
    if proc.returncode != 0:
        raise RuntimeError(f"streamed epoch over {items} items failed: {proc.stderr[-2000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def stream_rss_child(items: int) -> None:
    """In a fresh process: one epoch of the mlp over a Stream of `items` noise images; print its memory as JSON.

    ru_maxrss is the process's lifetime high-water mark (KiB on Linux); importing torch alone can set it,
    which would hide the epoch. So the epoch's own peak is also read: VmHWM reset to the current RSS
    (/proc/self/clear_refs) just before the epoch, read after it (None where Linux's /proc is missing).
    """
    import resource

    from unify_dist.data import Stream

    torch.set_num_threads(1)
    torch.manual_seed(0)
    model = build_model(ModelConfig(name="mlp"), 1, 10, 28)
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    data = Stream(NoiseImages(items))
    train_epoch(model, opt, data, 64, epoch_generator(0, 0, 0, 0), max_steps=2)  # allocator warm-up
    gc.collect()
    try:
        Path("/proc/self/clear_refs").write_text("5")  # 5: reset the peak RSS to the current RSS
        before: int | None = _status_kib("VmRSS") * 1024
    except (OSError, RuntimeError):
        before = None
    t0 = time.perf_counter()
    train_epoch(model, opt, data, 64, epoch_generator(0, 0, 0, 1))
    seconds = time.perf_counter() - t0
    epoch_peak = _status_kib("VmHWM") * 1024 if before is not None else None
    print(json.dumps({"items": items, "maxrss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
                      "rss_before_epoch_bytes": before, "epoch_peak_rss_bytes": epoch_peak,
                      "epoch_rise_bytes": None if before is None else epoch_peak - before,
                      "held_in_memory_bytes": items * 28 * 28 * 4, "epoch_s": seconds}))  # fmt: skip


# ---------------------------------------------------------------- output


def _fmt_s(seconds: float) -> str:
    return f"{seconds * 1e3:.2f} ms" if seconds < 1 else f"{seconds:.2f} s"


def _fmt_bytes(n: int | float | None) -> str:
    if n is None:
        return "n/a"
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


def _value(row: dict[str, Any]) -> tuple[str, str]:
    if row["section"] in ("epoch", "stream"):
        return f"{row['value']:.0f}", f"{row['baseline_value']:.0f}"
    return _fmt_s(row["value"]), _fmt_s(row["baseline_value"])


def _print(result: dict[str, Any]) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console(highlight=False, width=None if Console().is_terminal else 200)
    main = Table(title="unify-dist bench: ratios against baselines timed in the same run (medians)")
    for col in ("case", "owners", "params", "measured", "value", "baseline", "value ", "ratio", "target", "result"):
        main.add_column(col, justify="right" if col in ("owners", "params", "ratio") else "left")
    for row in result["unify"] + result["epoch"].get("rows", []) + result["stream"].get("rows", []) + result["trust"].get("rows", []):
        mark = "" if row["pass"] is None else ("[green]pass[/]" if row["pass"] else "[red]FAIL[/]")
        value, base = _value(row)
        main.add_row(row["case"], str(row["owners"]), f"{row['params']:,}", row["measured"], value, row["baseline"],
                     base, f"{row['ratio']:.2f}", row["target"] or "", mark)  # fmt: skip
    console.print(main)
    if "cipher_one_core" in result["trust"]:
        c = result["trust"]["cipher_one_core"]
        console.print(f"AES-256-GCM on one core: seal {c['seal_MB_s']:.0f} MB/s, open {c['open_MB_s']:.0f} MB/s")
    _print_simple(console, "absmax: time and extra memory (peak RSS rise; scratch = buffers the code allocates)",
                  result["absmax_memory"], {"model": str, "owners": str, "impl": str, "time_s": _fmt_s,
                  "ratio_vs_avg": "{:.2f}".format, "scratch_bytes": _fmt_bytes,
                  "peak_extra_bytes": _fmt_bytes})  # fmt: skip
    _print_simple(console, "where unify's time goes: avg beyond one all_reduce; absmax's all_reduce and key transform",
                  result["diagnosis"],
                  {"model": str, "owners": str, "overhead_ratio": "{:.3f}".format, "all_reduce_s": _fmt_s,
                   "overhead_s": _fmt_s, "check_and_scale_s": _fmt_s, "ints_all_reduce_s": _fmt_s, "rest_s": _fmt_s,
                   "replaced_check_s": _fmt_s, "replaced_scale_s": _fmt_s, "absmax_s": _fmt_s,
                   "max_all_reduce_keys_s": _fmt_s, "key_transform_s": _fmt_s})  # fmt: skip
    _print_simple(console, "unify.compress: bytes each owner sends per avg unify (ring estimate) and its time",
                  result["compression"],
                  {"model": str, "owners": str, "compress": str, "sent_bytes": _fmt_bytes, "bytes_vs_none": "{:.3f}".format,
                   "time_s": _fmt_s, "time_vs_none": "{:.2f}".format})  # fmt: skip
    _print_simple(console, "growth: avg unify vs parameters and owners (flat model)", result["scaling"],
                  {"params": "{:,}".format, "owners": str, "avg_s": _fmt_s, "all_reduce_s": _fmt_s,
                   "ratio": "{:.2f}".format, "avg_ns_per_param": "{:.2f}".format})  # fmt: skip
    _print_simple(console, "collective cost per unify and owner (fp32, secure_avg int64; sent = ring estimate; "
                  "train.scaffold adds one all_reduce of the parameters per round)",
                  result["collective_cost"],
                  {"model": str, "owners": str, "rule": str, "impl": str, "collectives": str,
                   "payload_bytes": _fmt_bytes, "sent_bytes": _fmt_bytes})  # fmt: skip
    _print_simple(console, "streamed epoch memory, a fresh process per size (items generated from the index; "
                  "maxrss = lifetime peak, epoch peak = VmHWM reset before the epoch)",
                  result["stream"].get("memory", []),
                  {"items": "{:,}".format, "maxrss_bytes": _fmt_bytes, "rss_before_epoch_bytes": _fmt_bytes,
                   "epoch_peak_rss_bytes": _fmt_bytes, "epoch_rise_bytes": _fmt_bytes,
                   "held_in_memory_bytes": _fmt_bytes, "epoch_s": _fmt_s})  # fmt: skip


def _print_records(console: Any, records: dict[str, Any]) -> None:
    """The signed records section: verify's time and signing's cost, each with its target."""
    mark = {True: "pass", False: "FAIL"}
    _print_simple(console, "unify-dist verify over signed rounds (target: 1 s per 1,000 rounds of 8 owners)",
                  records.get("verify", []), {"rounds": str, "owners": str, "verify_s": _fmt_s, "target_s": _fmt_s,
                  "problems": str, "pass": mark.get})  # fmt: skip
    _print_simple(console, "signing a round's record, per owner (targets: 5 ms, 1 KiB sent and stored)",
                  records.get("signing", []), {"owners": str, "sign_s": _fmt_s, "local_s": _fmt_s,
                  "sealed_gather_s": _fmt_s, "plain_gather_s": _fmt_s, "sent_bytes": _fmt_bytes,
                  "stored_bytes": _fmt_bytes, "pass": mark.get})  # fmt: skip


def _console() -> Any:
    from rich.console import Console

    return Console(highlight=False, width=None if Console().is_terminal else 200)


def _print_lora(console: Any, result: dict[str, Any]) -> None:
    _print_simple(console, "LoRA rules: relative error of the unified dW against mean(B_i @ A_i), and bytes per owner "
                  "per unify (vs_unified: over the unified tensors' bytes; vs_adapter: over all A and B)",
                  result["lora"].get("rows", []),
                  {"rule": str, "owners": str, "rel_error": "{:.2e}".format, "sent_bytes": _fmt_bytes,
                   "unified_bytes": _fmt_bytes, "adapter_bytes": _fmt_bytes, "vs_unified": "{:.3f}".format,
                   "vs_adapter": "{:.3f}".format, "unify_s": _fmt_s})  # fmt: skip


def _print_simple(console: Any, title: str, rows: list[dict[str, Any]], cols: dict[str, Callable[[Any], str]]) -> None:
    from rich.table import Table

    if not rows:
        return
    table = Table(title=title)
    for col in cols:
        table.add_column(col)
    for row in rows:
        table.add_row(*(fmt(row[c]) for c, fmt in cols.items()))
    console.print(table)


def _meta(args: argparse.Namespace) -> dict[str, Any]:
    return {"torch": torch.__version__, "python": platform.python_version(), "cpus": os.cpu_count(),
            "threads_per_owner": 1, "backend": "gloo", "repeats": args.repeats, "warmup": args.warmup,
            "quick": args.quick, "chunk_elements": args.chunk_elements, "statistic": "median of repeats, slowest rank",
            "memory_method": "rise of VmHWM over VmRSS after /proc/self/clear_refs=5, max over owners, first call",
            "targets": {k: f"{op} {b}" for k, (op, b) in TARGETS.items()},
            "time_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    """Run every section, print the tables, write the JSON; 0 even when a target fails (it is a measurement).

    A bad option is one line on stderr and exit code 2."""
    try:
        args = _settings(sys.argv[1:] if argv is None else argv)
    except UserError as e:
        say(f"unify-dist: error: {e}")
        return 2
    worlds = sorted(set(args.owners) | set(args.scaling_owners))
    runs = [_run_owners(w, args) for w in worlds]
    models = [c for r in runs for c in r["models"]]
    result = {
        "meta": _meta(args),
        "unify": [row for c in models for row in _unify_rows(c)],
        "absmax_memory": [row for c in models for row in _memory_rows(c)],
        "diagnosis": [_diagnosis_row(c) for c in models],
        "compression": [row for c in models for row in _compression_rows(c)],
        "scaling": _scaling_rows([c for r in runs for c in r["scaling"]]),
        "collective_cost": _cost_rows(models, args.chunk_elements),
        "epoch": {} if args.skip_epoch else _epoch_section(args),
        "stream": {} if args.skip_stream else _stream_section(args),
        "trust": {} if args.skip_trust else _trust_section(args),
        "records": {} if args.skip_records else _records_section(args),
        "lora": {} if args.skip_lora else {"rows": lora_section(args.owners, args.quick)},  # benchmarks/lora_bench.py
    }
    _print(result)
    _print_records(_console(), result["records"])
    _print_lora(_console(), result)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
