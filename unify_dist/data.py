"""Each owner's data: built-in datasets and partitions by name, or the owner's own factory; held in
memory or streamed.

Two registries, built like the rule registry: DATASETS (what `data.dataset` names) and PARTITIONS (what
`data.partition` names). A shared dataset (fashion_mnist, mnist, cifar10) is cut among owners by a
partition computed from the seed alone: every owner computes the same split and keeps only its part, so
no data and no index list ever crosses the network. An owner-held dataset (folder) needs no partition.

`data.factory = "my_pkg.data:owner_data"` replaces both: the owner's own function builds its datasets
(any modality; items are (input tensor, class index)).

Two ways to hold a split. `Split`: tensors decoded, normalised and moved to the device once; training
only slices them (no per-sample Python in the hot path). `Stream`: any torch Dataset, read batch by batch
through a DataLoader in a seeded order, so memory does not grow with the dataset.
"""

from __future__ import annotations

import functools
import importlib
import inspect
import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.utils.data
from torch import Tensor

from unify_dist.config import DataConfig, choice
from unify_dist.errors import UserError
from unify_dist.wire import WireError, gather_json

__all__ = [
    "Owner",
    "OwnerDatasets",
    "Split",
    "Stream",
    "OwnerData",
    "DatasetSpec",
    "dataset_problems",
    "PartitionSpec",
    "DATASETS",
    "PARTITIONS",
    "register_dataset",
    "register_partition",
    "partition",
    "check_owner_count",
    "prepare_dataset",
    "load_owner_data",
    "load_factory",
    "union_classes",
    "TORCHVISION_SETS",
]

Batches = Iterator[tuple[Tensor, Tensor]]
Group = dist.ProcessGroup | None
Rng = np.random.Generator

