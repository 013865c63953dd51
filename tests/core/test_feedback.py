"""Feedback on long work: train's final metrics and summary.png, `domainclip show`, compare.png."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from domainclip.core.cli import main
from domainclip.core.compare import CompareConfig, compare_figure

from ..conftest import tiny_recipe


def test_train_prints_final_metrics_writes_summary_png_and_show_describes_the_run(
        colour_squares: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    recipe = tiny_recipe(colour_squares, tmp_path / "runs", max_steps=2)
    recipe["eval"] = [{"name": "squares", "task": "zeroshot", "templates": ["a {} square"], "retention": True,
                       "data": {"format": "csv", "path": str(colour_squares), "label_key": "label"}}]
    (tmp_path / "r.yaml").write_text(yaml.safe_dump(recipe))
    assert main(["train", str(tmp_path / "r.yaml")]) == 0
    out, err = capsys.readouterr()
    result = json.loads(out.strip().splitlines()[-1])
    run = Path(result["run_dir"])
    metrics = json.loads((run / "metrics.json").read_text())[0]
    line = f"squares: acc1 {metrics['metrics']['acc1']:.4f} (base model {metrics['retention']['before']:.4f}"
    assert result["metrics"][0].startswith(line) and f"  {line}" in err
    assert result["summary_png"] == str(run / "summary.png") and (run / "summary.png").stat().st_size > 10_000

    assert main(["show", str(run)]) == 0
    shown = capsys.readouterr().out
    assert "recipe: tiny" in shown and "base model: open_clip domainclip-tiny-vit" in shown
    assert "method: full" in shown and "training: 2 steps" in shown and line in shown
    assert f"weights: {run / 'model' / 'trainable.safetensors'}" in shown and f"plot: {run / 'summary.png'}" in shown
    assert main(["show", str(tmp_path)]) == 2
    assert "is not a run folder: " in capsys.readouterr().err


def _row(method: str, k: int, value: float) -> dict:
    return {"method": method, "shots": k, "plant acc1": value, "plant acc1_std": 0.01, "plant": value,
            "plant_std": 0.01, "runs": 3, "trainable_parameters": 10, "train_seconds": 1.0, "retention_change": None}


def test_compare_plot_names_its_metric_keeps_ties_visible_and_draws_one_k_as_bars() -> None:
    spec = CompareConfig(name="apple", recipe="x", methods={"a": {}, "b": {}}, metric="balanced_accuracy")
    zero = {"plant": 0.3}
    several = compare_figure(spec, zero, [_row(m, k, 0.6) for m in ("lora", "coop") for k in (1, 4, 16)])
    ax = several.axes[0]
    assert ax.get_ylabel() == "plant: balanced_accuracy" and ax.get_xscale() == "log"
    lines = [c.lines[0] for c in ax.containers if c.get_label() in ("lora", "coop")]
    assert len(lines) == 2 and lines[0].get_marker() != lines[1].get_marker()
    assert list(lines[0].get_xdata()) != list(lines[1].get_xdata())  # equal scores, both visible
    single = compare_figure(spec, zero, [_row(m, 4, v) for m, v in (("lora", 0.6), ("coop", 0.5))])
    ax = single.axes[0]
    assert ax.get_xscale() == "linear" and len(ax.patches) == 2
    assert sorted(p.get_height() for p in ax.patches) == [0.5, 0.6]
    assert [t.get_text() for t in ax.get_xticklabels()] == ["coop", "lora"]
    assert ax.get_ylabel() == "plant: balanced_accuracy" and "4 shots" in ax.get_xlabel()


def test_loading_a_trained_run_is_quiet_about_the_replaced_base(colour_squares: Path, tmp_path: Path,
                                                                capfd: pytest.CaptureFixture,
                                                                caplog: pytest.LogCaptureFixture) -> None:
    from domainclip.core import config as config_lib
    from domainclip.core.run_config import RunConfig
    from domainclip.core.train import load_trained, train

    from .test_backbones import save_tiny_hf

    runs = []
    for kind, name in (("open_clip", "domainclip-tiny-vit"), ("hf", str(save_tiny_hf(tmp_path / "hf", "clip")))):
        recipe = tiny_recipe(colour_squares, tmp_path / "runs", max_steps=1)
        recipe["name"], recipe["model"] = f"quiet_{kind}", {"kind": kind, "name": name}
        runs.append(train(config_lib.load(RunConfig, None, (), base=recipe)).run_dir)
    capfd.readouterr()
    caplog.clear()
    with caplog.at_level("INFO"):
        for run in runs:
            load_trained(run)
    err = capfd.readouterr().err
    said = err + "\n".join(r.getMessage() for r in caplog.records)
    assert "initialized randomly" not in said and "Loading weights" not in said
    # the building itself (not followed by trained weights) still says it
    from domainclip.core.backbones import ModelConfig, create_backbone

    with caplog.at_level("WARNING"):
        create_backbone(ModelConfig(kind="open_clip", name="domainclip-tiny-vit"))
    assert "initialized randomly" in caplog.text


class _Terminal:
    """A text stream that says it is a terminal (tqdm draws on it)."""

    def __init__(self, tty: bool):
        self.tty, self.text = tty, ""

    def isatty(self) -> bool:
        return self.tty

    def write(self, text: str) -> int:
        self.text += text
        return len(text)

    def flush(self) -> None:
        pass


def test_progress_shows_done_total_and_eta_on_a_terminal_only() -> None:
    from domainclip.core.progress import progress, set_quiet

    terminal = _Terminal(True)
    assert list(progress(range(3), total=3, desc="compare apple", unit="run", stream=terminal)) == [0, 1, 2]
    assert "compare apple" in terminal.text and "3/3" in terminal.text and "<" in terminal.text  # elapsed<ETA
    pipe = _Terminal(False)
    assert list(progress(range(3), total=3, stream=pipe)) == [0, 1, 2] and pipe.text == ""
    set_quiet(True)
    try:
        quiet = _Terminal(True)
        assert list(progress(range(2), total=2, stream=quiet)) == [0, 1] and quiet.text == ""
    finally:
        set_quiet(False)


def test_compare_help_names_a_bundled_spec(capsys: pytest.CaptureFixture) -> None:
    from domainclip.core.recipe_files import resolve_recipe

    with pytest.raises(SystemExit):
        main(["compare", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    name = text.split("bundled name such as ", 1)[1].split(")")[0]
    assert resolve_recipe(name).is_file() and "--quiet" in text
