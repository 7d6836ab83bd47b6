"""The digest is a function of named tensors: FlatState's equals one computed offline from a state dict."""

from __future__ import annotations

import io

import torch
from torch import nn

from unify_dist.digest import state_digest
from unify_dist.flat import FlatState


class _Tied(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.bn = nn.BatchNorm2d(4)
        self.embed = nn.Embedding(5, 4)
        self.head = nn.Linear(4, 5, bias=False)
        self.head.weight = self.embed.weight  # tied: one tensor, two names in the state dict


def _saved_and_loaded(model: nn.Module) -> dict[str, torch.Tensor]:
    buf = io.BytesIO()
    torch.save({"model": model.state_dict()}, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=True)["model"]


def test_flat_digest_equals_the_offline_digest_of_the_saved_state_dict() -> None:
    torch.manual_seed(0)
    model = _Tied()
    model.conv.to(memory_format=torch.channels_last)
    flat = FlatState(model, tail=3)
    flat.tail.fill_(7.0)  # the tail is scratch, not state: it must not count
    model.bn.num_batches_tracked += 3
    loaded = _saved_and_loaded(model)
    assert loaded["conv.weight"].is_contiguous(memory_format=torch.channels_last)
    assert flat.digest() == state_digest(loaded.items()) == state_digest(model.state_dict().items())
    flat.tail.fill_(1.0)
    assert flat.digest() == state_digest(loaded.items())


def test_digest_changes_with_a_byte_a_name_a_shape_or_a_layout() -> None:
    w = torch.arange(24, dtype=torch.float32).reshape(1, 2, 3, 4)
    base = state_digest([("w", w)])
    flipped = w.clone()
    flipped.view(-1).view(torch.uint8)[5] ^= 1
    assert state_digest([("w", flipped)]) != base
    assert state_digest([("v", w)]) != base
    assert state_digest([("w", w.reshape(2, 3, 4))]) != base
    assert state_digest([("w", w.contiguous(memory_format=torch.channels_last))]) != base  # other bytes order
    assert state_digest([("w", w.double())]) != base
    assert state_digest([("a", w), ("b", w)]) == state_digest([("b", w), ("a", w)])  # name order, not given order
