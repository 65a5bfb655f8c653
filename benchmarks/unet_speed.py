"""U-Net speed: our DDPM U-Net against a diffusers ``UNet2DModel`` of the same architecture, on CPU.

Run (a few minutes on 2 CPU cores):  .venv/bin/python benchmarks/unet_speed.py   [--quick] [--threads 1,2]

Two sizes: the ``digits`` preset (1x8x8, 32 channels, levels (1, 2), one res-block per level, attention at 4x4,
10 classes + null) and the ``images`` preset (3x32x32, 64 channels, levels (1, 2, 2), attention at 8x8,
unconditional). The diffusers model gets the same widths, levels, res-blocks (``layers_per_block``), attention
placement (``Attn*Block2D`` at the same resolutions, one head: ``attention_head_dim`` = channels), group norm,
time-embedding width (4 x channels) and class embedding; the parameter counts are printed side by side.

A train step is ``loss = mse(net(x_t, t, y), eps); backward; AdamW.step`` on a fixed batch. The two models
are timed alternately, step by step, so that a change in machine load hits both alike; the table gives the
median wall-clock and CPU (process) time per step and the ratio ours / diffusers (< 1: ours is faster).
Sampling throughput (samples/s) is measured for the digits model with DDIM at 10 and 50 steps and ancestral
DDPM at 1000 steps, batch 100, through ``td.sample`` (diffusers' net wrapped by ``interop.DiffusersNet``).
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import sys
import time
from pathlib import Path

import torch

import _report
import torchdiffusion as td
from _unet import diffusers_call, diffusers_twin, med, nparams, ours_call, step_fn, time_pair
from torchdiffusion.runs import config as config_mod
from torchdiffusion.runs.build import build_model

CASES = {"digits": ((1, 8, 8), 128, 10), "images": ((3, 32, 32), 64, None)}  # shape, batch, classes


def train_rows(threads: list[int], reps: int) -> tuple[list[str], list[dict]]:
    """Table rows and the measurements behind them (one dict per model and thread count)."""
    rows, meas = [], []
    for name, (shape, batch, ncls) in CASES.items():
        cfg = config_mod.resolve(name)
        torch.manual_seed(0)
        ours = build_model(cfg, shape, ncls).net
        theirs = diffusers_twin(cfg["model"], shape, ncls)
        g = torch.Generator().manual_seed(0)
        x = torch.randn(batch, *shape, generator=g)
        eps = torch.randn(batch, *shape, generator=g)
        t = torch.randint(0, 1000, (batch,), generator=g)
        y = None if ncls is None else torch.randint(0, ncls, (batch,), generator=g)
        for th in threads:
            torch.set_num_threads(th)
            ta, tb = time_pair(step_fn(ours, ours_call, x, t.float(), y, eps),
                               step_fn(theirs, diffusers_call, x, t, y, eps), reps)
            ow, oc, dw, dc = med(ta, 0), med(ta, 1), med(tb, 0), med(tb, 1)
            meas.append({"model": name, "threads": th, "params": (nparams(ours), nparams(theirs)), "ours_ms": ow * 1e3,
                         "diffusers_ms": dw * 1e3, "wall": ow / dw, "cpu": oc / dc})
            rows.append(f"| {name} {'x'.join(map(str, shape))} | {batch} | {th} | {nparams(ours):,} | "
                        f"{nparams(theirs):,} | {ow * 1e3:.0f} | {dw * 1e3:.0f} | **{ow / dw:.2f}** | {oc * 1e3:.0f} | "
                        f"{dc * 1e3:.0f} | {oc / dc:.2f} |")
            print(rows[-1], flush=True)
    return rows, meas


def sample_rows(threads: int, n: int, budgets: list[tuple[str, int]]) -> tuple[list[str], list[float]]:
    """Table rows and the time ratios ours / diffusers."""
    from torchdiffusion.parameterization.interop import DiffusersNet

    torch.set_num_threads(threads)
    shape, _, ncls = CASES["digits"]
    cfg = config_mod.resolve("digits")
    torch.manual_seed(0)
    ours = build_model(cfg, shape, ncls).eval()
    theirs = td.Denoiser(DiffusersNet(diffusers_twin(cfg["model"], shape, ncls).eval()), ours.process,
                         prediction=ours.prediction)
    y = torch.arange(n) % 10
    rows, ratios = [], []
    for sampler, steps in budgets:
        speed = {}
        for who, model in (("ours", ours), ("diffusers", theirs)):
            x_T = torch.randn(n, *shape, generator=torch.Generator().manual_seed(0))
            w = time.perf_counter()
            td.sample(model, x_T, sampler, steps, generator=torch.Generator().manual_seed(1), cond=y)
            speed[who] = n / (time.perf_counter() - w)
        ratios.append(speed["diffusers"] / speed["ours"])
        rows.append(f"| {sampler} | {steps} | {n} | {threads} | {speed['ours']:.1f} | {speed['diffusers']:.1f} | "
                    f"{ratios[-1]:.2f} |")
        print(rows[-1], flush=True)
    return rows, ratios


def span(values: list[float], fmt: str = ".2f") -> str:
    """``lo-hi`` of the values as printed (one value if they print alike)."""
    lo, hi = format(min(values), fmt), format(max(values), fmt)
    return lo if lo == hi else f"{lo}-{hi}"


def findings(meas: list[dict], samp: list[float]) -> list[str]:
    """The findings, computed from this run's measurements (nothing here is typed by hand)."""
    same = all(m["params"][0] == m["params"][1] for m in meas)
    wall, cpu = [m["wall"] for m in meas], [m["cpu"] for m in meas]
    faster = sum(w < 1 for w in wall)
    out = [f"- Train step, ours / diffusers: {span(wall)}x in wall-clock time and {span(cpu)}x in CPU time "
           f"({faster} of {len(wall)} rows below 1, i.e. ours faster); parameter counts "
           f"{'equal in every row' if same else 'DIFFER (see the table)'}."]
    by = {(m["model"], m["threads"]): m for m in meas}
    th = sorted({m["threads"] for m in meas})
    if len(th) > 1:
        slow = [by[(name, t)]["ours_ms"] / by[(name, th[0])]["ours_ms"] for name in CASES for t in th[1:]
                if (name, t) in by and (name, th[0]) in by]
        more = "slower" if min(slow) > 1 else "faster" if max(slow) < 1 else "mixed"
        out.append(f"- Threads: {th[-1]} intra-op threads make our train step {span(slow)}x the wall-clock time of "
                   f"{th[0]} ({more}, under the load recorded above). The `digits` presets set `train.threads=1`; "
                   "`train.threads=0` (torch's default) suits an idle multi-core machine.")
    if samp:
        out.append(f"- Sampling, time ours / diffusers: {span(samp)}x (single timed runs).")
    return out


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="fewer repetitions, no 1000-step sampling")
    ap.add_argument("--threads", default="1,2", help="intra-op thread counts to time, e.g. 1,2")
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "unet_speed.md"))
    a = ap.parse_args(argv)
    threads = [int(s) for s in a.threads.split(",")]
    load0 = os.getloadavg()
    t0 = time.time()
    head = ("| model | batch | threads | params ours | params diffusers | ours ms | diffusers ms | ratio (wall) "
            "| ours CPU ms | diffusers CPU ms | ratio (CPU) |\n|---|---|---|---|---|---|---|---|---|---|---|")
    print(head)
    train, meas = train_rows(threads, 5 if a.quick else 15)
    budgets = [("ddim", 10), ("ddim", 50)] + ([] if a.quick else [("ddpm", 1000)])
    shead = ("| sampler | steps | batch | threads | ours samples/s | diffusers samples/s | ratio (ours time / "
             "diffusers time) |\n|---|---|---|---|---|---|---|")
    print(shead)
    samp, ratios = sample_rows(threads[0], 100, budgets)
    found = findings(meas, ratios)
    print("\n".join(found))
    import diffusers

    text = "\n".join([
        "# U-Net speed: ours vs diffusers `UNet2DModel` (same architecture), CPU", "",
        f"Command: `.venv/bin/python benchmarks/unet_speed.py{' --quick' if a.quick else ''} --threads {a.threads}`",
        "", f"Date: {datetime.datetime.now().isoformat(timespec='seconds')}; machine: `{' '.join(platform.uname())}`, "
        f"{os.cpu_count()} cores; python {sys.version.split()[0]}, torch {torch.__version__}, diffusers "
        f"{diffusers.__version__}; load average {load0[0]:.1f} at the start, {os.getloadavg()[0]:.1f} at the end "
        f"(the machine is shared: wall-clock times are noisy, the CPU-time columns less so); {time.time() - t0:.0f}s.",
        "", "## Train step (forward + backward + AdamW), median over alternating repetitions", "", head, *train, "",
        "## Sampling throughput (digits model, class-conditional, no guidance)", "", shead, *samp, "",
        "## Findings (computed by the script from the tables above)", "", *found, ""])
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    _report.write_results(Path(a.out), text.split("\n"), echo=False)
    print(f"wrote {a.out}")


if __name__ == "__main__":
    main()
