"""Sample-quality metrics for the digits data: a classifier trained only on real digits scores generated ones.

``DigitsEvaluator(size=8)`` holds a small CNN trained (deterministically, in a few seconds on CPU) on a fixed
80 % split of scikit-learn's 8x8 digits (resized to ``size``) and cached under ``~/.cache/torchdiffusion``
(``$TORCHDIFFUSION_CACHE`` overrides). It gives

- ``.predict(x)`` / ``.accuracy(x, y)``: class predictions; the fraction of samples classified as their
  requested class (conditional accuracy);
- ``.features(x)``: the penultimate-layer activations, in which
- ``.fd(x)`` is the Frechet distance (FID-style, Heusel et al. 2017) between the samples and the real training
  split, and ``.fd_floor()`` the same for the real held-out split: the value a perfect generator reaches;
  ``.fd_floor_bootstrap()`` its (class-stratified) bootstrap standard error and 95 % interval.

The split is the one that :func:`torchdiffusion.data.datasets.split_dataset` makes with ``holdout = HOLDOUT``
(same seed-0 permutation), so a diffusion run with ``data.holdout = HOLDOUT`` (the digits presets that are scored
here) trains on exactly the evaluator's training digits: the floor's held-out digits are unseen by the model,
and a generated FD below the floor means samples closer to the training digits than unseen real digits are.

The Frechet distance of two finite samples depends on their size (a bias of roughly ``tr(cov)/n``) and, at a few
hundred digits, strongly on their class composition (the class means are far apart in feature space: a
stratified sample scores about half the FD of a random draw of the same size). ``fd`` therefore averages over
disjoint chunks of the held-out size and, given the labels the samples were generated for, with the held-out
class counts, so that ``fd(x, y)`` and ``fd_floor()`` compare like with like. Generating for
``ev.y_heldout.repeat(k)`` uses every sample (``k`` chunks).
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from torchdiffusion.data.datasets import digits

HOLDOUT = 0.2  # fraction of the digits held out from the classifier (and used for the FD floor)
_VERSION = 1  # bump when the classifier or its training changes (invalidates the cache)


def frechet_distance_gaussian(mu1: Tensor, cov1: Tensor, mu2: Tensor, cov2: Tensor) -> float:
    """Frechet (2-Wasserstein squared) distance between ``N(mu1, cov1)`` and ``N(mu2, cov2)``:
    ``|mu1 - mu2|^2 + tr(S1 + S2 - 2 (S1^1/2 S2 S1^1/2)^1/2)``.

    The matrix square roots are taken by symmetric eigendecompositions in float64 (negative round-off
    eigenvalues are clipped to 0), which is exact for PSD inputs and needs no scipy.
    """
    mu1, mu2 = mu1.double().flatten(), mu2.double().flatten()
    cov1, cov2 = torch.atleast_2d(cov1.double()), torch.atleast_2d(cov2.double())
    if cov1.shape != cov2.shape or cov1.shape != (len(mu1), len(mu1)) or mu1.shape != mu2.shape:
        raise ValueError(f"shape mismatch: means {tuple(mu1.shape)}, {tuple(mu2.shape)}; covariances "
                         f"{tuple(cov1.shape)}, {tuple(cov2.shape)}")
    lam, U = torch.linalg.eigh((cov1 + cov1.T) / 2)
    s1h = (U * lam.clamp_min(0).sqrt()) @ U.T
    m = s1h @ cov2 @ s1h
    tr_cross = torch.linalg.eigvalsh((m + m.T) / 2).clamp_min(0).sqrt().sum()
    return float((mu1 - mu2).square().sum() + cov1.trace() + cov2.trace() - 2 * tr_cross)


def mean_cov(feat: Tensor) -> tuple[Tensor, Tensor]:
    """Sample mean and unbiased covariance of ``(n, d)`` features (float64)."""
    feat = feat.double().flatten(1)
    if len(feat) < 2:
        raise ValueError(f"need at least 2 samples for a covariance, got {len(feat)}")
    return feat.mean(0), torch.cov(feat.T).reshape(feat.shape[1], feat.shape[1])


def frechet_distance(feat_a: Tensor, feat_b: Tensor) -> float:
    """Frechet distance between Gaussians fitted (mean, covariance) to two sets of ``(n, d)`` features."""
    if feat_a.shape[1:] != feat_b.shape[1:]:
        raise ValueError(f"feature shapes differ: {tuple(feat_a.shape)} vs {tuple(feat_b.shape)}")
    return frechet_distance_gaussian(*mean_cov(feat_a), *mean_cov(feat_b))


# ---------------------------------------------------------------------------------------------------------
class DigitsClassifier(nn.Module):
    """A small CNN: two conv layers (the first strided for images above 8x8), pooling to 4x4, a 128-unit
    layer and a ``feature_dim`` layer (the features), then a linear layer to the 10 logits."""

    def __init__(self, size: int = 8, feature_dim: int = 64):
        super().__init__()
        st = max(1, size // 8)  # larger images: a strided first convolution brings them to about 8x8
        self.conv = nn.Sequential(nn.Conv2d(1, 32, 2 * st + 1, stride=st, padding=st), nn.ReLU(),
                                  nn.Conv2d(32, 64, 3, padding=1), nn.ReLU())
        self.fc = nn.Sequential(nn.Flatten(), nn.Linear(64 * 16, 128), nn.ReLU(), nn.Linear(128, feature_dim),
                                nn.ReLU())
        self.head = nn.Linear(feature_dim, 10)

    def features(self, x: Tensor) -> Tensor:
        return self.fc(F.adaptive_avg_pool2d(self.conv(x), 4))

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.features(x))


def digits_split(size: int = 8) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """``(x_train, y_train, x_heldout, y_heldout)``: digits in [-1, 1] split by a fixed permutation (seed 0);
    the last ``HOLDOUT`` fraction is held out."""
    d = digits(int(size))
    perm = torch.randperm(len(d), generator=torch.Generator().manual_seed(0))
    n_test = round(HOLDOUT * len(d))
    tr, te = perm[: len(d) - n_test], perm[len(d) - n_test:]
    return d.x[tr], d.y[tr], d.x[te], d.y[te]


@contextmanager
def one_thread() -> Iterator[None]:
    """Run torch ops on one intra-op thread inside the block (restored afterwards)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def train_classifier(x: Tensor, y: Tensor, *, epochs: int = 30, seed: int = 0) -> DigitsClassifier:
    """Train ``DigitsClassifier`` on real images (Adam, batch 64, mild random shifts); deterministic.

    Runs on one thread: the batches are small, and extra threads only add synchronisation (on a busy
    machine they make it many times slower)."""
    with one_thread():
        return _train(x, y, epochs, seed)


