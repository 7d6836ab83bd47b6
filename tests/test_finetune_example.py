"""examples/finetune: owners adapt one pretrained transformers model (saved here with save_pretrained) with peft
LoRA, through the public API in their own loop and through `model.factory` in the program. Real gloo groups
of 3 owners, a real torchrun; the tiny ViT is built from a small ViTConfig, nothing comes from a model hub.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tests.conftest import REPO
from tests.world import run_world, torchrun

FINETUNE = REPO / "examples" / "finetune"
sys.path.insert(0, str(FINETUNE))  # the owner's package, as `pip install -e examples/finetune` would make it

from finetune_owner.data import CLASSES  # noqa: E402
from finetune_owner.model import Logits, adapted  # noqa: E402
from finetune_owner.pretrain import save_tiny_vit  # noqa: E402

PREFIX = "model.base_model.model."  # Logits -> PeftModel -> LoraModel -> the ViT


def _owner(rank: int, world: int, pretrained: Path, out: Path, rule: str, rounds: int) -> dict:
    from finetune_owner.loop import run

    return run(rounds, rule, out if rank == 0 else None, pretrained)


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory) -> Path:
    return save_tiny_vit(tmp_path_factory.mktemp("vit") / "pretrained", num_labels=10)


def _saved(pretrained: Path) -> dict[str, torch.Tensor]:
    """The pretrained file's tensors under the model's own names (transformers 5 maps its legacy keys on load;
    fp32 in, fp32 out, so these are the file's bytes), after checking they are all of the file's values."""
    from transformers import ViTForImageClassification

    state = ViTForImageClassification.from_pretrained(pretrained).state_dict()
    raw = load_file(str(pretrained / "model.safetensors"))
    assert sorted(t.sum().item() for t in state.values()) == sorted(t.sum().item() for t in raw.values())
    return state


def _saved_name(name: str) -> str:
    """The pretrained file's key for a tensor of the adapted model (peft moves a layer's weight to base_layer)."""
    return name.removeprefix(PREFIX).replace(".base_layer.", ".")


def _unified_model(pretrained: Path, state: dict) -> Logits:
    model = Logits(adapted(CLASSES, path=pretrained))
    model.load_state_dict(state)
    return model.eval()


def _images(n: int = 8) -> torch.Tensor:
    return torch.randn(n, 1, 16, 16, generator=torch.Generator().manual_seed(5))


@pytest.mark.slow
def test_ffa_lora_keeps_the_pretrained_file_bit_exact_and_saves_a_peft_adapter(pretrained, tmp_path):
    from peft import PeftModel
    from transformers import ViTForImageClassification

    results = run_world(_owner, 3, pretrained, tmp_path, "lora_ffa", 10)
    rounds = [r["figures"] for r in results]
    assert all([f["digest"] for f in owner] == [f["digest"] for f in rounds[0]] for owner in rounds)
    saved, state = _saved(pretrained), results[0]["state"]
    compared = 0
    for name in results[0]["roles"]["frozen"]:  # the base, every A (FFA), the head's original copy
        if _saved_name(name) in saved:
            assert torch.equal(state[name], saved[_saved_name(name)]), name  # after 10 rounds, 3 owners
            compared += 1
    assert compared == len([k for k in saved if not k.startswith("classifier.")])  # the whole pretrained body
    unified = _unified_model(pretrained, state)
    base = ViTForImageClassification.from_pretrained(pretrained, num_labels=CLASSES, ignore_mismatched_sizes=True)
    loaded = PeftModel.from_pretrained(base, tmp_path / "adapter").eval()
    x = _images()
    with torch.no_grad():
        assert torch.equal(loaded(pixel_values=x).logits, unified(x))
    assert rounds[0][-1]["acc"] > 1.5 / CLASSES  # it learned something, far from chance


@pytest.mark.slow
def test_exact_lora_folds_into_the_adapted_layers_only_and_saves_merged_safetensors(pretrained, tmp_path):
    from transformers import ViTConfig, ViTForImageClassification

    results = run_world(_owner, 3, pretrained, tmp_path, "lora_exact", 3)
    assert len({r["figures"][-1]["digest"] for r in results}) == 1
    saved, state = _saved(pretrained), results[0]["state"]
    for name in results[0]["roles"]["frozen"]:
        key = _saved_name(name)
        if key in saved:
            folded = name.endswith(".base_layer.weight")  # the residual lands in adapted layers' weights only
            assert torch.equal(state[name], saved[key]) != folded, name
    merged = ViTForImageClassification(ViTConfig.from_pretrained(pretrained, num_labels=CLASSES))
    merged.load_state_dict(load_file(str(tmp_path / "merged.safetensors")))
    x = _images()
    with torch.no_grad():
        torch.testing.assert_close(merged.eval()(pixel_values=x).logits, _unified_model(pretrained, state)(x))


@pytest.mark.slow
def test_the_program_adapts_it_through_model_factory(pretrained, tmp_path):
    env = {"PYTHONPATH": os.pathsep.join([str(FINETUNE), os.environ.get("PYTHONPATH", "")]),
           "FINETUNE_PRETRAINED": str(pretrained)}  # fmt: skip
    proc = torchrun(["train", "--config", str(FINETUNE / "owners.toml"), "--set", "train.max_rounds=2",
                     "--set", f"output.dir={tmp_path / 'run'}"], env=env)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "tensor roles: unified" in proc.stdout + proc.stderr
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["rule_used"] for r in records] == ["lora_exact"] * 2
    assert all([o["digest"] for o in r["owners"]] == [r["digest"]] * 2 for r in records)
    final = torch.load(tmp_path / "run" / "final.pt", weights_only=False)
    assert any(".lora_A." in n for n in final["roles"]["unified"]) and final["roles"]["local"] == []
    assert all(".lora_" not in n for n in final["roles"]["frozen"])
