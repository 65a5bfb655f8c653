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

from helpers import one_line_error
from torchdiffusion.cli.main import main
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


# --- kill -9 and Ctrl-C with worker processes ----------------------------------------------------------------
def _cli_sets(folder: Path, steps: int) -> list[str]:
    return [x for s in [f"data.name={folder}", *TINY, f"train.steps={steps}", "train.ckpt_every=3",
                        "train.workers=2"] for x in ("--set", s)]


@pytest.mark.slow  # 3 training processes: ~20 s on an idle 2-core machine, ~65 s under the helpers' load
def test_kill_9_twice_and_ctrl_c_resume_bit_identically_with_two_workers(tmp_path: Path) -> None:
    """A real `torchdiffusion train` on an image folder with train.workers=2 is killed with SIGKILL at two seeded
    steps and stopped once by Ctrl-C sent to its whole process group (the workers get it too, as from a
    terminal); each time the same command resumes. The end state (weights, EMA, optimizer, RNG, log) equals an
    uninterrupted run's without workers. (The kill -9 machinery is tests/test_faults.py's.)"""
    import os
    import random
    import signal
    import subprocess
    import sys

    from test_faults import RUN_FILES, _env, assert_same, drive, log_steps, state, wait_for

    folder = write_folder(tmp_path / "imgs", n=40)
    steps = 24
    ref = tmp_path / "reference"
    argv_ref = ["train", "images", "--out", str(ref), *_cli_sets(folder, steps), "--set", "train.workers=0",
                "--quiet"]
    assert main(argv_ref) == 0
    run = tmp_path / "run"
    argv = ["train", "images", "--out", str(run), *_cli_sets(folder, steps), "--quiet"]
    rng = random.Random(27)
    k1, k2 = rng.randint(2, 8), rng.randint(14, 20)
    p = drive("step", k1, argv)
    assert p.returncode == -signal.SIGKILL, p.stderr[-800:]
    assert 0 < log_steps(run) <= k1
    # Ctrl-C from a terminal reaches the trainer and its workers: the step finishes, a checkpoint is written
    q = subprocess.Popen([sys.executable, "-m", "torchdiffusion", *argv], stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True, env=_env(), start_new_session=True)
    wait_for(lambda: log_steps(run) >= k1 + 2 or q.poll() is not None)
    os.killpg(q.pid, signal.SIGINT)
    _, err = q.communicate(timeout=120)
    assert q.returncode == 128 + signal.SIGINT, err[-800:]
    assert "checkpoint saved" in err and "Traceback" not in err
    saved = load_tensors(run / "train_state.safetensors")[1]["step"]
    assert saved < k2, "stopped too late for the second kill"
    p = drive("step", k2, argv)
    assert p.returncode == -signal.SIGKILL, p.stderr[-800:]
    assert main(argv) == 0
    assert_same(state(run), state(ref))
    assert {x.name for x in run.iterdir()} == RUN_FILES


# --- bad input: one line, nothing lost ------------------------------------------------------------------------
def _train_argv(folder: Path, out: Path, *sets: str) -> list[str]:
    return ["train", "images", "--out", str(out),
            *[x for s in [f"data.name={folder}", *TINY, "train.steps=4", *sets] for x in ("--set", s)], "--quiet"]


def _bomb(path: Path, width: int, height: int) -> None:
    """A PNG whose header claims ``width x height`` pixels (the data is a 1x1 image's): Pillow's bomb check
    reads the size from the header."""
    import struct
    import zlib

    Image.new("L", (1, 1)).save(path)
    b = bytearray(path.read_bytes())
    b[16:24] = struct.pack(">II", width, height)
    b[29:33] = struct.pack(">I", zlib.crc32(bytes(b[12:29])))
    path.write_bytes(bytes(b))


