"""The generated shapes data set (issue 27, data/shapes.py) and ``torchdiffusion make-data``: deterministic per seed,
attributes that match the pixels, fixed disjoint splits, captions built from the attributes, the imagefolder layout,
and one-line errors for bad input."""

from __future__ import annotations

import hashlib
import json
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

from helpers import one_line_error
from torchdiffusion.cli.main import main
from torchdiffusion.data import datasets, shapes

pytestmark = pytest.mark.usefixtures("one_thread")


def _digest(a: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(a).tobytes()).hexdigest()


def _shape_mask(attrs: dict, size: int) -> np.ndarray:
    """Pixels touched by the shape: where the image drawn in black and in white differ."""
    black = shapes.render(attrs, size, fill=(0, 0, 0)).astype(int)
    white = shapes.render(attrs, size, fill=(255, 255, 255)).astype(int)
    return (white - black).max(-1) > 0


def test_examples_are_deterministic_per_seed():
    a, attrs_a = shapes.example(7, "train", seed=3)
    b, attrs_b = shapes.example(7, "train", seed=3)
    assert np.array_equal(a, b) and attrs_a == attrs_b
    c, _ = shapes.example(7, "train", seed=4)
    assert not np.array_equal(a, c)
    assert a.dtype == np.uint8 and a.shape == (32, 32, 3)


@pytest.mark.parametrize("size", [16, 32, 64])
def test_attributes_match_the_pixels(size):
    for i in range(40):
        img, at = shapes.example(i, "test", size=size, seed=1)
        # the fill colour at the centre is exactly the recorded one, and it is of the recorded colour name/family
        cx, cy = at["cx"], at["cy"]
        assert img[int(cy), int(cx)].tolist() == at["rgb"], (i, at)
        nearest = min(shapes.COLORS, key=lambda c: np.abs(np.array(shapes.COLORS[c]) - at["rgb"]).sum())
        assert nearest == at["color"] and at["color"] in shapes.FAMILIES[at["color_family"]]
        assert shapes.CLASSES[at["label"]] == f"{at['color_family']} {at['shape']}" and at["label"] == i % 10
        # the shape's pixels: inside the recorded bbox (1 px of anti-aliasing), reaching its edges
        mask = _shape_mask(at, size)
        ys, xs = np.nonzero(mask)
        x0, y0, x1, y1 = at["bbox"]
        assert xs.min() >= np.floor(x0) - 1 and xs.max() <= np.ceil(x1) and ys.min() >= np.floor(y0) - 1
        assert ys.max() <= np.ceil(y1)
        assert xs.min() <= x0 + 1 and xs.max() >= x1 - 2 and ys.min() <= y0 + 1 and ys.max() >= y1 - 2
        # its centroid (weighted by coverage) is the recorded centre; the position name is its cell of the grid
        w = (shapes.render(at, size, fill=(255, 255, 255)).astype(float)
             - shapes.render(at, size, fill=(0, 0, 0)).astype(float)).mean(-1)
        gy, gx = np.mgrid[0:size, 0:size] + 0.5
        mx, my = (w * gx).sum() / w.sum(), (w * gy).sum() / w.sum()
        assert abs(mx - cx) < 0.04 * size and abs(my - cy) < 0.04 * size, (i, at["shape"], mx, my, cx, cy)
        col, row = int(np.digitize(mx / size, [0.4, 0.6])), int(np.digitize(my / size, [0.4, 0.6]))
        assert shapes.POSITIONS[3 * row + col] == at["position"], (i, at)
        # the size name is the nearest of the radius classes, and the shape covers about its area
        frac = at["radius"] / size
        assert min(shapes.SIZES, key=lambda s: abs(shapes.SIZES[s] - frac)) == at["size"]
        assert w.sum() / 255 > 0.5 * at["radius"] ** 2


def test_caption_is_built_from_the_attributes():
    at = {"size": "small", "color": "red", "shape": "triangle", "position": "upper left", "background": "striped"}
    assert shapes.caption(at) == "a small red triangle in the upper left on a striped background"
    for i in range(20):
        _, at = shapes.example(i, seed=2)
        words = at["text"]
        for k in ("size", "color", "shape", "background"):
            assert f" {at[k]} " in f" {words} "
        assert shapes.POSITION_PHRASES[at["position"]] in words


