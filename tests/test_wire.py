"""Metadata on the wire (unify_dist/wire.py): typed tensors and length-capped JSON, plain and sealed, on real
gloo groups; a message over its cap or not JSON stops every rank that receives it, naming the sender; and
no module of the package calls a pickling collective or unpickles what it receives.
"""

from __future__ import annotations

import ast
import struct
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

import unify_dist
from tests.trust_keys import fresh_keys, key, roster_of
from tests.world import run_world
from unify_dist.distributed import Context, agree
from unify_dist.errors import UserError
from unify_dist.wire import WireError, broadcast_bytes, broadcast_tensor, gather_bytes, gather_floats, gather_json

PACKAGE = Path(unify_dist.__file__).parent


def _ring(rank: int, raws: list[bytes] | None):
    if raws is None:
        return None
    from unify_dist.trust import SealedRing, admit

    return SealedRing(admit(key(raws[rank]), f"owner{rank}", roster_of(raws), run_id="wire"), segment_bytes=64)


def _round_trips(rank: int, world: int, raws: list[bytes] | None) -> dict:
    ring = _ring(rank, raws)
    calls = ring.calls if ring else 0
    plain = []  # a watch on gloo's own collectives (each still runs): what would cross in the clear
    for name in ("all_gather", "broadcast", "all_reduce"):
        real = getattr(dist, name)
        setattr(dist, name, lambda *a, _real=real, _name=name, **k: (plain.append(_name), _real(*a, **k))[1])
    value = {"rank": rank, "names": ["ä" * rank, "b"], "nested": [[1, 2.5], None, True]}
    out = {
        "bytes": gather_bytes(bytes(range(rank * 7)), reducer=ring),
        "json": gather_json(value, reducer=ring),
        "broadcast": broadcast_bytes(b"from rank 1: " + bytes(300) if rank == 1 else None, src=1, reducer=ring),
        "floats": gather_floats([rank, 0.5], reducer=ring),
    }
    nan = struct.unpack("<f", b"\x01\x00\xc0\x7f")[0]  # a NaN with a payload, and -0.0: bits, not values
    t = torch.tensor([nan, -0.0, 3.25, float(rank)]) if rank == 0 else torch.full((4,), 7.0)
    broadcast_tensor(t, src=0, reducer=ring)
    out["tensor"] = t.view(torch.int32).tolist()
    out["ring calls"] = (ring.calls - calls) if ring else 0
    out["plain"] = plain
    return out


@pytest.mark.parametrize("sealed", [False, True], ids=["plain", "sealed"])
def test_messages_arrive_whole_plain_and_sealed(sealed: bool) -> None:
    world = 3
    results = run_world(_round_trips, world, fresh_keys(world) if sealed else None)
    want_tensor = torch.tensor([struct.unpack("<f", b"\x01\x00\xc0\x7f")[0], -0.0, 3.25, 0.0]).view(torch.int32).tolist()
    for r in results:
        assert r["bytes"] == [bytes(range(k * 7)) for k in range(world)]
        assert [j["rank"] for j in r["json"]] == [0, 1, 2] and r["json"][2]["names"] == ["ää", "b"]
        assert r["json"][1]["nested"] == [[1, 2.5], None, True]
        assert r["broadcast"] == b"from rank 1: " + bytes(300)
        assert r["floats"] == [[0.0, 0.5], [1.0, 0.5], [2.0, 0.5]]
        assert r["tensor"] == want_tensor  # rank 0's exact bits everywhere, NaN payload and sign of zero included
        assert r["ring calls"] == (8 if sealed else 0)  # two per gather or broadcast of bytes, one per fixed-size one
        assert len(r["plain"]) == (0 if sealed else 8), r["plain"]  # sealed: nothing in the clear


