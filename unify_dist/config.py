"""Typed settings of the library's components: one frozen dataclass per component, a docstring per field.

Each component receives only its own section (DataConfig to data.py, UnifyConfig to the unifier, ...),
never the whole run configuration, so a component cannot quietly depend on another's settings. The
program (unify_dist.app.config) reads them from TOML and `--set`; a library user builds them directly.
"""

from __future__ import annotations

import difflib
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

__all__ = [
    "DataConfig", "ModelConfig", "TrainConfig", "UnifyConfig", "DistConfig", "DATA_ROOT_ENV", "choice", "outer_settings",
]  # fmt: skip

DATA_ROOT_ENV = "UNIFY_DIST_DATA_ROOT"
"""Environment variable that overrides `data.root`, so tests and CI can point every run at one copy."""

OPTIMIZERS = ("sgd", "adam")


@dataclass(frozen=True)
class DataConfig:
    dataset: str = "fashion_mnist"
    """A registered dataset (unify_dist.data.DATASETS): fashion_mnist, mnist, cifar10 (torchvision), or
    folder (each owner brings an ImageFolder tree). Ignored when data.factory is set."""
    root: str = "data"
    """Where torchvision datasets live (ROOT/FashionMNIST/raw/...). The UNIFY_DIST_DATA_ROOT variable wins."""
    download: bool = True
    """Download missing files when online; offline, a missing dataset is a clear error."""
    partition: str = "iid"
    """A registered partition (unify_dist.data.PARTITIONS), how owners get their share of a shared dataset:
    iid (paper V), label_split (paper H), dirichlet; folder for owner-held data. Ignored with data.factory."""
    alpha: float = 0.5
    """Dirichlet concentration for partition = dirichlet; small alpha means skewed owners."""
    train_per_owner: int = 0
    """Cap on each owner's training images (0: the whole share). Keeps demos and tests small."""
    test_size: int = 0
    """Global test images, sharded across owners (0: the whole test set)."""
    val_fraction: float = 0.1
    """Share of each owner's data held back as its private validation split."""
    folder: str = ""
    """For dataset = folder: a path per owner, `{rank}` replaced by the owner's rank."""
    image_size: int = 28
    """For dataset = folder: images are resized to image_size x image_size."""
    channels: int = 1
    """For dataset = folder: 1 (grayscale) or 3 (RGB)."""
    factory: str = ""
    """The owner's own data, 'module.path:function' ({rank} and {owner} replaced first, so paths may differ
    per owner), called as fn(owner: unify_dist.data.Owner) -> unify_dist.data.OwnerDatasets. Any modality:
    items are (input tensor, class index). Set, data.dataset and data.partition are ignored."""
    workers: int = 0
    """DataLoader worker processes per owner for streamed datasets (a factory's non-tensor datasets)."""
    pin_memory: bool = True
    """Pin streamed batches in host memory for faster copies to a GPU (no effect when training on CPU)."""

    def problems(self) -> list[str]:
        out = self._source_problems()
        if self.alpha <= 0:
            out.append(f"data.alpha must be > 0, got {self.alpha}")
        if self.train_per_owner < 0 or self.test_size < 0:
            out.append("data.train_per_owner and data.test_size must be >= 0 (0 means all)")
        if not 0 < self.val_fraction < 1:
            out.append(f"data.val_fraction must be between 0 and 1, got {self.val_fraction}")
        if self.channels not in (1, 3):
            out.append(f"data.channels must be 1 or 3, got {self.channels}")
        if self.image_size < 8:
            out.append(f"data.image_size must be >= 8, got {self.image_size}")
        return out

    def _source_problems(self) -> list[str]:
        """Where the data comes from, as far as it is plain values: the factory string's form. Whether
        data.dataset and data.partition name registered ones is data.py's to say (unify_dist.data.dataset_problems):
        the registries live there, above this module."""
        out = [] if self.workers >= 0 else [f"data.workers must be >= 0 (0: load in the training process), got {self.workers}"]
        if self.factory:
            module, sep, attr = self.factory.partition(":")
            if not (sep and module and attr):
                out.append(f"data.factory = '{self.factory}' is not 'module.path:function'; write e.g. 'my_pkg.data:owner_data'")
        return out

    def resolved_root(self) -> Path:
        return Path(os.environ.get(DATA_ROOT_ENV) or self.root).expanduser()


