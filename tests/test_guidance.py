"""Classifier guidance, multi-view denoising (visual anagrams) and their CLI, against exact Gaussian-mixture
oracles (THEORY T-CG-1, T-CG-2, T-BAY-2, T-CFG-1, T-MV-1, T-MV-2, B-13)."""

from __future__ import annotations

import math

import pytest
import torch

import torchdiffusion as td
from torchdiffusion.cli.main import main
from torchdiffusion.parameterization.guidance import (
    CFG,
    VIEWS,
    Classifier,
    ClassifierGuidance,
    MultiView,
    View,
    check_view,
    get_view,
)

torch.set_default_dtype(torch.float32)

# three classes, five components in 2-D (class 0 and class 2 have two components each)
MEANS = torch.tensor([[-2.0, 0.0], [-1.0, 1.5], [1.5, -1.0], [2.0, 1.0], [0.5, 2.0]])
VARS = torch.tensor([[0.2, 0.1], [0.1, 0.3], [0.15, 0.15], [0.3, 0.05], [0.1, 0.1]])
WEIGHTS = torch.tensor([0.3, 0.1, 0.25, 0.2, 0.15])
LABELS = torch.tensor([0, 0, 1, 2, 2])


def mixture(keep=None) -> td.GaussianMixture:
    keep = torch.ones(len(LABELS), dtype=torch.bool) if keep is None else keep
    return td.GaussianMixture(WEIGHTS[keep], MEANS[keep], VARS[keep], labels=LABELS[keep])


def oracle_model(gmm: td.GaussianMixture, process) -> td.Denoiser:
    return td.Denoiser(gmm.net(process, "eps"), process, "eps")


def bayes_classifier(gmm: td.GaussianMixture, process):
    """Exact ``log p(y | x_t)`` of the oracle (log space)."""
    return lambda x, t: gmm.class_log_prob(x, process, t)


PROCESSES = {"ddpm": td.DDPM("linear", 1000), "vp": td.VP()}
TIMES = {"ddpm": [5, 100, 400, 900], "vp": [0.01, 0.1, 0.4, 0.9]}


def points(n: int = 64, seed: int = 0) -> torch.Tensor:
    return 2.0 * torch.randn(n, 2, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


# --- classifier guidance -------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", list(PROCESSES))
@pytest.mark.parametrize("k", [0, 1, 2])
def test_classifier_guidance_s1_is_class_conditional_score(name, k):
    """T-CG-1 / T-SDE-12: at s = 1, the unconditional eps guided by the Bayes classifier is the eps of the
    class-k mixture (built separately from the class-k components only); x0 matches its Tweedie mean."""
    proc, gmm = PROCESSES[name], mixture()
    only_k = mixture(k == LABELS)
    guided = ClassifierGuidance(oracle_model(gmm, proc), bayes_classifier(gmm, proc), 1.0, model_cond=None)
    x = points()
    for t in TIMES[name]:
        x0, eps = guided.predict(x, t, k)
        eps_k, x0_k = only_k.eps_x0(x, proc, torch.full((len(x),), float(t), dtype=torch.float64))
        torch.testing.assert_close(eps, eps_k, rtol=1e-9, atol=1e-9)
        torch.testing.assert_close(x0, x0_k, rtol=1e-9, atol=1e-8)


@pytest.mark.parametrize("name", list(PROCESSES))
def test_classifier_guidance_scale_is_tilted_score(name):
    """T-CG-1 / T-CG-2 for s != 1: ``-eps_g / sigma = grad log [p_t(x) p(y|x)^s]`` (autograd, 1e-9); s = 0 is the
    wrapped model exactly."""
    proc, gmm = PROCESSES[name], mixture()
    model = oracle_model(gmm, proc)
    x, y = points(32, 1), torch.tensor([0, 1, 2, 2] * 8)
    for t in TIMES[name][1:3]:
        tt = torch.full((len(x),), float(t), dtype=torch.float64)
        xg = x.clone().requires_grad_(True)
        logp = gmm.log_prob(xg, proc, tt) + 2.5 * gmm.class_log_prob(xg, proc, tt).gather(1, y[:, None])[:, 0]
        (score,) = torch.autograd.grad(logp.sum(), xg)
        _, eps = ClassifierGuidance(model, bayes_classifier(gmm, proc), 2.5, model_cond=None).predict(x, t, y)
        torch.testing.assert_close(-eps / proc.sigma(tt)[:, None], score, rtol=1e-9, atol=1e-9)
        plain = model.predict(x, t)
        zero = ClassifierGuidance(model, bayes_classifier(gmm, proc), 0.0, model_cond=None).predict(x, t, y)
        assert torch.equal(plain[0], zero[0]) and torch.equal(plain[1], zero[1])


def test_classifier_guidance_composes_with_cfg():
    """T-CFG-1: with oracles, CFG(w) is classifier guidance with scale 1 + w on the unconditional model, so
    CG(CFG(w), s) = CFG(w + s) (and guiding the null class of a conditional oracle works the same)."""
    proc, gmm = PROCESSES["ddpm"], mixture()
    model, clf = oracle_model(gmm, proc), bayes_classifier(gmm, proc)
    x, y = points(16, 2), torch.tensor([2, 0, 1, 1] * 4)
    for t in (50, 500):
        ref = CFG(model, 0.7 + 1.5).predict(x, t, y)
        got = ClassifierGuidance(CFG(model, 0.7), clf, 1.5).predict(x, t, y)
        null = ClassifierGuidance(model, clf, 1.7, model_cond=-1).predict(x, t, y)
        for a, b in zip(ref, got):
            torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-9)
        for a, b in zip(CFG(model, 0.7).predict(x, t, y), null):
            torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("sampler,opts", [("ddim", {}), ("ddpm", {}), ("heun", {})])
