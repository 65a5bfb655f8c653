"""Issue 19, part 3: folders of numbered PNGs (exact round trip, batched, resumable, sharded under torchrun) and
real-image metrics through torch-fidelity with a tiny registered feature extractor (offline). The torch-fidelity
tests skip where it cannot be imported (it imports torchvision at import time)."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import torchdiffusion as td
from torchdiffusion.cli.main import main
from torchdiffusion.evaluation.images import (
    fidelity_metrics,
    numbered_pngs,
    parse_metrics,
    read_png_folder,
    to_uint8_chw,
    write_png,
)
from torchdiffusion.evaluation.metrics import frechet_distance
from torchdiffusion.runs import config as config_mod
from torchdiffusion.runs.train import train

pytestmark = pytest.mark.usefixtures("one_thread")


def _images(n: int, c: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, 256, (n, c, 8, 8), generator=torch.Generator().manual_seed(seed), dtype=torch.uint8)


def _write(folder: Path, imgs: torch.Tensor) -> Path:
    for i, im in enumerate(imgs):
        write_png(im, folder / f"{i:06d}.png")
    return folder


@pytest.mark.parametrize("channels", [1, 3])
def test_png_folder_round_trip_is_exact(tmp_path, channels):
    imgs = _images(7, channels)
    _write(tmp_path, imgs)
    assert sorted(numbered_pngs(tmp_path)) == list(range(7))
    assert torch.equal(read_png_folder(tmp_path), imgs)
    x = imgs.float() / 127.5 - 1  # values in [-1, 1] map back to the same bytes
    assert torch.equal(to_uint8_chw(x), imgs)
    with pytest.raises(ValueError, match="uint8"):
        write_png(imgs[0].float(), tmp_path / "bad.png")


def test_metric_names_are_checked():
    assert parse_metrics("fid, KID") == ["fid", "kid"]
    with pytest.raises(ValueError, match="allowed: fid, kid, isc, prc"):
        parse_metrics("fid,lpips")


def _features(imgs: torch.Tensor) -> torch.Tensor:
    """A tiny fixed feature map: 4x4 average pooling of the [0, 1] RGB image, then a fixed random projection."""
    x = imgs.expand(-1, 3, -1, -1).float() / 255
    pooled = torch.nn.functional.adaptive_avg_pool2d(x, 4).flatten(1)  # 48 numbers
    w = torch.randn(48, 12, generator=torch.Generator().manual_seed(0))
    return torch.tanh(pooled @ w)


def test_our_frechet_distance_of_a_folder_against_itself_is_zero(tmp_path):
    _write(tmp_path, _images(40, 3))
    f = _features(read_png_folder(tmp_path))
    assert abs(frechet_distance(f, f)) < 1e-8
    assert frechet_distance(f, _features(_images(40, 3, seed=1))) > 1e-3


# --- torch-fidelity -------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny_extractor():
    tf = pytest.importorskip("torch_fidelity")

    class Tiny(tf.FeatureExtractorBase):
        """``feat``: :func:`_features`; ``logits``: a fixed linear map of them to 10 classes (for IS)."""

        def __init__(self, name, features_list, **kwargs):
            super().__init__(name, features_list)
            self.register_buffer("head", torch.randn(12, 10, generator=torch.Generator().manual_seed(1)))

        @staticmethod
        def get_provided_features_list():
            return ("feat", "logits")

        @staticmethod
        def get_default_feature_layer_for_metric(metric):
            return "logits" if metric == "isc" else "feat"

        @staticmethod
        def can_be_compiled():
            return False

        @staticmethod
        def get_dummy_input_for_compile():
            return torch.zeros(1, 3, 8, 8, dtype=torch.uint8)

        def forward(self, x):
            f = _features(x)
            out = {"feat": f, "logits": f @ self.head}
            return tuple(out[k] for k in self.features_list)

    tf.register_feature_extractor("td-tiny", Tiny)
    return "td-tiny"


def test_fidelity_fid_of_a_folder_against_itself_is_zero(tiny_extractor, tmp_path):
    _write(tmp_path / "a", _images(40, 3))
    res = fidelity_metrics(tmp_path / "a", tmp_path / "a", ["fid", "kid", "isc", "prc"],
                           feature_extractor=tiny_extractor, kid_subset_size=20)
    assert abs(res["fid"]) < 1e-6
    assert abs(res["kid_mean"]) <= 3 * res["kid_std"]  # unbiased MMD^2 on random subsets: 0 within its spread
    assert res["precision"] == 1.0 and res["recall"] == 1.0 and res["isc_mean"] >= 1.0


def test_our_frechet_distance_equals_torch_fidelitys(tiny_extractor, tmp_path):
    a, b = _images(50, 3), _images(40, 1, seed=2)  # a grey folder is scored as RGB
    res = fidelity_metrics(a, _write(tmp_path / "b", b), ["fid"], feature_extractor=tiny_extractor)
    ours = frechet_distance(_features(a), _features(b))
    assert ours > 1e-3
    assert abs(res["fid"] - ours) <= 1e-5 * max(1.0, ours)


# --- sample --out DIR/ ----------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def digits_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("imgs")
    sets = ["model.channels=8", "model.num_res_blocks=1", "train.batch=8", "train.ckpt_every=0", "train.log_every=2",
            "train.threads=0", "train.warmup=1", "train.device=cpu", "train.steps=2", "sample.steps=3",
            "data.conditional=false", "process.T=100"]
    train(config_mod.resolve("digits", sets), root / "run", progress=False)
    return root / "run"


def _bytes(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.glob("*.png"))}


def test_sample_folder_is_batched_resumable_and_equals_the_pipeline(digits_run, tmp_path, capsys):
    out = tmp_path / "s"
    assert main(["sample", str(digits_run), "--n", "5", "--out", f"{out}/", "--batch-size", "2", "--quiet",
                 "--seed", "3"]) == 0
    assert "wrote 5 samples" in capsys.readouterr().out
    first = _bytes(out)
    assert sorted(first) == [f"{i:06d}.png" for i in range(5)]
    x = td.Pipeline.from_pretrained(digits_run)(n=5, generator=torch.Generator().manual_seed(3))
    assert torch.equal(read_png_folder(out), to_uint8_chw(x))  # the same samples as the Pipeline, as uint8
    for name in ("000001.png", "000004.png"):  # an interrupted run: the missing files are drawn again
        (out / name).unlink()
    assert main(["sample", str(digits_run), "--n", "5", "--out", str(out), "--quiet", "--seed", "3"]) == 0
    again = capsys.readouterr().out
    assert "wrote 2 samples" in again and "3 were already there" in again
    assert _bytes(out) == first


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_sharded_sampling_under_torchrun_writes_the_same_images(digits_run, tmp_path):
    """``torchrun --nproc_per_node 2 -m torchdiffusion -- sample RUN --n 5 --out DIR/``: two CPU ranks split the
    indices and write byte-identical PNGs to one process's; one summary line. (The ``--`` keeps torchrun's own
    parser from reading ``--n`` as an abbreviation of its ``--nnodes``/``--nproc_per_node``.)"""
    one = tmp_path / "one"
    assert main(["sample", str(digits_run), "--n", "5", "--out", f"{one}/", "--quiet"]) == 0
    torchrun = Path(sys.executable).with_name("torchrun")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([str(torchrun), "--nproc_per_node", "2", "--master_port", str(_free_port()), "-m",
                           "torchdiffusion", "--", "sample", str(digits_run), "--n", "5", "--quiet",
                           "--out", f"{tmp_path / 'two'}/"], capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.count("wrote 5 samples") == 1, proc.stdout
    assert _bytes(tmp_path / "two") == _bytes(one)


def test_eval_ref_errors_are_one_line(digits_run, tmp_path, capsys):
    _write(tmp_path / "ref", _images(4, 1))
    assert main(["eval", str(digits_run), "--ref", str(tmp_path / "ref"), "--metrics", "fid,nope"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "allowed: fid, kid, isc, prc" in err
    try:
        import torch_fidelity  # noqa: F401
    except ImportError:
        assert main(["eval", str(digits_run), "--ref", str(tmp_path / "ref"), "--n", "4"]) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and "torch-fidelity" in err
        assert not (digits_run / "eval_samples").exists()  # refused before sampling


def test_eval_ref_with_tiny_extractor(tiny_extractor, digits_run, tmp_path, capsys):
    _write(tmp_path / "ref", _images(6, 1))
    args = ["eval", str(digits_run), "--ref", str(tmp_path / "ref"), "--metrics", "fid,kid,prc", "--samples",
            str(tmp_path / "s"), "--feature-extractor", tiny_extractor, "--json", str(tmp_path / "m.json"), "--quiet"]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "fid" in out and "kid_mean" in out and "precision" in out
    assert len(numbered_pngs(tmp_path / "s")) == 6
    assert np.isfinite(__import__("json").loads((tmp_path / "m.json").read_text())["fid"])
