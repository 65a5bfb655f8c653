"""Background results of the notes (000 "Bayes' Rule and Its Validity", 003 mean-field VI) checked numerically.

These are not library code paths: the notes state them, THEORY.md lists them (T-BAY-1, T-BAY-5), and a test
that can fail is the way to keep the documentation of them honest.
"""

import numpy as np
import pytest
from scipy import integrate, optimize, stats


def bvm_tv(n: int, theta0: float = 0.3, wrong: bool = False) -> float:
    """Total variation between the Beta(1 + k, 1 + n - k) posterior of a Bernoulli(theta0) sample with
    k = round(theta0 n) successes and the Bernstein-von Mises normal N(k/n, 1 / (n I(theta0))),
    I(theta) = 1 / (theta (1 - theta)); ``wrong`` uses I instead of 1/I as the variance."""
    k = round(theta0 * n)
    post = stats.beta(1 + k, 1 + n - k)
    info = 1 / (theta0 * (1 - theta0))
    var = info / n if wrong else 1 / (n * info)
    approx = stats.norm(k / n, np.sqrt(var))
    lo, hi = min(post.ppf(1e-12), approx.ppf(1e-12)), max(post.ppf(1 - 1e-12), approx.ppf(1 - 1e-12))
    val, _ = integrate.quad(lambda th: abs(post.pdf(th) - approx.pdf(th)), lo, hi, limit=500, points=[k / n])
    return 0.5 * val


def test_bernstein_von_mises_rate():  # T-BAY-1
    tv = [bvm_tv(n) for n in (50, 500, 5000)]
    for got, want in zip(tv, (0.035, 0.0106, 0.0033)):
        assert got == pytest.approx(want, rel=0.1)
    assert tv[0] / tv[1] == pytest.approx(np.sqrt(10), rel=0.1) and tv[1] / tv[2] == pytest.approx(np.sqrt(10), rel=0.1)
    assert bvm_tv(500, wrong=True) > 0.5


def cavi_gaussian(mu: np.ndarray, lam: np.ndarray, sweeps: int = 100) -> tuple[np.ndarray, np.ndarray]:
    """Mean-field coordinate ascent for p = N(mu, lam^-1): log q_j = E_{q_-j}[log p] + const gives
    q_j = N(m_j, 1/lam_jj) with m_j = mu_j - sum_{i != j} lam_ji (m_i - mu_i) / lam_jj (Bishop 10.1.2)."""
    m = np.zeros_like(mu)
    for _ in range(sweeps):
        for j in range(len(mu)):
            others = [i for i in range(len(mu)) if i != j]
            m[j] = mu[j] - lam[j, others] @ (m[others] - mu[others]) / lam[j, j]
    return m, 1 / np.diag(lam)


def test_mean_field_cavi_gaussian():  # T-BAY-5
    mu = np.array([1.0, -2.0])
    cov = np.array([[1.0, 0.8], [0.8, 2.0]])
    lam = np.linalg.inv(cov)
    m, var = cavi_gaussian(mu, lam)
    np.testing.assert_allclose(m, mu, atol=1e-8)
    np.testing.assert_allclose(var, 1 / np.diag(lam), atol=1e-8)
    assert np.all(var < np.diag(cov))  # mean field underestimates the marginal variances

    # the fixed point maximizes the mean-field ELBO E_q log p + H(q) (found here by a generic optimizer)
    def neg_elbo(z):
        mm, lv = z[:2], z[2:]
        d = mm - mu
        return 0.5 * (d @ lam @ d + np.diag(lam) @ np.exp(lv)) - 0.5 * lv.sum()

    best = optimize.minimize(neg_elbo, np.zeros(4), method="BFGS", options={"gtol": 1e-12}).x
    np.testing.assert_allclose(best[:2], m, atol=1e-5)
    np.testing.assert_allclose(np.exp(best[2:]), var, rtol=1e-5)
