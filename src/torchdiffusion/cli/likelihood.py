"""``torchdiffusion likelihood RUN``: bits/dim of a trained run on held-out data, by the variational bound or
the probability-flow ODE (see :mod:`torchdiffusion.likelihood`)."""

from __future__ import annotations

import argparse
import math
from pathlib import Path

import torch

from torchdiffusion._files import prepare_output, write_json
from torchdiffusion._tensor import check_finite
from torchdiffusion.cli.commands import command
from torchdiffusion.data.datasets import examples, load, split_dataset
from torchdiffusion.likelihood import LikelihoodResult, bits_per_dim, time_at_sigma, truncate_times, vlb_times
from torchdiffusion.runs.build import load_run
from torchdiffusion.runs.pipeline import require_kind


def _args(p: argparse.ArgumentParser) -> None:
    p.add_argument("run", help="run folder written by `torchdiffusion train`")
    p.add_argument("--data", default="test",
                   help="'test' (the run's held-out data.holdout split), 'train', or a .npz file / image folder")
    p.add_argument("--method", choices=("vlb", "ode"), default=None,
                   help="variational bound or probability-flow ODE (default: vlb for ddpm, ode otherwise)")
    p.add_argument("--batch", type=int, default=256, help="examples per batch")
    p.add_argument("--n", type=int, default=None, help="use only the first N examples")
    p.add_argument("--exact", action="store_true",
                   help="vlb: every term instead of --n-t sampled ones; ode: exact divergence instead of Hutchinson")
    p.add_argument("--n-t", type=int, default=8,
                   help="vlb: sampled steps (DDPM) or times (continuous-time bound) per example (unbiased estimate)")
    p.add_argument("--steps", type=int, default=None,
                   help="vlb: the bound on a grid of this size (default: every DDPM step; continuous processes: the "
                        "continuous-time bound)")
    p.add_argument("--variance", choices=("small", "large"), default="small", help="vlb: reverse variance")
    p.add_argument("--noise", choices=("gaussian", "rademacher"), default="gaussian", help="ode: Hutchinson probe")
    # ode tolerances (issue 29): on the ring's exact mixture model (50 examples, exact divergence) rtol = atol = 1e-4
    # takes 79 drift evaluations against 439 at 1e-5 and 8587 at 1e-7, with a mean log p within 4e-4 nats of the 1e-7
    # solve (max 0.05); 1e-3 is off by 1e-2 nats on average (max 0.55). The library default
    # (likelihood.ode_log_likelihood) stays 1e-5, which the tests of exactness use.
    p.add_argument("--rtol", type=float, default=1e-4, help="ode: solver relative tolerance (default 1e-4)")
    p.add_argument("--atol", type=float, default=1e-4, help="ode: solver absolute tolerance (default 1e-4)")
    p.add_argument("--t-eps", type=float, default=None, help="ode: start time (default: the process's t_min)")
    p.add_argument("--x0-in-range", action="store_true",
                   help="ode: clamp x0_hat to the data's value range (likelihood.ode_log_likelihood x0_range): "
                        "keeps an eps-net whose x0_hat runs outside the range from diverging")
    p.add_argument("--min-sigma", type=float, default=None,
                   help="vlb: decode from the first step with noise sigma >= S (a shorter chain); "
                        "ode: start at the time where sigma = S (instead of --t-eps)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-ema", action="store_true", help="use the raw weights instead of the EMA")
    p.add_argument("--device", default="cpu")
    p.add_argument("--json", default=None, help="also write the summary to this JSON file")


def _dataset(cfg: dict, which: str):
    dcfg = cfg["data"]
    kw = {k: v for k, v in dcfg.items() if k != "name"}
    if which in ("test", "train"):
        train, test = split_dataset(load(dcfg["name"], **kw), float(dcfg.get("holdout", 0.0)))
        if which == "test" and test is None:
            raise ValueError("this run holds no data out (data.holdout = 0); use --data train or a file")
        return train if which == "train" else test
    return load(which, **kw)


def _groups(N: int) -> list[tuple[int, int]]:
    """Step ranges ``[a, b)`` of the per-term breakdown: 1..9, 10..99, ... (``L_0`` and ``L_T`` apart)."""
    out, a = [], 1
    while a < N:
        b = min(N, a * 10)
        out.append((a, b))
        a = b
    return out


def breakdown(res: LikelihoodResult) -> list[tuple[str, float, float]]:
    """``(name, mean bpd, SE)`` rows: ``L_T``, ``L_0``, decade groups of ``L_i`` (VLB) or the ODE parts."""
    scale = 1 / (res.dims * math.log(2))
    rows = []
    if res.per_step is not None:
        N = res.per_step.shape[1]
        rows.append(("L_T (prior)", *res.mean_se(res.terms["L_T"] * scale)))
        rows.append(("L_0 (decoder)", *res.mean_se(res.per_step[:, 0] * scale)))
        for a, b in _groups(N):
            rows.append((f"L_{a}..L_{b - 1}", *res.mean_se(res.per_step[:, a:b].sum(1) * scale)))
    else:
        for k, v in res.terms.items():
            rows.append((k, *res.mean_se(v * scale)))
    return rows


