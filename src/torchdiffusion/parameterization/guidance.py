"""Guidance as model wrappers usable with every sampler: classifier-free guidance (:class:`CFG`), classifier
guidance with a noise-conditional classifier (:class:`ClassifierGuidance`) and multi-view denoising / visual
anagrams (:class:`MultiView` with the orthogonal :data:`VIEWS`). A wrapper has ``.process`` and
``.predict(x, t, cond) -> (x0, eps)``, so wrappers compose (e.g. ``MultiView(CFG(model, w), ...)``)."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
from torch import Tensor

from torchdiffusion._tensor import check_number
from torchdiffusion.processes import Process, as_time, expand_like


class CFG:
    """Classifier-free guidance (Ho & Salimans 2022, THEORY T-CFG-1):
    ``eps_g = (1 + w) eps(x, c) - w eps(x, null)``, and the same combination of the x0 predictions.

    ``w = 0`` is the plain conditional model; the notes' ``gamma`` (000) and ``lambda`` (004) equal ``1 + w``.
    Both predictions come from one batched network call.

    The condition is anything the model takes as ``cond`` with a batch dimension: class labels ``(B,)`` or token ids
    ``(B, L)``; the null condition is ``cond`` filled with ``-1`` (the null class; for text, all padding: the empty
    prompt). With ``negative=True`` the unconditional branch is a given condition instead (a negative prompt):
    ``cond`` then holds pairs along dimension 1, ``cond[:, 0]`` the condition and ``cond[:, 1]`` the negative one,
    so that ``eps_g = (1 + w) eps(x, c) - w eps(x, c_neg)``.
    """

    def __init__(self, model, w: float, *, negative: bool = False):
        self.model, self.w, self.process = model, check_number(w, "guidance scale w"), model.process
        self.negative = bool(negative)

    def predict(self, x: Tensor, t, cond=None) -> tuple[Tensor, Tensor]:
        if cond is None:
            raise ValueError("classifier-free guidance needs a class condition")
        n = x.shape[0]
        c, tt = _labels(cond, n, x.device), _batch_time(t, n)
        if self.negative:
            if c.ndim < 2 or c.shape[1] != 2:
                raise ValueError(f"CFG(negative=True) needs cond of shape (B, 2, ...) (condition, negative), got "
                                 f"{tuple(c.shape)}")
            c, u = c[:, 0], c[:, 1]
        else:
            u = torch.full_like(c, -1)
        x0, eps = self.model.predict(torch.cat([x, x]), torch.cat([tt, tt]), torch.cat([c, u]))
        w = self.w
        return (1 + w) * x0[:n] - w * x0[n:], (1 + w) * eps[:n] - w * eps[n:]


# --- classifier guidance -------------------------------------------------------------------------------------
def _batch_time(t, n: int) -> Tensor:
    tt = as_time(t)
    return tt.expand(n) if tt.ndim == 0 else tt


def _labels(cond, n: int, device) -> Tensor:
    c = torch.as_tensor(cond, device=device).long()
    return c.expand(n) if c.ndim == 0 else c


def process_difference(p, q, points: int = 11) -> str | None:
    """How process ``p`` differs from ``q`` in words (kind, time range, or the first grid time where ``alpha(t)``
    or ``sigma(t)`` differ), or None when they are the same."""
    if type(p) is not type(q) or p.discrete != q.discrete:
        return f"a {type(p).__name__} process against a {type(q).__name__} process"
    if abs(p.t_max - q.t_max) > 1e-9:
        return f"t_max {p.t_max:g} against {q.t_max:g}"
    t = torch.linspace(max(p.t_min, q.t_min), p.t_max, points, dtype=torch.float64)
    t = t.round() if p.discrete else t
    for ti in t:
        a, b = (float(p.alpha(ti)), float(p.sigma(ti))), (float(q.alpha(ti)), float(q.sigma(ti)))
        if any(abs(u - v) > 1e-9 + 1e-6 * abs(v) for u, v in zip(a, b)):
            return (f"at t = {float(ti):g} alpha, sigma = {a[0]:.4g}, {a[1]:.4g} against {b[0]:.4g}, {b[1]:.4g} "
                    f"(same kind, {type(p).__name__}, other schedule)")
    return None


def same_process(p, q, points: int = 11) -> bool:
    """Whether two processes have the same ``alpha(t)`` and ``sigma(t)`` (checked on a grid of their range)."""
    return process_difference(p, q, points) is None


class Classifier:
    """A noise-conditional classifier ``p_phi(y | x_t, t)``: its network (``net(x_t, t) -> logits``) and the process
    whose times it was trained on (a ``classifier`` run; B-13)."""

    def __init__(self, net: Callable, process: Process):
        self.net, self.process = net, process

    def with_net(self, net: Callable) -> Classifier:
        return Classifier(net, self.process)

    def logits(self, x: Tensor, t) -> Tensor:
        """The logits at ``(x_t, t)``; ``t`` in the process's time."""
        tt = self.process.check_time(t).to(x.device)
        return self.net(x, tt if self.process.discrete else tt.to(x.dtype))

    def to(self, device) -> Classifier:
        self.net.to(device)
        return self

    def eval(self) -> Classifier:
        self.net.eval()
        return self


