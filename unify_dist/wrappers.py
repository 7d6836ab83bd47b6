"""Concerns around a rule, each a small object that owns its state: the Unifier composes them.

A unify in update space (any option below) works on an owner's *update*, its weights minus the anchor
(the previous unified state, identical on every rank):

    owner side, before anything leaves the rank:   update = x - anchor
        ClipUpdate      scale the update to L2 norm <= C                     (unify.update_norm_bound)
        GaussianNoise   add N(0, (z C)^2) to every element; count releases   (unify.dp_noise_multiplier)
        ErrorFeedback   + what earlier rounds could not send; compressed     (unify.compress; forces delta)
    the rule's collective (on updates in delta space, else on anchor + update)
    after, identical arithmetic on every rank:      unified update u
        OuterOptimizer  m = beta m + u; u = lr m (sgd), lr (u + beta m) (nesterov)   (unify.outer; unify_dist.outer)
    unified = anchor + u; the anchor becomes unified (unless the unify is a side-by-side candidate)

Like Flower's DP wrappers and torchft's outer optimizer, each concern is optional and independent, and
its state travels in state_dict(), so a resumed run continues bit for bit (the noise excepted: its seed
is secret by design).
"""

from __future__ import annotations

import secrets
from typing import Any, Protocol

import torch
from torch import Tensor

from unify_dist.privacy import dp_epsilon, require_dp_accounting
from unify_dist.rules import clip_factor

__all__ = [
    "OwnerStep", "UnifiedStep", "UpdateSpace", "ClipUpdate", "GaussianNoise", "ErrorFeedback",
    "COMPRESS_BLOCK", "HALF_DTYPES", "int8_levels", "block_absmax", "quantize_int8", "dequantize_int8", "to_half",
]  # fmt: skip


class OwnerStep(Protocol):
    """Runs on this owner's update before anything leaves the rank."""

    def __call__(self, update: Tensor, commit: bool) -> None: ...


class UnifiedStep(Protocol):
    """Runs on the round's unified update, identically on every rank."""

    def __call__(self, update: Tensor, commit: bool) -> None: ...


class UpdateSpace:
    """The anchor: the previous unified state, from which updates are measured and to which they return.

    Build it when every rank holds the same weights, so the first anchor is identical everywhere.
    """

    def __init__(self, values: Tensor):
        self.anchor = values.detach().clone()

    def state_dict(self) -> dict[str, Any]:
        return {"anchor": self.anchor}

    def load_state_dict(self, state: dict[str, Any], current: Tensor) -> None:
        """A state without an anchor (a checkpoint of a run without these options) takes the current
        weights: the last unified state, since checkpoints are written after unify."""
        self.anchor.copy_(state.get("anchor", current))


class ClipUpdate:
    """Scale this owner's update to L2 norm `bound` if it is longer: one owner pulls at most that far."""

    def __init__(self, bound: float):
        self.bound = bound

    def __call__(self, update: Tensor, commit: bool) -> None:
        factor = clip_factor(update, self.bound)  # host sync (the norm)
        if factor != 1.0:
            update.mul_(factor)


class GaussianNoise:
    """Differential privacy: Gaussian noise of std multiplier x bound on the clipped update, and its accountant.

    The noise is drawn from a secret seed (OS entropy), never shared: a peer who could regenerate it
    could subtract it. So DP runs are not bit-reproducible across restarts; ranks still end identical,
    because the noise is added before anything leaves the rank. Every noised update is one release;
    `epsilon()` is the privacy spent so far (unify_dist.privacy.dp_epsilon), and the count is state.
    """

    def __init__(self, multiplier: float, bound: float, delta: float):
        require_dp_accounting()  # the accountant's package: a one-line UserError now, not after the first round
        self.multiplier, self.bound, self.delta = multiplier, bound, delta
        self.releases = 0
        self._generator: torch.Generator | None = None  # seeded on first use

    def __call__(self, update: Tensor, commit: bool) -> None:
        if self._generator is None:
            self._generator = torch.Generator(device=update.device)
            self._generator.manual_seed(secrets.randbits(63))
        noise = torch.empty_like(update).normal_(0.0, self.multiplier * self.bound, generator=self._generator)
        update.add_(noise)
        self.releases += 1  # a side-by-side candidate is a release too: its noised update left the rank

    def epsilon(self) -> float:
        return dp_epsilon(self.multiplier, self.releases, self.delta)

    def state_dict(self) -> dict[str, Any]:
        return {"dp_releases": torch.tensor(self.releases)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.releases = int(state.get("dp_releases", 0))


# ------------------------------------------------------------------------------------ compression
COMPRESS_BLOCK = 256
"""Elements per int8 block: one float32 scale each, so scales add 1/64 to the int8 payload."""

HALF_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}
"""unify.compress modes that cast to 16 bits."""


