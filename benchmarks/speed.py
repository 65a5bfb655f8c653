"""How fast our U-Net trains and samples on this CPU, against diffusers, and how far from the machine's limit.

Run (the full measurement wants a quiet machine; about 25 minutes on 2 cores, see the options that bound it):

    .venv/bin/python benchmarks/speed.py --threads 2          [--quick: tiny shapes, a minute, for checking]

Two U-Nets (``--configs``): the ``shapes32`` preset's (32 ch x (1, 2, 2), one res-block, attention at 8x8, 3x32x32,
10 classes) and the DDPM CIFAR-10 U-Net (Ho et al. 2020: 128 ch x (1, 2, 2, 2), two res-blocks, attention at 16x16,
dropout 0.1, 35.7M parameters, unconditional), both at batch ``--batch`` (16). Each variant of ours -- eager fp32,
``channels_last``, ``torch.compile``, compile + channels_last, bf16 autocast, compile + bf16 -- and diffusers'
``UNet2DModel`` (eager, the same architecture and the same weights: what ``export-diffusers`` writes, built by
``parameterization.interop.unet2d_from_unet``; parameter counts asserted equal, also with the shared
``_unet.diffusers_twin``) is timed on

- a train step: ``loss = mse(net(x_t, t, y), eps); backward; AdamW.step`` on a fixed batch (the trainer's switches:
  ``nets.fast.ChannelsLast``, ``torch.compile`` of the network, autocast as ``train.precision=bf16``);
- one network evaluation without gradients (the Pipeline's switches: ``nets.fast.speed_up_in_place``);
- a whole 20-NFE ``td.sample`` (DDIM), against diffusers' ``DDIMPipeline`` (or the exported class-conditional
  pipeline) on the same weights and batch.

Times are medians of alternating repetitions (every variant once per round, so that load hits all alike), wall-clock
and CPU (this process's threads). A compiled variant's first call is timed apart: compile time = first call - the
median, with the CPU of the compiler's subprocesses; break-even = compile time / time saved per step against ours
eager. Inductor compiles into a fresh cache folder (cold, as a user's first run; ``--warm-cache`` reuses
``TORCHINDUCTOR_CACHE_DIR``). Peak memory: the largest RSS seen (sampled every 2 ms) during one call above the RSS
before it. FLOPs: ``torch.utils.flop_counter.FlopCounterMode`` on ours eager (convolutions, matmuls, attention);
achieved FLOP/s = FLOPs / median wall time, as a fraction of the machine's fp32 peak measured here by a large matmul.
Also: AdamW's for-loop / foreach / fused step alone; compiled vs eager training of the small config for
``--check-steps`` steps on shapes images (same init, data and noise: the losses must agree within ``--check-tol``);
the peak training memory at 64x64 with and without activation checkpointing (``model.checkpointing``, each in a
fresh process); and the small nets (the ``ring`` MLP, the ``digits`` 8x8 U-Net) eager vs compiled, which the
``auto`` rule (``nets/fast.py``) must not compile.
"""

from __future__ import annotations

import argparse
import atexit
import contextlib
import copy
import ctypes
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

# the compiler's cache folder must be chosen before torch._inductor is imported (removed at exit)
if "--warm-cache" not in sys.argv and "--probe-memory" not in sys.argv:
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = tempfile.mkdtemp(prefix="td-speed-inductor-")
    atexit.register(shutil.rmtree, os.environ["TORCHINDUCTOR_CACHE_DIR"], ignore_errors=True)

import psutil
import torch
import torch._dynamo
from torch.utils.flop_counter import FlopCounterMode

import _report
import torchdiffusion as td
from _unet import (
    CIFAR_PARAMS,
    alternate,
    build,
    clock,
    diffusers_call,
    diffusers_of,
    diffusers_pipeline,
    med,
    nparams,
    ours_call,
    step_fn,
)
from torchdiffusion.nets import fast
from torchdiffusion.runs import config as config_mod
from torchdiffusion.runs.build import build_model
from torchdiffusion.runs.train import loss_closure

VARIANTS = ("eager", "channels_last", "compile", "compile+channels_last", "bf16", "compile+bf16", "diffusers")
NFE = 20
T0 = time.time()
# every compiled variant recompiles the U-Net's code for another module or setting; past dynamo's default limit (8)
# it would fall back to eager silently
torch._dynamo.config.recompile_limit = 256


def log(msg: str) -> None:
    print(f"[{time.time() - T0:7.0f} s] {msg}", flush=True)