def _refusals(rank: int, world: int) -> dict:
    out = {}
    try:  # rank 1's message is one byte over the cap: every rank refuses it, rank 1 too, and nobody waits
        gather_bytes(b"x" * (65 if rank == 1 else 3), limit=64, what="a test message")
    except WireError as e:
        out["cap"] = str(e)
    try:  # rank 2 sends bytes that are no JSON (a pickle's opening bytes): the same collectives, other bytes
        if rank == 2:
            gather_bytes(b"\x80\x04\x95")
        else:
            gather_json("fine", what="a test message")
    except WireError as e:
        out["json"] = str(e)
    try:
        broadcast_bytes(b"y" * 100, src=0, limit=10, what="a broadcast")
    except WireError as e:
        out["broadcast"] = str(e)
    ctx = Context(rank, world, rank, world, torch.device("cpu"), "gloo", 60.0)
    try:
        agree("rank 1's disk is full; free some space" if rank == 1 else None, ctx, "a test step")
    except UserError as e:
        out["agree"] = str(e)
    return out


def test_over_the_cap_or_not_json_stops_every_rank_naming_the_sender() -> None:
    results = run_world(_refusals, 3)
    for r in results:
        assert r["cap"] == ("a test message from rank 1 claims 65 bytes, outside 0..64; a peer is broken or the bytes "
                            "were changed on the way (set [trust] to seal them)")  # fmt: skip
        if r is not results[2]:  # rank 2 sent it and does not read its own bytes as JSON
            assert r["json"].startswith("a test message from rank 2 is not valid JSON (UnicodeDecodeError"), r["json"]
        assert "a broadcast from rank 0 claims 100 bytes, outside 0..10" in r["broadcast"]
        assert r["agree"] == "rank 1's disk is full; free some space"


# ------------------------------------------------------------------------------ no pickle, anywhere
PICKLING_COLLECTIVES = {"all_gather_object", "broadcast_object_list", "gather_object", "scatter_object_list",
                        "send_object_list", "recv_object_list"}  # fmt: skip
UNPICKLERS = {"pickle", "cPickle", "_pickle", "dill", "cloudpickle", "marshal", "shelve"}


def _unsafe_calls(source: str) -> list[str]:
    """Pickling collectives, imports of unpicklers, and torch.load calls without weights_only=True."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import | ast.ImportFrom):
            names = [a.name for a in node.names] + ([node.module] if isinstance(node, ast.ImportFrom) and node.module else [])
            found += [f"line {node.lineno}: imports {n}" for n in names if n.split(".")[0] in UNPICKLERS]
        elif isinstance(node, ast.Attribute) and node.attr in PICKLING_COLLECTIVES:
            found.append(f"line {node.lineno}: {node.attr}")
        elif isinstance(node, ast.Name) and node.id in PICKLING_COLLECTIVES:
            found.append(f"line {node.lineno}: {node.id}")
        elif isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "load":
            base = node.func.value
            if isinstance(base, ast.Name) and base.id == "torch":
                safe = any(k.arg == "weights_only" and isinstance(k.value, ast.Constant) and k.value.value is True for k in node.keywords)
                if not safe:
                    found.append(f"line {node.lineno}: torch.load without weights_only=True")
    return sorted(found, key=lambda f: int(f.split()[1].rstrip(":")))  # in the file's order


def test_the_scan_finds_what_it_looks_for() -> None:
    """The scan below can fail: each thing it forbids, written once, is found."""
    bad = ("import pickle\nfrom cloudpickle import loads\nimport torch.distributed as dist\n"
           "dist.all_gather_object(out, x)\ndist.broadcast_object_list(o, src=0)\ntorch.load(f)\n"
           "torch.load(f, weights_only=False)\ntorch.load(f, weights_only=True)\n")  # fmt: skip
    assert [f.split(": ", 1)[1] for f in _unsafe_calls(bad)] == [
        "imports pickle", "imports cloudpickle", "all_gather_object", "broadcast_object_list",
        "torch.load without weights_only=True", "torch.load without weights_only=True",
    ]  # fmt: skip


def test_no_module_of_the_package_unpickles_from_the_network() -> None:
    files = sorted(PACKAGE.rglob("*.py"))
    assert len(files) > 30, files  # the package, not an empty folder
    found = {str(f.relative_to(PACKAGE)): _unsafe_calls(f.read_text()) for f in files}
    assert {k: v for k, v in found.items() if v} == {}