@dataclass(frozen=True)
class ModelConfig:
    name: str = "paper_cnn"
    """A registered model (unify_dist.models.MODELS): paper_cnn (two conv blocks, two linear layers, as in the
    paper), mlp, resnet18, or one added with register_model."""
    hidden: int = 128
    """Width of the hidden linear layer (paper_cnn and mlp)."""
    channels_last: bool = True
    """Keep the built-in convolutional models' weights (paper_cnn, resnet18) in channels_last memory layout:
    on one CPU thread the paper CNN trains 1.25x faster (`make bench`, epoch section). Every owner must
    choose the same (the consistency check compares layouts). A factory's model keeps the layout the
    factory gives it."""
    factory: str = ""
    """The owner's own builder, 'module.path:function', called as fn(in_shape=..., num_classes=...) and
    returning an nn.Module; {rank} and {owner} in it become the owner's rank and name. Set, it wins over name."""

    def problems(self) -> list[str]:
        """The plain values; whether model.name is registered is models.py's to say (unify_dist.models.model_problems)."""
        out = []
        module, sep, attr = self.factory.partition(":")
        if self.factory and not (sep and module and attr):
            out.append(
                f"model.factory = '{self.factory}' is not 'module.path:function'; write e.g. 'my_pkg.models:build'"
            )
        if self.hidden <= 0:
            out.append(f"model.hidden must be > 0, got {self.hidden}")
        return out