# --- the machine -------------------------------------------------------------------------------------------------
def cpu_flags() -> set[str]:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def bf16_note(flags: set[str]) -> tuple[bool, str]:
    """Whether the CPU has bf16 instructions (``avx512_bf16`` / ``amx_bf16`` in /proc/cpuinfo), in words."""
    native = [f for f in ("avx512_bf16", "amx_bf16") if f in flags]
    if native:
        return True, f"bf16 native on this CPU ({', '.join(native)} in /proc/cpuinfo)"
    return False, "bf16 not native on this CPU (no avx512_bf16 / amx_bf16 in /proc/cpuinfo): emulated in fp32 units"


def matmul_peak(n: int, dtype: torch.dtype, reps: int = 10) -> float:
    """FLOP/s of the best of ``reps`` ``n x n`` matmuls (2 n^3 FLOPs each): the machine's practical peak."""
    a, b = torch.randn(n, n).to(dtype), torch.randn(n, n).to(dtype)
    torch.mm(a, b)
    best = float("inf")
    for _ in range(reps):
        w = time.perf_counter()
        torch.mm(a, b)
        best = min(best, time.perf_counter() - w)
    return 2 * n**3 / best


def cpu_with_children() -> float:
    """CPU seconds of this process and its finished children (inductor's C++ compiler runs as children)."""
    s, c = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return s.ru_utime + s.ru_stime + c.ru_utime + c.ru_stime


def trim() -> None:
    """Give freed heap back to the system (glibc), so that the RSS before a call is not inflated by earlier ones."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)


def peak_rss(fn) -> float:
    """MB: the largest RSS seen during ``fn()`` (sampled every 2 ms) above the RSS just before it."""
    trim()
    proc, stop, peak = psutil.Process(), threading.Event(), [0]
    base = proc.memory_info().rss

    def watch() -> None:
        while not stop.is_set():
            peak[0] = max(peak[0], proc.memory_info().rss)
            time.sleep(0.002)
    th = threading.Thread(target=watch, daemon=True)
    th.start()
    try:
        fn()
    finally:
        stop.set()
        th.join()
    return max(peak[0] - base, 0) / 2**20


def first_call(fn) -> tuple[float, float]:
    """(wall, CPU incl. children) seconds of one call."""
    w, c = time.perf_counter(), cpu_with_children()
    fn()
    return time.perf_counter() - w, cpu_with_children() - c


def flops_of(fn) -> int:
    with FlopCounterMode(display=False) as fc:
        fn()
    return int(fc.get_total_flops())


def compiled_frames() -> int:
    from torch._dynamo.utils import counters

    return int(counters["stats"]["unique_graphs"])


def ours_modules(net, variant: str) -> tuple[torch.nn.Module, torch.nn.Module, torch.dtype | None]:
    """(train module, eval module, autocast dtype) of a variant of ours: the trainer's wrappers for training, the
    Pipeline's in-place switches for sampling; each a copy of ``net`` (the same weights)."""
    cl, comp = "channels_last" in variant, "compile" in variant
    train = copy.deepcopy(net).train()
    if cl:
        train = fast.ChannelsLast(train)
    if comp:
        train = torch.compile(train)
    ev = copy.deepcopy(net).eval()
    if cl:
        fast.channels_last_in_place(ev)
    if comp:
        fast.compile_in_place(ev)
    return train, ev, (torch.bfloat16 if "bf16" in variant else None)


def amp(dtype):
    return torch.autocast("cpu", dtype=dtype) if dtype is not None else contextlib.nullcontext()


