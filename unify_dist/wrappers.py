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
        16-bit: the subtraction is in the residual's precision)."""
        if not commit:
            return
        if sent.dtype != self.residual.dtype:  # widened first (exact): a mixed-dtype sub runs 4x slower on a CPU
            self.residual.copy_(sent)
            sent = self.residual
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


STEP_BLOCKS = 256
"""Blocks per step of the int8 helpers: 64 Ki elements, 256 KiB of float32, so a step's passes stay in
cache. Measured on resnet18's 11.7 M values (one thread, loaded 2-core machine): the block scales 26 ms
a pass against 82 ms for one whole-buffer aminmax, quantising 39 ms against 133, dequantising 24 against 108."""


def _steps(n: int, block: int):
    """(start, end) of consecutive steps of STEP_BLOCKS whole blocks; the last may end in a short block."""
    step = block * STEP_BLOCKS
    for start in range(0, n, step):
        yield start, min(n, start + step)


def _times_block_factor(src: Tensor, factors: Tensor, start: int, block: int, out: Tensor) -> None:
    """out = src times the factor of its block, for a piece of a vector that starts at element `start`
    (a multiple of `block`): one float32 product each (out may be src)."""
    whole, first = src.numel() // block * block, start // block
    if whole:
        torch.mul(src[:whole].view(-1, block), factors[first : first + whole // block, None], out=out[:whole].view(-1, block))
    if whole < src.numel():
        torch.mul(src[whole:], factors[first + whole // block], out=out[whole:])


def block_absmax(x: Tensor, block: int, out: Tensor) -> None:
    """out[b] = max |x| over block b (out has ceil(n / block) elements)."""
    scratch = torch.empty(min(x.numel(), block * STEP_BLOCKS), dtype=x.dtype, device=x.device)
    for start, end in _steps(x.numel(), block):
        size = end - start
        magnitude = torch.abs(x[start:end], out=scratch[:size])
        whole, first = size // block * block, start // block
        if whole:
            torch.amax(magnitude[:whole].view(-1, block), dim=1, out=out[first : first + whole // block])
        if whole < size:
            out[-1] = magnitude[whole:].amax()


def quantize_int8(x: Tensor, scales: Tensor, levels: int, out: Tensor) -> None:
    """out = round(x * levels / scale of its block), clamped to [-levels, levels] (int8); 0 where the scale is 0.

    With scales at least every owner's block max |x| (agreed by a MAX), |out| <= levels before the clamp.
    """
    inverse = torch.where(scales > 0, levels / scales.clamp_min(torch.finfo(scales.dtype).tiny), 0.0)
    scratch = torch.empty(min(x.numel(), COMPRESS_BLOCK * STEP_BLOCKS), dtype=x.dtype, device=x.device)
    for start, end in _steps(x.numel(), COMPRESS_BLOCK):
        scaled = scratch[: end - start]
        _times_block_factor(x[start:end], inverse, start, COMPRESS_BLOCK, scaled)
        out[start:end].copy_(scaled.round_().clamp_(-levels, levels))


def dequantize_int8(q: Tensor, factors: Tensor, out: Tensor) -> None:
    """out = q * factor of its block: the same float32 products on every rank for the same q and factors
    (q widened to out's float dtype first, exactly, so each product is a float-by-float multiply)."""
    for start, end in _steps(q.numel(), COMPRESS_BLOCK):
        piece = out[start:end]
        piece.copy_(q[start:end])
        _times_block_factor(piece, factors, start, COMPRESS_BLOCK, piece)


def to_half(x: Tensor, dtype: torch.dtype, out: Tensor) -> None:
    """out = x in 16 bits, clamped to the format's finite range (fp16 tops out at 65504): a value
    too large arrives as the largest finite one, and error feedback carries the rest."""
    top = torch.finfo(dtype).max
    low, high = torch.aminmax(x)  # host sync; clamping (a copy) only when something is out of range
    out.copy_(x.clamp(-top, top) if low < -top or high > top else x)