def _train(x: Tensor, y: Tensor, epochs: int, seed: int) -> DigitsClassifier:
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        net = DigitsClassifier(x.shape[-1])
        g = torch.Generator().manual_seed(seed)
        opt = torch.optim.Adam(net.parameters(), lr=2e-3, weight_decay=1e-4)
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, epochs)
        pad = max(1, x.shape[-1] // 8)
        for _ in range(epochs):
            perm = torch.randperm(len(x), generator=g)
            for i in range(0, len(x), 64):
                idx = perm[i:i + 64]
                xb = F.pad(x[idx], (pad,) * 4, value=-1.0)  # random shift by up to `pad` pixels
                dx, dy = torch.randint(0, 2 * pad + 1, (2,), generator=g).tolist()
                xb = xb[..., dy:dy + x.shape[-2], dx:dx + x.shape[-1]]
                loss = F.cross_entropy(net(xb), y[idx])
                opt.zero_grad()
                loss.backward()
                opt.step()
            sched.step()
    return net.eval().requires_grad_(False)


def cache_dir() -> Path:
    """``$TORCHDIFFUSION_CACHE`` or ``~/.cache/torchdiffusion``."""
    return Path(os.environ.get("TORCHDIFFUSION_CACHE") or Path.home() / ".cache" / "torchdiffusion")


class FloorInterval(NamedTuple):
    """The real-data FD floor with its bootstrap standard error, bias-corrected 95 % interval and the bootstrap's
    bias (see :meth:`DigitsEvaluator.fd_floor_bootstrap`)."""

    floor: float
    se: float
    lo: float
    hi: float
    bias: float


def matched_chunks(n: int, y: Tensor | None, y_ref: Tensor, num_classes: int) -> list[Tensor]:
    """Disjoint index sets into ``n`` samples, each of the size of the reference labels ``y_ref`` and, given the
    samples' labels ``y``, with exactly ``y_ref``'s class counts (without labels: cut after a fixed shuffle).
    Comparing each chunk with a real set of the same size and composition keeps a Frechet distance's size and
    class-mix bias equal on both sides."""
    m = len(y_ref)
    if y is None:
        perm = torch.randperm(n, generator=torch.Generator().manual_seed(0))
        return list(perm.split(m)[: n // m])
    y = torch.as_tensor(y).long().cpu().reshape(-1)
    if len(y) != n:
        raise ValueError(f"{n} samples but {len(y)} labels")
    want = torch.bincount(y_ref, minlength=num_classes)
    by_class = [torch.nonzero(y == c).flatten() for c in range(len(want))]
    k = min(len(idx) // int(c) for idx, c in zip(by_class, want) if c > 0)
    return [torch.cat([idx[j * int(c):(j + 1) * int(c)] for idx, c in zip(by_class, want)]) for j in range(k)]


def stratified_floor_bootstrap(feat: Tensor, y: Tensor, ref_feat: Tensor, num_classes: int, n_boot: int = 1000,
                               seed: int = 0) -> FloorInterval:
    """The real-data floor ``FD(feat, ref_feat)`` and how much it depends on which real examples were drawn: a
    class-stratified bootstrap of ``feat`` (each class resampled with replacement to its own count; the reference
    fixed), ``n_boot`` seeded draws. Repeated examples raise a Frechet distance (the bootstrap mean lies above the
    floor by ``bias``), so the 95 % interval is the bias-corrected percentile interval ``[q_2.5 - bias,
    q_97.5 - bias]``; ``se`` is the bootstrap standard deviation."""
    if int(n_boot) < 2:
        raise ValueError(f"n_boot must be >= 2, got {n_boot}")
    g = torch.Generator().manual_seed(int(seed))
    by_class = [torch.nonzero(y == c).flatten() for c in range(num_classes)]
    fds = []
    for _ in range(int(n_boot)):
        idx = torch.cat([i[torch.randint(len(i), (len(i),), generator=g)] for i in by_class if len(i)])
        fds.append(frechet_distance(feat[idx], ref_feat))
    v = torch.tensor(fds, dtype=torch.float64)
    floor = frechet_distance(feat, ref_feat)
    bias = float(v.mean()) - floor
    lo, hi = torch.quantile(v, torch.tensor([0.025, 0.975], dtype=torch.float64)).tolist()
    return FloorInterval(floor, float(v.std()), lo - bias, hi - bias, bias)


_LOADED: dict[tuple[int, str], DigitsEvaluator] = {}


class DigitsEvaluator:
    """Score digit images (``(N, 1, size, size)`` in [-1, 1]) with a classifier trained only on real digits.

    ``DigitsEvaluator(size)`` is cheap after the first call: the trained classifier is cached on disk (and
    in memory), the real-data features once computed.
    """

    def __new__(cls, size: int = 8):
        key = (int(size), str(cache_dir()))
        if key not in _LOADED:
            obj = super().__new__(cls)
            obj._setup(int(size))
            _LOADED[key] = obj
        return _LOADED[key]

    def _setup(self, size: int) -> None:
        from safetensors.torch import load_file, save_file

        if size < 4:
            raise ValueError(f"size must be >= 4, got {size}")
        self.size = size
        self.x_train, self.y_train, self.x_heldout, self.y_heldout = digits_split(size)
        tag = hashlib.sha1(f"{_VERSION}-{size}-{HOLDOUT}".encode()).hexdigest()[:10]
        path = cache_dir() / f"digits_classifier_{size}_{tag}.safetensors"
        self.net = DigitsClassifier(size)
        try:
            self.net.load_state_dict(load_file(str(path)))
        except Exception:  # missing or unreadable cache: train (a few seconds) and store
            self.net = train_classifier(self.x_train, self.y_train)
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_suffix(f".{os.getpid()}.tmp")
            save_file({k: v.contiguous() for k, v in self.net.state_dict().items()}, str(tmp))
            os.replace(tmp, path)
        self.net.eval().requires_grad_(False)
        self._f_train = self.features(self.x_train)
        self._f_heldout = self.features(self.x_heldout)

    def _prep(self, x: Tensor) -> Tensor:
        x = torch.as_tensor(x).float().cpu()
        if x.ndim == 3:
            x = x[:, None]
        if x.ndim != 4 or x.shape[1] != 1 or x.shape[-1] != self.size or x.shape[-2] != self.size:
            raise ValueError(f"expected digit images of shape (N, 1, {self.size}, {self.size}), "
                             f"got {tuple(x.shape)}")
        return x.clamp(-1, 1)

    @torch.no_grad()
    def features(self, x: Tensor) -> Tensor:
        """Penultimate-layer features ``(N, 64)`` (float32)."""
        x = self._prep(x)
        with one_thread():
            return torch.cat([self.net.features(c) for c in x.split(1024)]) if len(x) else x.new_zeros(0, 64)

    @torch.no_grad()
    def logits(self, x: Tensor) -> Tensor:
        return self.net.head(self.features(x))

    def predict(self, x: Tensor) -> Tensor:
        """Predicted classes ``(N,)``."""
        return self.logits(x).argmax(1)

    def accuracy(self, x: Tensor, y: Tensor | int) -> float:
        """Fraction of ``x`` classified as ``y`` (per-sample labels or one label for all)."""
        pred = self.predict(x)
        y = torch.as_tensor(y).long().expand(len(pred)) if torch.as_tensor(y).ndim == 0 else torch.as_tensor(y)
        if y.shape != pred.shape:
            raise ValueError(f"{len(pred)} samples but {len(y)} labels")
        return float((pred == y.long().cpu()).float().mean())

    def fd(self, x: Tensor, y: Tensor | None = None, matched: bool = True) -> float:
        """Frechet distance between the features of ``x`` and of the real training split.

        With ``matched`` (default), the distance is averaged over disjoint chunks of ``x`` of the held-out
        size, so that the number is comparable with :meth:`fd_floor`: with the labels ``y`` the samples were
        generated for, each chunk has exactly the held-out class counts; without, chunks are cut after a fixed
        shuffle. Too few samples for one chunk, or ``matched=False``: all of ``x`` at once.
        """
        per = self.fd_per_chunk(x, y) if matched else []
        return sum(per) / len(per) if per else frechet_distance(self.features(x), self._f_train)

    def fd_per_chunk(self, x: Tensor, y: Tensor | None = None) -> list[float]:
        """The Frechet distances of the matched chunks that :meth:`fd` averages (empty if there are none)."""
        f = self.features(x)
        return [frechet_distance(f[c], self._f_train) for c in self._chunks(f, y)]

    def _chunks(self, f: Tensor, y: Tensor | None) -> list[Tensor]:
        """Index sets of the matched chunks (see :meth:`fd`)."""
        return matched_chunks(len(f), y, self.y_heldout, 10)

    def fd_floor(self) -> float:
        """Frechet distance of the real held-out digits to the real training digits (what real data scores)."""
        return frechet_distance(self._f_heldout, self._f_train)

    def fd_floor_bootstrap(self, n_boot: int = 1000, seed: int = 0) -> FloorInterval:
        """How much the floor depends on which real digits were held out: a class-stratified bootstrap of the
        held-out digits (each class resampled with replacement to its own count, as the generated chunks are
        matched; the training reference fixed, as it is for generated samples), ``n_boot`` seeded draws.

        Repeated digits raise a Frechet distance (the bootstrap mean lies above the floor by ``bias``), so the
        95 % interval is the bias-corrected percentile interval ``[q_2.5 - bias, q_97.5 - bias]``; ``se`` is the
        bootstrap standard deviation. A generated chunk's FD inside the interval is at the real-data floor."""
        return stratified_floor_bootstrap(self._f_heldout, self.y_heldout, self._f_train, 10, n_boot, seed)

    def heldout_accuracy(self) -> float:
        """Accuracy of the classifier on the real held-out digits."""
        return self.accuracy(self.x_heldout, self.y_heldout)


def conditional_accuracy(samples: Tensor, labels: Tensor | int, evaluator: DigitsEvaluator | None = None) -> float:
    """Fraction of generated digits that the real-data classifier assigns to their requested class."""
    ev = evaluator or DigitsEvaluator(int(samples.shape[-1]))
    return ev.accuracy(samples, labels)