# --- one configuration -------------------------------------------------------------------------------------------
def measure_config(name: str, a, peak: float) -> dict:
    model, cfg, shape, ncls = build(name, a.quick)
    net = model.net
    B = a.batch
    n = nparams(net)
    if name == "cifar10" and not a.quick:
        assert abs(n - CIFAR_PARAMS) < 0.05e6, n
    twin = diffusers_of(model, cfg, shape, ncls)
    log(f"{name}: {n:,} parameters (ours = diffusers' UNet2DModel), batch {B}")
    g = torch.Generator().manual_seed(0)
    x0 = torch.randn(B, *shape, generator=g)
    eps = torch.randn(B, *shape, generator=g)
    t = torch.randint(0, model.process.T, (B,), generator=g)
    y = None if ncls is None else torch.randint(0, ncls, (B,), generator=g)
    x = model.process.add_noise(x0, t, eps)
    variants = [v for v in a.variants if f"{name}:{v}" not in a.skip]
    mods, train_fns, eval_fns, sample_fns = {}, {}, {}, {}
    x_T = torch.randn(B, *shape, generator=torch.Generator().manual_seed(1))
    t_eval = torch.tensor(float(model.process.T) / 2)  # a scalar time, as the sampler gives the Denoiser
    for v in variants:
        if v == "diffusers":
            tw_train = copy.deepcopy(twin).train()
            tw_eval = copy.deepcopy(twin).eval()
            train_fns[v] = step_fn(tw_train, diffusers_call, x, t, y, eps)
            eval_fns[v] = (lambda m=tw_eval: _no_grad(lambda: diffusers_call(m, x, torch.full((B,), 500), y)))
            pipe = diffusers_pipeline(tw_eval, model, ncls)
            labels = None if y is None else y.tolist()
            sample_fns[v] = (lambda p=pipe, lab=labels: p(**({"class_labels": lab} if lab is not None else
                                                            {"batch_size": B}), num_inference_steps=NFE,
                                                         generator=torch.Generator().manual_seed(1), output_type="np"))
            continue
        tr, ev, dt = ours_modules(net, v)
        mods[v] = (tr, ev)
        train_fns[v] = step_fn(tr, ours_call, x, t.float(), y, eps, autocast=dt)
        den = model.with_net(ev)
        eval_fns[v] = (lambda d=den, dt=dt: _no_grad(lambda: _amp_call(dt, lambda: d.predict(x, t_eval, y))))
        sample_fns[v] = (lambda d=den, dt=dt: _amp_call(dt, lambda: td.sample(
            d, x_T, "ddim", NFE, cond=y, generator=torch.Generator().manual_seed(1), progress=False)))
    sample_fns = {v: f for v, f in sample_fns.items() if v in a.sample_variants}
    out = {"name": name, "params": n, "batch": B, "shape": shape, "variants": variants}
    # FLOPs of ours eager (the same architecture for every variant and for diffusers)
    ref_tr, ref_ev, _ = ours_modules(net, "eager")
    out["flops_train"] = flops_of(step_fn(ref_tr, ours_call, x, t.float(), y, eps))
    out["flops_eval"] = flops_of(lambda: _no_grad(lambda: ref_ev(x, t.float(), y)))
    out["flops_diffusers_train"] = flops_of(train_fns["diffusers"]) if "diffusers" in train_fns else None
    log(f"{name}: {out['flops_train'] / 1e9:.1f} GFLOP a train step, {out['flops_eval'] / 1e9:.1f} GFLOP an evaluation")
    for part, fns, reps in (("train", train_fns, a.reps), ("eval", eval_fns, a.reps)):
        first = {}
        graphs = {}
        for v, f in fns.items():
            frames = compiled_frames()
            first[v] = first_call(f)
            graphs[v] = compiled_frames() - frames
            log(f"{name} {part} {v}: first call {first[v][0]:.2f} s wall, {first[v][1]:.2f} s CPU, {graphs[v]} graphs "
                "compiled")
            if "compile" in v and not graphs[v]:
                raise RuntimeError(f"{name} {part} {v}: nothing was compiled (dynamo fell back to eager?)")
        ts = alternate(fns, reps, warmup=1)
        mem = {v: peak_rss(f) for v, f in fns.items()}
        out[part] = {v: {"wall": med(ts[v], 0), "cpu": med(ts[v], 1), "first_wall": first[v][0],
                         "first_cpu": first[v][1], "rss_mb": mem[v], "graphs": graphs[v]} for v in fns}
        for v in fns:
            r = out[part][v]
            log(f"{name} {part} {v}: {r['wall'] * 1e3:.0f} ms wall, {r['cpu'] * 1e3:.0f} ms CPU, +{r['rss_mb']:.0f} MB")
    frames = compiled_frames()
    ts = alternate(sample_fns, a.sample_reps, warmup=0)
    out["sample"] = {v: {"wall": med(ts[v], 0), "cpu": med(ts[v], 1)} for v in sample_fns}
    out["sample_recompiles"] = compiled_frames() - frames
    for v in sample_fns:
        log(f"{name} {NFE}-NFE sample {v}: {out['sample'][v]['wall']:.2f} s wall")
    out["optimizer"] = optimizer_rows(net, a.reps)
    out["peak"] = peak
    return out


def _no_grad(fn):
    with torch.no_grad():
        return fn()


def _amp_call(dtype, fn):
    with amp(dtype):
        return fn()


def optimizer_rows(net, reps: int) -> dict:
    """AdamW's step alone (for-loop, foreach, fused, where this torch offers them on CPU) on ``net``'s parameters."""
    fns = {}
    for name, kw in (("for-loop", {"foreach": False}), ("foreach", {"foreach": True}), ("fused", {"fused": True})):
        params = [p.detach().clone().requires_grad_(True) for p in net.parameters()]
        for p in params:
            p.grad = torch.randn_like(p)
        try:
            opt = torch.optim.AdamW(params, lr=1e-4, **kw)
            opt.step()
        except (RuntimeError, ValueError) as e:
            fns[name] = str(e).splitlines()[0][:80]
            continue
        fns[name] = opt.step
    timed = {k: f for k, f in fns.items() if callable(f)}
    ts = alternate(timed, max(reps, 3), warmup=1)
    return {k: ({"wall": med(ts[k], 0), "cpu": med(ts[k], 1)} if k in ts else {"error": fns[k]}) for k in fns}


