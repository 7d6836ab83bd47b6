"""Typed run configuration: one frozen dataclass per section, loaded from TOML, overridden by --set.

Each component receives only its own section (DataConfig to data.py, UnifyConfig to the unify layer,
...), never the whole RunConfig, so a component cannot quietly depend on another's settings.
"""

from __future__ import annotations

import dataclasses
import difflib
import os
import tomllib
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, get_type_hints

from unify_dist.errors import UserError

__all__ = [
    "DataConfig",
    "ModelConfig",
    "TrainConfig",
    "UnifyConfig",
    "DistConfig",
    "OutputConfig",
    "AttackConfig",
    "RunConfig",
    "load_config",
    "parse_overrides",
    "DATA_ROOT_ENV",
]

DATA_ROOT_ENV = "UNIFY_DIST_DATA_ROOT"
"""Environment variable that overrides `data.root`, so tests and CI can point every run at one copy."""

DATASETS = ("fashion_mnist", "mnist", "cifar10", "folder")
PARTITIONS = ("iid", "label_split", "dirichlet", "folder")
MODELS = ("paper_cnn", "mlp", "resnet18")
OPTIMIZERS = ("sgd", "adam")


@dataclass(frozen=True)
class DataConfig:
    dataset: str = "fashion_mnist"
    """fashion_mnist, mnist, cifar10 (torchvision), or folder (each owner brings an ImageFolder tree)."""
    root: str = "data"
    """Where torchvision datasets live (ROOT/FashionMNIST/raw/...). The UNIFY_DIST_DATA_ROOT variable wins."""
    download: bool = True
    """Download missing files when online; offline, a missing dataset is a clear error."""
    partition: str = "iid"
    """How owners get their share: iid (paper V), label_split (paper H), dirichlet, folder."""
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

    def problems(self) -> list[str]:
        out = []
        if self.dataset not in DATASETS:
            out.append(_choice("data.dataset", self.dataset, DATASETS))
        if self.partition not in PARTITIONS:
            out.append(_choice("data.partition", self.partition, PARTITIONS))
        if (self.dataset == "folder") != (self.partition == "folder"):
            out.append("data.dataset = 'folder' and data.partition = 'folder' go together: set both or neither")
        if self.dataset == "folder" and not self.folder:
            out.append("data.folder is empty: give each owner's image folder, e.g. 'owners/{rank}'")
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

    def resolved_root(self) -> Path:
        return Path(os.environ.get(DATA_ROOT_ENV) or self.root).expanduser()


@dataclass(frozen=True)
class ModelConfig:
    name: str = "paper_cnn"
    """paper_cnn (two conv blocks, two linear layers, as in the paper), mlp, or resnet18."""
    hidden: int = 128
    """Width of the hidden linear layer (paper_cnn and mlp)."""

    def problems(self) -> list[str]:
        out = []
        if self.name not in MODELS:
            out.append(_choice("model.name", self.name, MODELS))
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
    """Cap on local mini-batch steps per round (0: local_epochs whole epochs). Fewer steps, less drift."""
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
            out.append(_choice("train.optimizer", self.optimizer, OPTIMIZERS))
        if self.lr_schedule not in ("constant", "cosine"):
            out.append(_choice("train.lr_schedule", self.lr_schedule, ("constant", "cosine")))
        if not 0 <= self.absent_class_scale <= 1:
            out.append(f"train.absent_class_scale must be in [0, 1] (1: off), got {self.absent_class_scale}")
        if self.local_steps < 0:
            out.append(f"train.local_steps must be >= 0 (0: whole epochs), got {self.local_steps}")
        if self.optimizer_state not in ("keep", "reset"):
            out.append(_choice("train.optimizer_state", self.optimizer_state, ("keep", "reset")))
        if not 0 <= self.target_accuracy <= 1:
            out.append(f"train.target_accuracy is a fraction in [0, 1], got {self.target_accuracy}")
        if self.threads < 0 or self.momentum < 0 or self.weight_decay < 0:
            out.append("train.threads, train.momentum and train.weight_decay must be >= 0")
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
    """Serverless FedAvgM: momentum over the rounds' unified updates, applied identically by every owner (0: off)."""
    server_lr: float = 1.0
    """Serverless FedAvgM: the unified update (with momentum) is scaled by this before it is applied."""
    dp_noise_multiplier: float = 0.0
    """Differential privacy: each owner adds Gaussian noise of std dp_noise_multiplier x update_norm_bound
    to its clipped update before it leaves the rank (0: off; needs update_norm_bound > 0)."""
    dp_delta: float = 1e-5
    """Differential privacy: the delta of the (epsilon, delta) privacy cost reported each round."""

    def problems(self) -> list[str]:
        from unify_dist.rules import RULES  # late: rules import nothing from config

        out = []
        for name in [self.rule, *self.compare]:
            if name not in RULES and not (name == "auto" and name == self.rule):
                out.append(_choice("unify.rule", name, (*RULES, "auto")))
        if self.absmax_impl not in ("reduce", "gather"):
            out.append(_choice("unify.absmax_impl", self.absmax_impl, ("reduce", "gather")))
        if self.nonfinite not in ("fail", "skip"):
            out.append(_choice("unify.nonfinite", self.nonfinite, ("fail", "skip")))
        if self.chunk_elements <= 0:
            out.append(f"unify.chunk_elements must be > 0, got {self.chunk_elements}")
        if self.space not in ("weights", "delta"):
            out.append(_choice("unify.space", self.space, ("weights", "delta")))
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
        if self.dp_noise_multiplier < 0:
            out.append(f"unify.dp_noise_multiplier must be >= 0 (0: off), got {self.dp_noise_multiplier}")
        if self.dp_noise_multiplier > 0 and self.update_norm_bound <= 0:
            out.append("unify.dp_noise_multiplier needs a clipping norm: set unify.update_norm_bound > 0 (C)")
        if not 0 < self.dp_delta < 1:
            out.append(f"unify.dp_delta must be in (0, 1), got {self.dp_delta}")
        return out