@dataclass(frozen=True)
class TrainConfig:
    seed: int = 0
    """Seeds initial weights, partitions, and each (round, owner)'s data order."""
    max_rounds: int = 30
    """Stop after this many rounds of train-then-unify."""
    local_epochs: int = 1
    """Epochs each owner trains on its own data between two unifications."""
    batch_size: int = 64
    """Mini-batch size of local training (the paper uses 64)."""
    optimizer: str = "adam"
    """sgd or adam."""
    lr: float = 1e-3
    """Learning rate of the local optimizer."""
    momentum: float = 0.9
    """Momentum for sgd (ignored by adam)."""
    weight_decay: float = 0.0
    """L2 penalty of the local optimizer."""
    lr_schedule: str = "constant"
    """Learning rate over rounds: constant, or cosine (lr in round 1, decaying towards 0 after the last round)."""
    local_steps: int = 0
    """Local mini-batch steps per round, the same budget for every owner whatever its data size (0: local_epochs
    whole epochs); the epochs it spans are consecutive seeded epochs. Fewer steps, less drift."""
    round_seconds: float = 0.0
    """A wall-clock budget per round (0: off): every owner trains until this many seconds have passed since
    its local training began, and stops after the step in progress, so fast owners take more steps instead of
    waiting for slow ones. Each owner's step count is recorded in metrics.jsonl (train.replay_steps replays them)."""
    replay_steps: str = ""
    """A metrics.jsonl of an earlier run: every owner trains exactly the step count recorded for it (by name)
    in each round, instead of local_epochs, local_steps or round_seconds: the same weights, bit for bit."""
    optimizer_state: str = "keep"
    """After unify: keep each owner's optimizer state, or reset it to fresh."""
    target_accuracy: float = 0.0
    """Stop when every owner's unified validation accuracy reaches this (0: never stop early)."""
    threads: int = 0
    """torch threads per owner process (0: the machine's cores divided by the local owner count)."""
    fedprox_mu: float = 0.0
    """FedProx: add mu/2 * ||w - w_unified||^2 to the local loss, so owners stay near the unified model (0: off)."""
    absent_class_scale: float = 1.0
    """FedRS restricted softmax: in the local loss, logits of classes this owner has no images of are scaled
    by this (< 1 keeps an owner from teaching the model that the others' classes never occur; 1: off)."""
    owners: list[str] = field(default_factory=list)
    """Every owner of the project by name, in a fixed order (empty: owners are named rank0, rank1, ...). Each owner
    says which it is with UNIFY_DIST_OWNER; its data share is cut by its place here, so it never moves."""
    min_owners: int = 1
    """The fewest owners a round may run with; with fewer, wait owner_wait_s for more, then stop."""
    owner_wait_s: float = 60.0
    """How long too few owners wait for another to join (under elastic torchrun) before stopping."""
    scaffold: bool = False
    """SCAFFOLD control variates: local gradients corrected by (mean of owners' last-round gradients - own);
    one extra all_reduce of the parameters per round."""

    def problems(self) -> list[str]:
        out = []
        if self.max_rounds <= 0:
            out.append(f"train.max_rounds must be > 0, got {self.max_rounds}")
        if self.local_epochs <= 0:
            out.append(f"train.local_epochs must be > 0, got {self.local_epochs}")
        if self.batch_size <= 0:
            out.append(f"train.batch_size must be > 0, got {self.batch_size}")
        if self.lr <= 0:
            out.append(f"train.lr must be > 0, got {self.lr}")
        if self.optimizer not in OPTIMIZERS:
            out.append(choice("train.optimizer", self.optimizer, OPTIMIZERS))
        if self.lr_schedule not in ("constant", "cosine"):
            out.append(choice("train.lr_schedule", self.lr_schedule, ("constant", "cosine")))
        if not 0 <= self.absent_class_scale <= 1:
            out.append(f"train.absent_class_scale must be in [0, 1] (1: off), got {self.absent_class_scale}")
        if self.local_steps < 0:
            out.append(f"train.local_steps must be >= 0 (0: whole epochs), got {self.local_steps}")
        if self.round_seconds < 0:
            out.append(f"train.round_seconds must be >= 0 (0: off), got {self.round_seconds}")
        if self.round_seconds > 0 and self.local_steps > 0:
            out.append(f"train.round_seconds = {self.round_seconds} and train.local_steps = {self.local_steps} are two "
                       "budgets for the same round: set one of them to 0")  # fmt: skip
        if self.replay_steps and not Path(self.replay_steps).is_file():
            out.append(f"train.replay_steps = '{self.replay_steps}' is not a file; give the metrics.jsonl of the run "
                       "to replay")  # fmt: skip
        if self.optimizer_state not in ("keep", "reset"):
            out.append(choice("train.optimizer_state", self.optimizer_state, ("keep", "reset")))
        if not 0 <= self.target_accuracy <= 1:
            out.append(f"train.target_accuracy is a fraction in [0, 1], got {self.target_accuracy}")
        if self.threads < 0 or self.momentum < 0 or self.weight_decay < 0:
            out.append("train.threads, train.momentum and train.weight_decay must be >= 0")
        if self.min_owners < 1 or self.owner_wait_s < 0:
            out.append(f"train.min_owners must be >= 1 and train.owner_wait_s >= 0, got {self.min_owners}, {self.owner_wait_s}")
        if len(set(self.owners)) != len(self.owners) or any(not n.strip() for n in self.owners):
            out.append(f"train.owners must be distinct non-empty names, got {self.owners}")
        if self.fedprox_mu < 0:
            out.append(f"train.fedprox_mu must be >= 0 (0: off), got {self.fedprox_mu}")
        return out