# --- compiled vs eager training ----------------------------------------------------------------------------------
def check_training(name: str, a) -> dict:
    """Train ours eager and compiled from the same weights on the same batches, noise and label dropout (the run's
    own loss, ``runs.train.loss_closure``) for ``--check-steps`` steps; compare the losses."""
    model, cfg, shape, ncls = build(name, a.quick)
    if a.quick:
        data = torch.rand(256, *shape) * 2 - 1
        labels = torch.randint(0, ncls or 1, (256,))
    else:
        from torchdiffusion.data import shapes

        ex = [shapes.example(i, "train", size=shape[1], seed=0) for i in range(512)]
        data = torch.stack([torch.from_numpy(im).permute(2, 0, 1).float() / 127.5 - 1 for im, _ in ex])
        labels = torch.arange(512) % 10  # shapes.example: image i has label i % 10
    loss_fn = loss_closure(model, cfg)
    init = copy.deepcopy(model.net.state_dict())
    curves, graphs = {}, 0
    for kind in ("eager", "compile"):
        net = copy.deepcopy(model.net)
        net.load_state_dict(init)
        net.train()
        fwd = torch.compile(net) if kind == "compile" else net
        opt = torch.optim.AdamW(net.parameters(), lr=float(cfg["train"]["lr"]))
        g, gd = torch.Generator().manual_seed(0), torch.Generator().manual_seed(1)
        losses = []
        w, frames = time.perf_counter(), compiled_frames()
        for _ in range(a.check_steps):
            idx = torch.randint(0, len(data), (a.batch,), generator=gd)
            opt.zero_grad(set_to_none=True)
            loss = loss_fn(fwd, data[idx], cond=labels[idx] if ncls else None, generator=g)
            loss.backward()
            opt.step()
            losses.append(float(loss.detach()))
        curves[kind] = losses
        graphs = compiled_frames() - frames if kind == "compile" else graphs
        log(f"check {name} {kind}: {a.check_steps} steps in {time.perf_counter() - w:.0f} s, first loss "
            f"{losses[0]:.5f}, mean of the last {min(50, len(losses))} {_tail(losses):.5f}")
    e, c = curves["eager"], curves["compile"]
    return {"steps": a.check_steps, "first": (e[0], c[0]), "tail": (_tail(e), _tail(c)),
            "first_rel": abs(c[0] - e[0]) / abs(e[0]), "tail_rel": abs(_tail(c) - _tail(e)) / abs(_tail(e)),
            "tol": a.check_tol, "window": min(50, len(e)), "graphs": graphs}


def _tail(xs: list[float]) -> float:
    k = min(50, len(xs))
    return sum(xs[-k:]) / k


# --- small networks: what auto must not compile ------------------------------------------------------------------
def small_nets(a) -> list[dict]:
    """Eager vs compiled train step of the ``ring`` MLP (batch 256) and the ``digits`` 8x8 U-Net (batch 128), with
    the compile time and what ``auto`` decides at the preset's step count."""
    rows = []
    for preset, shape, ncls in (("ring", (2,), None), ("digits", (1, 8, 8), 10)):
        cfg = config_mod.resolve(preset)
        torch.manual_seed(0)
        model = build_model(cfg, shape, ncls)
        B = int(cfg["train"]["batch"])
        g = torch.Generator().manual_seed(0)
        x, eps = torch.randn(B, *shape, generator=g), torch.randn(B, *shape, generator=g)
        t = torch.randint(0, 1000, (B,), generator=g).float()
        y = None if ncls is None else torch.randint(0, ncls, (B,), generator=g)
        eager = copy.deepcopy(model.net).train()
        comp = torch.compile(copy.deepcopy(model.net).train())
        fe, fc = step_fn(eager, ours_call, x, t, y, eps), step_fn(comp, ours_call, x, t, y, eps)
        fe()
        first = first_call(fc)
        ts = alternate({"eager": fe, "compile": fc}, max(a.reps, 5), warmup=1)
        ew, cw = med(ts["eager"], 0), med(ts["compile"], 0)
        steps = int(cfg["train"]["steps"])
        rows.append({"preset": preset, "shape": shape, "batch": B, "eager": ew, "compile": cw,
                     "compile_s": max(first[0] - cw, 0.0), "steps": steps,
                     "auto": fast.auto_picks("compile", "train", model.net, shape, steps),
                     "auto_cl": fast.auto_picks("channels_last", "train", model.net, shape, steps)})
        log(f"small {preset}: eager {ew * 1e3:.1f} ms, compiled {cw * 1e3:.1f} ms, "
            f"compile {rows[-1]['compile_s']:.0f} s")
    return rows