@dataclass(frozen=True)
class DistConfig:
    backend: str = "auto"
    """auto (nccl when CUDA is available, else gloo), gloo, or nccl."""
    timeout_s: float = 300.0
    """A collective that waits longer than this fails every rank instead of hanging."""

    def problems(self) -> list[str]:
        out = []
        if self.backend not in ("auto", "gloo", "nccl"):
            out.append(_choice("dist.backend", self.backend, ("auto", "gloo", "nccl")))
        if self.timeout_s <= 0:
            out.append(f"dist.timeout_s must be > 0, got {self.timeout_s}")
        return out


@dataclass(frozen=True)
class OutputConfig:
    dir: str = "runs/latest"
    """Run directory: metrics.jsonl, checkpoints/, final.pt."""
    keep_checkpoints: int = 3
    """How many round checkpoints to keep (older ones are deleted)."""
    resume: bool = True
    """Continue from the newest round every owner has a checkpoint of (false: delete them, start over)."""
    progress: bool = True
    """Show rich progress bars on rank 0 (tables are always shown)."""
    all_ranks: bool = False
    """Let every rank print, prefixed by its rank (for debugging)."""
    local_metrics: bool = True
    """Evaluate each owner's local model before unify (the paper's local columns, the per-class matrix);
    false skips those two evaluation passes per round."""

    def problems(self) -> list[str]:
        if self.keep_checkpoints < 1:
            return [f"output.keep_checkpoints must be >= 1, got {self.keep_checkpoints}"]
        return []


@dataclass(frozen=True)
class AttackConfig:
    owner: int = -1
    """Simulate a hostile owner: this rank corrupts what it sends before every unify (-1: nobody)."""
    kind: str = "scale"
    """scale (its weights times `scale`) or noise (Gaussian noise of std `noise_std` instead of its weights)."""
    scale: float = -10.0
    """For kind = scale: the factor applied to the hostile owner's weights."""
    noise_std: float = 1.0
    """For kind = noise: standard deviation of the noise the hostile owner sends."""
    from_round: int = 1
    """The first round in which the hostile owner attacks."""

    def problems(self) -> list[str]:
        out = []
        if self.kind not in ("scale", "noise"):
            out.append(_choice("attack.kind", self.kind, ("scale", "noise")))
        if self.owner < -1:
            out.append(f"attack.owner is a rank (or -1 for nobody), got {self.owner}")
        if self.noise_std <= 0 or self.from_round < 1:
            out.append("attack.noise_std must be > 0 and attack.from_round >= 1")
        return out


