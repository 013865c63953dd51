"""Every recipe and comparison spec shipped in ``recipes/`` validates (types, keys, methods)."""
from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from domainclip.core import config as config_lib
from domainclip.core.compare import CompareConfig, _recipe_dict, run_configs
from domainclip.core.run_config import RunConfig

RECIPES = Path(__file__).resolve().parents[2] / "recipes"
FILES = sorted(p for p in RECIPES.rglob("*.yaml") if "sample_data" not in p.parts)


def is_compare_spec(path: Path) -> bool:
    return "recipe" in (yaml.safe_load(path.read_text()) or {})


def test_recipes_are_found() -> None:
    assert len(FILES) >= 5, FILES


@pytest.mark.parametrize("path", FILES, ids=[str(p.relative_to(RECIPES)) for p in FILES])
def test_shipped_recipe_validates(path: Path, tmp_path: Path) -> None:
    if is_compare_spec(path):
        spec = config_lib.load(CompareConfig, path, [f"output_dir={tmp_path}"])
        recipe = _recipe_dict(spec, path.parent)
        runs = run_configs(spec, recipe, tmp_path)
        assert len(runs) == len(spec.methods) * len(spec.shots) * len(spec.seeds)
        for _, _, _, values in runs:  # each (method, k, seed) is a valid run recipe
            config_lib.from_dict(RunConfig, values)
    else:
        cfg = config_lib.load(RunConfig, path)
        assert cfg.name
        for source in [cfg.data.train, *[task.data for task in cfg.eval]]:
            assert all(isinstance(v, str) and v for v in (source.class_names or {}).values()), source.class_names