# --- activation checkpointing at 64x64 (each in a fresh process) -----------------------------------------------------
def memory_probe(name: str, size: int, checkpointing: bool, a) -> dict:
    """In this (fresh) process: peak RSS of train steps at ``size`` x ``size`` with or without checkpointing."""
    torch.set_num_threads(a.threads)
    model, cfg, shape, ncls = build(name, a.quick, size=size, checkpointing=checkpointing)
    g = torch.Generator().manual_seed(0)
    x, eps = torch.randn(a.batch, *shape, generator=g), torch.randn(a.batch, *shape, generator=g)
    t = torch.randint(0, 1000, (a.batch,), generator=g).float()
    y = None if ncls is None else torch.randint(0, ncls, (a.batch,), generator=g)
    net = model.net.train()
    step = step_fn(net, ours_call, x, t, y, eps)
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    ws = []
    for _ in range(2):
        w, _ = clock()
        step()
        ws.append(time.perf_counter() - w)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return {"config": name, "size": size, "checkpointing": checkpointing, "base_mb": base, "peak_mb": peak,
            "step_s": min(ws)}


def checkpointing_rows(a) -> list[dict]:
    rows = []
    for name in a.memory_configs:
        for ck in (False, True):
            cmd = [sys.executable, __file__, "--probe-memory", name, "--probe-size", str(a.memory_size), "--batch",
                   str(a.batch), "--threads", str(a.threads), *(["--checkpointing"] if ck else []),
                   *(["--quick"] if a.quick else [])]
            res = subprocess.run(cmd, capture_output=True, text=True, check=True)
            rows.append(json.loads(res.stdout.strip().splitlines()[-1]))
            r = rows[-1]
            log(f"memory {name} {a.memory_size}x{a.memory_size} checkpointing={ck}: peak {r['peak_mb']:.0f} MB "
                f"(+{r['peak_mb'] - r['base_mb']:.0f} MB over the built model), step {r['step_s']:.2f} s")
    return rows


# --- the report ----------------------------------------------------------------------------------------------------
def fmt_ms(s: float) -> str:
    return f"{s * 1e3:.0f}" if s >= 0.1 else f"{s * 1e3:.1f}"


def break_even(first: float, wall: float, eager: float) -> str:
    """Steps after which a compiled variant's first-call cost is repaid (``never`` where it is not faster)."""
    cost = max(first - wall, 0.0)
    saved = eager - wall
    return f"{cost / saved:.0f}" if saved > 0 else "never"


def config_lines(r: dict, peak: float) -> tuple[list[str], dict]:
    name, B = r["name"], r["batch"]
    lines, figures = [], {}
    shape = "x".join(map(str, r["shape"]))
    for part, title, flops in (("train", "train step", r["flops_train"]),
                               ("eval", "network evaluation", r["flops_eval"])):
        rows = r[part]
        ref = rows.get("diffusers", rows.get("eager"))
        eager = rows.get("eager")
        lines += [f"## {name} {title} ({shape}, batch {B}, {r['params']:,} parameters)", "",
                  "| variant | wall ms | CPU ms | speed vs diffusers | speed vs ours eager | compile s (wall) | "
                  "compile s (CPU) | break-even steps | peak memory MB | GFLOP/s | fraction of fp32 peak |",
                  "|---|---|---|---|---|---|---|---|---|---|---|"]
        for v, m in rows.items():
            comp = "compile" in v
            cw = max(m["first_wall"] - m["wall"], 0.0) if comp else None
            cc = max(m["first_cpu"] - m["cpu"], 0.0) if comp else None
            be = break_even(m["first_wall"], m["wall"], eager["wall"]) if comp and eager else "-"
            gfs = flops / m["wall"] / 1e9
            vs_eager = f"{eager['wall'] / m['wall']:.2f}x" if eager else "-"
            lines.append(f"| {v} | {fmt_ms(m['wall'])} | {fmt_ms(m['cpu'])} | {ref['wall'] / m['wall']:.2f}x | "
                         f"{vs_eager}"
                         f" | {'-' if cw is None else f'{cw:.0f}'} | {'-' if cc is None else f'{cc:.0f}'} | {be} | "
                         f"{m['rss_mb']:.0f} | {gfs:.1f} | {gfs * 1e9 / peak:.3f} |")
            figures[f"{name} {part} {v} ms"] = round(m["wall"] * 1e3, 2)
            figures[f"{name} {part} {v} fraction of peak"] = round(gfs * 1e9 / peak, 4)
            if "diffusers" in rows:
                figures[f"{name} {part} {v} speed vs diffusers"] = round(ref["wall"] / m["wall"], 3)
        lines.append("")
    s = r["sample"]
    ref = s.get("diffusers")
    lines += [f"## {name} {NFE}-NFE sample (batch {B}; ours td.sample DDIM, diffusers "
              f"{'the exported ClassConditionalPipeline' if 'shapes' in name else 'DDIMPipeline'}, same weights)", "",
              "| variant | wall s | CPU s | speed vs diffusers pipeline |", "|---|---|---|---|"]
    for v, m in s.items():
        speed = f"{ref['wall'] / m['wall']:.2f}x" if ref else "-"
        lines.append(f"| {v} | {m['wall']:.2f} | {m['cpu']:.2f} | {speed} |")
        if ref:
            figures[f"{name} sample {v} speed vs diffusers"] = round(ref["wall"] / m["wall"], 3)
    k = r["sample_recompiles"]
    lines += ["", f"Graphs compiled during these samples (torch._dynamo unique graphs): {k}"
              + (" (the compiled variants reused the graphs their first evaluation built: no recompilation per step)."
                 if k == 0 else " (RECOMPILED while sampling)."), ""]
    o = r["optimizer"]
    lines += [f"## {name} AdamW step alone", "", "| implementation | wall ms | CPU ms |", "|---|---|---|"]
    for k, m in o.items():
        lines.append(f"| {k} | {fmt_ms(m['wall'])} | {fmt_ms(m['cpu'])} |" if "wall" in m else
                     f"| {k} | not available: {m['error']} | - |")
    lines.append("")
    return lines, figures