@dataclass(frozen=True)
class RunConfig:
    name: str = "run"
    """A label for the run, shown in tables and stored in metrics."""
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    unify: UnifyConfig = field(default_factory=UnifyConfig)
    dist: DistConfig = field(default_factory=DistConfig)
    output: OutputConfig = field(default_factory=OutputConfig)
    attack: AttackConfig = field(default_factory=AttackConfig)

    def problems(self) -> list[str]:
        out = []
        for f in fields(self):
            section = getattr(self, f.name)
            if dataclasses.is_dataclass(section):
                out += section.problems()
        return out

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _choice(key: str, value: Any, allowed: tuple[str, ...]) -> str:
    hint = difflib.get_close_matches(str(value), allowed, n=1)
    also = f" (did you mean '{hint[0]}'?)" if hint else ""
    return f"{key} = '{value}' is not known{also}; choose one of: {', '.join(allowed)}"


def parse_overrides(items: list[str]) -> dict[str, dict[str, Any]]:
    """Turn ['train.lr=0.1', 'name=x'] into nested TOML-typed values; values parse as TOML, else as text."""
    out: dict[str, Any] = {}
    for item in items:
        key, sep, raw = item.partition("=")
        if not sep or not key.strip():
            raise UserError(f"--set '{item}' has no '=': write --set section.key=value, e.g. --set train.lr=0.01")
        try:
            value = tomllib.loads(f"v = {raw}")["v"]
        except tomllib.TOMLDecodeError:
            value = raw  # bare words such as rule names need no quotes on the command line
        *path, leaf = key.strip().split(".")
        node = out
        for part in path:
            node = node.setdefault(part, {})
        node[leaf] = value
    return out


def _merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    merged = dict(base)
    for k, v in extra.items():
        merged[k] = _merge(merged[k], v) if isinstance(v, dict) and isinstance(merged.get(k), dict) else v
    return merged


def _coerce(key: str, value: Any, typ: Any) -> Any:
    """Check one TOML value against the field's type; ints are accepted where floats are expected."""
    if typ is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if typ == list[str]:
        if isinstance(value, str):  # --set unify.compare=avg,max
            value = [v for v in value.split(",") if v]
        if isinstance(value, list) and all(isinstance(v, str) for v in value):
            return value
        raise UserError(f"{key} must be a list of names, e.g. [\"avg\", \"max\"]; got {value!r}")
    if isinstance(typ, type) and isinstance(value, typ) and not (typ is int and isinstance(value, bool)):
        return value
    name = getattr(typ, "__name__", str(typ))
    raise UserError(f"{key} must be of type {name}, got {value!r} ({type(value).__name__}); fix the config or --set")


def _build(cls: type, raw: dict[str, Any], prefix: str) -> Any:
    hints = get_type_hints(cls)
    known = {f.name for f in fields(cls)}
    kwargs = {}
    for key, value in raw.items():
        full = f"{prefix}{key}"
        if key not in known:
            hint = difflib.get_close_matches(key, known, n=1)
            also = f" (did you mean '{prefix}{hint[0]}'?)" if hint else ""
            raise UserError(f"unknown config key '{full}'{also}; known keys here: {', '.join(sorted(known))}")
        typ = hints[key]
        if dataclasses.is_dataclass(typ):
            if not isinstance(value, dict):
                raise UserError(f"'{full}' is a section: write [{full}] in TOML or --set {full}.KEY=VALUE")
            kwargs[key] = _build(typ, value, f"{full}.")
        else:
            kwargs[key] = _coerce(full, value, typ)
    return cls(**kwargs)


def load_config(path: str | Path | None, overrides: list[str] | None = None) -> RunConfig:
    """Read a TOML file (or defaults when path is None), apply --set overrides, validate everything.

    Raises UserError with every problem found, joined on one line.
    """
    raw: dict[str, Any] = {}
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise UserError(f"config file '{p}' does not exist; pass an existing file, e.g. configs/demo_cpu.toml")
        try:
            raw = tomllib.loads(p.read_text())
        except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
            raise UserError(f"config file '{p}' is not valid TOML ({e}); fix the syntax and run again") from None
    raw = _merge(raw, parse_overrides(overrides or []))
    cfg = _build(RunConfig, raw, "")
    problems = cfg.problems()
    if problems:
        raise UserError("; ".join(problems))
    return cfg
