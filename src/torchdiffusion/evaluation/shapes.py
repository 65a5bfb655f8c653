"""The judge of the shapes benchmark (issue 27): the counterpart of :class:`~.metrics.DigitsEvaluator` for the
generated 32x32 RGB data set of :mod:`torchdiffusion.data.shapes`.

``ShapesJudge(root)`` holds a small multi-head CNN (:class:`ShapesJudgeNet`: one head per attribute -- the 10
classes, shape, colour, size, position, background) trained only on real images of the folder's ``train/`` split,
never on generated ones, deterministically, and cached under ``~/.cache/torchdiffusion`` (``$TORCHDIFFUSION_CACHE``)
as ``shapes_judge_TAG.safetensors`` + ``.json`` (written atomically; the tag is a hash of the folder's
``dataset.json`` -- version, seed, size, counts -- and of the judge's settings). It gives

- ``predict(x)``: each head's predictions; ``accuracy(x, y)``: the fraction of samples judged to be of the class
  they were generated for (conditional accuracy); ``attribute_accuracy(x, y)``: the same for the attributes that the
  class fixes (shape and colour family), and ``attribute_tv(x)``: for the attributes it leaves free (colour, size,
  position, background), the total-variation distance between the judged frequencies of the samples and of the
  real test images (0: the same mix);
- ``features(x)``: the penultimate layer (128 numbers), in which ``fd(x, y)`` is the Frechet distance (Heusel et al.
  2017) of the samples to the held-out ``test/`` split, averaged over chunks of the reference's size and class
  counts; ``fd_floor()`` is what real images score: the same distance for ``n_ref`` real training images that the
  judge did not train on (the last ones of ``train/``), and ``fd_floor_bootstrap()`` its class-stratified bootstrap
  interval (:func:`~.metrics.stratified_floor_bootstrap`).

Images are float ``(N, 3, S, S)`` in [-1, 1] (what a run samples) or uint8.
"""

from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from torchdiffusion._files import atomic_write, read_json, write_json
from torchdiffusion.data import shapes as shapes_data
from torchdiffusion.evaluation.metrics import (
    FloorInterval,
    cache_dir,
    frechet_distance,
    matched_chunks,
    one_thread,
    stratified_floor_bootstrap,
)

JUDGE_VERSION = 2  # bump when the network or its training changes (invalidates the cache)
HEADS = {"label": len(shapes_data.CLASSES), **{k: len(v) for k, v in shapes_data.ATTRIBUTES.items()}}
FREE_ATTRIBUTES = ("color", "size", "position", "background")  # not fixed by the class


class ShapesJudgeNet(nn.Module):
    """Four convolutions with batch norm (the first two of stride 2, for 16x16 images the second: a 32x32 image
    becomes 8x8x64) on the RGB image
    and its chroma ``max - min`` over the channels (a fourth channel: high on the saturated shape, low on the muted
    background, so that shape is told from texture), average pooling to 4x4 (which keeps the position), a
    ``feature_dim`` layer (the features) and one linear head per attribute. The feature layer also sees
    :func:`background_cells` (the background's mean in 4x4 cells: a gradient is a ramp across them; version 1, without
    it, told plain from gradient at chance: background accuracy 0.78 on real test images)."""

    def __init__(self, size: int = 32, feature_dim: int = 128, heads: dict[str, int] | None = None):
        super().__init__()
        first = 2 if size >= 32 else 1  # 16x16 images: no stride in the first layer (they are already small)
        def block(c_in: int, c_out: int, k: int, stride: int) -> list[nn.Module]:
            return [nn.Conv2d(c_in, c_out, k, stride=stride, padding=(k - 1) // 2 if stride == 1 else 1,
                              bias=False), nn.BatchNorm2d(c_out), nn.ReLU()]
        self.conv = nn.Sequential(*block(4, 32, 4 if first == 2 else 3, first), *block(32, 64, 4, 2),
                                  *block(64, 64, 3, 1), *block(64, 64, 3, 1))
        self.fc = nn.Sequential(nn.Linear(64 * 16 + 3 * 16, feature_dim), nn.ReLU())
        self.heads = nn.ModuleDict({k: nn.Linear(feature_dim, n) for k, n in (heads or HEADS).items()})

    def features(self, x: Tensor) -> Tensor:
        chroma = x.amax(1, keepdim=True) - x.amin(1, keepdim=True)  # high on the shape, low on the grey background
        conv = F.adaptive_avg_pool2d(self.conv(torch.cat([x, chroma], 1)), 4).flatten(1)
        return self.fc(torch.cat([conv, 10 * background_cells(x, chroma)], 1))  # ramps of about 0.2 -> 2

    def forward(self, x: Tensor) -> dict[str, Tensor]:
        f = self.features(x)
        return {k: h(f) for k, h in self.heads.items()}