def test_classifier_guidance_through_samplers(sampler, opts):
    """The wrapper is a model for every sampler: guided sampling at s = 1 follows the class-k oracle's trajectory
    (same seed, same noise draws) to 1e-8, while the unguided run ends elsewhere."""
    proc, gmm = PROCESSES["ddpm"], mixture()
    guided = ClassifierGuidance(oracle_model(gmm, proc), bayes_classifier(gmm, proc), 1.0, model_cond=None)
    target = oracle_model(mixture(LABELS == 2), proc)
    x_T = torch.randn(64, 2, generator=torch.Generator().manual_seed(3), dtype=torch.float64)

    def run(m, cond):
        return td.sample(m, x_T, sampler, 20, generator=torch.Generator().manual_seed(4), cond=cond, **opts)
    a, b = run(guided, 2), run(target, None)
    torch.testing.assert_close(a, b, rtol=1e-8, atol=1e-8)
    plain = run(oracle_model(gmm, proc), None)
    assert (plain - b).abs().max() > 0.5
    pred = gmm.class_log_prob(a).argmax(1)  # guided samples land in class 2
    assert (pred == 2).float().mean() > 0.95


def test_classifier_guidance_log_space_gap_200():
    """T-BAY-2: a two-class linear classifier with a logit gap of 200: the gradient of log p(y=1 | x) is finite
    and equals the analytic ``(1 - softmax_1) (w_1 - w_0) = sigmoid(-200) (w1 - w0)``."""
    proc = PROCESSES["ddpm"]
    w = torch.tensor([[0.0, 0.0], [-100.0, 0.0]], dtype=torch.float64)  # logits w x: gap -200 at x=(2, 0)
    model = td.Denoiser(lambda x, t: torch.zeros_like(x), proc, "eps")
    cg = ClassifierGuidance(model, lambda x, t: x @ w.T, 1.0, model_cond=None)
    x = torch.tensor([[2.0, 0.0], [-0.01, 0.0]], dtype=torch.float64)
    g = cg.grad_log_prob(x, 10, torch.tensor([1, 1]))
    assert torch.isfinite(g).all()
    p0 = torch.sigmoid(torch.tensor([200.0, -1.0], dtype=torch.float64))  # p(y=0 | x)
    torch.testing.assert_close(g, p0[:, None] * (w[1] - w[0])[None], rtol=1e-12, atol=1e-300)
    _, eps = cg.predict(x, 10, 1)
    torch.testing.assert_close(eps, -proc.sigma(torch.tensor(10.0)).item() * g, rtol=1e-12, atol=0)