def auto_lines(results: list[dict], small: list[dict]) -> list[str]:
    """What the auto rule decides, beside what was measured."""
    lines = ["## Auto rule (nets/fast.py AUTO_RULES) against these measurements", "",
             "| option, use | rule (min side, min calls) | measured here |", "|---|---|---|"]
    for (opt, use), rule in fast.AUTO_RULES.items():
        part = "train" if use == "train" else "eval"
        seen = []
        for r in results:
            rows = r[part]
            if opt in rows and "eager" in rows:
                m = rows[opt]
                be = break_even(m["first_wall"], m["wall"], rows["eager"]["wall"]) if opt == "compile" else "-"
                seen.append(f"{r['name']}: {rows['eager']['wall'] / m['wall']:.2f}x eager"
                            + ((f", break-even {be} calls" if be != "never" else ", never repaid") if opt == "compile"
                               else ""))
        when = "never" if rule.min_size is None else f"side >= {rule.min_size}, >= {rule.min_calls} calls"
        lines.append(f"| {opt}, {use} | {when} | {'; '.join(seen) or 'not measured'} |")
    if small:
        lines += ["", "Small networks (train step, eager vs compiled; auto decides at the preset's step count):", "",
                  "| preset | example | batch | eager ms | compiled ms | compile s | break-even steps | preset steps | "
                  "auto compiles | auto channels_last |", "|---|---|---|---|---|---|---|---|---|---|"]
        for s in small:
            saved = s["eager"] - s["compile"]
            be = f"{s['compile_s'] / saved:.0f}" if saved > 0 else "never"
            lines.append(f"| {s['preset']} | {'x'.join(map(str, s['shape']))} | {s['batch']} | {fmt_ms(s['eager'])} | "
                         f"{fmt_ms(s['compile'])} | {s['compile_s']:.0f} | {be} | {s['steps']} | "
                         f"{'yes' if s['auto'] else 'no'} | {'yes' if s['auto_cl'] else 'no'} |")
    return [*lines, ""]


