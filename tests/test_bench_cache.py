"""benchmarks/likelihood.py reports cached scores only for the recipe that made them (a renamed or changed recipe
must not inherit another run's numbers)."""

from __future__ import annotations

import importlib
import json
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"


@pytest.fixture(scope="module")
def bench():
    sys.path.insert(0, str(BENCH))
    try:
        yield importlib.import_module("likelihood")
    finally:
        sys.path.remove(str(BENCH))


def _folder(tmp_path: Path, name: str, cfg: dict) -> Path:
    (tmp_path / name).mkdir()
    (tmp_path / name / "config.json").write_text(json.dumps({**cfg, "run": {"data_shape": [1, 8, 8]}}))
    return tmp_path


def test_cached_scores_of_the_same_recipe_pass(bench, tmp_path):
    name = "without augmentation (short)"
    _, cfg = bench.recipe(name, 1000, False, threads=2)  # threads, device and logging are not the recipe
    cfg["train"]["log_every"] = 7
    bench.check_cached(name, _folder(tmp_path, name, cfg), 1000, False)


@pytest.mark.parametrize("change", [("data", "augment", 0.2), ("train", "steps", 2000), ("loss", "dequantize", "none")])
def test_cached_scores_of_another_recipe_are_refused(bench, tmp_path, change):
    name = "without augmentation (short)"
    _, cfg = bench.recipe(name, 1000, False)
    sec, key, value = change
    cfg[sec][key] = value
    work = _folder(tmp_path, name, cfg)
    with pytest.raises(SystemExit, match=rf"another recipe .*differs in {sec}\.{key}\b"):
        bench.check_cached(name, work, 1000, False)


def test_cached_scores_without_a_config_are_refused(bench, tmp_path):
    (tmp_path / "digits").mkdir()
    with pytest.raises(SystemExit, match="no config.json"):
        bench.check_cached("digits", tmp_path, 1000, False)