class ErrorFeedback:
    """Compressed transport's memory: what this owner could not send yet, added to its next contribution.

    Each round the owner sends compress(contribution + residual) and keeps residual = (contribution +
    residual) - what was sent, so no signal is lost over rounds: the sum of everything sent trails the
    sum of all contributions by one residual. The residual differs per owner, is state (a checkpoint
    holds it), and a side-by-side candidate (commit=False) leaves it as it was.
    """

    def __init__(self, mode: str, like: Tensor):
        self.mode = mode
        self.residual = torch.zeros_like(like)

    def add_to(self, contribution: Tensor) -> None:
        contribution.add_(self.residual)

    def keep(self, contribution: Tensor, sent: Tensor, commit: bool) -> None:
        """residual = contribution - sent: what the lossy transport dropped this round (`sent` may be
        16-bit: the subtraction is in the residual's precision, in one pass)."""
        if commit:
            torch.sub(contribution, sent, out=self.residual)

    def state_dict(self) -> dict[str, Any]:
        return {"compress_residual": self.residual}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """A checkpoint without a residual (one of an uncompressed run) starts with nothing owed."""
        if "compress_residual" in state:
            self.residual.copy_(state["compress_residual"])
        else:
            self.residual.zero_()


def int8_levels(owners: int) -> int:
    """Levels per sign each owner quantises to: 127 // owners, so the SUM over owners of values in
    [-levels, levels] stays in [-127, 127] and an int8 all_reduce cannot overflow, whatever the signs."""
    return 127 // owners


def _blocks(x: Tensor, block: int) -> tuple[Tensor, Tensor]:
    """x as [whole blocks, block] and the short last block (maybe empty): views, no copy."""
    whole = x.numel() // block * block
    return x[:whole].view(-1, block), x[whole:]


def block_absmax(x: Tensor, block: int, out: Tensor) -> None:
    """out[b] = max |x| over block b (out has ceil(n / block) elements)."""
    main, rest = _blocks(x, block)
    low, high = torch.aminmax(main, dim=1)  # one read, no |x| copy
    torch.maximum(low.neg_(), high, out=out[: main.shape[0]])
    if rest.numel():
        out[-1] = rest.abs().amax()


def quantize_int8(x: Tensor, scales: Tensor, levels: int, out: Tensor) -> None:
    """out = round(x * levels / scale of its block), clamped to [-levels, levels] (int8); 0 where the scale is 0.

    With scales at least every owner's block max |x| (agreed by a MAX), |out| <= levels before the clamp.
    """
    inverse = torch.where(scales > 0, levels / scales.clamp_min(torch.finfo(scales.dtype).tiny), 0.0)
    for part, q, inv in _block_pairs(x, out, inverse, COMPRESS_BLOCK):
        q.copy_((part * inv).round_().clamp_(-levels, levels))


def dequantize_int8(q: Tensor, factors: Tensor, out: Tensor) -> None:
    """out = q * factor of its block: the same float32 products on every rank for the same q and factors."""
    for part, o, f in _block_pairs(q, out, factors, COMPRESS_BLOCK):
        torch.mul(part, f, out=o)


def _block_pairs(x: Tensor, out: Tensor, per_block: Tensor, block: int):
    """(x part, out part, per-block factor broadcast to it) for the whole blocks and the short last one."""
    x_main, x_rest = _blocks(x, block)
    o_main, o_rest = _blocks(out, block)
    yield x_main, o_main, per_block[: x_main.shape[0], None]
    if x_rest.numel():
        yield x_rest, o_rest, per_block[-1]


def to_half(x: Tensor, dtype: torch.dtype, out: Tensor) -> None:
    """out = x in 16 bits, clamped to the format's finite range (fp16 tops out at 65504): a value
    too large arrives as the largest finite one, and error feedback carries the rest."""
    top = torch.finfo(dtype).max
    low, high = torch.aminmax(x)  # host sync; clamping (a copy) only when something is out of range
    out.copy_(x.clamp(-top, top) if low < -top or high > top else x)
