"""``torchdiffusion make-data shapes OUT --n N --size 32 --seed S``: write a generated benchmark image folder
(:mod:`torchdiffusion.data.shapes`: coloured shapes, ``train/`` and ``test/`` splits, ``metadata.jsonl`` with
every attribute and a caption, a ``dataset.json`` marker)."""

from __future__ import annotations

import argparse

from tqdm.auto import tqdm

from torchdiffusion.cli.commands import command
from torchdiffusion.data import shapes

KINDS = ("shapes",)


def _args(p: argparse.ArgumentParser) -> None:
    p.add_argument("kind", help=f"which data set ({', '.join(KINDS)})")
    p.add_argument("out", help="folder to write (train/, test/, dataset.json); refused if not empty without --force")
    p.add_argument("--n", type=int, default=10000, help="training images (default 10000)")
    p.add_argument("--n-test", type=int, default=None, help="held-out test images (default n // 5)")
    p.add_argument("--size", type=int, default=32,
                   help=f"image side in pixels ({', '.join(map(str, shapes.SUPPORTED_SIZES))}; default 32)")
    p.add_argument("--seed", type=int, default=0, help="seed of the images and of the fixed splits")
    p.add_argument("--force", action="store_true", help="replace the shapes data in a non-empty OUT")
    p.add_argument("--quiet", action="store_true", help="no progress bar")


def _run(a) -> int:
    if a.kind not in KINDS:
        raise ValueError(f"unknown data set {a.kind!r}; allowed: {', '.join(KINDS)}")

    def bar(items, split):
        return tqdm(items, desc=split, unit="img", disable=a.quiet, dynamic_ncols=True)
    info = shapes.write_shapes(a.out, a.n, n_test=a.n_test, size=a.size, seed=a.seed, force=a.force, progress=bar)
    s = info["splits"]
    print(f"wrote {s['train']} training and {s['test']} test images ({a.size}x{a.size}, seed {a.seed}, "
          f"{len(info['classes'])} classes) to {a.out}")
    return 0


command("make-data", "write a generated benchmark image folder (shapes: 10 classes, captions, train/test)")(
    (_args, _run))
