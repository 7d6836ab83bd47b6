"""Models by name, or the owner's own builder. Every owner builds the same architecture; rank 0's initial
weights are broadcast (unify_dist.same_start), so a builder only has to agree on shapes, not on values.

A builder is a function of keywords: `in_shape` (the shape of one input item, e.g. (1, 28, 28) or (30,)),
`num_classes`, and `hidden` when it has a hidden width. `register_model(name)` adds one to MODELS, which
the config validation (`model.name`) reads; `model.factory = "my_pkg.models:build"` names a builder that
lives in the owner's own package, called as fn(in_shape=..., num_classes=...).
"""

from __future__ import annotations

import importlib
import inspect
import math
from collections.abc import Callable

import torch
from torch import nn

from unify_dist.config import ModelConfig, choice
from unify_dist.errors import UserError

__all__ = ["MODELS", "ModelBuilder", "register_model", "model_problems", "build_model", "load_factory", "check_output_size", "PaperCNN"]

ModelBuilder = Callable[..., nn.Module]
"""fn(*, in_shape: tuple[int, ...], num_classes: int[, hidden: int]) -> nn.Module"""

MODELS: dict[str, ModelBuilder] = {}


def register_model(name: str) -> Callable[[ModelBuilder], ModelBuilder]:
    """Register a builder under `name` (a decorator), so `model.name = name` validates and builds.

    A second builder with the same name is a bug, so it raises ValueError.
    """

    def wrap(fn: ModelBuilder) -> ModelBuilder:
        if name in MODELS:
            raise ValueError(f"model '{name}' is registered twice; pick another name")
        MODELS[name] = fn
        return fn

    return wrap