@dataclass(frozen=True)
class UnifyConfig:
    rule: str = "avg"
    """How owners' weights become one: avg, weighted_avg, max, absmax, median, trimmed_mean, ties (unify_dist.rules)."""
    absmax_impl: str = "reduce"
    """absmax through one all_reduce MAX of integer keys (reduce: the bytes of avg) or a chunked all_gather (gather)."""
    chunk_elements: int = 1 << 20
    """Elements per all_gather chunk of the gather implementations: bounds their extra memory."""
    nonfinite: str = "fail"
    """An owner with NaN/Inf weights: fail (stop, naming owner and tensor) or skip it this round."""
    compare: list[str] = field(default_factory=list)
    """Side-by-side: rules whose unified candidates are also evaluated each round (the paper's rows)."""
    space: str = "weights"
    """weights (the paper) or delta: rules combine each owner's update since the last unified model,
    unified = previous + rule(updates). The rule ties always works on updates."""
    trim_fraction: float = 0.25
    """trimmed_mean: share of owners dropped at each end, per element (floor(trim_fraction * owners))."""
    ties_density: float = 0.2
    """ties: share of each owner's update entries kept (the largest by magnitude) before the sign vote."""
    update_norm_bound: float = 0.0
    """Clip each owner's update (weights - previous unified weights) to this L2 norm before any rule (0: off)."""
    server_momentum: float = 0.0
    """Serverless FedAvgM: momentum over the rounds' unified updates, applied identically by every owner (0: off).
    The older name of outer = 'sgd' with outer_momentum = server_momentum (and outer_lr = server_lr)."""
    server_lr: float = 1.0
    """Serverless FedAvgM: the unified update (with momentum) is scaled by this before it is applied.
    The older name of outer = 'sgd' with outer_lr = server_lr."""
    outer: str = "none"
    """Outer optimizer on the pseudo-gradient (previous unified - this round's unified), the same step on
    every owner: none, sgd (heavy-ball momentum: FedAvgM) or nesterov (DiLoCo's: lr 0.7, momentum 0.9)."""
    outer_lr: float = 0.7
    """Outer optimizer's learning rate (with outer = sgd or nesterov; 1 with momentum 0 is no outer step)."""
    outer_momentum: float = 0.9
    """Outer optimizer's momentum, in [0, 1) (with outer = sgd or nesterov)."""
    dp_noise_multiplier: float = 0.0
    """Differential privacy: each owner adds Gaussian noise of std dp_noise_multiplier x update_norm_bound
    to its clipped update before it leaves the rank (0: off; needs update_norm_bound > 0)."""
    dp_delta: float = 1e-5
    """Differential privacy: the delta of the (epsilon, delta) privacy cost reported each round."""
    dp_max_epsilon: float = 0.0
    """Differential privacy budget: the run stops before the round whose releases would take an owner's
    epsilon (at dp_delta) past this, having saved the last affordable round (0: no budget; needs
    dp_noise_multiplier > 0). Privacy spent is in every checkpoint, so a resumed run keeps counting."""
    normalize_steps: bool = False
    """FedNova: each owner's update is divided by its local step count and the unified update multiplied by
    the owners' mean step count (weighted as the rule weighs them), so an owner that took more steps does not
    pull harder. avg and weighted_avg only; forces update space; the loop passes the counts (unify(steps=N))."""
    overlap_start: str = "own"
    """With overlap, where each round's training starts while the previous round's unify is in flight: own
    (the owner's own weights, all its unsent progress: Streaming DiLoCo's merge), eager (the unified state
    plus 1/W of its unsent progress, its own share of the mean in flight), or unified (the unified state:
    one round stale). On label-skewed owners own drifts each owner towards its own classes."""
    overlap_fragments: int = 1
    """With overlap: the background unify's transfer in this many pieces, consecutive slices of the flat state
    (groups of layers in the model's order), piece k started no earlier than k / N of 3/4 of the round just
    trained, so the link carries a steady trickle through the round instead of one burst at its start. Same
    values (bit for bit with 2 owners); 1: one burst."""
    weight_by: str = "data"
    """What weighted_avg weighs each owner by in the program: data (its training images, FedAvg's weighting) or
    steps (the local steps it took this round: under train.round_seconds, what it really trained on, so a
    slow owner's shorter round counts for less). Needs rule = weighted_avg."""
    overlap: bool = False
    """The program's overlapped unify (unify_dist.overlap): round r's unify runs in the background over a second
    gloo group while round r+1 trains, and is applied at the end of round r+1 with that round's own progress
    kept on top. CPU owners; avg and weighted_avg; no compress, compare, auto or DP noise."""
    compress: str = "none"
    """Transport of updates: none, bf16 / fp16 (16-bit casts), int8 (blockwise scaled), each with error
    feedback (an owner's unsent remainder joins its next update). Forces update space; sums only (avg,
    weighted_avg): a MAX or an order statistic of rounded values has no remainder to carry."""
    frozen: list[str] = field(default_factory=list)
    """Tensors proven identical once at the start and never touched by a unify, besides those that do not
    require grad (the default): fnmatch globs over full tensor names, e.g. ["vit.embeddings.*"]. Each
    pattern must match a tensor (unify_dist.roles)."""
    local: list[str] = field(default_factory=list)
    """Tensors each owner keeps for itself, never sent nor compared: FedBN's ["*.running_*", "*.num_batches_tracked"]
    or FedPer's ["classifier.*"]. Globs over full tensor names; each must match a tensor."""
    int_rule: str = "max"
    """How unified integer buffers combine over owners, exactly at any magnitude: max (the furthest counter,
    e.g. BatchNorm's num_batches_tracked) or min."""

    def problems(self) -> list[str]:
        from unify_dist.collectives import INT_RULES  # late: the collective layer imports this module
        from unify_dist.rules import RULES  # late: rules import nothing from config

        out = []
        for name in [self.rule, *self.compare]:
            if name not in RULES and not (name == "auto" and name == self.rule):
                out.append(choice("unify.rule", name, (*RULES, "auto")))
        if self.absmax_impl not in ("reduce", "gather"):
            out.append(choice("unify.absmax_impl", self.absmax_impl, ("reduce", "gather")))
        if self.nonfinite not in ("fail", "skip"):
            out.append(choice("unify.nonfinite", self.nonfinite, ("fail", "skip")))
        if self.chunk_elements <= 0:
            out.append(f"unify.chunk_elements must be > 0, got {self.chunk_elements}")
        if self.space not in ("weights", "delta"):
            out.append(choice("unify.space", self.space, ("weights", "delta")))
        if not 0 <= self.trim_fraction < 0.5:
            out.append(f"unify.trim_fraction must be in [0, 0.5), got {self.trim_fraction}")
        if not 0 < self.ties_density <= 1:
            out.append(f"unify.ties_density must be in (0, 1], got {self.ties_density}")
        if self.update_norm_bound < 0:
            out.append(f"unify.update_norm_bound must be >= 0 (0: off), got {self.update_norm_bound}")
        if not 0 <= self.server_momentum < 1:
            out.append(f"unify.server_momentum must be in [0, 1), got {self.server_momentum}")
        if self.server_lr <= 0:
            out.append(f"unify.server_lr must be > 0, got {self.server_lr}")
        out += _outer_problems(self)
        out += _normalize_problems(self)
        out += _overlap_problems(self)
        if self.weight_by not in ("data", "steps"):
            out.append(f"unify.weight_by must be 'data' or 'steps', got '{self.weight_by}'")
        elif self.weight_by == "steps" and self.rule != "weighted_avg":
            out.append(f"unify.weight_by = 'steps' sets weighted_avg's weights, and unify rule '{self.rule}' does not "
                       "weigh owners; set rule = 'weighted_avg', or weight_by = 'data'")
        if self.dp_noise_multiplier < 0:
            out.append(f"unify.dp_noise_multiplier must be >= 0 (0: off), got {self.dp_noise_multiplier}")
        if self.dp_noise_multiplier > 0 and self.update_norm_bound <= 0:
            out.append("unify.dp_noise_multiplier needs a clipping norm: set unify.update_norm_bound > 0 (C)")
        if not 0 < self.dp_delta < 1:
            out.append(f"unify.dp_delta must be in (0, 1), got {self.dp_delta}")
        if self.dp_max_epsilon < 0:
            out.append(f"unify.dp_max_epsilon must be >= 0 (0: no budget), got {self.dp_max_epsilon}")
        if self.dp_max_epsilon > 0 and self.dp_noise_multiplier <= 0:
            out.append(f"unify.dp_max_epsilon = {self.dp_max_epsilon} is a budget for noise: "
                       "set unify.dp_noise_multiplier > 0")
        lora_compared = [n for n in self.compare if n.startswith("lora_")]
        if lora_compared:
            out.append(f"unify.compare cannot list '{lora_compared[0]}': a LoRA rule sets up roles (lora_ffa) or "
                       "changes the base weights (lora_exact) for the whole run; make it unify.rule")  # fmt: skip
        if self.int_rule not in INT_RULES:
            out.append(choice("unify.int_rule", self.int_rule, INT_RULES))
        both = sorted(set(self.frozen) & set(self.local))
        if both:
            out.append(f"unify.frozen and unify.local both name '{both[0]}'; give each tensor one role")
        out += _compress_problems(self)
        return out