def test_classifier_guidance_errors():
    proc, gmm = PROCESSES["ddpm"], mixture()
    cg = ClassifierGuidance(oracle_model(gmm, proc), bayes_classifier(gmm, proc), 1.0, model_cond=None)
    with pytest.raises(ValueError, match="needs the target class"):
        cg.predict(points(4), 10)
    with pytest.raises(ValueError, match=r"labels must be in 0\.\.2"):
        cg.predict(points(4), 10, 3)
    with pytest.raises(ValueError, match="model_cond"):
        ClassifierGuidance(oracle_model(gmm, proc), bayes_classifier(gmm, proc), 1.0, model_cond="null")
    from torchdiffusion.nets.classifier import NoisyClassifier

    clf_vp = Classifier(NoisyClassifier(1, 3, channels=8, groups=8), td.VP())
    with pytest.raises(ValueError, match="another process"):
        ClassifierGuidance(oracle_model(gmm, proc), clf_vp, 1.0)
    clf_ddpm = Classifier(NoisyClassifier(1, 3, channels=8, groups=8), td.DDPM("linear", 1000))
    ClassifierGuidance(oracle_model(gmm, proc), clf_ddpm, 1.0)  # same process: accepted


def test_noisy_classifier_and_loss():
    """B-13: the classifier net gives (B, K) logits at any t; the training loss is the cross-entropy on x_t (at a
    zero-initialised head it equals log K exactly), and a trained run loads only through load_classifier."""
    from torchdiffusion.nets.classifier import NoisyClassifier
    from torchdiffusion.runs.losses import LOSSES

    torch.manual_seed(0)
    net = NoisyClassifier(1, 10, channels=8, channel_mult=(1, 2), num_res_blocks=1, groups=8)
    x = torch.randn(5, 1, 8, 8)
    assert net(x, torch.tensor([1, 10, 100, 500, 999])).shape == (5, 10)
    assert net(x, torch.tensor(3)).shape == (5, 10)
    torch.nn.init.zeros_(net.head.weight)
    torch.nn.init.zeros_(net.head.bias)
    model = td.Denoiser(net, td.DDPM("cosine", 1000), "eps")
    loss = LOSSES["classifier"](model, x, cond=torch.arange(5), generator=torch.Generator().manual_seed(0), cfg={})
    assert abs(loss.item() - math.log(10)) < 1e-6
    with pytest.raises(ValueError, match="needs labels"):
        LOSSES["classifier"](model, x, cond=None, generator=None, cfg={})


# --- views and multi-view denoising ---------------------------------------------------------------------------
SHAPE = (1, 4, 4)