class PaperCNN(nn.Module):
    """The paper's CNN: two conv+ReLU+max-pool blocks, then two linear layers (225,034 weights on 28x28).

    Each block pools before its ReLU: max(relu(a), relu(b)) = relu(max(a, b)) exactly (ReLU never reorders
    values, and a pooled window's winner is the same), so outputs and gradients are the same bits as conv,
    ReLU, pool (tests/test_models.py), and the ReLU and its backward touch a quarter of the values
    (docs/performance.md has the speed-up). The parameters' names are the same either way.
    """

    def __init__(self, in_shape: tuple[int, int, int], num_classes: int, hidden: int = 128):
        super().__init__()
        channels, height, width = in_shape
        self.features = nn.Sequential(
            nn.Conv2d(channels, 32, 3), nn.MaxPool2d(2), nn.ReLU(),
            nn.Conv2d(32, 64, 3), nn.MaxPool2d(2), nn.ReLU(),
        )  # fmt: skip
        rows, cols = (((side - 2) // 2 - 2) // 2 for side in (height, width))
        self.classifier = nn.Sequential(
            nn.Flatten(), nn.Linear(64 * rows * cols, hidden), nn.ReLU(), nn.Linear(hidden, num_classes)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))


def _image_shape(model: str, in_shape: tuple[int, ...], smallest: int) -> tuple[int, int, int]:
    """(channels, height, width), or a UserError saying which model wants images and what to use instead."""
    if len(in_shape) != 3 or min(in_shape[1:]) < smallest:
        raise UserError(
            f"model.name = '{model}' needs images of at least {smallest}x{smallest} pixels (channels, height, "
            f"width), but one input item has shape {tuple(in_shape)}; use model.name = 'mlp' or your own model.factory"
        )
    return in_shape[0], in_shape[1], in_shape[2]


@register_model("paper_cnn")
def paper_cnn(*, in_shape: tuple[int, ...], num_classes: int, hidden: int = 128) -> nn.Module:
    """The paper's CNN (PaperCNN) on images."""
    return PaperCNN(_image_shape("paper_cnn", in_shape, smallest=10), num_classes, hidden)


@register_model("mlp")
def mlp(*, in_shape: tuple[int, ...], num_classes: int, hidden: int = 128) -> nn.Module:
    """Three linear layers over the flattened input: works on images and on tabular rows alike."""
    return nn.Sequential(
        nn.Flatten(),
        nn.Linear(math.prod(in_shape), hidden), nn.ReLU(),
        nn.Linear(hidden, hidden), nn.ReLU(),
        nn.Linear(hidden, num_classes),
    )  # fmt: skip


@register_model("resnet18")
def resnet18(*, in_shape: tuple[int, ...], num_classes: int) -> nn.Module:
    """torchvision's resnet18 for small images: a 3x3 stride-1 stem and no max-pool (the CIFAR variant)."""
    from torchvision.models import resnet18 as tv_resnet18

    channels, _, _ = _image_shape("resnet18", in_shape, smallest=1)
    model = tv_resnet18(num_classes=num_classes)
    model.conv1 = nn.Conv2d(channels, 64, kernel_size=3, stride=1, padding=1, bias=False)
    model.maxpool = nn.Identity()
    return model


def model_problems(cfg: ModelConfig) -> list[str]:
    """model.name against the registry. The program checks this on config load (unify_dist.app.config),
    beside ModelConfig.problems(); build_model checks it too."""
    if cfg.name in MODELS:
        return []
    return [choice("model.name", cfg.name, tuple(MODELS))]


def build_model(
    cfg: ModelConfig,
    in_shape: tuple[int, ...] | int,
    num_classes: int,
    image_size: int | None = None,
    *,
    rank: int = 0,
    owner: str = "",
) -> nn.Module:
    """This owner's model: `cfg.factory` when set (with {rank}/{owner} filled in), else MODELS[cfg.name].

    `owner` is the owner's name for {owner} (the program's UNIFY_DIST_OWNER; empty: rank{rank}, as data uses).

    The older call build_model(cfg, in_channels, num_classes, image_size) still means square images.
    """
    if isinstance(in_shape, int):
        if image_size is None:
            raise ValueError("build_model: give in_shape as a tuple, or in_channels together with image_size")
        in_shape = (in_shape, image_size, image_size)
    shape = tuple(int(s) for s in in_shape)
    if cfg.factory:
        return _from_factory(cfg.factory, shape, num_classes, rank, owner or f"rank{rank}")
    if cfg.name not in MODELS:  # a library caller's config that the program's load would have refused
        raise UserError(model_problems(cfg)[0])
    builder = MODELS[cfg.name]
    if "hidden" in inspect.signature(builder).parameters:
        model = builder(in_shape=shape, num_classes=num_classes, hidden=cfg.hidden)
    else:
        model = builder(in_shape=shape, num_classes=num_classes)
    if cfg.channels_last and any(isinstance(m, nn.Conv2d) for m in model.modules()):
        model = model.to(memory_format=torch.channels_last)  # faster convolutions (ModelConfig.channels_last)
    return model


@torch.no_grad()
def check_output_size(model: nn.Module, batch: torch.Tensor, num_classes: int, cfg: ModelConfig) -> None:
    """A UserError, before any training, when the model's output is not one logit per class.

    Runs one forward on `batch` (a few of this owner's items) in eval mode, so nothing the model keeps
    (BatchNorm statistics, dropout's RNG draws) changes. Without it a 9-class output meets class 9 deep in
    cross_entropy as 'IndexError: Target 9 is out of bounds'.
    """
    where = f"model.factory = '{cfg.factory}'" if cfg.factory else f"model.name = '{cfg.name}'"
    was_training = model.training
    model.eval()
    try:
        out = model(batch)
    finally:
        model.train(was_training)
    if not isinstance(out, torch.Tensor):
        raise UserError(f"{where} builds a model whose forward returns {type(out).__name__}, not a tensor of logits; "
                        "return the logits (for a transformers model, its output's .logits)")  # fmt: skip
    if out.dim() != 2 or out.shape[1] != num_classes:
        size = out.shape[1] if out.dim() == 2 else tuple(out.shape[1:])
        raise UserError(f"{where} builds a model with output size {size}, but the data has {num_classes} classes; "
                        f"make its last layer output num_classes (the builder is called with num_classes={num_classes})")  # fmt: skip


def load_factory(key: str, value: str, rank: int, owner: str = "") -> Callable[..., object]:
    """Import 'module.path:function' ({rank} and {owner} replaced) and return the function, or a UserError."""
    path = value.replace("{rank}", str(rank)).replace("{owner}", owner or f"rank{rank}")
    module_name, _, attr = path.partition(":")
    fix = "install the package that holds it (or put its folder on PYTHONPATH) and write 'module.path:function'"
    try:
        module = importlib.import_module(module_name)
    except Exception as e:  # ModuleNotFoundError, or whatever the module raises while importing
        why = f"{type(e).__name__}: {_first_line(e)}"
        raise UserError(f"{key} = '{value}': cannot import module '{module_name}' ({why}); {fix}") from None
    fn = module
    for part in attr.split("."):
        fn = getattr(fn, part, None)
        if fn is None:
            raise UserError(f"{key} = '{value}': module '{module_name}' has no '{attr}'; {fix}")
    if not callable(fn):
        raise UserError(f"{key} = '{value}': '{attr}' in '{module_name}' is not a function; {fix}")
    return fn


def _from_factory(value: str, in_shape: tuple[int, ...], num_classes: int, rank: int, owner: str) -> nn.Module:
    """Call the owner's builder; its own failure becomes one line naming the owner and what it was asked for."""
    fn = load_factory("model.factory", value, rank, owner)
    try:
        model = fn(in_shape=in_shape, num_classes=num_classes)
    except Exception as e:
        raise UserError(
            f"model.factory = '{value}' failed on {owner} for in_shape {in_shape}, num_classes {num_classes} "
            f"({type(e).__name__}: {_first_line(e)}); fix the builder"
        ) from None
    if not isinstance(model, nn.Module):
        raise UserError(
            f"model.factory = '{value}' returned {type(model).__name__}, not a torch.nn.Module; return the model"
        )
    return model


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0][:160] if text else "no message"