@dataclass(frozen=True)
class DistConfig:
    backend: str = "auto"
    """auto (nccl when CUDA is available, else gloo), gloo, or nccl."""
    timeout_s: float = 300.0
    """A collective that waits longer than this fails every rank instead of hanging."""
    device: str = "auto"
    """Where this owner trains: auto (the GPU with nccl, else the CPU), cpu, or cuda (the GPU numbered by
    LOCAL_RANK, modulo the GPUs there are). cuda with backend gloo: train on the GPU, unify over gloo, each
    collective staged through pinned host memory (NCCL across NAT and WAN links is fragile; with trust on
    the sealed ring needs host bytes anyway)."""

    procs_per_owner: int = 1
    """Processes per owner (G): launch each owner with `torchrun --nproc_per_node=G`; the G processes train
    data-parallel on the owner's data (each takes its 1/G of every batch, gradients averaged every step), and
    after each round the owners' first processes unify across owners and hand the result to the rest
    (unify_dist.hierarchy). WORLD_SIZE and each machine's process count must be multiples of G."""

    def problems(self) -> list[str]:
        out = []
        if self.backend not in ("auto", "gloo", "nccl"):
            out.append(choice("dist.backend", self.backend, ("auto", "gloo", "nccl")))
        if self.device not in ("auto", "cpu", "cuda"):
            out.append(choice("dist.device", self.device, ("auto", "cpu", "cuda")))
        if self.device == "cpu" and self.backend == "nccl":
            out.append("dist.device = 'cpu' with dist.backend = 'nccl': NCCL reduces GPU tensors only; use backend gloo")
        if self.timeout_s <= 0:
            out.append(f"dist.timeout_s must be > 0, got {self.timeout_s}")
        if self.procs_per_owner < 1:
            out.append(f"dist.procs_per_owner must be >= 1 (processes per owner), got {self.procs_per_owner}")
        return out