def findings(results: list[dict], check: dict | None, mem: list[dict], peak: float) -> list[str]:
    out = []
    for r in results:
        tr, s = r["train"], r["sample"]
        ours = {v: m for v, m in tr.items() if v != "diffusers"}
        if "diffusers" in tr and ours:
            best = min(ours, key=lambda v: ours[v]["wall"])
            fp32 = {v: m for v, m in ours.items() if "bf16" not in v}
            best32 = min(fp32, key=lambda v: fp32[v]["wall"]) if fp32 else best
            d = tr["diffusers"]["wall"]
            out.append(f"- {r['name']} train step: fastest of ours {best} at {d / ours[best]['wall']:.2f}x diffusers' "
                       f"step rate (fp32: {best32} at {d / ours[best32]['wall']:.2f}x); achieved "
                       f"{r['flops_train'] / ours[best32]['wall'] / peak:.3f} of the fp32 peak ({best32}) vs "
                       f"{r['flops_train'] / d / peak:.3f} for diffusers.")
        if "diffusers" in s:
            so = {v: m for v, m in s.items() if v != "diffusers"}
            if so:
                best = min(so, key=lambda v: so[v]["wall"])
                out.append(f"- {r['name']} {NFE}-NFE sampling: fastest of ours {best} at "
                           f"{s['diffusers']['wall'] / so[best]['wall']:.2f}x diffusers' pipeline.")
    if check:
        ok = check["first_rel"] < 1e-3 and check["tail_rel"] <= check["tol"] and check["graphs"] > 0
        out.append(f"- Compiled vs eager training ({check['steps']} steps): first loss {check['first'][0]:.5f} vs "
                   f"{check['first'][1]:.5f} (relative difference {check['first_rel']:.1e}, must be < 1e-3), mean of "
                   f"the last {check['window']} {check['tail'][0]:.5f} vs {check['tail'][1]:.5f} (relative "
                   f"{check['tail_rel']:.3f}, tolerance {check['tol']}; {check['graphs']} graphs compiled for the "
                   f"compiled run): {'PASS' if ok else 'FAIL'}.")
    for name in dict.fromkeys(m["config"] for m in mem):
        a, b = (next(m for m in mem if m["config"] == name and m["checkpointing"] is ck) for ck in (False, True))
        out.append(f"- Activation checkpointing, {name} at {a['size']}x{a['size']}: peak RSS {a['peak_mb']:.0f} -> "
                   f"{b['peak_mb']:.0f} MB (training memory over the built model {a['peak_mb'] - a['base_mb']:.0f} -> "
                   f"{b['peak_mb'] - b['base_mb']:.0f} MB), step time {b['step_s'] / a['step_s']:.2f}x.")
    return out


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="tiny shapes (8x8, 8 channels), few steps: checks the script")
    ap.add_argument("--configs", default="shapes32,cifar10", help="which U-Nets: shapes32, cifar10")
    ap.add_argument("--variants", default=",".join(VARIANTS), help=f"which of {', '.join(VARIANTS)}")
    ap.add_argument("--skip", default="", help="CONFIG:VARIANT pairs left out, e.g. cifar10:compile+channels_last")
    ap.add_argument("--sample-variants", default=",".join(VARIANTS), help="variants timed on whole samples")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--threads", type=int, default=2, help="torch intra-op threads (2: the whole machine, when quiet)")
    ap.add_argument("--reps", type=int, default=3, help="timed rounds of train steps and evaluations")
    ap.add_argument("--sample-reps", type=int, default=1, help="timed rounds of whole samples")
    ap.add_argument("--check-steps", type=int, default=200, help="compiled vs eager training steps (0: skip)")
    ap.add_argument("--check-tol", type=float, default=0.05, help="relative tolerance, mean of the last 50 losses")
    ap.add_argument("--memory-size", type=int, default=64, help="image side of the checkpointing memory probe")
    ap.add_argument("--memory-configs", default="shapes32,cifar10", help="checkpointing probe configs (none: skip)")
    ap.add_argument("--no-small", action="store_true", help="skip the small nets (ring MLP, digits U-Net)")
    ap.add_argument("--warm-cache", action="store_true", help="reuse inductor's cache (compile times then not cold)")
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "speed.md"))
    ap.add_argument("--note", action="append", default=[], help="a line for the results file's notes")
    ap.add_argument("--probe-memory", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--probe-size", type=int, default=64, help=argparse.SUPPRESS)
    ap.add_argument("--checkpointing", action="store_true", help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    a.configs = [c for c in a.configs.split(",") if c]
    a.variants = [v for v in a.variants.split(",") if v]
    a.skip = {s for s in a.skip.split(",") if s}
    a.sample_variants = [v for v in a.sample_variants.split(",") if v]
    a.memory_configs = [c for c in a.memory_configs.split(",") if c and c != "none"]
    bad = [v for v in a.variants + a.sample_variants + [s.split(":")[-1] for s in a.skip] if v not in VARIANTS]
    if bad:
        ap.error(f"unknown variant(s) {', '.join(bad)}; allowed: {', '.join(VARIANTS)}")
    if a.quick:
        a.batch, a.reps, a.check_steps = min(a.batch, 4), min(a.reps, 2), min(a.check_steps, 6)
        a.memory_size = 16
    if a.probe_memory:
        print(json.dumps(memory_probe(a.probe_memory, a.probe_size, a.checkpointing, a)))
        return
    torch.set_num_threads(a.threads)
    load0 = os.getloadavg()
    flags = cpu_flags()
    native, bf16_text = bf16_note(flags)
    n = 512 if a.quick else 2048
    peak = max(matmul_peak(n, torch.float32) for _ in range(2))
    peak_bf16 = matmul_peak(n, torch.bfloat16)
    log(f"fp32 peak {peak / 1e9:.1f} GFLOP/s ({n}x{n} matmul), bf16 {peak_bf16 / 1e9:.1f}; {bf16_text}")
    # inductor's once-per-process start-up (loading the compiler, building its C++ prelude), apart from the graphs
    startup = first_call(lambda: torch.compile(lambda z: (z * 2).sin())(torch.randn(8)))
    log(f"inductor start-up: {startup[0]:.1f} s wall, {startup[1]:.1f} s CPU")
    state = {"results": [], "check": None, "memory": [], "small": [], "todo": []}

    def report() -> None:
        """Write the results file from what is measured so far (after every part: a stopped run keeps its parts)."""
        write_report(a, argv, state, flags, bf16_text, native, n, peak, peak_bf16, load0, startup)
        log(f"wrote {a.out}" + (f" (still to measure: {', '.join(state['todo'])})" if state["todo"] else ""))

    state["todo"] = [*a.configs, *(["check"] if a.check_steps > 0 else []),
                     *(["checkpointing memory"] if a.memory_configs else []),
                     *([] if (a.no_small or a.quick) else ["small nets"])]
    for name in a.configs:
        state["results"].append(measure_config(name, a, peak))
        state["todo"].remove(name)
        report()
    if a.check_steps > 0:
        state["check"] = check_training(a.configs[0], a)
        state["todo"].remove("check")
        report()
    if a.memory_configs:
        state["memory"] = checkpointing_rows(a)
        state["todo"].remove("checkpointing memory")
        report()
    if not (a.no_small or a.quick):
        state["small"] = small_nets(a)
        state["todo"].remove("small nets")
        report()


def write_report(a, argv, state: dict, flags: set[str], bf16_text: str, native: bool, n: int, peak: float,
                 peak_bf16: float, load0, startup: tuple[float, float]) -> None:
    """The results file (Markdown + JSON twin) of everything in ``state``."""
    import diffusers

    results, check, mem, small = state["results"], state["check"], state["memory"], state["small"]
    body, figures = [], {"fp32 peak GFLOP/s": round(peak / 1e9, 2)}
    for r in results:
        lines, figs = config_lines(r, peak)
        body += lines
        figures.update(figs)
    found = findings(results, check, mem, peak)
    cmd = _report.command("speed.py", argv)
    head = ["# Speed: compile, channels_last, bf16 and checkpointing against diffusers, and the distance to the "
            "machine's peak (CPU)", "", cmd, "",
            _report.machine(T0, f"{a.threads} intra-op thread(s)", load0) + f" diffusers {diffusers.__version__}.",
            "", f"CPU flags: avx2 {'yes' if 'avx2' in flags else 'no'}, avx512f {'yes' if 'avx512f' in flags else 'no'}"
            f"; {bf16_text}. fp32 peak (best {n}x{n} matmul, {a.threads} thread(s)): {peak / 1e9:.1f} GFLOP/s; bf16 "
            f"matmul {peak_bf16 / 1e9:.1f} GFLOP/s. Inductor cache: "
            f"{'reused (compile times are not cold)' if a.warm_cache else 'fresh (cold compile times)'}; its "
            f"once-per-process start-up (timed apart, not in the compile times below) {startup[0]:.1f} s wall, "
            f"{startup[1]:.1f} s CPU."
            + (" QUICK MODE: tiny shapes, numbers check the script only." if a.quick else "")
            + (f" INCOMPLETE: not yet measured: {', '.join(state['todo'])}." if state["todo"] else ""), "",
            "Speed = time of the reference / time of the variant (> 1: faster); peak memory = the largest RSS during "
            "one call above the RSS before it; GFLOP/s = FLOPs of the eager network (FlopCounterMode) / median wall "
            "time; compile s = first call - median call; break-even = compile s / (ours eager - variant) per call. "
            "Train step = forward + backward + AdamW (for-loop); network evaluation = one call without gradients.",
            ""]
    mem_lines = []
    if mem:
        mem_lines = ["## Activation checkpointing: peak training memory (fresh process each, train step at "
                     f"{a.memory_size}x{a.memory_size}, batch {a.batch})", "",
                     "| config | checkpointing | peak RSS MB | over the built model MB | step s |",
                     "|---|---|---|---|---|"]
        for m in mem:
            mem_lines.append(f"| {m['config']} | {'on' if m['checkpointing'] else 'off'} | {m['peak_mb']:.0f} | "
                             f"{m['peak_mb'] - m['base_mb']:.0f} | {m['step_s']:.2f} |")
        mem_lines.append("")
    text = [*head, *body, *mem_lines, *auto_lines(results, small), "## Findings (computed from the tables above)", "",
            *found]
    _report.write_results(Path(a.out), text, a.note, figures=figures, echo=False,
                          data={"results": results, "check": check, "memory": mem, "small": small,
                                "bf16_native": native, "peak_flops": peak})


if __name__ == "__main__":
    main()
