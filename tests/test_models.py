"""The model registry and the owner's own builder (model.factory): shapes, refusals, and errors for people."""

from __future__ import annotations

import sys
import textwrap
from pathlib import Path

import pytest
import torch
from torch import nn

from tests.world import cli
from unify_dist.app.config import RunConfig
from unify_dist.config import ModelConfig
from unify_dist.errors import UserError
from unify_dist.models import MODELS, build_model, load_factory, register_model


def _count(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def test_builtin_models_are_registry_entries_and_build_from_in_shape():
    assert {"paper_cnn", "mlp", "resnet18"} <= set(MODELS)
    cnn = build_model(ModelConfig(name="paper_cnn"), (1, 28, 28), 10)
    assert _count(cnn) == 225_034  # the paper's figure
    assert cnn(torch.zeros(3, 1, 28, 28)).shape == (3, 10)
    wide = build_model(ModelConfig(name="paper_cnn"), (3, 32, 40), 7)  # rectangles work too
    assert wide(torch.zeros(2, 3, 32, 40)).shape == (2, 7)
    tabular = build_model(ModelConfig(name="mlp", hidden=16), (30,), 2)
    assert tabular(torch.zeros(5, 30)).shape == (5, 2)
    assert _count(tabular) == 30 * 16 + 16 + 16 * 16 + 16 + 16 * 2 + 2  # hidden reached the builder


def test_older_call_form_still_means_square_images():
    torch.manual_seed(0)
    old = build_model(ModelConfig(), 1, 10, 28)
    torch.manual_seed(0)
    new = build_model(ModelConfig(), (1, 28, 28), 10)
    for (n1, a), (n2, b) in zip(old.state_dict().items(), new.state_dict().items(), strict=True):
        assert n1 == n2 and torch.equal(a, b)
    with pytest.raises(ValueError, match="image_size"):
        build_model(ModelConfig(), 1, 10)


def test_image_models_refuse_tabular_rows_naming_what_to_use():
    with pytest.raises(UserError, match=r"'paper_cnn' needs images .* shape \(30,\); use model.name = 'mlp'"):
        build_model(ModelConfig(name="paper_cnn"), (30,), 2)
    with pytest.raises(UserError, match="'resnet18' needs images"):
        build_model(ModelConfig(name="resnet18"), (30,), 2)


def test_register_model_refuses_duplicates_and_config_reads_the_registry():
    assert RunConfig(model=ModelConfig(name="tiny_for_test")).problems() == [
        "model.name = 'tiny_for_test' is not known; choose one of: " + ", ".join(MODELS)
    ]

    @register_model("tiny_for_test")
    def tiny(*, in_shape, num_classes):  # no hidden: build_model must not pass it
        return nn.Linear(in_shape[0], num_classes)

    try:
        assert RunConfig(model=ModelConfig(name="tiny_for_test")).problems() == []
        assert build_model(ModelConfig(name="tiny_for_test"), (4,), 3).weight.shape == (3, 4)
        with pytest.raises(ValueError, match="model 'tiny_for_test' is registered twice"):
            register_model("tiny_for_test")(tiny)
        with pytest.raises(ValueError, match="registered twice"):
            register_model("mlp")(tiny)
    finally:
        MODELS.pop("tiny_for_test")


@pytest.fixture
def owner_modules(tmp_path: Path, monkeypatch):
    """Two importable owner modules, owner0_models and owner1_models, differing in their hidden width, and
    raising_models, which fails on import."""
    for rank, width in ((0, 8), (1, 12)):
        (tmp_path / f"owner{rank}_models.py").write_text(textwrap.dedent(f"""
            from torch import nn

            def build(in_shape, num_classes):
                return nn.Sequential(nn.Linear(in_shape[0], {width}), nn.ReLU(), nn.Linear({width}, num_classes))

            not_a_model = lambda in_shape, num_classes: "a string"
            WIDTH = {width}
        """))
    (tmp_path / "raising_models.py").write_text('raise RuntimeError("needs a GPU\\nand a second line")\n')
    monkeypatch.syspath_prepend(str(tmp_path))
    yield tmp_path
    for name in ("owner0_models", "owner1_models", "raising_models"):
        sys.modules.pop(name, None)


def test_factory_builds_the_owners_model_with_placeholders(owner_modules):
    for rank, width in ((0, 8), (1, 12)):
        cfg = ModelConfig(name="paper_cnn", factory="{owner}_models:build")
        model = build_model(cfg, (5,), 3, rank=1 - rank, owner=f"owner{rank}")  # {owner} is the name, not the rank
        assert model[0].weight.shape == (width, 5)  # the factory wins over model.name
        assert build_model(ModelConfig(factory="owner{rank}_models:build"), (5,), 3, rank=rank)[0].out_features == width
    with pytest.raises(UserError, match="cannot import module 'rank1_models'"):  # unnamed owners are rank{R}
        build_model(ModelConfig(factory="{owner}_models:build"), (5,), 3, rank=1)


def test_factory_errors_name_the_value_and_the_fix(owner_modules):
    cases = {
        "no_such_pkg.models:build": "cannot import module 'no_such_pkg.models' (ModuleNotFoundError",
        "raising_models:build": "cannot import module 'raising_models' (RuntimeError: needs a GPU);",
        "owner0_models:nope": "module 'owner0_models' has no 'nope'",
        "owner0_models:WIDTH": "'WIDTH' in 'owner0_models' is not a function",
    }
    for value, phrase in cases.items():
        with pytest.raises(UserError) as err:
            build_model(ModelConfig(factory=value), (5,), 3)
        message = str(err.value)
        assert f"model.factory = '{value}'" in message and phrase in message and "module.path:function" in message
        assert "\n" not in message
    with pytest.raises(UserError, match="returned str, not a torch.nn.Module"):
        build_model(ModelConfig(factory="owner0_models:not_a_model"), (5,), 3)
    with pytest.raises(UserError, match=r"failed on rank1 for in_shape \(\), num_classes 3 \(IndexError: .*\); fix"):
        build_model(ModelConfig(factory="owner1_models:build"), (), 3, rank=1)  # the builder reads in_shape[0]
    assert load_factory("data.factory", "owner1_models:build", rank=0)((2,), 2)[0].out_features == 12


def test_factory_without_a_function_part_is_a_config_problem():
    for value in ("my_pkg.models", "my_pkg.models:", ":build"):
        assert ModelConfig(factory=value).problems() == [
            f"model.factory = '{value}' is not 'module.path:function'; write e.g. 'my_pkg.models:build'"
        ]
    assert ModelConfig(factory="my_pkg.models:build").problems() == []


def test_bad_factory_through_the_cli_is_one_line_and_exit_2(data_root, tmp_path):
    settings = ["model.factory=no_such_pkg.models:build", "data.train_per_owner=200", "data.test_size=200",
                "train.max_rounds=1", f"output.dir={tmp_path}/run"]  # fmt: skip
    args = ["train", *(arg for s in settings for arg in ("--set", s))]
    proc = cli(args)
    assert proc.returncode == 2, proc.stderr[-2000:]
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert lines == [
        "unify-dist: error: model.factory = 'no_such_pkg.models:build': cannot import module 'no_such_pkg.models' "
        "(ModuleNotFoundError: No module named 'no_such_pkg'); install the package that holds it (or put its folder "
        "on PYTHONPATH) and write 'module.path:function'"
    ]


def test_builtin_conv_models_are_channels_last_unless_told_otherwise():
    for name in ("paper_cnn", "resnet18"):
        fast = build_model(ModelConfig(name=name), (1, 28, 28), 10)
        plain = build_model(ModelConfig(name=name, channels_last=False), (1, 28, 28), 10)
        conv = [m for m in fast.modules() if isinstance(m, nn.Conv2d)][-1].weight  # the first has 1 input channel
        assert conv.is_contiguous(memory_format=torch.channels_last) and not conv.is_contiguous(), name
        assert all(p.is_contiguous() for p in plain.parameters()), name
        assert fast(torch.zeros(2, 1, 28, 28)).shape == (2, 10)
    tabular = build_model(ModelConfig(name="mlp"), (30,), 2)  # no convolution: nothing to change
    assert all(p.is_contiguous() for p in tabular.parameters())


def _paper_order(cnn: nn.Module) -> nn.Module:
    """The same layers and weights in the paper's order, conv, ReLU, pool: the reference for pool-then-ReLU."""
    import copy

    ref = copy.deepcopy(cnn)
    f = ref.features
    assert [type(m) for m in f] == [nn.Conv2d, nn.MaxPool2d, nn.ReLU] * 2  # what the reorder claims to change
    ref.features = nn.Sequential(f[0], f[2], f[1], f[3], f[5], f[4])
    return ref


@pytest.mark.parametrize("channels_last", [True, False])
def test_paper_cnn_pools_before_relu_with_the_same_bits_as_the_papers_order(channels_last):
    torch.manual_seed(3)
    cnn = build_model(ModelConfig(name="paper_cnn", channels_last=channels_last), (1, 28, 28), 10)
    ref = _paper_order(cnn)
    # Images as the data sets have them: a zero background, where every window ties (conv output = bias),
    # and with one bias forced negative and one positive, so both sides of the ReLU meet the ties.
    x = torch.relu(torch.randn(96, 1, 28, 28)) * (torch.rand(96, 1, 28, 28) < 0.3)
    y = torch.randint(0, 10, (96,))
    for m in (cnn, ref):
        with torch.no_grad():
            m.features[0].bias[:2] = torch.tensor([-0.05, 0.05])
    opts = [torch.optim.Adam(m.parameters(), lr=1e-2) for m in (cnn, ref)]
    for step in range(6):  # gradients and Adam's steps: the weights stay the same bits
        batch = slice(16 * step, 16 * step + 16)
        for m, opt in zip((cnn, ref), opts):
            opt.zero_grad()
            nn.functional.cross_entropy(m(x[batch]), y[batch]).backward()
        for a, b in zip(cnn.parameters(), ref.parameters(), strict=True):
            assert torch.equal(a.grad, b.grad), f"step {step}"
        for opt in opts:
            opt.step()
    for a, b in zip(cnn.state_dict().values(), ref.state_dict().values(), strict=True):
        assert torch.equal(a, b)
    cnn.eval(), ref.eval()
    with torch.no_grad():
        assert torch.equal(cnn(x), ref(x))
    assert list(cnn.state_dict()) == list(ref.state_dict())  # checkpoints of either order load in the other


def test_pool_relu_benchmark_runs_and_keeps_both_orders_equal(capsys):
    from benchmarks.pool_relu import main

    assert main(["--repeats", "1", "--steps", "2"]) == 0  # 1: the two orders' weights parted
    out = capsys.readouterr().out
    assert "weights still equal: True" in out and out.count("ratio") == 2
