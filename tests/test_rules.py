"""Pure rules: definitions on hand-made tensors, no process group."""

from __future__ import annotations

import pytest
import torch

from unify_dist.rules import RULES, register_rule

W = torch.ones(3)
X = torch.tensor([[1.0, -4.0, 2.0, -3.0], [-2.0, 3.0, -2.0, 0.5], [0.5, 1.0, 1.0, 3.0]])


def test_avg_and_max() -> None:
    assert torch.allclose(RULES["avg"](X, W), torch.tensor([-0.5 / 3, 0.0, 1.0 / 3, 0.5 / 3]))
    assert torch.equal(RULES["max"](X, W), torch.tensor([1.0, 3.0, 2.0, 3.0]))


def test_absmax_keeps_sign_and_breaks_ties_to_positive() -> None:
    # column 2: +2 and -2 tie -> +2; column 3: -3 and +3 tie -> +3
    assert torch.equal(RULES["absmax"](X, W), torch.tensor([-2.0, -4.0, 2.0, 3.0]))


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