class ClassifierGuidance:
    """Classifier guidance (Dhariwal & Nichol 2021, Alg. 2; THEORY T-CG-1, T-CG-2):
    ``eps_g = eps - s sigma(t) grad_x log p_phi(y | x_t, t)``, i.e. the score ``grad log p_t(x) + s grad log
    p_phi(y | x_t)`` of the tilted density ``p_t(x) p_phi(y | x)^s``; ``x0`` is made consistent with the guided
    eps, ``x0_g = (x - sigma eps_g) / alpha = x0 + s sigma^2 / alpha grad log p_phi``.

    ``classifier`` is either a :class:`Classifier` (a loaded classifier run, ``runs.build.load_classifier``,
    whose process must equal the model's) or any callable ``f(x, t) -> logits`` (or log-probabilities)
    taking the model's process time ``t`` of shape ``(B,)``. ``log p_phi`` is ``log_softmax`` of the logits
    (log space, T-BAY-2). ``predict(x, t, cond)`` guides towards the labels ``cond`` (``(B,)`` or one int).

    ``model_cond`` is what the wrapped model receives: ``"same"`` (the labels: a conditional model, or
    :class:`CFG`, which composes), ``None`` (an unconditional model) or a fixed label such as ``-1`` (the
    null class of a jointly trained classifier-free model, i.e. its unconditional half). ``scale = 0`` is the
    wrapped model, exactly.

    ``min_alpha``: no guidance where ``alpha(t) < min_alpha`` (default 1e-3, log-SNR below about -13.8). There
    the exact ``grad log p(y | x_t)`` is ``O(alpha / sigma^2)`` and ``p(y | x_t)`` differs from the prior by
    ``O(alpha^2)``, but a learned classifier's gradient does not vanish, and a deterministic step from such a
    time (e.g. DDIM from the cosine schedule's last step, ``alpha = 5e-5``) multiplies the change of eps by
    ``alpha_next / alpha_t`` (several hundred): the samples blow up. ``min_alpha = 0`` guides at every time.
    """

    def __init__(self, model, classifier, scale: float, *, model_cond="same", min_alpha: float = 1e-3):
        self.model, self.classifier, self.process = model, classifier, model.process
        self.scale = check_number(scale, "classifier guidance scale")
        self.model_cond, self.min_alpha = model_cond, float(min_alpha)
        if not (model_cond is None or model_cond == "same" or isinstance(model_cond, int)):
            raise ValueError(f"model_cond must be 'same', None or an int label, got {model_cond!r}")
        if isinstance(classifier, Classifier):
            diff = process_difference(classifier.process, model.process)
            if diff is not None:
                raise ValueError(f"the classifier was trained on another process than the model's ({diff}: "
                                 "classifier against model); train it with the model's process config")
        elif not callable(classifier):
            raise TypeError("classifier must be a loaded classifier run or a callable f(x, t) -> logits")

    def logits(self, x: Tensor, t: Tensor) -> Tensor:
        """The classifier's logits at ``(x_t, t)``."""
        c = self.classifier
        return c.logits(x, t) if isinstance(c, Classifier) else c(x, t)

    def grad_log_prob(self, x: Tensor, t, y: Tensor) -> Tensor:
        """``grad_x log p_phi(y | x_t, t)`` per example (log_softmax, so a huge logit gap stays finite)."""
        tt = _batch_time(t, x.shape[0])
        with torch.enable_grad():
            xg = x.detach().requires_grad_(True)
            logp = torch.log_softmax(self.logits(xg, tt), dim=-1)
            if not (int(y.min()) >= 0 and int(y.max()) < logp.shape[-1]):
                raise ValueError(f"classifier guidance labels must be in 0..{logp.shape[-1] - 1}, "
                                 f"got {y.min().item()}..{y.max().item()}")
            sel = logp.gather(-1, y.reshape(-1, 1).to(logp.device)).sum()
            (g,) = torch.autograd.grad(sel, xg)
        return g.to(x.dtype)

    def predict(self, x: Tensor, t, cond=None) -> tuple[Tensor, Tensor]:
        if cond is None:
            raise ValueError("classifier guidance needs the target class (cond)")
        y = _labels(cond, x.shape[0], x.device)
        mc = cond if self.model_cond == "same" else self.model_cond
        x0, eps = self.model.predict(x, t, mc) if mc is not None else self.model.predict(x, t)
        if self.scale == 0:
            return x0, eps
        tt = self.process.check_time(_batch_time(t, x.shape[0])).to(x.device)
        a, s = expand_like(self.process.alpha(tt), x).to(x.dtype), expand_like(self.process.sigma(tt), x).to(x.dtype)
        on = a > self.min_alpha
        if not on.any():
            return x0, eps
        g = self.grad_log_prob(x, t, y)
        eps_g = eps - self.scale * s * torch.where(on, g, torch.zeros_like(g))
        # x0 = (x - sigma eps) / alpha for the guided eps; where alpha = 0 (pure noise) x0 is left as it is
        x0_g = torch.where(a > 0, x0 - s * (eps_g - eps) / torch.where(a > 0, a, torch.ones_like(a)), x0)
        return x0_g, eps_g


