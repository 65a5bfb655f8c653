"""Metrics: Frechet distance against closed forms, and the real-digits evaluator (torchdiffusion.evaluation.metrics)."""

from __future__ import annotations

import math

import pytest
import torch

from torchdiffusion.evaluation import metrics
from torchdiffusion.evaluation.metrics import DigitsEvaluator, frechet_distance, frechet_distance_gaussian


def _rand_psd(d: int, g: torch.Generator) -> torch.Tensor:
    a = torch.randn(d, d, generator=g, dtype=torch.float64)
    return a @ a.T / d + 0.1 * torch.eye(d, dtype=torch.float64)


def test_fd_gaussian_closed_forms() -> None:
    g = torch.Generator().manual_seed(0)
    # 1-D: (m1 - m2)^2 + (s1 - s2)^2
    fd = frechet_distance_gaussian(torch.tensor([1.0]), torch.tensor([[4.0]]), torch.tensor([-0.5]),
                                   torch.tensor([[0.25]]))
    assert fd == pytest.approx(1.5**2 + (2 - 0.5) ** 2, abs=1e-12)
    # diagonal (commuting) covariances: |m1 - m2|^2 + sum (sqrt a - sqrt b)^2
    d = 6
    m1, m2 = torch.randn(d, generator=g, dtype=torch.float64), torch.randn(d, generator=g, dtype=torch.float64)
    a = torch.rand(d, generator=g, dtype=torch.float64) + 0.1
    b = torch.rand(d, generator=g, dtype=torch.float64) + 0.1
    want = float((m1 - m2).square().sum() + (a.sqrt() - b.sqrt()).square().sum())
    assert frechet_distance_gaussian(m1, torch.diag(a), m2, torch.diag(b)) == pytest.approx(want, abs=1e-10)
    # the same in a common rotated basis
    q, _ = torch.linalg.qr(torch.randn(d, d, generator=g, dtype=torch.float64))
    fd_rot = frechet_distance_gaussian(q @ m1, q @ torch.diag(a) @ q.T, q @ m2, q @ torch.diag(b) @ q.T)
    assert fd_rot == pytest.approx(want, abs=1e-10)
    # scaled covariances S and c^2 S: (1 - c)^2 tr S
    s = _rand_psd(d, g)
    assert frechet_distance_gaussian(m1, s, m1, 9 * s) == pytest.approx(4 * float(s.trace()), abs=1e-10)


def test_fd_gaussian_matches_scipy_sqrtm_for_non_commuting() -> None:
    scipy_linalg = pytest.importorskip("scipy.linalg")
    g = torch.Generator().manual_seed(1)
    d = 8
    s1, s2 = _rand_psd(d, g), _rand_psd(d, g)
    m1, m2 = torch.randn(d, generator=g, dtype=torch.float64), torch.randn(d, generator=g, dtype=torch.float64)
    cross = scipy_linalg.sqrtm(s1.numpy() @ s2.numpy()).real.trace()
    want = float((m1 - m2).square().sum() + s1.trace() + s2.trace()) - 2 * cross
    assert frechet_distance_gaussian(m1, s1, m2, s2) == pytest.approx(want, abs=1e-9)
    assert frechet_distance_gaussian(m1, s1, m2, s2) == pytest.approx(frechet_distance_gaussian(m2, s2, m1, s1),
                                                                       abs=1e-9)
    assert frechet_distance_gaussian(m1, s1, m1, s1) == pytest.approx(0.0, abs=1e-9)


def test_fd_of_samples_converges_to_closed_form() -> None:
    g = torch.Generator().manual_seed(2)
    d, n = 3, 200_000
    m1, m2 = torch.tensor([0.0, 1.0, -1.0]), torch.tensor([0.5, 0.5, 0.0])
    a, b = torch.tensor([1.0, 0.5, 2.0]), torch.tensor([0.3, 1.0, 1.0])
    x = m1 + a.sqrt() * torch.randn(n, d, generator=g, dtype=torch.float64)
    y = m2 + b.sqrt() * torch.randn(n, d, generator=g, dtype=torch.float64)
    want = float((m1 - m2).square().sum() + (a.sqrt() - b.sqrt()).square().sum())
    # the estimator's error is O(1/sqrt(n)) ~ 0.005 here
    assert frechet_distance(x, y) == pytest.approx(want, abs=0.03)
    assert frechet_distance(x, x) == pytest.approx(0.0, abs=1e-8)
    with pytest.raises(ValueError, match="feature shapes"):
        frechet_distance(x, y[:, :2])


@pytest.fixture(scope="module")
def ev() -> DigitsEvaluator:
    return DigitsEvaluator(size=8)