def test_backgrounds_differ_and_never_take_the_shapes_hue():
    seen = set()
    for i in range(60):
        img, at = shapes.example(i, seed=0)
        seen.add(at["background"])
        bg = np.array(at["background_rgb"])
        assert bg.max() - bg.min() <= 30  # a muted grey: the shape's colour stands out
        corner = img[0, 0].astype(int) if at["cx"] > 10 and at["cy"] > 10 else img[-1, -1].astype(int)
        if at["background"] == "plain":
            assert np.abs(corner - bg).max() <= 1
    assert seen == set(shapes.BACKGROUNDS)


def test_written_folder_layout_splits_and_loader_labels(tmp_path):
    out = tmp_path / "sh"
    info = shapes.write_shapes(out, 30, n_test=20, size=16, seed=5)
    assert info["splits"] == {"train": 30, "test": 20} and info["classes"] == list(shapes.CLASSES)
    for split, n in (("train", 30), ("test", 20)):
        rows = shapes.read_metadata(out / split)
        assert len(rows) == n
        for i, r in enumerate(rows):
            img, at = shapes.example(i, split, size=16, seed=5)
            assert r == {"file_name": f"{shapes.class_folder(i % 10)}/{i:06d}.png", **at}
            saved = np.asarray(Image.open(out / split / r["file_name"]))
            assert np.array_equal(saved, img)  # PNG is lossless
        m = shapes.read_marker(out / split)
        assert m["split"] == split and m["root"] == str(out.resolve()) and m["seed"] == 5
    assert shapes.read_marker(out)["root"] == str(out.resolve())
    assert shapes.read_marker(tmp_path) is None
    # the splits are disjoint streams
    train, _ = shapes.load_split(out, "train")
    test, _ = shapes.load_split(out, "test")
    assert not {_digest(a) for a in train} & {_digest(a) for a in test}
    # the image-folder loader (data.name=DIR) takes labels from metadata.jsonl's `label` column, or, without it, from
    # the class sub-folders: both give the recorded labels
    want = {r["file_name"]: r["label"] for r in shapes.read_metadata(out / "train")}
    bare = tmp_path / "bare"
    shutil.copytree(out / "train", bare, ignore=shutil.ignore_patterns("metadata.jsonl", "dataset.json"))
    for folder in (out / "train", bare):
        ds = datasets.load(str(folder), size=16, channels=3, label_key="label" if folder != bare else None)
        got = {ds.path(i).relative_to(folder).as_posix(): int(ds.label(i)) for i in range(len(ds))}
        assert got == want


def test_fixed_splits_do_not_depend_on_the_count(tmp_path):
    shapes.write_shapes(tmp_path / "a", 12, n_test=4, size=16, seed=9)
    shapes.write_shapes(tmp_path / "b", 25, n_test=6, size=16, seed=9)
    for split, n in (("train", 12), ("test", 4)):
        xa, ra = shapes.load_split(tmp_path / "a", split)
        xb, rb = shapes.load_split(tmp_path / "b", split, limit=n)
        assert np.array_equal(xa, xb) and ra == rb
    idx = shapes.attribute_indices(shapes.read_metadata(tmp_path / "b" / "train"))
    assert idx["label"].tolist() == [i % 10 for i in range(25)]
    assert set(idx) == {"label", *shapes.ATTRIBUTES}


def test_make_data_cli(tmp_path, capsys):
    out = tmp_path / "d"
    assert main(["make-data", "shapes", str(out), "--n", "10", "--n-test", "10", "--size", "16", "--seed", "1",
                 "--quiet"]) == 0
    assert "wrote 10 training and 10 test images" in capsys.readouterr().out
    meta = json.loads((out / "dataset.json").read_text())
    assert meta["dataset"] == "shapes" and meta["size"] == 16
    # a non-empty folder is refused without --force; with it, the old splits are replaced (no stale images)
    assert "not empty" in one_line_error(capsys, "make-data", "shapes", str(out), "--n", "10")
    assert main(["make-data", "shapes", str(out), "--n", "10", "--n-test", "0", "--size", "16", "--force",
                 "--quiet"]) == 0
    assert not (out / "test").exists() and len(list((out / "train").rglob("*.png"))) == 10
    assert "--n must be a whole number >= 1" in one_line_error(capsys, "make-data", "shapes", str(tmp_path / "e"),
                                                               "--n", "0")
    assert "--size 33 is not supported" in one_line_error(capsys, "make-data", "shapes", str(tmp_path / "e"),
                                                          "--size", "33")
    assert "unknown data set 'circles'" in one_line_error(capsys, "make-data", "circles", str(tmp_path / "e"))
    f = tmp_path / "file"
    f.write_text("x")
    assert "is a file" in one_line_error(capsys, "make-data", "shapes", str(f), "--force")
    assert not (tmp_path / "e").exists()  # refused before anything was written


