"""Reproduction recipes (recipes/remote_sensing/reproduce/) and the weight conversion they need.

The published checkpoints cannot be downloaded here, so the recipes are checked for structure and
run end to end on a tiny open_clip model whose weights go through the same .pt -> safetensors path
a user takes with RemoteCLIP-ViT-B-32.pt.
"""
from __future__ import annotations

import json
import pickle
from pathlib import Path

import open_clip
import pytest
import torch

from domainclip.core import config as config_lib
from domainclip.core.checkpoint import convert_torch_checkpoint
from domainclip.core.cli import main as cli_main
from domainclip.core.run_config import RunConfig

from .make_fake_data import write_karpathy_set

REPRODUCE = Path(__file__).resolve().parents[3] / "recipes" / "remote_sensing" / "reproduce"


class _RunsCode:
    """A pickle payload that would call print() when unpickled without restrictions."""

    def __reduce__(self):  # noqa: ANN204
        return (print, ("unpickled arbitrary code",))


def test_remoteclip_recipe_structure() -> None:
    cfg = config_lib.load(RunConfig, REPRODUCE / "remoteclip_vitb32_rsicd.yaml")
    assert (cfg.model.kind, cfg.model.name) == ("open_clip", "ViT-B-32-quickgelu")
    assert cfg.model.pretrained.endswith(".safetensors")
    assert [(t.task, t.data.format, t.data.split) for t in cfg.eval] == [("retrieval", "rsicd", "test")]


def test_convert_then_eval_reproduces_the_checkpoint(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    model = open_clip.create_model("domainclip-tiny-vit")
    checkpoint = tmp_path / "published.pt"
    # the layout of a DDP-trained release: {"state_dict": {"module.<key>": tensor}}
    torch.save({"state_dict": {f"module.{k}": v for k, v in model.state_dict().items()}, "epoch": 3}, checkpoint)
    converted = tmp_path / "published.safetensors"
    summary = convert_torch_checkpoint(checkpoint, converted)
    assert summary["tensors"] == len(model.state_dict())
    assert summary["parameters"] == sum(v.numel() for v in model.state_dict().values())

    data = write_karpathy_set(tmp_path / "rsicd", per_class=2, numeric=0, size=32)
    out = tmp_path / "metrics.json"
    code = cli_main(["eval", str(REPRODUCE / "remoteclip_vitb32_rsicd.yaml"), "model.name=domainclip-tiny-vit",
                     f"model.pretrained={converted}", f"eval.0.data.path={data}", "eval.0.batch_size=8",
                     f"data.train.path={data}", "--out", str(out)])
    assert code == 0
    capsys.readouterr()
    from domainclip.core.backbones import create_backbone

    # the kit's backbone, built from the recipe's model section as `domainclip eval` builds it
    cfg = config_lib.load(RunConfig, REPRODUCE / "remoteclip_vitb32_rsicd.yaml",
                          ["model.name=domainclip-tiny-vit", f"model.pretrained={converted}"])
    loaded = create_backbone(cfg.model).model.state_dict()
    for key, value in model.state_dict().items():
        assert torch.equal(loaded[key], value), key
    assert not torch.equal(open_clip.create_model("domainclip-tiny-vit").state_dict()["visual.conv1.weight"],
                           model.state_dict()["visual.conv1.weight"])  # a fresh init differs: the check can fail
    metrics = json.loads(out.read_text())[0]["metrics"]
    recalls = [metrics[f"{side}_retrieval_recall@{k}"] for side in ("image", "text") for k in (1, 5, 10)]
    assert metrics["mean_recall"] == pytest.approx(sum(recalls) / 6)


def test_pickled_checkpoint_is_refused_by_the_backbone(tmp_path: Path) -> None:
    from domainclip.core.backbones import create_backbone
    from domainclip.core.backbones.factory import ModelConfig

    with pytest.raises(ValueError, match="convert-weights .*model.pt"):
        create_backbone(ModelConfig(kind="open_clip", name="domainclip-tiny-vit", pretrained=str(tmp_path / "model.pt")))


def test_convert_refuses_code_and_non_tensor_entries(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    evil = tmp_path / "evil.pt"
    evil.write_bytes(pickle.dumps({"weight": _RunsCode()}))
    with pytest.raises(ValueError, match="evil.pt is not a plain tensor checkpoint"):
        convert_torch_checkpoint(evil, tmp_path / "evil.safetensors")
    assert "unpickled arbitrary code" not in capsys.readouterr().out
    assert not (tmp_path / "evil.safetensors").exists()
    mixed = tmp_path / "mixed.pt"
    torch.save({"weight": torch.ones(2), "step": 5}, mixed)
    with pytest.raises(ValueError, match="non-tensor entries.*'step'"):
        convert_torch_checkpoint(mixed, tmp_path / "mixed.safetensors")
    with pytest.raises(KeyError, match="no dict under key 'ema'"):
        convert_torch_checkpoint(mixed, tmp_path / "mixed.safetensors", key="ema")
    with pytest.raises(ValueError, match="must end in .safetensors"):
        convert_torch_checkpoint(mixed, tmp_path / "mixed.pt2")