def _run(a) -> int:
    from tqdm.auto import tqdm

    if a.batch < 1 or (a.n is not None and a.n < 1) or a.n_t < 1:
        raise ValueError("--batch, --n and --n-t must be >= 1")
    if a.json:
        prepare_output(a.json)  # refuse an unwritable --json before the work
    model, cfg = load_run(a.run, ema=not a.no_ema, device=a.device)
    require_kind(cfg, a.run, ("diffusion",), "likelihood")
    ds = _dataset(cfg, a.data)
    x = examples(ds, a.n).x  # (an image folder is decoded here, only the examples scored)
    if tuple(x.shape[1:]) != tuple(cfg["run"]["data_shape"]):
        raise ValueError(f"data of shape {tuple(x.shape[1:])} does not match the run's {cfg['run']['data_shape']}")
    method = a.method or ("vlb" if model.process.discrete else "ode")
    proc = model.process
    if a.min_sigma is not None and not 0 < a.min_sigma < 1:
        raise ValueError(f"--min-sigma must be in (0, 1), got {a.min_sigma}")
    if method == "vlb" and not proc.discrete and a.steps is None and a.min_sigma is None:
        # the continuous-time bound (VDM), dequantized as the run was trained: a run trained by the bound on the
        # grid values (loss vdm, dequantize none) keeps the discretized decoder; the others are dequantized
        lcfg = cfg.get("loss", {})
        deq = "none" if lcfg.get("name") == "vdm" and lcfg.get("dequantize", "none") == "none" else None
        opts = {"n_t": a.n_t, "dequantize": deq}
    elif method == "vlb":
        times = vlb_times(proc, a.steps)
        if a.min_sigma is not None:
            times = truncate_times(proc, times, a.min_sigma)
        opts = {"n_t": None if a.exact else a.n_t, "variance": a.variance, "times": times}
    else:
        if a.min_sigma is not None and a.t_eps is not None:
            raise ValueError("give --t-eps or --min-sigma, not both")
        t_eps = time_at_sigma(proc, a.min_sigma) if a.min_sigma is not None else a.t_eps
        opts = {"divergence": "exact" if a.exact else "hutchinson", "noise": a.noise, "rtol": a.rtol,
                "atol": a.atol, "t_eps": t_eps}
        if a.x0_in_range:
            lo, hi = (float(v) for v in ds.value_range)
            if not (float(x.min()) >= lo and float(x.max()) <= hi):
                raise ValueError(f"--x0-in-range: the data exceed their value range [{lo:g}, {hi:g}] "
                                 f"(min {float(x.min()):.3g}, max {float(x.max()):.3g})")
            opts["x0_range"] = (lo, hi)
    g = torch.Generator().manual_seed(a.seed)
    results = []
    with tqdm(total=len(x), desc=f"likelihood ({method})", unit="example", dynamic_ncols=True) as bar:
        for i in range(0, len(x), a.batch):  # (the bar is closed before an error is printed)
            xb = x[i: i + a.batch].to(a.device)
            try:
                results.append(bits_per_dim(model, xb, method=method, levels=ds.levels, value_range=ds.value_range,
                                            generator=g, **opts))
            except ValueError as e:  # name the batch (the indices in the message count from its start)
                raise ValueError(f"examples {i}..{i + len(xb) - 1}: {e}") from e
            bar.update(len(xb))
    res = LikelihoodResult.cat(results)
    check_finite(res.bpd, "the bits/dim")
    mean, se = res.mean_se()
    if res.method == "vlb-continuous":
        what = f"continuous-time bound, {a.n_t} times per example"
    else:
        what = (f"all {res.per_step.shape[1]} terms" if a.exact else f"{a.n_t} sampled terms per example") \
            if method == "vlb" else ("exact divergence" if a.exact else f"Hutchinson ({a.noise})")
    levels = f"{ds.levels} levels in [{ds.value_range[0]:g}, {ds.value_range[1]:g}]" if ds.levels else "continuous"
    print(f"{Path(a.run).name}: {a.data} data, {len(x)} examples of dimension {res.dims}, {levels}")
    print(f"method {method} ({what}): {mean:.4f} +- {se:.4f} bits/dim (mean +- SE), "
          f"NFE/example {res.nfe:.0f}, {res.seconds:.1f} s")
    rows = breakdown(res)
    print("breakdown (bits/dim):")
    for name, m, s in rows:
        print(f"  {name:<16s} {m:10.5f} +- {s:.5f}")
    if a.json:
        write_json(a.json, {"run": str(a.run), "data": a.data, "method": method, "n": len(x), "bpd": mean,
                            "se": se, "nfe": res.nfe, "seconds": res.seconds,
                            "breakdown": {n: [m, s] for n, m, s in rows}})
    return 0


command("likelihood", "bits/dim of a trained run (variational bound or probability-flow ODE)")((_args, _run))