def background_cells(x: Tensor, chroma: Tensor, cells: int = 4, threshold: float = 0.3) -> Tensor:
    """The mean of the muted (background) pixels -- chroma ``max - min`` below ``threshold`` in [-1, 1] units --
    in each of ``cells x cells`` cells, centred on the image's background mean (a cell the shape covers takes
    that mean): ``(N, 3 cells^2)``. A gradient background is a ramp across these cells, a plain one is flat."""
    w = (chroma < threshold).float()
    num, den = F.adaptive_avg_pool2d(x * w, cells), F.adaptive_avg_pool2d(w, cells)
    mean = (x * w).sum((2, 3), keepdim=True) / w.sum((2, 3), keepdim=True).clamp_min(1)
    cell = torch.where(den > 0.05, num / den.clamp_min(1e-6), mean)
    return (cell - mean).flatten(1)


def to_float(x: Tensor | np.ndarray) -> Tensor:
    """uint8 images -> float in [-1, 1]; float images are clamped to [-1, 1]."""
    x = torch.as_tensor(x)
    if x.dtype == torch.uint8:
        return x.float() / 127.5 - 1
    return x.detach().float().cpu().clamp(-1, 1)


def train_judge(x: Tensor, targets: dict[str, Tensor], *, epochs: int = 6, batch: int = 32, lr: float = 2e-3,
                seed: int = 0, progress=None) -> ShapesJudgeNet:
    """Train :class:`ShapesJudgeNet` on real images ``x`` (float, [-1, 1]) with the sum of the heads'
    cross-entropies (Adam, cosine learning rate, a little Gaussian noise on the inputs so that the judge does not
    hinge on noise-free pixels); deterministic, on one thread."""
    with one_thread(), torch.random.fork_rng():
        torch.manual_seed(seed)
        net = ShapesJudgeNet(x.shape[-1])
        g = torch.Generator().manual_seed(seed)
        opt = torch.optim.Adam(net.parameters(), lr=lr, weight_decay=1e-4)
        steps = epochs * ((len(x) + batch - 1) // batch)
        sched = torch.optim.lr_scheduler.OneCycleLR(opt, lr, total_steps=steps, pct_start=0.1)
        it = range(epochs)
        for _ in (progress(it) if progress else it):
            perm = torch.randperm(len(x), generator=g)
            for i in range(0, len(x), batch):
                idx = perm[i:i + batch]
                xb = x[idx] + 0.05 * torch.rand(len(idx), 1, 1, 1, generator=g) * torch.randn(x[idx].shape,
                                                                                               generator=g)
                out = net(xb)
                loss = sum(F.cross_entropy(out[k], targets[k][idx]) for k in out)
                opt.zero_grad()
                loss.backward()
                opt.step()
                sched.step()
    return net.eval().requires_grad_(False)


def _targets(rows: list[dict]) -> dict[str, Tensor]:
    return {k: torch.from_numpy(v) for k, v in shapes_data.attribute_indices(rows).items()}


_LOADED: dict[tuple, ShapesJudge] = {}


class ShapesJudge:
    """Score generated shapes with a judge trained only on the real ``train/`` split (module docstring).

    ``root``: a shapes folder (holding ``train/``, ``test/`` and ``dataset.json``) or one of its split folders.
    ``n_train``: at most this many training images for the judge (from the start of ``train/``); ``n_ref``: the
    size of the FD reference (the first ``n_ref`` test images) and of the real sample for the floor (the last
    ``n_ref`` training images, never used to train the judge).
    """

    def __new__(cls, root: str | Path, *, n_train: int = 4000, n_ref: int = 1000, epochs: int = 8,
                progress=None):
        info = shapes_data.read_marker(root)
        if info is None:
            raise ValueError(f"{root} is not a shapes data folder (no dataset.json written by `torchdiffusion "
                             "make-data shapes`)")
        key = (info["root"], json.dumps(info, sort_keys=True), int(n_train), int(n_ref), int(epochs), str(cache_dir()))
        if key not in _LOADED:
            obj = super().__new__(cls)
            obj._setup(info, int(n_train), int(n_ref), int(epochs), progress)
            _LOADED[key] = obj
        return _LOADED[key]

    def _setup(self, info: dict, n_train: int, n_ref: int, epochs: int, progress) -> None:
        from safetensors.torch import load_file, save_file

        self.info, self.root = info, Path(info["root"])
        counts = info["splits"]
        if counts.get("test", 0) < 10:
            raise ValueError(f"{self.root}: the judge needs a test split of at least 10 images, the folder has "
                             f"{counts.get('test', 0)} (make-data --n-test)")
        self.n_ref = min(n_ref, counts["test"], counts["train"] // 2)
        self.n_ref -= self.n_ref % len(shapes_data.CLASSES) if self.n_ref >= 10 else 0
        n_fit = min(n_train, counts["train"] - self.n_ref)
        if self.n_ref < 10 or n_fit < 10:
            raise ValueError(f"{self.root}: too few training images ({counts['train']}) for the judge and its "
                             "real-data floor; make-data --n 100 or more")
        ident = {k: info[k] for k in ("dataset", "version", "size", "seed", "splits")}
        settings = {"judge_version": JUDGE_VERSION, "n_train": n_fit, "epochs": epochs}  # what the weights depend on
        tag = hashlib.sha1(json.dumps([ident, settings], sort_keys=True).encode()).hexdigest()[:12]
        self.weights_path = cache_dir() / f"shapes_judge_{tag}.safetensors"
        self.meta_path = self.weights_path.with_suffix(".json")
        x_ref, rows_ref = shapes_data.load_split(self.root, "test", limit=self.n_ref)
        self.x_ref, self.y_ref = to_float(x_ref), _targets(rows_ref)["label"]
        x_tr, rows_tr = shapes_data.load_split(self.root, "train")
        self.x_real, self.y_real = to_float(x_tr[-self.n_ref:]), _targets(rows_tr[-self.n_ref:])["label"]
        self.net, self.meta = ShapesJudgeNet(int(info["size"])), None
        try:
            meta = read_json(self.meta_path, "judge record")
            if meta.get("tag") != tag:
                raise ValueError("stale")
            self.net.load_state_dict(load_file(str(self.weights_path)))
            self.meta = meta
        except Exception:  # missing, stale or unreadable cache: train (minutes) and store
            t0 = time.time()
            x_fit = to_float(x_tr[:n_fit])
            self.net = train_judge(x_fit, _targets(rows_tr[:n_fit]), epochs=epochs, progress=progress)
            x_test, rows_test = shapes_data.load_split(self.root, "test")
            acc = self._head_accuracy(to_float(x_test), _targets(rows_test))
            self.meta = {"tag": tag, "dataset": ident, "settings": settings, "train_seconds": time.time() - t0,
                         "test_accuracy": acc, "trained_on": f"{self.root}/train (first {n_fit} images)"}
            sd = {k: v.contiguous() for k, v in self.net.state_dict().items()}
            atomic_write(self.weights_path, lambda tmp: save_file(sd, str(tmp)))
            write_json(self.meta_path, self.meta)  # last: the record says the weights are complete
        self.net.eval().requires_grad_(False)
        self._f_ref = self.features(self.x_ref)
        self._f_real = self.features(self.x_real)
        self._ref_pred = self.predict(self.x_ref)

    # ---- predictions ---------------------------------------------------------------------------------------
    @torch.no_grad()
    def _outputs(self, x: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        x = to_float(x)
        if x.ndim != 4 or x.shape[1] != 3:
            raise ValueError(f"expected RGB images (N, 3, H, W), got {tuple(x.shape)}")
        size = self.info["size"]
        if x.shape[-1] != size or x.shape[-2] != size:
            raise ValueError(f"expected {size}x{size} images (the judge's data), got {x.shape[-2]}x{x.shape[-1]}")
        with one_thread():
            feats, outs = [], {k: [] for k in HEADS}
            for c in x.split(500):
                f = self.net.features(c)
                feats.append(f)
                for k, h in self.net.heads.items():
                    outs[k].append(h(f))
        return torch.cat(feats), {k: torch.cat(v) for k, v in outs.items()}

    def features(self, x: Tensor) -> Tensor:
        """Penultimate-layer features ``(N, 128)``."""
        return self._outputs(x)[0]

    def predict(self, x: Tensor) -> dict[str, Tensor]:
        """Each head's predicted value index ``(N,)``: ``label`` (class), ``shape``, ``color``, ``size``,
        ``position``, ``background`` (indices into :data:`torchdiffusion.data.shapes.ATTRIBUTES`)."""
        return {k: v.argmax(1) for k, v in self._outputs(x)[1].items()}

    def _head_accuracy(self, x: Tensor, targets: dict[str, Tensor]) -> dict[str, float]:
        pred = self.predict(x)
        return {k: float((pred[k] == targets[k]).float().mean()) for k in HEADS}

    @staticmethod
    def _labels(y: Tensor | int, n: int) -> Tensor:
        y = torch.as_tensor(y).long().cpu()
        y = y.expand(n) if y.ndim == 0 else y.reshape(-1)
        if len(y) != n:
            raise ValueError(f"{n} samples but {len(y)} labels")
        return y

    def accuracy(self, x: Tensor, y: Tensor | int) -> float:
        """Fraction of ``x`` judged to be of class ``y`` (per-sample labels or one label for all)."""
        pred = self.predict(x)["label"]
        return float((pred == self._labels(y, len(pred))).float().mean())

    def attribute_accuracy(self, x: Tensor, y: Tensor | int) -> dict[str, float]:
        """For samples generated for classes ``y``: the fraction whose judged shape is the class's shape, and whose
        judged colour is of the class's colour family."""
        pred = self.predict(x)
        y = self._labels(y, len(pred["label"]))
        fam = (pred["color"] >= len(shapes_data.FAMILIES["warm"])).long()  # colours: 3 warm, then 3 cool
        return {"shape": float((pred["shape"] == y // 2).float().mean()),
                "color_family": float((fam == y % 2).float().mean())}

    def attribute_tv(self, x: Tensor) -> dict[str, float]:
        """For the attributes the class leaves free: the total-variation distance between the judged value
        frequencies of ``x`` and of the real test images (0 = the same mix, 1 = disjoint)."""
        pred = self.predict(x)
        out = {}
        for k in FREE_ATTRIBUTES:
            p = torch.bincount(pred[k], minlength=HEADS[k]).double() / len(pred[k])
            q = torch.bincount(self._ref_pred[k], minlength=HEADS[k]).double() / len(self._ref_pred[k])
            out[k] = float(0.5 * (p - q).abs().sum())
        return out

    def real_accuracy(self) -> dict[str, float]:
        """Each head's accuracy on the whole real test split (from the cached record)."""
        return dict(self.meta["test_accuracy"])

    # ---- Frechet distance ----------------------------------------------------------------------------------
    def fd(self, x: Tensor, y: Tensor | None = None) -> float:
        """Frechet distance of ``x``'s features to the test reference's, averaged over disjoint chunks of the
        reference's size (with the labels ``y``: each with the reference's class counts); fewer samples than one
        chunk: all of ``x`` at once."""
        per = self.fd_per_chunk(x, y)
        return sum(per) / len(per) if per else frechet_distance(self.features(x), self._f_ref)

    def fd_per_chunk(self, x: Tensor, y: Tensor | None = None) -> list[float]:
        f = self.features(x)
        return [frechet_distance(f[c], self._f_ref) for c in matched_chunks(len(f), y, self.y_ref, HEADS["label"])]

    def fd_floor(self) -> float:
        """What real images score: FD of ``n_ref`` real training images (unseen by the judge) to the reference."""
        return frechet_distance(self._f_real, self._f_ref)

    def fd_floor_bootstrap(self, n_boot: int = 1000, seed: int = 0) -> FloorInterval:
        """The floor with its class-stratified bootstrap standard error and bias-corrected 95 % interval."""
        return stratified_floor_bootstrap(self._f_real, self.y_real, self._f_ref, HEADS["label"], n_boot, seed)

    def reference_labels(self, n: int) -> Tensor:
        """``n`` class labels for generating samples that :meth:`fd` can match: the reference's labels repeated."""
        return self.y_ref.repeat(n // len(self.y_ref) + 1)[:n]

    def score(self, x: Tensor, y: Tensor | None = None, n_boot: int = 1000) -> dict:
        """Every number at once: ``fd``, the floor and its interval, and for labelled samples ``accuracy``,
        ``attribute_accuracy`` and ``attribute_tv``."""
        fl = self.fd_floor_bootstrap(n_boot)
        out = {"samples": len(x), "fd": self.fd(x, y), "fd_floor": fl.floor, "fd_floor_lo": fl.lo,
               "fd_floor_hi": fl.hi, "chunk": self.n_ref}
        if y is not None:
            out["accuracy"] = self.accuracy(x, y)
            out.update({f"accuracy_{k}": v for k, v in self.attribute_accuracy(x, y).items()})
        out.update({f"tv_{k}": v for k, v in self.attribute_tv(x).items()})
        return out