# name -> (torchvision class, folder under root, channels, side, classes, per-channel mean, std)
TORCHVISION_SETS = {
    "fashion_mnist": ("FashionMNIST", "FashionMNIST", 1, 28, 10, (0.2860,), (0.3530,)),
    "mnist": ("MNIST", "MNIST", 1, 28, 10, (0.1307,), (0.3081,)),
    "cifar10": ("CIFAR10", "cifar-10-batches-py", 3, 32, 10, (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
}


@dataclass(frozen=True)
class Owner:
    """Who asks for data: what a data factory (`data.factory`) receives."""

    rank: int
    """This owner's index among the owners, 0 .. world_size - 1."""
    world_size: int
    """How many owners take part."""
    seed: int
    """train.seed: derive any shuffling from it, so every restart sees the same split."""
    name: str
    """The owner's name (UNIFY_DIST_OWNER; rank{R} when owners are not named); paths in the factory string may
    use {rank} and {owner}."""
    index: int = -1
    """This owner's place in the agreed list of owner names (train.owners): stable across elastic restarts,
    unlike rank. -1: the rank."""
    count: int = 0
    """How many owners that list holds (0: world_size). Built-in partitions cut count shares, take share index."""

    @property
    def share(self) -> tuple[int, int]:
        """(which share, of how many): the built-in partitions' cut, by name when owners are named."""
        return (self.index if self.index >= 0 else self.rank, self.count or self.world_size)


@dataclass
class OwnerDatasets:
    """What a data factory returns: this owner's three datasets, each item (input tensor, class index)."""

    train: torch.utils.data.Dataset
    val: torch.utils.data.Dataset
    test: torch.utils.data.Dataset
    classes: list[str]
    """The class names, the same list (same order) on every owner."""


# ---------------------------------------------------------------- holding a split


@dataclass
class Split:
    """A split held as tensors on the training device: batches are slices, nothing per sample."""

    x: Tensor
    y: Tensor

    def __len__(self) -> int:
        return len(self.y)

    @property
    def device(self) -> torch.device:
        return self.x.device

    @property
    def in_shape(self) -> tuple[int, ...]:
        return tuple(self.x.shape[1:])

    def labels(self) -> Tensor:
        return self.y

    def batches(self, order: Tensor | None, batch_size: int, generator: torch.Generator | None = None) -> Batches:
        """(inputs, labels) batches in `order` (None: as stored); `generator` is unused (nothing random here)."""
        if order is None:
            for start in range(0, len(self), batch_size):
                yield self.x[start : start + batch_size], self.y[start : start + batch_size]
            return
        order = order.to(self.x.device)
        for start in range(0, len(order), batch_size):
            idx = order[start : start + batch_size]
            yield self.x[idx], self.y[idx]


class Stream:
    """A split read through a DataLoader: any Dataset of (input tensor, class index), any size.

    The order is given by the caller (train_epoch draws it from the epoch's generator), so a streamed
    epoch visits items exactly as the in-memory path would. Worker processes are started per epoch and
    seeded from the same generator, so random transforms inside workers repeat on resume too; with
    0 workers, random transforms draw from this process's global RNG, which a resume does not restore.
    """

    def __init__(self, dataset: torch.utils.data.Dataset, device: torch.device | str = "cpu", workers: int = 0,
                 pin_memory: bool = False, eval_batch_size: int = 256):  # fmt: skip
        self.dataset = dataset
        self.device = torch.device(device)
        self.workers = workers
        self.pin_memory = pin_memory and self.device.type == "cuda"  # pinning helps only host-to-GPU copies
        self.eval_batch_size = eval_batch_size
        self._labels: Tensor | None = None
        self._in_shape: tuple[int, ...] | None = None

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    @property
    def in_shape(self) -> tuple[int, ...]:
        """The shape of one input item (reads item 0 once)."""
        if self._in_shape is None:
            self._in_shape = tuple(torch.as_tensor(self.dataset[0][0]).shape)
        return self._in_shape

    def labels(self) -> Tensor:
        """Every item's class index, read once: from `targets` (torchvision sets) or a Subset of such a
        dataset when there is one, else by one pass over the dataset (it costs what an epoch's reads cost)."""
        if self._labels is None:
            found = _known_targets(self.dataset)
            if found is None:
                found = torch.cat([y for _, y in self.batches(None, self.eval_batch_size)]).cpu()
            self._labels = found.to(device=self.device, dtype=torch.int64)
        return self._labels

    def batches(self, order: Tensor | None, batch_size: int, generator: torch.Generator | None = None) -> Batches:
        """(inputs, labels) batches on the device, in `order` (None: as stored).

        `generator` seeds the loader's worker processes (torch draws their base seed from it), so the
        same generator gives the same worker seeds; the global RNG is left alone.
        """
        sampler = None if order is None else _InOrder(order)
        seeds = generator if generator is not None else torch.Generator().manual_seed(0)
        loader = torch.utils.data.DataLoader(self.dataset, batch_size=batch_size, sampler=sampler,
                                             num_workers=self.workers, pin_memory=self.pin_memory, generator=seeds)
        for x, y in loader:
            yield (x.to(self.device, non_blocking=self.pin_memory),
                   torch.as_tensor(y).to(self.device, dtype=torch.int64, non_blocking=self.pin_memory))  # fmt: skip


class _InOrder(torch.utils.data.Sampler[int]):
    """Indices in a given order, read from the tensor a chunk at a time: a list of Python ints would cost
    about 36 bytes per item (4.5 times the tensor), memory that grows with the dataset."""

    def __init__(self, order: Tensor):
        self.order = order.cpu()

    def __len__(self) -> int:
        return len(self.order)

    def __iter__(self) -> Iterator[int]:
        for chunk in self.order.split(4096):
            yield from chunk.tolist()


def _known_targets(ds: object) -> Tensor | None:
    """Labels a dataset already holds (TensorDataset, torchvision's `targets`, Subsets of those), else None."""
    if isinstance(ds, torch.utils.data.Subset):
        inner = _known_targets(ds.dataset)
        return None if inner is None else inner[torch.as_tensor(ds.indices, dtype=torch.int64)]
    if isinstance(ds, torch.utils.data.TensorDataset) and len(ds.tensors) == 2:
        return ds.tensors[1].cpu()
    targets = getattr(ds, "targets", None)
    if targets is not None and len(targets) == len(ds):  # type: ignore[arg-type]
        return torch.as_tensor(np.asarray(targets))
    return None


@dataclass
class OwnerData:
    """One owner's private data: its training share, its validation split, and its shard of the test set."""

    train: Split | Stream
    val: Split | Stream
    test: Split | Stream
    classes: list[str]

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def in_shape(self) -> tuple[int, ...]:
        """The shape of one input item, e.g. (1, 28, 28) for Fashion-MNIST or (20,) for 20 tabular features."""
        return self.train.in_shape

    @property
    def in_channels(self) -> int:
        """For the built-in image models: C of square (C, S, S) images; a flat input's feature count."""
        return self.in_shape[0] if _square_image(self.in_shape) else math.prod(self.in_shape)

    @property
    def image_size(self) -> int:
        """For the built-in image models: S of square (C, S, S) images; 1 for any other shape (so that
        in_channels * image_size**2 is the flattened input size the mlp expects)."""
        return self.in_shape[-1] if _square_image(self.in_shape) else 1


def _square_image(shape: tuple[int, ...]) -> bool:
    return len(shape) == 3 and shape[1] == shape[2]


# ---------------------------------------------------------------- registries


@dataclass(frozen=True)
class PartitionSpec:
    """How a partition scheme splits a shared dataset among owners."""

    split: Callable[..., list[np.ndarray]]
    """(labels, owners, rng, *, alpha, num_classes) -> each owner's sample indices."""
    owner_held: bool = False
    """The scheme of owner-held datasets: each owner already has its own data, nothing is split."""
    owners_at_most_classes: bool = False
    """The scheme gives each owner its own classes, so it cannot serve more owners than classes."""


@dataclass(frozen=True)
class DatasetSpec:
    """How to load a dataset named in `data.dataset`."""

    load: Callable[[DataConfig, Owner, torch.device, dist.ProcessGroup | None], OwnerData]
    """(config, owner, device, group) -> this owner's data. An owner-held dataset may call collectives
    on `group` (None: the default group); every owner calls load, so every owner joins them."""
    prepare: Callable[[DataConfig], None] | None = None
    """Fetch or unpack files, once per machine, before any owner loads."""
    num_classes: int | None = None
    """Known before any file is read (None: found while loading)."""
    owner_held: bool = False
    """Each owner brings its own files, so it takes an owner-held partition (folder), not a split."""
    problems: Callable[[DataConfig], list[str]] | None = None
    """Settings this dataset needs, checked on config load."""


PARTITIONS: dict[str, PartitionSpec] = {}
DATASETS: dict[str, DatasetSpec] = {}


def register_partition(name: str, *, owner_held: bool = False, owners_at_most_classes: bool = False) -> Callable:
    """Register a partition scheme under `name` (a decorator); a second one with the same name raises ValueError."""

    def wrap(fn: Callable[..., list[np.ndarray]]) -> Callable[..., list[np.ndarray]]:
        if name in PARTITIONS:
            raise ValueError(f"partition '{name}' is registered twice; pick another name")
        PARTITIONS[name] = PartitionSpec(fn, owner_held, owners_at_most_classes)
        return fn

    return wrap


def register_dataset(
    name: str,
    *,
    prepare: Callable[[DataConfig], None] | None = None,
    num_classes: int | None = None,
    owner_held: bool = False,
    problems: Callable[[DataConfig], list[str]] | None = None,
) -> Callable:
    """Register a dataset loader under `name` (a decorator); a second one with the same name raises ValueError.

    The loader is called as load(cfg, owner, device, group) and returns OwnerData. For data that lives
    only with its owner, `data.factory` is simpler: no registration, no change to the package.
    """

    def wrap(fn: Callable[..., OwnerData]) -> Callable[..., OwnerData]:
        if name in DATASETS:
            raise ValueError(f"dataset '{name}' is registered twice; pick another name")
        DATASETS[name] = DatasetSpec(fn, prepare, num_classes, owner_held, problems)
        return fn

    return wrap


def dataset_problems(cfg: DataConfig) -> list[str]:
    """data.dataset and data.partition against the registries: known names that go together, and the named
    dataset's own settings. Empty with data.factory (both are ignored then). The program checks this on
    config load (unify_dist.app.config), beside DataConfig.problems(); load_owner_data checks it too."""
    if cfg.factory:
        return []
    out = []
    if cfg.dataset not in DATASETS:
        out.append(choice("data.dataset", cfg.dataset, tuple(DATASETS)))
    if cfg.partition not in PARTITIONS:
        out.append(choice("data.partition", cfg.partition, tuple(PARTITIONS)))
    if out:
        return out
    dataset, scheme = DATASETS[cfg.dataset], PARTITIONS[cfg.partition]
    if dataset.owner_held != scheme.owner_held:
        held = [n for n, p in PARTITIONS.items() if p.owner_held]
        shared = [n for n, p in PARTITIONS.items() if not p.owner_held]
        takes = held if dataset.owner_held else shared
        out.append(f"data.dataset = '{cfg.dataset}' and data.partition = '{cfg.partition}' do not go together: "
                   f"'{cfg.dataset}' takes partition {' or '.join(repr(t) for t in takes)}")  # fmt: skip
    return out + (dataset.problems(cfg) if dataset.problems else [])


# ---------------------------------------------------------------- partitions


def partition(
    labels: np.ndarray, scheme: str, owners: int, seed: int, alpha: float = 0.5, num_classes: int | None = None
) -> list[np.ndarray]:
    """Split sample indices among owners with a registered scheme; the same arguments give the same split
    on every machine."""
    if scheme not in PARTITIONS:
        raise ValueError(f"unknown partition scheme '{scheme}' (registered: {', '.join(PARTITIONS)})")
    n_classes = num_classes or int(labels.max()) + 1
    return PARTITIONS[scheme].split(labels, owners, np.random.default_rng(seed), alpha=alpha, num_classes=n_classes)


@register_partition("iid")
def _iid(labels: np.ndarray, owners: int, rng: np.random.Generator, **_: object) -> list[np.ndarray]:
    """A seeded shuffle cut into equal parts (the paper's V-environment)."""
    return [np.sort(p) for p in np.array_split(rng.permutation(len(labels)), owners)]


@register_partition("label_split", owners_at_most_classes=True)
def _label_split(labels: np.ndarray, owners: int, rng: Rng, *, num_classes: int, **_: object) -> list[np.ndarray]:
    """Owner i gets the i-th contiguous block of classes (2 owners: 0-4 and 5-9, the H-environment)."""
    if owners > num_classes:
        raise UserError(
            f"label_split gives each owner a block of classes, but {owners} owners > {num_classes} classes; "
            "use fewer owners or partition = 'dirichlet'"
        )
    blocks = np.array_split(np.arange(num_classes), owners)
    return [np.flatnonzero(np.isin(labels, b)) for b in blocks]


@register_partition("dirichlet")
def _dirichlet(
    labels: np.ndarray, owners: int, rng: Rng, *, alpha: float, num_classes: int, **_: object
) -> list[np.ndarray]:
    """Per class, shares drawn from Dirichlet(alpha); redrawn (deterministically) until every owner has
    at least 10 samples."""
    for _ in range(1000):
        shares: list[list[np.ndarray]] = [[] for _ in range(owners)]
        for c in range(num_classes):
            idx = rng.permutation(np.flatnonzero(labels == c))
            cuts = (np.cumsum(rng.dirichlet([alpha] * owners))[:-1] * len(idx)).astype(int)
            for owner, part in enumerate(np.split(idx, cuts)):
                shares[owner].append(part)
        out = [np.sort(np.concatenate(s)) for s in shares]
        if min(len(o) for o in out) >= 10:
            return out
    raise UserError(f"dirichlet alpha = {alpha} leaves some of {owners} owners nearly empty; raise data.alpha")


@register_partition("folder", owner_held=True)
def _owner_held(labels: np.ndarray, owners: int, rng: np.random.Generator, **_: object) -> list[np.ndarray]:
    """Owner-held data (dataset = folder): each owner already has its own; there is nothing to split."""
    raise ValueError("partition 'folder' splits nothing: each owner brings its own data (dataset = 'folder')")


def check_owner_count(cfg: DataConfig, owners: int) -> None:
    """Refuse, before any file is read, an owner count the partition cannot serve."""
    if cfg.factory or cfg.dataset not in DATASETS or cfg.partition not in PARTITIONS:
        return
    classes = DATASETS[cfg.dataset].num_classes
    if PARTITIONS[cfg.partition].owners_at_most_classes and classes is not None and owners > classes:
        raise UserError(
            f"{cfg.partition} gives each owner a block of classes, but {owners} owners > {classes} classes "
            f"in {cfg.dataset}; use fewer owners or partition = 'dirichlet'"
        )


# ---------------------------------------------------------------- loading


def prepare_dataset(cfg: DataConfig) -> None:
    """Make sure the dataset's files are there (download if allowed, else a clear error); nothing for a factory.

    Call on one process per machine before the others load (torchvision unpacks files in place).
    """
    if cfg.factory:
        return
    prepare = DATASETS[cfg.dataset].prepare
    if prepare is not None:
        prepare(cfg)


def load_owner_data(cfg: DataConfig, owner: Owner, device: torch.device, group: Group = None, reducer=None) -> OwnerData:
    """This owner's train/val data and test shard: from `data.factory` when set, else the named dataset.

    Every owner must call it: owner-held datasets agree on their class list with a collective on `group`,
    through `reducer` (trust on: the sealed ring) when given and the loader takes a `reducer` keyword.
    """
    if cfg.factory:
        return _from_factory(cfg, owner, device)
    problems = dataset_problems(cfg)
    if problems:  # a library caller's config that the program's load would have refused
        raise UserError("; ".join(problems))
    load = DATASETS[cfg.dataset].load
    if reducer is not None and "reducer" in inspect.signature(load).parameters:
        return load(cfg, owner, device, group, reducer=reducer)
    return load(cfg, owner, device, group)


def _torchvision_class(name: str):
    import torchvision.datasets as tvd

    return getattr(tvd, TORCHVISION_SETS[name][0])


def _prepare_torchvision(cfg: DataConfig) -> None:
    cls, root = _torchvision_class(cfg.dataset), cfg.resolved_root()
    where = f"{root}/{TORCHVISION_SETS[cfg.dataset][1]}"
    try:
        for train in (True, False):
            cls(str(root), train=train, download=cfg.download)
    except Exception as e:  # torchvision raises RuntimeError, URLError, OSError... depending on what is missing
        how = "and it could not be downloaded" if cfg.download else "and data.download = false"
        raise UserError(
            f"dataset '{cfg.dataset}' is not under data root '{root}' ({where}) {how} "
            f"({type(e).__name__}: {str(e).splitlines()[0][:120] if str(e) else ''}); put the official files in "
            f"{where}/raw/ or point UNIFY_DIST_DATA_ROOT (or data.root) at a folder that has them"
        ) from None


def _read_torchvision(cfg: DataConfig, train: bool) -> tuple[Tensor, Tensor]:
    ds = _torchvision_class(cfg.dataset)(str(cfg.resolved_root()), train=train, download=False)
    x = torch.as_tensor(np.asarray(ds.data))
    y = torch.as_tensor(np.asarray(ds.targets), dtype=torch.int64)
    x = x.unsqueeze(1) if x.dim() == 3 else x.permute(0, 3, 1, 2)  # -> N, C, H, W
    return x, y


def _normalise(x: Tensor, mean: tuple[float, ...], std: tuple[float, ...], device: torch.device) -> Tensor:
    x = x.to(device=device, dtype=torch.float32).div_(255.0)
    m = torch.tensor(mean, device=device).view(1, -1, 1, 1)
    s = torch.tensor(std, device=device).view(1, -1, 1, 1)
    return x.sub_(m).div_(s)


def _own_share(indices: np.ndarray, cfg: DataConfig, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Shuffle an owner's indices, cap them (train_per_owner), and cut off the validation split."""
    idx = np.random.default_rng(seed).permutation(indices)
    if cfg.train_per_owner:
        idx = idx[: int(round(cfg.train_per_owner / (1 - cfg.val_fraction)))]
    n_val = max(1, int(round(len(idx) * cfg.val_fraction)))
    return idx[n_val:], idx[:n_val]


def _load_torchvision(name: str, cfg: DataConfig, owner: Owner, device: torch.device, group: Group = None) -> OwnerData:
    """This owner's partition share of a torchvision set, and its shard of the test set, as tensors on `device`."""
    _, _, _, _, n_classes, mean, std = TORCHVISION_SETS[name]
    x, y = _read_torchvision(cfg, train=True)
    index, count = owner.share
    shares = partition(y.numpy(), cfg.partition, count, owner.seed, cfg.alpha, n_classes)
    train_idx, val_idx = _own_share(shares[index], cfg, owner.seed + 1000 + index)
    tx, ty = _read_torchvision(cfg, train=False)
    test_idx = np.random.default_rng(owner.seed).permutation(len(ty))[: cfg.test_size or len(ty)]
    test_idx = np.sort(test_idx[owner.rank :: owner.world_size])  # shards: disjoint, together the whole test set

    def split(xs: Tensor, ys: Tensor, idx: np.ndarray) -> Split:
        t = torch.as_tensor(idx)
        return Split(_normalise(xs[t], mean, std, device), ys[t].to(device))

    classes = [str(c) for c in range(n_classes)]
    return OwnerData(split(x, y, train_idx), split(x, y, val_idx), split(tx, ty, test_idx), classes)


for _name, _row in TORCHVISION_SETS.items():
    _load = functools.partial(_load_torchvision, _name)
    register_dataset(_name, prepare=_prepare_torchvision, num_classes=_row[4])(_load)


# ---------------------------------------------------------------- owner-held image folders


def _folder_problems(cfg: DataConfig) -> list[str]:
    return [] if cfg.folder else ["data.folder is empty: give each owner's image folder, e.g. 'owners/{rank}'"]


def union_classes(mine: list[str] | str, group: dist.ProcessGroup | None = None, reducer=None) -> list[str]:
    """The sorted union of every owner's class names; `mine` may be an error message instead.

    A collective (UTF-8 JSON on `group`, never a pickle, through `reducer` when given; without a process
    group, this owner alone): every owner calls it, and if any owner sent an error, every owner raises a
    UserError (the failing one its own).
    """
    if dist.is_available() and dist.is_initialized():
        everyone = gather_json(mine, group, reducer, what="an owner's class list")  # collective: class names (or errors)
    else:
        everyone = [mine]
    if isinstance(mine, str):
        raise UserError(mine)
    if not all(isinstance(v, str) or (isinstance(v, list) and all(isinstance(n, str) for n in v)) for v in everyone):
        raise WireError("an owner's class list is neither names nor an error message; a peer is broken or the bytes "
                        "were changed on the way")  # fmt: skip
    failed = [r for r, v in enumerate(everyone) if isinstance(v, str)]
    if failed:
        raise UserError(f"loading the owners' folders failed on rank(s) {failed}; see that rank's message")
    return sorted({name for names in everyone for name in names})  # type: ignore[union-attr]


def _folder_classes(path: Path, rank: int, spec: str) -> list[str] | str:
    """This owner's class folder names, or a one-line error (sent to the others, not raised here)."""
    if not path.is_dir():
        return f"owner {rank}'s image folder '{path}' does not exist; check data.folder ('{spec}')"
    names = sorted(d.name for d in path.iterdir() if d.is_dir())
    if not names:
        return f"owner {rank}'s folder '{path}' has no class subfolders; use one subfolder per class"
    return names


@register_dataset("folder", owner_held=True, problems=_folder_problems)
def _load_folder(cfg: DataConfig, owner: Owner, device: torch.device, group: Group = None, reducer=None) -> OwnerData:
    """An owner's own folder tree (class-named subfolders), its test shard a held-out part of it.

    Owners may hold different classes: the class list is the sorted union of every owner's folder
    names (one collective), and each owner's labels index into that union. A class this owner lacks,
    or holds an empty folder of, simply has no images here.
    """
    path = Path(cfg.folder.replace("{rank}", str(owner.rank)).replace("{owner}", owner.name)).expanduser()
    classes = union_classes(_folder_classes(path, owner.rank, cfg.folder), group, reducer)
    samples = [(f, i) for i, c in enumerate(classes) for f in _images_in(path / c)]
    if not samples:
        kinds = ", ".join(IMAGE_SUFFIXES)
        raise UserError(f"owner {owner.rank}'s folder '{path}' has no images ({kinds}) in its class folders")
    x = torch.stack([_decode(f, cfg) for f, _ in samples])  # decoded once, at load time
    y = torch.as_tensor([c for _, c in samples], dtype=torch.int64)
    order = np.random.default_rng(owner.seed + owner.share[0]).permutation(len(y))
    n_hold = max(1, int(round(len(y) * cfg.val_fraction)))
    test_idx, rest = order[:n_hold], order[n_hold:]
    train_idx, val_idx = _own_share(rest, cfg, owner.seed + 1000 + owner.share[0])
    half = (0.5,) * cfg.channels

    def split(idx: np.ndarray) -> Split:
        t = torch.as_tensor(idx, dtype=torch.int64)
        return Split(_normalise(x[t], half, half, device), y[t].to(device))

    return OwnerData(split(train_idx), split(val_idx), split(test_idx), classes)


IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm")


def _images_in(folder: Path) -> list[Path]:
    """Image files under a class folder (subfolders included), sorted; none when the folder is absent."""
    if not folder.is_dir():
        return []
    return sorted(f for f in folder.rglob("*") if f.suffix.lower() in IMAGE_SUFFIXES and f.is_file())


def _decode(file: Path, cfg: DataConfig) -> Tensor:
    """One image file as a uint8 (C, S, S) tensor in the configured channels and size (bilinear resize)."""
    from PIL import Image

    with Image.open(file) as image:
        image = image.convert("L" if cfg.channels == 1 else "RGB")
        image = image.resize((cfg.image_size, cfg.image_size), Image.BILINEAR)
        pixels = torch.from_numpy(np.array(image))  # a copy: PIL hands out read-only buffers
    return pixels.unsqueeze(0) if pixels.dim() == 2 else pixels.permute(2, 0, 1)


# ---------------------------------------------------------------- the owner's own factory


def load_factory(spec: str, owner: Owner) -> Callable[[Owner], OwnerDatasets]:
    """Import 'module.path:function' ({rank} and {owner} replaced first); a UserError names what is wrong."""
    path = spec.replace("{rank}", str(owner.rank)).replace("{owner}", owner.name)
    module_name, _, attr = path.partition(":")
    where = f"data.factory = '{spec}'" + (f" ('{path}' on owner {owner.rank})" if path != spec else "")
    try:
        module = importlib.import_module(module_name)
    except Exception as e:  # ModuleNotFoundError, or whatever the module raises while importing
        why = f"{type(e).__name__}: {_first_line(e)}"
        raise UserError(f"{where}: cannot import module '{module_name}' ({why}); "
                        "put its folder on PYTHONPATH (or install it) and write 'module.path:function'") from None
    fn = getattr(module, attr, None)
    if not callable(fn):
        raise UserError(f"{where}: module '{module_name}' has no function '{attr}'; "
                        f"define {attr}(owner) -> OwnerDatasets there or fix the name after ':'")  # fmt: skip
    return fn


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0][:160] if text else "no message"


def _from_factory(cfg: DataConfig, owner: Owner, device: torch.device) -> OwnerData:
    """Call the owner's factory and hold its datasets: small TensorDatasets in memory, the rest streamed."""
    fn = load_factory(cfg.factory, owner)
    where = f"data.factory = '{cfg.factory}'"
    try:
        made = fn(owner)
    except UserError:
        raise
    except Exception as e:  # the owner's own code failed: one line, and every owner stops together
        why = f"{type(e).__name__}: {_first_line(e)}"
        raise UserError(f"{where} failed on owner {owner.rank} ({why}); fix the factory") from None
    _check_made(made, where)

    def hold(ds: torch.utils.data.Dataset) -> Split | Stream:
        if _small_tensor_dataset(ds):
            x, y = ds.tensors  # type: ignore[attr-defined]
            return Split(x.to(device), y.to(device=device, dtype=torch.int64))
        return Stream(ds, device, cfg.workers, cfg.pin_memory)

    data = OwnerData(hold(made.train), hold(made.val), hold(made.test), list(made.classes))
    _check_item(made.train, where)
    return data


SMALL_BYTES = 256 << 20
"""A factory's TensorDataset up to this size is held as a Split (sliced, no DataLoader); larger ones stream."""


def _small_tensor_dataset(ds: object) -> bool:
    return (isinstance(ds, torch.utils.data.TensorDataset) and len(ds.tensors) == 2
            and ds.tensors[0].nbytes <= SMALL_BYTES and not ds.tensors[1].is_floating_point())  # fmt: skip


def _check_made(made: object, where: str) -> None:
    fix = ("return unify_dist.data.OwnerDatasets(train, val, test, classes) "
           "with torch Datasets and a list of class names")
    if not isinstance(made, OwnerDatasets):
        raise UserError(f"{where} returned {type(made).__name__}; {fix}")
    for part in ("train", "val", "test"):
        ds = getattr(made, part)
        if not (hasattr(ds, "__getitem__") and hasattr(ds, "__len__")):
            raise UserError(f"{where} returned a {part} of type {type(ds).__name__}, not a Dataset; {fix}")
    if len(made.train) == 0:  # type: ignore[arg-type]
        raise UserError(f"{where} returned an empty train dataset; give every owner some training items")
    if not made.classes or not all(isinstance(c, str) for c in made.classes):
        raise UserError(f"{where} returned classes = {made.classes!r:.80}; {fix}")


def _check_item(ds: torch.utils.data.Dataset, where: str) -> None:
    """The first training item must be (input tensor, class index), or training fails obscurely later."""
    item = ds[0]
    pair = isinstance(item, (tuple, list)) and len(item) == 2
    if not (pair and isinstance(item[0], Tensor) and _is_class_index(item[1])):
        parts = item if isinstance(item, (tuple, list)) else (item,)
        shown = "(" + ", ".join(type(v).__name__ for v in parts) + ")"
        raise UserError(f"{where}: a train item is {shown}; each item must be (input tensor, class index int)")


def _is_class_index(label: object) -> bool:
    if isinstance(label, Tensor):
        return label.numel() == 1 and not label.is_floating_point()
    return isinstance(label, (int, np.integer)) and not isinstance(label, bool)
