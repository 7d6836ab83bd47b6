"""The run's configuration file: the library's sections plus the program's own, loaded from TOML and
overridden by --set, every value validated on load (all problems reported together, one line)."""

from __future__ import annotations

import dataclasses
import difflib
import importlib
import tomllib
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, get_type_hints

from unify_dist.config import DataConfig, DistConfig, ModelConfig, TrainConfig, UnifyConfig
from unify_dist.errors import UserError

__all__ = ["OutputConfig", "RunConfig", "TrustConfig", "load_config", "parse_overrides", "build_section", "import_modules"]

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
class TrustConfig:
    """Who may join and how unify traffic travels (unify_dist.trust; docs/trust.md).

    In `key` and `owner`, '{rank}' becomes this process's rank: one machine, one config, several owners.
    """

    enabled: bool = False
    """Admit only roster owners (a signed admission before any weight is sent) and seal every unify message
    (AES-256-GCM over a point-to-point ring). Off: gloo's collectives, in the clear, anyone may join."""
    roster: str = ""
    """TOML file with an [owners] table, name = "public key" (from keygen's .pub), the same on every owner."""
    key: str = ""
    """This owner's private identity key, made by `unify-dist keygen --out FILE` (mode 0600)."""
    owner: str = ""
    """This owner's name in the roster."""

    def problems(self) -> list[str]:
        if not self.enabled:
            return []
        missing = [f"trust.{k}" for k in ("roster", "key", "owner") if not getattr(self, k)]
        if missing:
            return [f"trust.enabled needs {', '.join(missing)}: set them (unify-dist keygen makes a key; docs/trust.md)"]
        if not Path(self.roster).is_file():
            return [f"trust.roster '{self.roster}' does not exist; give every owner the same roster file"]
        return []


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
    trust: TrustConfig = field(default_factory=TrustConfig)
    imports: list[str] = field(default_factory=list)
    """Modules imported before the config is validated, e.g. ["my_pkg.rules"]: they can register rules and
    models (unify_dist.register_rule, register_model) that the rest of the config then names."""

    def problems(self) -> list[str]:
        # the registries' checks from their own modules: they sit above unify_dist.config, which imports neither
        from unify_dist.data import dataset_problems
        from unify_dist.models import model_problems

        out = []
        for f in fields(self):
            section = getattr(self, f.name)
            if dataclasses.is_dataclass(section):
                registry = {"data": dataset_problems, "model": model_problems}.get(f.name)
                out += (registry(section) if registry else []) + section.problems()
        return out + _overlap_problems(self) + _procs_problems(self)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _overlap_problems(cfg: RunConfig) -> list[str]:
    """unify.overlap against the other sections: what its background unify cannot share with them."""
    if not cfg.unify.overlap:
        return []
    out = []
    if cfg.trust.enabled:
        out.append("unify.overlap with trust.enabled: the sealed ring is one ring of point-to-point messages in call "
                   "order on the main group, and a background unify would interleave with it; set overlap = false")  # fmt: skip
    if cfg.train.scaffold:
        out.append("unify.overlap with train.scaffold: SCAFFOLD's control variates assume every owner starts the "
                   "round from this round's unified model; set one of them off")  # fmt: skip
    if cfg.dist.device == "cuda" or cfg.dist.backend == "nccl":
        out.append("unify.overlap runs on CPU owners over gloo (a second gloo group for the background unify); set "
                   "dist.device = 'cpu' and dist.backend = 'gloo', or overlap = false")  # fmt: skip
    return out


def _procs_problems(cfg: RunConfig) -> list[str]:
    """dist.procs_per_owner > 1 against the other sections: what an owner of several processes cannot run."""
    if cfg.dist.procs_per_owner <= 1:
        return []
    g, out = f"dist.procs_per_owner = {cfg.dist.procs_per_owner}", []
    if cfg.trust.enabled:
        out.append(f"{g} with trust.enabled: admission and the sealed ring give every process a roster identity "
                   "and a place in the ring, and an owner of several processes has one identity; set procs_per_owner = 1")  # fmt: skip
    if cfg.unify.overlap:
        out.append(f"{g} with unify.overlap: the background unify runs on its own group of every process, while an "
                   "owner's processes must take their leader's result in step; set one of them off")  # fmt: skip
    if cfg.train.round_seconds > 0:
        out.append(f"{g} with train.round_seconds: an owner's processes average gradients every step, so they must "
                   "stop after the same step, and each reads its own clock; use train.local_steps")  # fmt: skip
    if cfg.dist.device == "cuda" and cfg.dist.backend != "nccl":
        out.append(f"{g} with dist.device = 'cuda' over gloo: the leaders' unify is not staged through host memory; "
                   "use dist.backend = 'nccl' for GPU owners of several processes")  # fmt: skip
    return out


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


def build_section(cls: type, raw: dict[str, Any], prefix: str) -> Any:
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
            kwargs[key] = build_section(typ, value, f"{full}.")
        else:
            kwargs[key] = _coerce(full, value, typ)
    return cls(**kwargs)


def import_modules(names: list[str]) -> None:
    """Import each module of `imports` (once per process: Python caches them); a failure is one UserError."""
    for name in names:
        try:
            importlib.import_module(name)
        except ImportError as e:
            raise UserError(
                f"imports: cannot import module '{name}' ({e}); install its package or run from the folder "
                "that holds it, or remove it from imports"
            ) from None
        except Exception as e:  # the module's own code failed, e.g. registering a rule name twice
            raise UserError(f"imports: module '{name}' failed while importing ({type(e).__name__}: {e}); fix it") from None


def load_config(path: str | Path | None, overrides: list[str] | None = None) -> RunConfig:
    """Read a TOML file (or defaults when path is None), apply --set overrides, validate everything.

    Raises UserError with every problem found, joined on one line.
    """
    raw: dict[str, Any] = {}
    if path is not None:
        p = Path(path)
        if p.is_dir():
            raise UserError(f"config file '{p}' is a directory; pass a TOML file, e.g. configs/demo_cpu.toml")
        if not p.is_file():
            raise UserError(f"config file '{p}' does not exist; pass an existing file, e.g. configs/demo_cpu.toml")
        try:
            raw = tomllib.loads(p.read_text(encoding="utf-8-sig"))  # -sig: editors on Windows start files with a BOM
        except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
            raise UserError(f"config file '{p}' is not valid TOML ({e}); fix the syntax and run again") from None
    raw = _merge(raw, parse_overrides(overrides or []))
    cfg = build_section(RunConfig, raw, "")
    import_modules(cfg.imports)  # before validation: they may register the rule or model the config names
    problems = cfg.problems()
    if problems:
        raise UserError("; ".join(problems))
    return cfg