@pytest.mark.parametrize("name", list(VIEWS))
def test_builtin_views_orthogonal_and_inverse(name):
    """T-MV-1: every built-in view is a linear orthogonal map (A^T A = I on the standard basis) with
    inverse = transpose, on 1- and 3-channel images; v^{-1}(v(x)) = x exactly; noise stays N(0, I)."""
    v = VIEWS[name]
    check_view(v, SHAPE)
    check_view(v, (3, 8, 8))
    x = torch.randn(7, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    assert torch.equal(v.inverse(v.forward(x)), x) and torch.equal(v.forward(v.inverse(x)), x)
    d = 3 * 8 * 8
    A = v.forward(torch.eye(d).reshape(d, 3, 8, 8)).reshape(d, d)
    assert torch.equal(A @ A.T, torch.eye(d))  # a signed permutation
    if name not in ("identity",):
        assert not torch.equal(v.forward(x), x)


def test_views_are_the_transforms_named():
    x = torch.arange(16.0).reshape(1, 1, 4, 4)
    assert torch.equal(VIEWS["rot90"].forward(x)[0, 0, 0], torch.tensor([3.0, 7.0, 11.0, 15.0]))
    assert torch.equal(VIEWS["rot180"].forward(x).flatten(), torch.arange(15.0, -1, -1))
    assert torch.equal(VIEWS["rot270"].forward(VIEWS["rot90"].forward(x)), x)
    assert torch.equal(VIEWS["transpose"].forward(x)[0, 0], x[0, 0].T)
    assert torch.equal(VIEWS["flip_h"].forward(x)[0, 0, 0], torch.tensor([3.0, 2.0, 1.0, 0.0]))
    assert torch.equal(VIEWS["negate"].forward(x), -x)
    j = VIEWS["jigsaw"].forward(torch.arange(64.0).reshape(1, 1, 8, 8))[0, 0]
    pieces = {tuple(j[r:r + 2, c:c + 2].flatten().tolist()) for r in range(0, 8, 2) for c in range(0, 8, 2)}
    orig = torch.arange(64.0).reshape(8, 8)
    assert pieces == {tuple(orig[r:r + 2, c:c + 2].flatten().tolist()) for r in range(0, 8, 2) for c in range(0, 8, 2)}
    assert not torch.equal(j, orig)


@pytest.mark.parametrize("bad,why", [
    (View("scale", lambda x: 1.5 * x, lambda x: x / 1.5), "A\\^T A != I"),
    (View("blur", lambda x: 0.5 * (x + x.roll(1, -1)), lambda x: x), "A\\^T A != I"),
    (View("wrong_inverse", lambda x: x.flip(-1), lambda x: x), "inverse does not undo"),
    (View("shift", lambda x: x + 1, lambda x: x - 1), "not linear"),
    (View("crop", lambda x: x[..., :2, :], lambda x: x), "changes the shape"),
])
def test_non_orthogonal_view_refused(bad, why):
    proc, gmm = PROCESSES["ddpm"], td.GaussianMixture(torch.ones(1), torch.zeros(1, 16), 0.5)
    with pytest.raises(ValueError, match=why):
        check_view(bad, SHAPE)
    with pytest.raises(ValueError, match="not an orthogonal pixel transform"):
        MultiView(oracle_model(gmm, proc), ["identity", bad], shape=SHAPE)
    m = MultiView(oracle_model(gmm, proc), ["identity", bad])  # checked on the first call instead
    with pytest.raises(ValueError, match="not an orthogonal pixel transform"):
        m.predict(torch.zeros(2, *SHAPE), 10)
    if bad.name == "scale":  # a large image: the probe-based check
        with pytest.raises(ValueError, match="does not preserve norms"):
            check_view(bad, (3, 48, 48))
        check_view(VIEWS["jigsaw"], (3, 48, 48))


def test_unknown_view_lists_allowed():
    with pytest.raises(ValueError, match="unknown view 'rot45'; allowed: identity, flip_h"):
        get_view("rot45")


def image_mixture(seed: int, group: list[str] | None = None) -> td.GaussianMixture:
    """A labelled mixture on 4x4 images (2 classes x 2 components); with ``group`` the component set is closed
    under those views (each component and its transforms, same weight), so the density is invariant."""
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(4, *SHAPE, generator=g, dtype=torch.float64)
    labels = torch.tensor([0, 0, 1, 1])
    var = 0.05 + 0.3 * torch.rand(4, generator=g, dtype=torch.float64)
    if group:
        base = torch.cat([VIEWS[v].forward(base) for v in group])
        labels, var = labels.repeat(len(group)), var.repeat(len(group))
    return td.GaussianMixture(torch.ones(len(labels)), base.flatten(1), var, labels=labels)


def test_multiview_single_identity_is_plain_model():
    proc, gmm = PROCESSES["ddpm"], image_mixture(0)
    model = oracle_model(gmm, proc)
    x = torch.randn(8, *SHAPE, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    for cond in (None, 1):
        a = MultiView(model, ["identity"], shape=SHAPE).predict(x, 300, cond)
        b = model.predict(x, 300, cond)
        assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


@pytest.mark.parametrize("group", [["identity", "rot180"], ["identity", "rot90", "rot180", "rot270"]])
def test_multiview_invariant_density_gives_plain_eps(group):
    """T-MV-1: for a density invariant under the view group, the multi-view average equals plain eps (1e-10).
    The same views on a non-invariant mixture change eps (so the check has power), and with a rot90 group a
    wrapper that applied v instead of v^{-1} on the way back would fail."""
    proc = PROCESSES["vp"]
    x = torch.randn(16, *SHAPE, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    inv, plain = oracle_model(image_mixture(3, group), proc), oracle_model(image_mixture(3), proc)
    for t in (0.05, 0.5):
        for cond in (None, 0):
            a = MultiView(inv, group, shape=SHAPE).predict(x, t, cond)
            b = inv.predict(x, t, cond)
            torch.testing.assert_close(a[1], b[1], rtol=1e-10, atol=1e-10)
            torch.testing.assert_close(a[0], b[0], rtol=1e-10, atol=1e-10)
        diff = MultiView(plain, group, shape=SHAPE).predict(x, t)[1] - plain.predict(x, t)[1]
        assert diff.abs().max() > 1e-2


def test_multiview_is_gradient_of_mean_log_density():
    """T-MV-2: with a condition per view, ``-sigma^-1 eps_bar = grad (1/N) sum_i log p_{c_i}(v_i x)`` (autograd,
    1e-9), and x0_bar = (x - sigma eps_bar) / alpha."""
    proc, gmm = PROCESSES["ddpm"], image_mixture(5)
    views, conds = ["identity", "rot180", "jigsaw"], [0, 1, 1]
    with pytest.raises(ValueError, match="one condition per view"):
        MultiView(oracle_model(gmm, proc), views, conds=[0, 1])
    with pytest.raises(ValueError, match="needs height and width divisible by 4"):
        MultiView(oracle_model(gmm, proc), ["jigsaw"], shape=(1, 6, 6))
    m = MultiView(oracle_model(gmm, proc), views, conds=conds, shape=(1, 4, 4))
    x = torch.randn(8, *SHAPE, generator=torch.Generator().manual_seed(6), dtype=torch.float64)
    for t in (20, 250, 700):
        x0, eps = m.predict(x, t)
        tt = torch.full((len(x),), float(t), dtype=torch.float64)
        xg = x.clone().requires_grad_(True)
        logp = sum(gmm.log_prob(VIEWS[v].forward(xg), proc, tt, y=torch.full((len(x),), c))
                   for v, c in zip(views, conds)) / len(views)
        (score,) = torch.autograd.grad(logp.sum(), xg)
        s, a = proc.sigma(tt)[0].item(), proc.alpha(tt)[0].item()
        torch.testing.assert_close(-eps / s, score, rtol=1e-9, atol=1e-9)
        torch.testing.assert_close(x0, (x - s * eps) / a, rtol=1e-9, atol=1e-9)


def test_multiview_with_cfg_through_sampler():
    """Anagram with CFG through a sampler: the result equals averaging CFG per view by hand at every step (one
    DDIM step checked exactly) and runs under ddim and dpmpp_2m."""
    proc, gmm = PROCESSES["ddpm"], image_mixture(7)
    base = oracle_model(gmm, proc)
    m = MultiView(CFG(base, 1.0), ["identity", "flip_v"], conds=[0, 1], shape=SHAPE)
    x = torch.randn(4, *SHAPE, generator=torch.Generator().manual_seed(8), dtype=torch.float64)
    e0 = CFG(base, 1.0).predict(x, 600, 0)[1]
    e1 = VIEWS["flip_v"].inverse(CFG(base, 1.0).predict(VIEWS["flip_v"].forward(x), 600, 1)[1])
    torch.testing.assert_close(m.predict(x, 600)[1], (e0 + e1) / 2, rtol=1e-12, atol=1e-12)
    for sampler in ("ddim", "dpmpp_2m"):
        out = td.sample(m, x, sampler, 10)
        assert out.shape == x.shape and torch.isfinite(out).all()


# --- CLI -----------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("guid")
    small = ["--set", "train.steps=2", "--set", "model.channels=8", "--set", "train.batch=8", "--quiet"]
    assert main(["train", "digits", "--out", str(root / "cond"), *small]) == 0
    assert main(["train", "classifier_digits", "--out", str(root / "clf"), *small]) == 0
    assert main(["train", "digits", "--out", str(root / "uncond"), *small, "--set", "data.conditional=false"]) == 0
    return root


def test_cli_guided_sampling(runs, tmp_path):
    from PIL import Image

    r = runs
    common = ["--n", "3", "--steps", "2"]
    assert main(["sample", str(r / "uncond"), *common, "--classifier", str(r / "clf"), "--class", "3",
                 "--classifier-scale", "2", "--out", str(tmp_path / "a.png")]) == 0
    assert main(["sample", str(r / "cond"), *common, "--classifier", str(r / "clf"), "--class", "3", "--null-class",
                 "--out", str(tmp_path / "b.npz")]) == 0
    assert main(["sample", str(r / "cond"), *common, "--anagram", "rot180", "--class", "6", "--class2", "9",
                 "--guidance", "1", "--out", str(tmp_path / "c.png")]) == 0
    w, h = Image.open(tmp_path / "c.png").size
    assert w > 5 * h  # 3 pairs side by side in one row


@pytest.mark.parametrize("args,msg", [
    (["--class2", "9"], "--class2 needs --anagram"),
    (["--anagram", "rot45", "--class", "6", "--class2", "9"], "unknown view 'rot45'; allowed: identity"),
    (["--anagram", "rot180", "--class", "6"], "--anagram needs --class and --class2"),
    (["--anagram", "rot180", "--class", "6", "--class2", "12"], "--class2 must be in 0..9"),
    (["--classifier-scale", "2"], "--classifier-scale needs --classifier"),
    (["--classifier", "CLF"], "--classifier needs --class"),
    (["--classifier", "COND", "--class", "1"], "is not a classifier run"),
    (["--null-class", "--class", "1"], "--null-class needs --classifier"),
])
def test_cli_errors_one_line_exit_2(runs, capsys, args, msg):
    args = [str(runs / "clf") if a == "CLF" else str(runs / "cond") if a == "COND" else a for a in args]
    capsys.readouterr()
    assert main(["sample", str(runs / "cond"), "--n", "2", "--steps", "1", *args]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and msg in err, err


def test_cli_class_on_unconditional_model_without_classifier(runs, capsys):
    assert main(["sample", str(runs / "uncond"), "--n", "2", "--steps", "1", "--class", "1"]) == 2
    assert "not class-conditional (or give --classifier RUN)" in capsys.readouterr().err


def test_classifier_guidance_min_alpha():
    """Below ``min_alpha`` (cosine DDPM's last step, alpha = 5e-5) no guidance is applied; with min_alpha = 0 the
    exact class-conditional eps is returned there too."""
    proc, gmm = td.DDPM("cosine", 1000), mixture()
    model, clf, x = oracle_model(gmm, proc), bayes_classifier(gmm, proc), points(16, 4)
    assert proc.alpha(torch.tensor(999.0)) < 1e-3 < proc.alpha(torch.tensor(990.0))
    plain = model.predict(x, 999)
    cut = ClassifierGuidance(model, clf, 1.0, model_cond=None).predict(x, 999, 1)
    assert torch.equal(plain[0], cut[0]) and torch.equal(plain[1], cut[1])
    full = ClassifierGuidance(model, clf, 1.0, model_cond=None, min_alpha=0.0).predict(x, 999, 1)
    torch.testing.assert_close(full[1], mixture(LABELS == 1).eps(x, proc, torch.full((16,), 999.0)),
                               rtol=1e-9, atol=1e-9)
    assert not torch.equal(full[1], plain[1])


def test_classifier_loss_bayes_optimum_is_the_oracle_posterior():
    """B-13: the training loss (cross-entropy of net(x_t, t) against y, t and x_t drawn as in DSM) is minimised
    by the oracle's p(y | x_t): moving its logits along any direction h raises the expected loss, and the
    derivative at the oracle, E[sum_k p_k h_k - h_y], is zero within Monte Carlo error."""
    from torchdiffusion.runs.losses import LOSSES

    means = torch.tensor([[-1.0, 0.0], [1.0, 0.3], [0.0, 1.2]], dtype=torch.float64)
    gm = td.GaussianMixture(torch.tensor([0.5, 0.3, 0.2]), means, torch.full((3,), 0.3))
    proc = td.DDPM()

    def make(delta):
        def net(x, t):
            h = torch.stack([x[:, 0], torch.zeros_like(x[:, 0]), x[:, 1] ** 2], 1)
            return gm.class_log_prob(x, proc, t) + delta * h
        return td.Denoiser(net, proc, "eps")

    diffs, grads = [], []
    for b in range(20):
        x0, y = gm.sample(2000, torch.Generator().manual_seed(100 + b))
        loss = {d: LOSSES["classifier"](make(d), x0, cond=y, generator=torch.Generator().manual_seed(b), cfg={})
                for d in (-0.3, -0.01, 0.0, 0.01, 0.3)}
        diffs.append(min(loss[-0.3], loss[0.3]) - loss[0.0])
        grads.append((loss[0.01] - loss[-0.01]) / 0.02)
    diffs, grads = torch.stack(diffs), torch.stack(grads)
    se = lambda v: v.std() / len(v) ** 0.5  # noqa: E731
    assert diffs.mean() > 4 * se(diffs)  # the oracle is the minimum
    assert grads.mean().abs() < 4 * se(grads)  # ... and a stationary point
    # a wrong classifier (the prior, ignoring x) is not stationary
    x0, y = gm.sample(20000, torch.Generator().manual_seed(1))
    prior = td.Denoiser(lambda x, t: gm.weights.log().expand(len(x), 3), proc, "eps")
    ce = LOSSES["classifier"](prior, x0, cond=y, generator=torch.Generator().manual_seed(0), cfg={})
    assert ce > LOSSES["classifier"](make(0.0), x0, cond=y, generator=torch.Generator().manual_seed(0), cfg={}) + 0.05
