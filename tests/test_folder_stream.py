"""Image folders streamed from disk (issue 27, docs/design.md section 8): the order of examples is a function of
(seed, step) so that resumes are bit-exact with worker processes (also after kill -9), ranks never share an
example within a step, mode and bit-depth conversion follows the stated rule, and bad input (images, metadata,
config) is one line with nothing lost."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from torchdiffusion.data.datasets import load, split_dataset
from torchdiffusion.data.folder import (
    ImageFolder,
    StepBatches,
    decode,
    step_flips,
    step_indices,
)
from torchdiffusion.runs import config as config_mod
from torchdiffusion.runs.train import train
from torchdiffusion.training import distributed
from torchdiffusion.training.checkpoint import load_tensors

pytestmark = pytest.mark.usefixtures("one_thread")  # see conftest.py


def write_folder(root: Path, n: int = 24, size=(10, 12), classes: int = 3, seed: int = 0,
                 text: bool = True) -> Path:
    """``n`` random RGB PNGs with a metadata.jsonl (labels ``i % classes``, captions)."""
    rng = np.random.default_rng(seed)
    root.mkdir(parents=True, exist_ok=True)
    rows = []
    for i in range(n):
        Image.fromarray(rng.integers(0, 256, (size[0], size[1], 3), dtype=np.uint8)).save(root / f"{i:04d}.png")
        row = {"file_name": f"{i:04d}.png", "label": i % classes}
        if text:
            row["text"] = f"picture number {i}"
        rows.append(row)
    (root / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return root


TINY = ["data.size=8", "model.channels=8", "model.num_res_blocks=1", "model.channel_mult=[1]",
        "model.attn_resolutions=[]", "train.batch=8", "data.conditional=true", "train.device=cpu", "data.flip=true",
        "data.holdout=0", "train.ckpt_every=0", "train.log_every=1", "train.threads=1"]


def _state(run: Path) -> dict:
    return load_tensors(run / "train_state.safetensors")[0]


# --- the order of examples -----------------------------------------------------------------------------------
def test_each_step_is_a_pure_function_of_seed_and_step() -> None:
    n, per = 103, 16
    a = [step_indices(n, per, 5, s) for s in range(20)]
    assert all(torch.equal(x, step_indices(n, per, 5, s)) for s, x in enumerate(a))  # recomputed: the same
    assert not torch.equal(a[0], step_indices(n, per, 6, 0))  # another seed, another order
    assert all(len(set(x.tolist())) == per for x in a)  # distinct within a step
    epoch = torch.cat(a[: n // per])  # one epoch: 6 steps of 16 distinct images out of 103
    assert len(set(epoch.tolist())) == (n // per) * per
    assert not torch.equal(a[0], a[n // per])  # the next epoch is another permutation
    small = step_indices(5, 12, 0, 3)  # fewer images than a step: whole permutations, then a cut
    assert sorted(small[:5].tolist()) == list(range(5)) and sorted(small[5:10].tolist()) == list(range(5))
    f = step_flips(per, 5, 7)
    assert torch.equal(f, step_flips(per, 5, 7)) and 0 < int(f.sum()) < per


def test_two_ranks_never_share_an_example_within_a_step() -> None:
    """The ranks' shards of every micro-batch of a step (with accumulation) are disjoint and together are the
    single-process step, shard by shard in the order of distributed.shard."""
    n, batch, accum, world = 50, 8, 2, 2
    ranks = [StepBatches(n, batch, accum, seed=3, start=0, flip=True,
                         shard=distributed.shard(batch, distributed.DistInfo(r, world))) for r in range(world)]
    single = StepBatches(n, batch, accum, seed=3, start=0, flip=True)
    iters = [iter(s) for s in ranks]
    whole = iter(single)
    for _step in range(3 * n // (batch * accum)):  # a few epochs
        seen = [set(), set()]
        for _ in range(accum):
            parts = [next(it) for it in iters]
            assert parts[0] + parts[1] == next(whole)
            for r in range(world):
                seen[r] |= {i for i, _ in parts[r]}
        assert not seen[0] & seen[1]
    resumed = iter(StepBatches(n, batch, accum, seed=3, start=2, flip=True))  # a resume at step 2
    again = iter(StepBatches(n, batch, accum, seed=3, start=0, flip=True))
    for _ in range(2 * accum):
        next(again)
    assert [next(resumed) for _ in range(6)] == [next(again) for _ in range(6)]


def test_streamed_training_resumes_bit_identically_with_workers(tmp_path: Path) -> None:
    """12 steps straight with no worker = 5 steps (2 workers) + 4 steps (1 worker) + the rest (2 workers), with
    flips, accumulation and dropout (torch's global RNG): the DataLoader must not disturb any generator."""
    folder = write_folder(tmp_path / "imgs", n=40)
    sets = [f"data.name={folder}", *TINY, "train.steps=12", "train.accum=2", "model.dropout=0.1"]
    train(config_mod.resolve("images", [*sets, "train.workers=0"]), tmp_path / "a", progress=False)
    train(config_mod.resolve("images", [*sets, "train.workers=2"]), tmp_path / "b", progress=False, stop_after=5)
    train(config_mod.resolve("images", [*sets, "train.workers=1"]), tmp_path / "b", progress=False, stop_after=4)
    train(config_mod.resolve("images", [*sets, "train.workers=2"]), tmp_path / "b", progress=False)
    a, b = _state(tmp_path / "a"), _state(tmp_path / "b")
    assert a.keys() == b.keys() and [k for k in a if not torch.equal(a[k], b[k])] == []


# --- the index ----------------------------------------------------------------------------------------------
def test_metadata_labels_captions_and_class_folders(tmp_path: Path) -> None:
    folder = ImageFolder(write_folder(tmp_path / "m", n=7, classes=3), 8, return_text=True)
    assert len(folder) == 7 and folder.num_classes == 3 and folder.y.tolist() == [i % 3 for i in range(7)]
    x, y, text = folder[4]
    assert x.shape == (3, 8, 8) and x.dtype == torch.float32 and -1 <= float(x.min()) <= float(x.max()) <= 1
    assert y == 1 and text == "picture number 4" and folder.caption(4) == text
    train_part, test_part = split_dataset(folder, 0.3)
    assert len(train_part) + len(test_part) == 7
    assert sorted(map(str, [*map(train_part.path, range(5)), *map(test_part.path, range(2))])) == \
        sorted(str(folder.path(i)) for i in range(7))
    for i in range(5):  # a subset keeps each item's label and caption
        j = [str(folder.path(k)) for k in range(7)].index(str(train_part.path(i)))
        assert train_part.label(i) == folder.label(j) and train_part.caption(i) == folder.caption(j)
    # one sub-folder per class (sorted), any image format
    rng = np.random.default_rng(1)
    for cls, ext in (("cats", "png"), ("dogs", "jpg")):
        for i in range(2):
            (tmp_path / "c" / cls).mkdir(parents=True, exist_ok=True)
            Image.fromarray(rng.integers(0, 256, (9, 9, 3), dtype=np.uint8)).save(tmp_path / "c" / cls / f"{i}.{ext}")
    (tmp_path / "c" / ".hidden").mkdir()
    Image.new("RGB", (9, 9)).save(tmp_path / "c" / ".hidden" / "x.png")  # ignored
    f2 = load(str(tmp_path / "c"), size=8)
    assert isinstance(f2, ImageFolder) and len(f2) == 4 and f2.meta["classes"] == ["cats", "dogs"]
    assert f2.y.tolist() == [0, 0, 1, 1] and f2.caption(0) is None and f2.num_classes == 2


def test_sixteen_bit_grey_keeps_its_bit_depth_and_alpha_goes_over_white(tmp_path: Path) -> None:
    ramp = (np.arange(64, dtype=np.uint16).reshape(8, 8) * 1040)  # 0 .. 65520
    Image.fromarray(ramp).save(tmp_path / "g16.png")  # a 16-bit greyscale PNG
    with Image.open(tmp_path / "g16.png") as im:
        assert im.mode.startswith("I")
    got = decode(tmp_path / "g16.png", 8, 1)[0].astype(np.int64)
    want = (ramp.astype(np.int64) * 255 + 32767) // 65535  # round(v * 255 / 65535)
    assert np.array_equal(got, want) and got[0, 1] == 4 and got[4, 0] == 129  # 1040 -> 4.05, 33280 -> 129.49
    assert int((got == 255).sum()) == 1 and got.min() == 0  # not saturated to white (Pillow's convert("L") would)
    rgba = np.zeros((8, 8, 4), dtype=np.uint8)
    rgba[..., 0], rgba[..., 3] = 200, 0  # red, fully transparent -> white
    rgba[:4, :, 3] = 255  # top half opaque red
    Image.fromarray(rgba, "RGBA").save(tmp_path / "a.png")
    a = decode(tmp_path / "a.png", 8, 3)
    assert (a[:, :4] == np.array([200, 0, 0])[:, None, None]).all() and (a[:, 4:] == 255).all()
    pal = Image.fromarray(np.full((8, 8, 3), (10, 20, 30), dtype=np.uint8)).convert("P", palette=Image.Palette.ADAPTIVE)
    pal.save(tmp_path / "p.png")
    assert (decode(tmp_path / "p.png", 8, 3) == np.array([10, 20, 30])[:, None, None]).all()
    Image.fromarray(np.full((8, 8), 77, dtype=np.uint8), "L").save(tmp_path / "l.png")
    assert (decode(tmp_path / "l.png", 8, 3) == 77).all()  # grey -> RGB repeats the channel
