"""benchmarks/gpu.py (issue 31): its --smoke mode runs the GPU benchmark's code on CPU with tiny shapes in seconds and
writes a results file (Markdown + JSON twin) with every table the CUDA run fills; without CUDA the plain command
writes a file that says "not measured"."""

from __future__ import annotations

import importlib
import json
import sys
from pathlib import Path

import pytest
import torch

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"
pytestmark = pytest.mark.usefixtures("one_thread")  # see conftest.py


@pytest.fixture(scope="module")
def gpu():
    pytest.importorskip("diffusers")
    sys.path.insert(0, str(BENCH))
    try:
        yield importlib.import_module("gpu")
    finally:
        sys.path.remove(str(BENCH))


def test_smoke_mode_writes_every_table(gpu, tmp_path: Path) -> None:
    out = tmp_path / "gpu.md"
    assert gpu.main(["--smoke", "--out", str(out)]) == 0
    text = out.read_text()
    assert "SMOKE MODE" in text
    tables = json.loads(out.with_suffix(".json").read_text())["tables"]
    for section in ("shapes32 train step", "shapes32 network evaluation", "shapes32 20-NFE sample",
                    "shapes32 SDPA backends"):
        assert section in tables, sorted(tables)
    train = tables["shapes32 train step"]
    assert {"eager", "bf16", "diffusers", "diffusers bf16"} <= set(train)
    assert train["diffusers"]["speed vs diffusers fp32"] == "1.00x"
    assert all(isinstance(row["ms"], (int, float)) and row["ms"] > 0 for row in train.values())
    sample = tables["shapes32 20-NFE sample"]
    assert sample["compile"]["s"] == "not compiled in --smoke mode" and sample["diffusers DDIMPipeline"]["s"] > 0
    assert tables["shapes32 SDPA backends"]["MATH"]["ms"] > 0  # the math backend runs anywhere


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA: the real run would start")
def test_without_cuda_the_results_file_says_not_measured(gpu, tmp_path: Path) -> None:
    out = tmp_path / "gpu.md"
    assert gpu.main(["--out", str(out)]) == 0
    assert "Not measured: no CUDA device" in out.read_text()
    assert json.loads(out.with_suffix(".json").read_text())["text"]