@pytest.mark.parametrize("workers", [0, 2])
def test_bad_images_are_one_line_naming_the_file(tmp_path: Path, capsys, workers: int) -> None:
    """Corrupt, truncated, bomb-sized and float images stop training with one line naming the file (from the
    loader's worker processes too); a folder without images is refused; nothing is written."""
    folder = write_folder(tmp_path / "imgs", n=8)
    good = (folder / "0003.png").read_bytes()
    out = tmp_path / "run"
    cases = {
        "corrupt": (lambda p: p.write_bytes(b"\x89PNG\r\n\x1a\n this is not a png"), "corrupt or unreadable image"),
        "truncated": (lambda p: p.write_bytes(good[: len(good) // 2]), "corrupt or unreadable image"),
        "bomb warning": (lambda p: _bomb(p, 10_000, 10_000), "too large to decode safely"),
        "bomb error": (lambda p: _bomb(p, 30_000, 30_000), "too large to decode safely"),
        "float": (lambda p: Image.fromarray(np.zeros((8, 8), np.float32)).save(p.with_suffix(".tif")),
                  "mode F"),
    }
    for what, (make, expected) in cases.items():
        bad = folder / "0003.png"
        if what == "float":
            bad.unlink()
            make(bad)
            bad = bad.with_suffix(".tif")
            rows = (folder / "metadata.jsonl").read_text().replace("0003.png", "0003.tif")
            (folder / "metadata.jsonl").write_text(rows)
        else:
            make(bad)
        msg = one_line_error(capsys, *_train_argv(folder, out, "train.batch=8", f"train.workers={workers}"))
        assert expected in msg and str(bad) in msg, (what, msg)
        assert not out.exists(), what  # refused at the first batch: no trace
    (tmp_path / "none").mkdir()
    (tmp_path / "none" / "readme.txt").write_text("no images")
    msg = one_line_error(capsys, *_train_argv(tmp_path / "none", out))
    assert "no images" in msg and str(tmp_path / "none") in msg and not out.exists()


def test_a_bad_image_met_later_keeps_the_progress_and_skip_replaces_it(tmp_path: Path, capsys) -> None:
    """A truncated image first drawn at step s > 0 stops the run with a checkpoint of step s; once the file is
    repaired the same command ends bit-identical to a run on the good folder. With data.on_bad_image=skip the run
    goes on, the file named once, its draws given to the next image in the folder's order."""
    folder = write_folder(tmp_path / "imgs", n=16)
    ref = tmp_path / "ref"
    assert main(_train_argv(folder, ref, "train.steps=8", "train.ckpt_every=0")) == 0
    seed, per = 0, 8
    first = next(s for s in range(100) if 5 in step_indices(16, per, seed, s).tolist())
    assert first > 0
    bad = folder / "0005.png"
    good = bad.read_bytes()
    bad.write_bytes(good[: len(good) // 3])
    run = tmp_path / "run"
    msg = one_line_error(capsys, *_train_argv(folder, run, "train.steps=8", "train.ckpt_every=0"))
    assert str(bad) in msg and f"checkpoint saved at step {first}" in msg and "on_bad_image=skip" in msg
    assert load_tensors(run / "train_state.safetensors")[1]["step"] == first
    bad.write_bytes(good)
    assert main(_train_argv(folder, run, "train.steps=8", "train.ckpt_every=0")) == 0
    a, b = _state(ref), _state(run)
    assert [k for k in a if not torch.equal(a[k], b[k])] == []
    # skip: the run finishes; the file is named once; item 5 reads as item 6
    bad.write_bytes(good[: len(good) // 3])
    capsys.readouterr()
    assert main(_train_argv(folder, tmp_path / "skip", "train.steps=8", "data.on_bad_image=skip")) == 0
    err = capsys.readouterr().err
    assert err.count(f"skipped (data.on_bad_image=skip): corrupt or unreadable image {bad}") == 1, err
    f = ImageFolder(folder, 8, on_bad_image="skip")
    x5, y5, skipped = f.read(5)
    x6, y6, _ = f.read(6)
    assert np.array_equal(x5, x6) and y5 == y6 == 0 and len(skipped) == 1


def _meta_case(tmp_path: Path, rows: list, raw: bytes | None = None) -> Path:
    folder = write_folder(tmp_path / f"m{len(list(tmp_path.iterdir()))}", n=4, text=False)
    (folder / "metadata.jsonl").write_bytes(raw if raw is not None else
                                            "".join(json.dumps(r) + "\n" for r in rows).encode())
    return folder


OK_ROW = {"file_name": "0000.png", "label": 0}


@pytest.mark.parametrize("rows, sets, expected", [
    ([OK_ROW, {"file_name": "gone.png", "label": 1}], [], "line 2: file_name 'gone.png' names a file that does not"),
    ([OK_ROW, {"file_name": "../x.png", "label": 1}], [], "line 2: file_name '../x.png' must be a path inside"),
    ([OK_ROW, {"file_name": "0001.png"}], [], "line 2: no label column 'label'"),
    ([OK_ROW, {"file_name": "0001.png", "label": 5}], ["data.classes=3"],
     "line 2: label 'label' is 5: outside the 3 declared classes (data.classes)"),
    ([OK_ROW, {"file_name": "0001.png", "label": -1}], [], "line 2: label 'label' is -1: negative"),
    ([OK_ROW, {"file_name": "0001.png", "label": 2.5}], [],
     "line 2: label 'label' must be a whole number >= 0, got 2.5"),
    ([OK_ROW, {"file_name": "0001.png", "label": float("nan")}], [], "must be a whole number >= 0, got nan"),
    ([OK_ROW, {"file_name": "0001.png", "label": True}], [], "must be a whole number >= 0, got True"),
    ([OK_ROW, {"file_name": "0001.png", "label": "cat"}], [], "must be a whole number >= 0, got 'cat'"),
    ([OK_ROW, {"file_name": "0001.png", "label": 10**12}], [], "imply 1000000000001 classes for 2 examples"),
    ([OK_ROW, {"file_name": "0001.png", "label": 1, "text": ""}], [], "line 2: empty caption"),
    ([OK_ROW, {"file_name": "0001.png", "label": 1, "text": "  "}], [], "line 2: empty caption"),
    ([OK_ROW, {"file_name": "0001.png", "label": 1, "text": "a\u0007bell"}], [],
     "line 2: caption contains control characters"),
    ([OK_ROW, {"file_name": "0001.png", "label": 1, "text": 7}], [], "line 2: caption 'text' must be a string"),
    ([OK_ROW, ["not", "a", "dict"]], [], "line 2: not a JSON object (it holds a list)"),
    ([], [], "lists no images"),
])
def test_bad_metadata_is_one_line_naming_the_row(tmp_path: Path, capsys, rows, sets, expected) -> None:
    folder = _meta_case(tmp_path, rows)
    msg = one_line_error(capsys, *_train_argv(folder, tmp_path / "run", *sets))
    assert expected in msg and str(folder) in msg, msg  # (and the row, where one row is at fault)
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("raw, expected", [
    (b'{"file_name": "0000.png"}\n{"file_name": "0001.png", "text": "caf\xe9"}\n', "line 2: not UTF-8 (byte 0xe9"),
    (b'{"file_name": "0000.png"}\n{"file_name": "0001.png", "text": "a\x07b"}\n',
     "line 2: not a JSON object (a control character inside a string"),
    (b'{"file_name": "0000.png"}\n{"file_name": "0001.png",\n', "line 2: not a JSON object"),
])
def test_undecodable_metadata_rows_are_named(tmp_path: Path, capsys, raw: bytes, expected: str) -> None:
    folder = _meta_case(tmp_path, [], raw)
    msg = one_line_error(capsys, *_train_argv(folder, tmp_path / "run"))
    assert expected in msg and str(folder / "metadata.jsonl") in msg, msg


def test_captions_without_labels_and_mixed_modes_load(tmp_path: Path) -> None:
    """An uncaptioned row (key left out or null) is allowed; a folder of mixed modes (RGB, RGBA, L, P, 16-bit)
    decodes every image to the same shape."""
    folder = tmp_path / "mixed"
    folder.mkdir()
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 256, (9, 9, 3), dtype=np.uint8)).save(folder / "rgb.png")
    Image.fromarray(rng.integers(0, 256, (9, 9, 4), dtype=np.uint8), "RGBA").save(folder / "rgba.png")
    Image.fromarray(rng.integers(0, 256, (9, 9), dtype=np.uint8), "L").save(folder / "l.png")
    Image.fromarray(rng.integers(0, 256, (9, 9, 3), dtype=np.uint8)).convert("P").save(folder / "p.gif")
    Image.fromarray(rng.integers(0, 65536, (9, 9), dtype=np.uint16)).save(folder / "g16.png")
    rows = [{"file_name": "rgb.png", "text": "a photo"}, {"file_name": "rgba.png", "text": None},
            {"file_name": "l.png"}, {"file_name": "p.gif"}, {"file_name": "g16.png", "text": "sixteen bits"}]
    (folder / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    f = ImageFolder(folder, 8, return_text=True)
    assert f.y is None and f.num_classes is None
    got = [f[i] for i in range(len(f))]
    assert all(x.shape == (3, 8, 8) for x, _, _ in got)
    assert [t for _, _, t in got] == ["a photo", "", "", "", "sixteen bits"]
    assert [f.caption(i) for i in range(5)] == ["a photo", None, None, None, "sixteen bits"]


@pytest.mark.parametrize("sets, expected", [
    ("data.on_bad_image=ignore", "data.on_bad_image must be one of error, skip, got 'ignore'"),
    ("train.workers=-1", "train.workers must be a whole number in [0, 256], got -1"),
    ("train.workers=1.5", "train.workers must be a whole number in [0, 256], got 1.5"),
    ("data.classes=0", "data.classes must be"),
])
def test_bad_new_config_values_are_one_line(tmp_path: Path, capsys, sets: str, expected: str) -> None:
    folder = write_folder(tmp_path / "imgs", n=4)
    msg = one_line_error(capsys, *_train_argv(folder, tmp_path / "run", sets))
    assert expected in msg, msg
    assert not (tmp_path / "run").exists()


# --- memory ---------------------------------------------------------------------------------------------------
def test_the_folder_holds_an_index_not_images(tmp_path: Path) -> None:
    """After every image has been decoded, the folder object (what a worker process receives) still holds only
    its index: file names, labels and captions, a few dozen bytes per image, nothing per pixel."""
    import pickle

    n = 300
    folder = ImageFolder(write_folder(tmp_path / "f", n=n, size=(32, 32)), 32, return_text=True)
    for _ in folder.batches(64):
        pass
    _ = [folder[i] for i in range(0, n, 7)]
    names = sum(len(str(folder.path(i).relative_to(folder.root))) for i in range(n))
    texts = sum(len(folder.caption(i)) for i in range(n))
    size = len(pickle.dumps(folder))
    assert size < names + texts + 40 * n + 4000, size  # a 32x32 RGB image alone is 3072 bytes
    index = folder._names.nbytes + folder._name_off.nbytes + folder._labels.nbytes + folder._rows.nbytes
    assert index == names + 8 * (n + 1) + 8 * n + 8 * n


@pytest.mark.slow  # writes 101,000 PNGs and measures 6 fresh processes: 4.5 min under the helpers' load
def test_peak_memory_of_10_5_images_is_within_1_2x_of_10_3(tmp_path_factory) -> None:
    import importlib
    import sys

    bench_dir = str(Path(__file__).resolve().parents[1] / "benchmarks")
    sys.path.insert(0, bench_dir)
    try:
        bench = importlib.import_module("folder_stream")
    finally:
        sys.path.remove(bench_dir)
    root = tmp_path_factory.mktemp("rss")
    small = bench.median_peak(bench.write_pngs(root / "small", 1000), 3, batches=50)
    large = bench.median_peak(bench.write_pngs(root / "large", 100_000), 3, batches=50)
    assert small["n"] == 1000 and large["n"] == 100_000
    assert large["peak_rss"] <= 1.2 * small["peak_rss"], (small, large)  # medians of 3 fresh processes
    assert large["worker_peak_rss"] <= 1.2 * small["worker_peak_rss"], (small, large)


def _ddp_worker(rank: int, port: int, root: str) -> None:
    import os

    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2", MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    torch.set_num_threads(1)
    distributed.init_from_env("cpu")
    from torchdiffusion.training import trainer as trainer_mod

    seen = []
    real = trainer_mod.Trainer._streamed_batch

    def record(self):
        x, y = real(self)
        seen.append((x.clone(), y.clone()))
        return x, y
    trainer_mod.Trainer._streamed_batch = record
    cfg = config_mod.resolve("images", [f"data.name={root}/imgs", *TINY, "train.steps=6", "train.workers=1"])
    train(cfg, Path(root) / "run", progress=False)
    torch.save(seen, f"{root}/seen{rank}.pt")
    distributed.barrier()
    torch.distributed.destroy_process_group()


@pytest.mark.slow  # two processes under torch.distributed (gloo), ~75 s under load
def test_two_real_ranks_decode_disjoint_shards_of_the_single_process_batches(tmp_path: Path) -> None:
    import socket

    import torch.multiprocessing as mp

    from torchdiffusion.data.folder import stream

    folder = write_folder(tmp_path / "imgs", n=40)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_ddp_worker, args=(port, str(tmp_path)), nprocs=2, join=True)
    a, b = torch.load(tmp_path / "seen0.pt"), torch.load(tmp_path / "seen1.pt")
    it = stream(ImageFolder(folder, 8), batch=8, seed=0, flip=True)
    for k in range(6):
        x, y = next(it)
        assert a[k][0].shape[0] == b[k][0].shape[0] == 4
        assert torch.equal(torch.cat([a[k][0], b[k][0]]), x) and torch.equal(torch.cat([a[k][1], b[k][1]]), y)