def outer_settings(cfg: "UnifyConfig") -> tuple[str, float, float] | None:
    """(kind, lr, momentum) of the outer optimizer in force, None for none; the server_* names map to sgd."""
    if cfg.outer != "none":
        return cfg.outer, cfg.outer_lr, cfg.outer_momentum
    if cfg.server_momentum > 0 or cfg.server_lr != 1.0:
        return "sgd", cfg.server_lr, cfg.server_momentum
    return None


def _outer_problems(cfg: "UnifyConfig") -> list[str]:
    from unify_dist.outer import OUTER_OPTIMIZERS  # late, as the other registries

    if cfg.outer not in OUTER_OPTIMIZERS:
        return [choice("unify.outer", cfg.outer, OUTER_OPTIMIZERS)]
    out = []
    if cfg.outer_lr <= 0:
        out.append(f"unify.outer_lr must be > 0, got {cfg.outer_lr}")
    if not 0 <= cfg.outer_momentum < 1:
        out.append(f"unify.outer_momentum must be in [0, 1), got {cfg.outer_momentum}")
    if cfg.outer != "none" and (cfg.server_momentum > 0 or cfg.server_lr != 1.0):
        out.append(f"unify.outer = '{cfg.outer}' and unify.server_momentum / server_lr are both set: server_* are the "
                   "older names of outer = 'sgd' with outer_momentum / outer_lr; keep only the outer_* keys")  # fmt: skip
    return out


def _normalize_problems(cfg: "UnifyConfig") -> list[str]:
    """unify.normalize_steps rescales a weighted mean of updates: sum rules only, and one rule per round."""
    from unify_dist.rules import SPECS  # late: rules import nothing from config

    if not cfg.normalize_steps:
        return []
    if cfg.rule == "auto" or cfg.compare:
        return ["unify.normalize_steps with unify.compare or rule = 'auto' is not supported (the candidates' unify "
                "knows no step counts): name one rule and leave compare empty, or set normalize_steps = false"]  # fmt: skip
    kind = SPECS[cfg.rule].collective if cfg.rule in SPECS else None
    if kind not in ("sum", "weighted_sum"):
        return [f"unify.normalize_steps (FedNova) rescales a mean of updates: it serves avg and weighted_avg, not "
                f"unify rule '{cfg.rule}'; set normalize_steps = false or rule = 'avg'"]  # fmt: skip
    return []


OVERLAP_STARTS = ("own", "eager", "unified")


