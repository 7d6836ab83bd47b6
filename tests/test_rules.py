"""Pure rules: definitions on hand-made tensors, no process group."""

from __future__ import annotations

import pytest
import torch

from unify_dist.rules import KEY_DTYPES, RULES, absmax_keys_, absmax_unkeys_, register_rule

W = torch.ones(3)
X = torch.tensor([[1.0, -4.0, 2.0, -3.0], [-2.0, 3.0, -2.0, 0.5], [0.5, 1.0, 1.0, 3.0]])


def test_avg_and_max() -> None:
    assert torch.allclose(RULES["avg"](X, W), torch.tensor([-0.5 / 3, 0.0, 1.0 / 3, 0.5 / 3]))
    assert torch.equal(RULES["max"](X, W), torch.tensor([1.0, 3.0, 2.0, 3.0]))


def test_absmax_keeps_sign_and_breaks_ties_to_positive() -> None:
    # column 2: +2 and -2 tie -> +2; column 3: -3 and +3 tie -> +3
    assert torch.equal(RULES["absmax"](X, W), torch.tensor([-2.0, -4.0, 2.0, 3.0]))


def test_absmax_zeros_prefer_positive() -> None:
    out = RULES["absmax"](torch.tensor([[0.0, -0.0, -0.0], [-0.0, 0.0, -0.0]]), torch.ones(2))
    assert out.signbit().tolist() == [False, False, True]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_absmax_is_a_max_over_integer_keys(dtype: torch.dtype) -> None:
    """The one-all_reduce absmax: MAX over absmax_keys_ is the reference, bit for bit; keys invert exactly."""
    stacked = torch.randn(4, 3000, generator=torch.Generator().manual_seed(0), dtype=dtype).round(decimals=1)
    stacked[:, :100] = 0.0
    stacked[1, :50] = -0.0  # signed zeros
    stacked[2, 100:200] = -stacked[0, 100:200]  # exact +/- magnitude ties
    stacked[:, 200:210] = torch.tensor([1e-40, -1e-40, 2.0, -2.0, 3e38, -3e38, -0.0, 1e-45, -7.5, 2.5]).to(dtype)
    stacked[3, 210:220] = -1e30  # magnitudes >= 2 (the top bit of the magnitude) win by magnitude
    int_type = KEY_DTYPES[dtype]
    keys = stacked.clone().view(int_type)
    scratch = torch.empty(keys.shape[1], dtype=int_type)
    for row in keys:
        absmax_keys_(row, scratch)
    back = keys.clone()
    for row in back:
        absmax_unkeys_(row, scratch)
    assert torch.equal(back, stacked.view(int_type))  # lossless, signed zeros included
    top = keys.amax(0)
    absmax_unkeys_(top, scratch)
    assert torch.equal(top, RULES["absmax"](stacked, torch.ones(4)).view(int_type))


@pytest.mark.parametrize("name", ["avg", "weighted_avg", "max", "absmax"])
def test_rules_keep_shape_and_identity(name: str) -> None:
    x = torch.randn(4, 3, 5)
    same = x[:1].expand(4, 3, 5)
    out = RULES[name](same, torch.ones(4))
    assert out.shape == (3, 5)
    torch.testing.assert_close(out, x[0])  # unifying identical owners changes nothing


def test_registry_refuses_duplicates() -> None:
    with pytest.raises(ValueError, match="registered twice"):
        register_rule("avg")(lambda s, w: s[0])