def test_evaluator_accuracy_on_real_heldout_digits(ev: DigitsEvaluator) -> None:
    # the classifier never saw the held-out digits
    assert len(ev.x_heldout) == round(metrics.HOLDOUT * 1797)
    assert ev.heldout_accuracy() > 0.95
    assert metrics.conditional_accuracy(ev.x_heldout, ev.y_heldout, ev) == ev.heldout_accuracy()
    # wrong labels: about 1/10 of chance agreement at most
    assert ev.accuracy(ev.x_heldout, (ev.y_heldout + 1) % 10) < 0.05
    assert ev.features(ev.x_heldout[:5]).shape == (5, 64)
    assert ev.predict(ev.x_heldout[:7]).shape == (7,)


def test_evaluator_fd_floor_and_degradation(ev: DigitsEvaluator) -> None:
    floor = ev.fd_floor()
    assert floor > 0
    assert ev.fd(ev.x_heldout) == pytest.approx(floor, rel=1e-6)  # the same set, shuffled
    g = torch.Generator().manual_seed(0)
    noisy = (ev.x_heldout + 0.5 * torch.randn(ev.x_heldout.shape, generator=g)).clamp(-1, 1)
    assert ev.fd(noisy) > 2 * floor
    blank = torch.full_like(ev.x_heldout, -1.0) + 0.01 * torch.randn(ev.x_heldout.shape, generator=g)
    assert ev.fd(blank) > 10 * floor
    # one class only: mode collapse is far from the data
    assert ev.fd(ev.x_train[ev.y_train == 3]) > 5 * floor


def test_evaluator_matched_fd_averages_chunks(ev: DigitsEvaluator) -> None:
    n = len(ev.x_heldout)
    x = ev.x_train[: 2 * n + 5]
    perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(0))
    f = ev.features(x)[perm]
    want = (frechet_distance(f[:n], ev._f_train) + frechet_distance(f[n:2 * n], ev._f_train)) / 2
    assert ev.fd(x) == pytest.approx(want, rel=1e-12)
    assert ev.fd(x, matched=False) == pytest.approx(frechet_distance(ev.features(x), ev._f_train), rel=1e-12)


def test_evaluator_fd_with_labels_matches_heldout_composition(ev: DigitsEvaluator) -> None:
    floor = ev.fd_floor()
    # the held-out set itself, labelled: one chunk with exactly its class counts = the floor
    assert ev.fd(ev.x_heldout, ev.y_heldout) == pytest.approx(floor, rel=1e-6)
    x2, y2 = torch.cat([ev.x_heldout, ev.x_heldout.flip(0)]), torch.cat([ev.y_heldout, ev.y_heldout.flip(0)])
    chunks = ev._chunks(ev.features(x2), y2)
    assert len(chunks) == 2 and all(len(c) == len(ev.y_heldout) for c in chunks)
    assert len(torch.cat(chunks).unique()) == len(x2)  # disjoint
    for c in chunks:
        assert torch.equal(torch.bincount(y2[c], minlength=10), torch.bincount(ev.y_heldout, minlength=10))
    assert ev.fd(x2, y2) == pytest.approx(floor, rel=1e-6)
    # a class-balanced sample of the training digits: chunks follow the held-out composition
    idx = torch.cat([torch.nonzero(ev.y_train == c).flatten()[:60] for c in range(10)])
    ch = ev._chunks(ev.features(ev.x_train[idx]), ev.y_train[idx])
    assert len(ch) == 1
    with pytest.raises(ValueError, match="labels"):
        ev.fd(ev.x_heldout, ev.y_heldout[:10])


def test_evaluator_cached_on_disk_and_deterministic(ev: DigitsEvaluator) -> None:
    files = list(metrics.cache_dir().glob("digits_classifier_8_*.safetensors"))
    assert files
    metrics._LOADED.clear()
    again = DigitsEvaluator(8)
    assert again is not ev
    assert torch.equal(again.features(ev.x_heldout), ev.features(ev.x_heldout))
    assert DigitsEvaluator(8) is again  # in-memory cache


def test_evaluator_bad_input(ev: DigitsEvaluator) -> None:
    with pytest.raises(ValueError, match="shape"):
        ev.predict(torch.zeros(2, 3, 8, 8))
    with pytest.raises(ValueError, match="shape"):
        ev.predict(torch.zeros(2, 1, 16, 16))
    with pytest.raises(ValueError, match="labels"):
        ev.accuracy(ev.x_heldout[:4], torch.zeros(3, dtype=torch.long))
    with pytest.raises(ValueError, match="size"):
        DigitsEvaluator(2)


def test_train_classifier_is_deterministic() -> None:
    x, y, _, _ = metrics.digits_split(8)
    a = metrics.train_classifier(x[:200], y[:200], epochs=1, seed=3)
    b = metrics.train_classifier(x[:200], y[:200], epochs=1, seed=3)
    for pa, pb in zip(a.parameters(), b.parameters()):
        assert torch.equal(pa, pb)
    assert math.isfinite(float(a(x[:4]).sum()))