def _overlap_problems(cfg: "UnifyConfig") -> list[str]:
    """unify.overlap: the combinations it has been built and tested for, the others refused with the reason."""
    if cfg.overlap_fragments < 1:
        return [f"unify.overlap_fragments must be >= 1 (1: the background unify in one burst), got {cfg.overlap_fragments}"]
    if not cfg.overlap:
        out = [] if cfg.overlap_start == "own" else [
            f"unify.overlap_start = '{cfg.overlap_start}' says where overlapped rounds start, and unify.overlap is off; "
            "set overlap = true, or leave overlap_start out"]  # fmt: skip
        if cfg.overlap_fragments > 1:
            out.append(f"unify.overlap_fragments = {cfg.overlap_fragments} spreads the background unify over the round, "
                       "and unify.overlap is off; set overlap = true, or leave overlap_fragments out")  # fmt: skip
        return out
    out = []
    if cfg.overlap_start not in OVERLAP_STARTS:
        out.append(choice("unify.overlap_start", cfg.overlap_start, OVERLAP_STARTS))
    if cfg.rule not in ("avg", "weighted_avg"):
        out.append(f"unify.overlap serves avg and weighted_avg, not unify rule '{cfg.rule}' (robust and vote rules are "
                   "untested in the background unify); set overlap = false or rule = 'avg'")  # fmt: skip
    if cfg.compare:
        out.append("unify.overlap with unify.compare: side-by-side candidates need this round's unify, which "
                   "overlap applies a round later; leave compare empty or set overlap = false")  # fmt: skip
    if cfg.compress != "none":
        out.append(f"unify.overlap with unify.compress = '{cfg.compress}': untested (the residual would travel in "
                   "the background unify's state); set compress = 'none' or overlap = false")  # fmt: skip
    if cfg.dp_noise_multiplier > 0:
        out.append("unify.overlap with unify.dp_noise_multiplier > 0: untested (the privacy accountant counts the "
                   "background unify's releases); set one of them off")  # fmt: skip
    return out


COMPRESS_MODES = ("none", "bf16", "fp16", "int8")

_MAX_WHY = ("a MAX keeps one owner's value whole, so its rounding error is not averaged away, and the residual "
            "an owner carries inflates its next bid")  # fmt: skip
_NOT_COMPRESSIBLE = {  # a rule's collective -> why lossy transport with error feedback makes no sense for it
    "max": _MAX_WHY,
    "absmax": _MAX_WHY,
    "masked_sum": "its pairwise masks cancel only in the full 64-bit fixed-point ring",
    "gather": "it ranks or votes on owners' values, and a carried residual would shift an owner's vote",
}


def _compress_problems(cfg: "UnifyConfig") -> list[str]:
    """unify.compress: a known mode, and only rules that unify by a sum (their error feedback is exact)."""
    from unify_dist.rules import SPECS  # late: rules import nothing from config

    if cfg.compress not in COMPRESS_MODES:
        return [choice("unify.compress", cfg.compress, COMPRESS_MODES)]
    if cfg.compress == "none":
        return []
    out = []
    if cfg.rule == "auto" and not cfg.compare:
        out.append(f"unify.compress = '{cfg.compress}' with unify.rule = 'auto': auto compares max and absmax "
                   "by default; list sum rules in unify.compare, or set compress = 'none'")  # fmt: skip
    for name in dict.fromkeys([cfg.rule, *cfg.compare]):
        kind = SPECS[name].collective if name in SPECS else None
        if kind in _NOT_COMPRESSIBLE:
            out.append(f"unify.compress = '{cfg.compress}' cannot serve unify rule '{name}': {_NOT_COMPRESSIBLE[kind]}; "
                       "compression serves avg and weighted_avg, so set compress = 'none' for this rule")  # fmt: skip
    return out


def choice(key: str, value: Any, allowed: tuple[str, ...]) -> str:
    """'KEY = VALUE is not known', with the closest allowed name (case ignored: AVG suggests avg)."""
    lower = {a.lower(): a for a in allowed}
    hint = [lower[h] for h in difflib.get_close_matches(str(value).lower(), lower, n=1)]
    also = f" (did you mean '{hint[0]}'?)" if hint else ""
    return f"{key} = '{value}' is not known{also}; choose one of: {', '.join(allowed)}"