def test_images_stay_in_range_and_classes_are_balanced():
    x = torch.stack([torch.from_numpy(shapes.example(i, seed=0)[0]) for i in range(50)])
    assert x.dtype == torch.uint8 and x.float().std() > 20
    assert torch.bincount(torch.tensor([shapes.example(i)[1]["label"] for i in range(50)])).tolist() == [5] * 10


# ---- the judge (evaluation/shapes.py) ----------------------------------------------------------------------------
def test_background_cells_tell_a_gradient_from_a_plain_background():
    """The judge's low-frequency input (evaluation/shapes.py background_cells): flat on plain backgrounds, a ramp of
    at least 0.15 (in [-1, 1] units) on gradient ones, and the saturated shape is masked out of it."""
    from torchdiffusion.evaluation import shapes as judge_mod

    spans = {"plain": [], "gradient": []}
    for i in range(80):
        img, at = shapes.example(i, seed=0)
        if at["background"] in spans:
            x = judge_mod.to_float(torch.from_numpy(img).permute(2, 0, 1)[None])
            cells = judge_mod.background_cells(x, x.amax(1, keepdim=True) - x.amin(1, keepdim=True))
            assert cells.shape == (1, 48)
            spans[at["background"]].append(float(cells.max() - cells.min()))
    assert len(spans["plain"]) > 5 and len(spans["gradient"]) > 5
    assert max(spans["plain"]) < 0.1 < 0.15 < min(spans["gradient"])


@pytest.fixture(scope="module")
def judged(tmp_path_factory):
    """A tiny shapes folder (16x16) and a judge trained on its train split, cached in a private cache folder."""
    import os

    from torchdiffusion.evaluation import shapes as judge_mod

    root = tmp_path_factory.mktemp("judged")
    shapes.write_shapes(root / "data", 700, n_test=200, size=16, seed=0)
    old = os.environ.get("TORCHDIFFUSION_CACHE")
    os.environ["TORCHDIFFUSION_CACHE"] = str(root / "cache")
    try:
        judge = judge_mod.ShapesJudge(root / "data" / "train", n_train=600, n_ref=100, epochs=25)
        yield root, judge
    finally:
        if old is None:
            os.environ.pop("TORCHDIFFUSION_CACHE")
        else:
            os.environ["TORCHDIFFUSION_CACHE"] = old


def test_judge_scores_real_test_images_highly_and_wrong_or_noise_images_low(judged):
    _, judge = judged
    x, y = judge.x_ref, judge.y_ref  # real held-out test images and their classes
    assert judge.accuracy(x, y) > 0.8
    att = judge.attribute_accuracy(x, y)
    assert att["color_family"] > 0.95 and att["shape"] > 0.8
    assert judge.accuracy(x, (y + 1) % 10) < 0.15  # the wrong classes requested
    tv = judge.attribute_tv(judge.x_real)  # other real images: the same mix of the free attributes
    assert max(tv.values()) < 0.2
    fl = judge.fd_floor_bootstrap(n_boot=100)
    assert fl.lo <= fl.floor <= fl.hi and fl.floor == pytest.approx(judge.fd(judge.x_real, judge.y_real))
    noise = torch.rand(100, 3, 16, 16, generator=torch.Generator().manual_seed(0)) * 2 - 1
    assert judge.fd(noise) > 5 * fl.hi
    plain = judge.x_ref.clone()
    plain[:] = plain.mean((2, 3), keepdim=True)  # the shapes smeared away: colour kept, shape gone
    assert judge.fd(plain, y) > 2 * fl.hi and judge.attribute_accuracy(plain, y)["shape"] < 0.6
    # one class for every sample: FD far above the floor though each sample is a real image
    one = judge.x_real[judge.y_real == 3]
    assert judge.fd(one.repeat(10, 1, 1, 1)[:100]) > 2 * fl.hi