# --- multi-view denoising (visual anagrams) -----------------------------------------------------------------
class View:
    """A linear, orthogonal pixel transform ``v`` with its inverse ``v^{-1} = v^T`` (T-MV-1), acting on batches
    ``(B, *shape)``. User views are checked by :func:`check_view` before use."""

    def __init__(self, name: str, forward: Callable[[Tensor], Tensor], inverse: Callable[[Tensor], Tensor]):
        self.name, self.forward, self.inverse = name, forward, inverse

    def __repr__(self) -> str:
        return f"View({self.name!r})"


def _permutation_view(name: str, make_perm: Callable[[tuple[int, ...]], Tensor]) -> View:
    """A view that permutes the ``H*W`` pixel positions (every channel alike) by ``make_perm(shape)``."""
    cache: dict[tuple[int, ...], tuple[Tensor, Tensor]] = {}

    def perms(x: Tensor) -> tuple[Tensor, Tensor]:
        key = tuple(x.shape[-2:])
        if key not in cache:
            p = make_perm(key)
            cache[key] = (p, torch.argsort(p))
        return cache[key]

    def fwd(x: Tensor) -> Tensor:
        return x.flatten(-2)[..., perms(x)[0].to(x.device)].reshape(x.shape)

    def inv(x: Tensor) -> Tensor:
        return x.flatten(-2)[..., perms(x)[1].to(x.device)].reshape(x.shape)

    return View(name, fwd, inv)


def _jigsaw_perm(hw: tuple[int, int], seed: int = 0) -> Tensor:
    """Cut the image into a 4x4 grid of square pieces (2x2 pixels at 8x8) and shuffle them by a fixed seeded
    permutation that moves every piece."""
    H, W = hw
    if H % 4 or W % 4:
        raise ValueError(f"view 'jigsaw' needs height and width divisible by 4, got {H}x{W}")
    ph, pw = H // 4, W // 4
    g = torch.Generator().manual_seed(seed)
    while True:
        order = torch.randperm(16, generator=g)
        if (order != torch.arange(16)).all():
            break
    idx = torch.arange(H * W).reshape(4, ph, 4, pw).permute(0, 2, 1, 3).reshape(16, ph, pw)[order]
    return idx.reshape(4, 4, ph, pw).permute(0, 2, 1, 3).reshape(-1)


def _pixel_perm(hw: tuple[int, int], seed: int = 0) -> Tensor:
    return torch.randperm(hw[0] * hw[1], generator=torch.Generator().manual_seed(seed))


def _square(fn: Callable[[Tensor], Tensor], name: str) -> Callable[[Tensor], Tensor]:
    def f(x: Tensor) -> Tensor:
        if x.shape[-1] != x.shape[-2]:
            raise ValueError(f"view {name!r} needs square images, got {x.shape[-2]}x{x.shape[-1]}")
        return fn(x)
    return f


def _rot(k: int) -> Callable[[Tensor], Tensor]:
    return _square(lambda x: torch.rot90(x, k, dims=(-2, -1)), f"rot{90 * (k % 4)}")


VIEWS: dict[str, View] = {
    "identity": View("identity", lambda x: x, lambda x: x),
    "flip_h": View("flip_h", lambda x: x.flip(-1), lambda x: x.flip(-1)),
    "flip_v": View("flip_v", lambda x: x.flip(-2), lambda x: x.flip(-2)),
    "rot90": View("rot90", _rot(1), _rot(-1)),
    "rot180": View("rot180", lambda x: torch.rot90(x, 2, dims=(-2, -1)), lambda x: torch.rot90(x, -2, dims=(-2, -1))),
    "rot270": View("rot270", _rot(-1), _rot(1)),
    "transpose": View("transpose", _square(lambda x: x.transpose(-2, -1), "transpose"),
                      _square(lambda x: x.transpose(-2, -1), "transpose")),
    "jigsaw": _permutation_view("jigsaw", _jigsaw_perm),
    "permute": _permutation_view("permute", _pixel_perm),
    "negate": View("negate", lambda x: -x, lambda x: -x),
}


def get_view(view: str | View) -> View:
    """A registered view by name (or a :class:`View` as it is)."""
    if isinstance(view, View):
        return view
    if view not in VIEWS:
        raise ValueError(f"unknown view {view!r}; allowed: {', '.join(VIEWS)}")
    return VIEWS[view]


def check_view(view: View, shape: tuple[int, ...], atol: float = 1e-10, probes: int = 16) -> None:
    """Raise ``ValueError`` unless ``view`` is linear and orthogonal on examples of ``shape`` with ``inverse``
    its transpose (T-MV-1): then ``v(alpha x0 + sigma eps)`` is again signal plus ``N(0, sigma^2 I)`` noise.

    Up to 4096 dimensions the matrix ``A`` is built from the standard basis and ``A^T A = I``, ``A^{-1} A = I``,
    ``A A^{-1} = I`` are checked exactly; above, with random probes (norms, inner products, adjoint).
    Linearity is checked on random probes in both cases (float64)."""
    shape = tuple(shape)
    d = math.prod(shape)
    g = torch.Generator().manual_seed(1234)
    x, z = (torch.randn(probes, *shape, generator=g, dtype=torch.float64) for _ in range(2))

    def fail(why: str) -> ValueError:
        return ValueError(f"view {view.name!r} is not an orthogonal pixel transform ({why}); multi-view denoising "
                          "needs linear, norm-preserving, invertible views with inverse = transpose, such as "
                          f"{', '.join(VIEWS)}")

    fx, fz = view.forward(x), view.forward(z)
    if fx.shape != x.shape:
        raise fail(f"it changes the shape {shape} to {tuple(fx.shape[1:])}")
    if not torch.allclose(view.forward(2.5 * x - z), 2.5 * fx - fz, atol=atol * 100):
        raise fail("it is not linear")
    if d <= 4096:
        basis = torch.eye(d, dtype=torch.float64).reshape(d, *shape)
        A = view.forward(basis).reshape(d, d).T  # column j = v(e_j)
        B = view.inverse(basis).reshape(d, d).T
        eye = torch.eye(d, dtype=torch.float64)
        if not torch.allclose(A.T @ A, eye, atol=atol):
            raise fail("A^T A != I: it does not preserve the Gaussian noise")
        if not (torch.allclose(B @ A, eye, atol=atol) and torch.allclose(A @ B, eye, atol=atol)):
            raise fail("its inverse does not undo it")
        return
    nx = x.flatten(1).norm(dim=1)
    if not torch.allclose(fx.flatten(1).norm(dim=1), nx, rtol=atol * 100):
        raise fail("it does not preserve norms")
    if not torch.allclose(view.inverse(fx), x, atol=atol * 100):
        raise fail("its inverse does not undo it")
    if not torch.allclose((fx * z).flatten(1).sum(1), (x * view.inverse(z)).flatten(1).sum(1), atol=atol * 100 * d):
        raise fail("its inverse is not its transpose")