def test_judge_is_cached_and_never_retrained(judged, monkeypatch):
    from torchdiffusion.evaluation import shapes as judge_mod

    root, judge = judged
    assert judge.weights_path.is_file() and judge.meta_path.is_file()
    meta = json.loads(judge.meta_path.read_text())
    assert meta["settings"]["n_train"] == 600 and "first 600 images" in meta["trained_on"]
    monkeypatch.setattr(judge_mod, "_LOADED", {})
    monkeypatch.setattr(judge_mod, "train_judge", lambda *a, **k: pytest.fail("the cached judge was retrained"))
    again = judge_mod.ShapesJudge(root / "data", n_train=600, n_ref=100, epochs=25)
    assert again is not judge
    assert torch.equal(again.features(judge.x_ref[:5]), judge.features(judge.x_ref[:5]))
    with pytest.raises(ValueError, match="not a shapes data folder"):
        judge_mod.ShapesJudge(root)
    with pytest.raises(ValueError, match="expected 16x16 images"):
        judge.accuracy(torch.zeros(2, 3, 32, 32), 0)


def test_shapes_presets_validate_and_build():
    from torchdiffusion.runs import config as config_mod
    from torchdiffusion.runs.build import build_model, run_kind

    px = config_mod.resolve("shapes32")
    assert px["data"]["name"].endswith("/train") and px["data"]["holdout"] == 0.0 and px["data"]["conditional"]
    assert (px["sample"]["sampler"], px["sample"]["steps"]) == ("ddim", 20)
    net = build_model(px, (3, 32, 32), 10)
    x = torch.zeros(2, 3, 32, 32)
    assert net.eps(x, torch.tensor([10, 500]), cond=torch.tensor([0, 9])).shape == x.shape
    vae = config_mod.resolve("vae_shapes32")
    assert run_kind(vae) == "autoencoder"
    ae = build_model(vae, (3, 32, 32))
    assert ae.latent_shape == (4, 8, 8)  # 8x8x4 latents
    lat = config_mod.resolve("latent_shapes32", ["data.autoencoder=runs/vae"])
    assert run_kind(lat) == "latent" and (lat["sample"]["sampler"], lat["sample"]["steps"]) == ("ddim", 20)
    lnet = build_model(lat, (4, 8, 8), 10)
    z = torch.zeros(2, 4, 8, 8)
    assert lnet.eps(z, torch.tensor([10, 500]), cond=torch.tensor([0, 9])).shape == z.shape


def test_eval_uses_the_judge_for_a_shapes_run(judged, tmp_path, capsys, monkeypatch):
    from torchdiffusion.cli import eval as eval_cli
    from torchdiffusion.runs import config as config_mod
    from torchdiffusion.runs.train import train

    root, judge = judged
    cfg = config_mod.resolve("shapes32", [f"data.name={root / 'data' / 'train'}", "data.size=16",
                                          "model.channels=8", "model.attn_resolutions=[]", "train.steps=2",
                                          "train.batch=8", "train.ckpt_every=0", "train.threads=1"])
    train(cfg, tmp_path / "run", progress=False)
    assert eval_cli.shapes_root(json.loads((tmp_path / "run" / "config.json").read_text())) == str(
        (root / "data").resolve())
    used = []
    real = eval_cli.ShapesJudge

    def spy(path, **kw):  # the judge of the fixture (same folder), recorded
        used.append(path)
        return judge if path == str((root / "data").resolve()) else real(path, **kw)
    monkeypatch.setattr(eval_cli, "ShapesJudge", spy)
    out = tmp_path / "scores.json"
    assert main(["eval", str(tmp_path / "run"), "--n", "100", "--steps", "2", "--quiet", "--json", str(out)]) == 0
    line = capsys.readouterr().out
    assert line.startswith("shapes: 100 samples (ddim, 2 NFE") and "real-data floor" in line
    res = json.loads(out.read_text())
    fl = judge.fd_floor_bootstrap()
    assert used and res["fd_floor"] == pytest.approx(fl.floor) and res["fd_floor_hi"] == pytest.approx(fl.hi)
    assert 0 <= res["accuracy"] <= 1 and res["fd"] > fl.hi  # two training steps: far from the real images