class MultiView:
    """Multi-view denoising, "visual anagrams" (Geng, Park & Owens 2024, eq. 2; THEORY T-MV-1, T-MV-2):
    ``eps_bar = (1/N) sum_i v_i^{-1}(eps(v_i(x_t), t, c_i))``, and the same average of the x0 predictions
    (consistent with ``eps_bar``, as the views are linear). All views go through one batched model call.

    ``views``: names from :data:`VIEWS` or :class:`View` objects (checked orthogonal by :func:`check_view` for
    ``shape``, at construction if ``shape`` is given, else on the first call); ``conds``: one condition per
    view (an int label, ``None`` = the ``cond`` passed to ``predict``); wrap a :class:`CFG` model to guide each
    view. The result is the score of the geometric mean of the view-transformed densities at every noise level
    (T-MV-2); at the end each ``v_i(x_0)`` should look like class ``c_i``.
    """

    def __init__(self, model, views: Sequence[str | View], conds: Sequence | None = None,
                 shape: tuple[int, ...] | None = None):
        self.model, self.process = model, model.process
        self.views = [get_view(v) for v in views]
        if not self.views:
            raise ValueError("multi-view denoising needs at least one view")
        if conds is not None and len(conds) != len(self.views):
            raise ValueError(f"give one condition per view: {len(self.views)} views, {len(conds)} conditions")
        self.conds = list(conds) if conds is not None else [None] * len(self.views)
        self._checked: set[tuple[int, ...]] = set()
        if shape is not None:
            self._check(tuple(shape))

    def _check(self, shape: tuple[int, ...]) -> None:
        if shape not in self._checked:
            for v in self.views:
                check_view(v, shape)
            self._checked.add(shape)

    def predict(self, x: Tensor, t, cond=None) -> tuple[Tensor, Tensor]:
        n = x.shape[0]
        self._check(tuple(x.shape[1:]))
        conds = [c if c is not None else cond for c in self.conds]
        if any(c is None for c in conds) and not all(c is None for c in conds):
            raise ValueError("give a condition for every view or for none")
        xs = torch.cat([v.forward(x) for v in self.views])
        tt = _batch_time(t, n)
        tt = torch.cat([tt] * len(self.views))
        if conds[0] is None:
            x0s, epss = self.model.predict(xs, tt)
        else:
            x0s, epss = self.model.predict(xs, tt, torch.cat([_labels(c, n, x.device) for c in conds]))
        k = len(self.views)
        x0 = sum(v.inverse(x0s[i * n:(i + 1) * n]) for i, v in enumerate(self.views)) / k
        eps = sum(v.inverse(epss[i * n:(i + 1) * n]) for i, v in enumerate(self.views)) / k
        return x0, eps
