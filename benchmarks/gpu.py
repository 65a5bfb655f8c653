"""The speed measurements of ``speed.py`` on a CUDA GPU: bf16 autocast, torch.compile, CUDA graphs for the sampler
loop, and the attention (SDPA) backends, ours against diffusers' ``UNet2DModel`` on the same weights.

Run (one command; on a machine without CUDA it writes a results file that says "not measured"):

    .venv/bin/python benchmarks/gpu.py                 [--configs shapes32,cifar10] [--batch 128]
    .venv/bin/python benchmarks/gpu.py --smoke         (CPU, tiny shapes, seconds: checks the script; tests/ runs it)

Per configuration (``_unet.config_of``: the ``shapes32`` preset's U-Net and the DDPM CIFAR-10 U-Net, 35.7M
parameters) and variant -- ours eager fp32 (TF32 off), bf16 autocast, ``torch.compile``, compile + bf16, and
diffusers eager (fp32 and bf16) -- the median time (alternating rounds, the GPU synchronized around each call) of
a train step (forward + backward + AdamW, fused where available) and of one network evaluation, with the peak CUDA
memory of the step (``torch.cuda.max_memory_allocated``), FLOPs (``FlopCounterMode``) and achieved FLOP/s as a
fraction of the matmul peak measured here (fp32 without TF32 and bf16). Then a whole 20-NFE DDIM sample: ours eager,
bf16, compiled and compiled with CUDA graphs (``mode="reduce-overhead"``: every sampler step replays one captured
graph) against diffusers' ``DDIMPipeline``; and one evaluation under each SDPA backend (math, efficient, flash,
cudnn; one that cannot run these shapes is reported as such). ``--smoke`` runs the same code on CPU with tiny shapes
and no compilation (compiled rows say so), in seconds.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import time
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

import _report
import torchdiffusion as td
from _unet import alternate, build, diffusers_call, diffusers_of, diffusers_pipeline, med, nparams, ours_call, step_fn

NFE = 20
OURS = ("eager", "bf16", "compile", "compile+bf16")
SAMPLERS = ("eager", "bf16", "compile", "compile+cudagraphs")
BACKENDS = ("MATH", "EFFICIENT_ATTENTION", "FLASH_ATTENTION", "CUDNN_ATTENTION")


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def amp(device: torch.device, dtype):
    return torch.autocast(device.type, dtype=dtype) if dtype is not None else contextlib.nullcontext()


def matmul_peak(device: torch.device, dtype: torch.dtype, n: int) -> float:
    a, b = torch.randn(n, n, device=device, dtype=dtype), torch.randn(n, n, device=device, dtype=dtype)
    torch.mm(a, b)
    sync(device)
    best = float("inf")
    for _ in range(5):
        w = time.perf_counter()
        torch.mm(a, b)
        sync(device)
        best = min(best, time.perf_counter() - w)
    return 2 * n**3 / best


def peak_memory(device: torch.device, fn) -> float:
    """MB of CUDA memory at the peak of ``fn()`` (None off CUDA)."""
    if device.type != "cuda":
        return float("nan")
    sync(device)
    torch.cuda.reset_peak_memory_stats(device)
    fn()
    sync(device)
    return torch.cuda.max_memory_allocated(device) / 2**20


def flops_of(fn) -> int:
    with FlopCounterMode(display=False) as fc:
        fn()
    return int(fc.get_total_flops())


def measure(name: str, a, device: torch.device) -> dict:
    model, cfg, shape, ncls = build(name, a.smoke)
    twin = diffusers_of(model, cfg, shape, ncls).to(device)
    model = model.to(device)
    net, B = model.net, a.batch
    g = torch.Generator().manual_seed(0)
    x0, eps = torch.randn(B, *shape, generator=g).to(device), torch.randn(B, *shape, generator=g).to(device)
    t = torch.randint(0, model.process.T, (B,), generator=g).to(device)
    y = None if ncls is None else torch.randint(0, ncls, (B,), generator=g).to(device)
    x = model.process.add_noise(x0, t, eps)
    fused = {"fused": True} if device.type == "cuda" else {}
    train, evals, notes = {}, {}, []
    for v in OURS:
        dt = torch.bfloat16 if "bf16" in v else None
        if "compile" in v and a.smoke:
            notes.append(f"{v}: not compiled in --smoke mode")
            continue
        tr, ev = copy.deepcopy(net).train(), copy.deepcopy(net).eval()
        if "compile" in v:
            tr, ev = torch.compile(tr), torch.compile(ev)
        train[v] = step_fn(tr, ours_call, x, t.float(), y, eps, autocast=dt, optimizer=fused)
        evals[v] = (lambda m=ev, dt=dt: _eval(device, dt, lambda: m(x, t.float(), y)))
    for v, dt in (("diffusers", None), ("diffusers bf16", torch.bfloat16)):
        tr, ev = copy.deepcopy(twin).train(), copy.deepcopy(twin).eval()
        train[v] = step_fn(tr, diffusers_call, x, t, y, eps, autocast=dt, optimizer=fused)
        evals[v] = (lambda m=ev, dt=dt: _eval(device, dt, lambda: diffusers_call(m, x, t, y)))
    out = {"name": name, "params": nparams(net), "batch": B, "shape": shape, "notes": notes}
    out["flops_train"] = flops_of(step_fn(copy.deepcopy(net).train(), ours_call, x, t.float(), y, eps))
    out["flops_eval"] = flops_of(lambda: _eval(device, None, lambda: net.eval()(x, t.float(), y)))
    for part, fns in (("train", train), ("eval", evals)):
        first = {}
        for v, f in fns.items():
            sync(device)
            w = time.perf_counter()
            f()
            sync(device)
            first[v] = time.perf_counter() - w
        ts = alternate(fns, a.reps, warmup=1, between=lambda: sync(device))
        out[part] = {v: {"ms": med(ts[v], 0) * 1e3, "first_s": first[v], "mem_mb": peak_memory(device, fns[v])}
                     for v in fns}
    out["sample"] = sample_rows(model, twin, ncls, shape, B, device, a)
    out["sdpa"] = sdpa_rows(net, x, t, y, device, a)
    return out


def _eval(device, dtype, fn):
    with torch.no_grad(), amp(device, dtype):
        return fn()


def sample_rows(model, twin, ncls, shape, B, device, a) -> dict:
    """A whole 20-NFE DDIM sample: ours (eager, bf16, compiled, compiled with CUDA graphs) vs diffusers."""
    x_T = torch.randn(B, *shape, generator=torch.Generator().manual_seed(1)).to(device)
    y = None if ncls is None else (torch.arange(B) % ncls).to(device)
    fns, rows = {}, {}
    for v in SAMPLERS:
        if "compile" in v and (a.smoke or device.type != "cuda" and "cudagraphs" in v):
            rows[v] = {"note": "not compiled in --smoke mode" if a.smoke else "CUDA graphs need CUDA"}
            continue
        net = copy.deepcopy(model.net).eval()
        if v == "compile":
            net = torch.compile(net)
        elif v == "compile+cudagraphs":
            net = torch.compile(net, mode="reduce-overhead")
        den, dt = model.with_net(net), (torch.bfloat16 if v == "bf16" else None)
        fns[v] = (lambda d=den, dt=dt: _eval(device, dt, lambda: td.sample(
            d, x_T, "ddim", NFE, cond=y, generator=torch.Generator(device).manual_seed(1), progress=False)))
    pipe = diffusers_pipeline(copy.deepcopy(twin).eval(), model, ncls)
    pipe.to(device)
    labels = None if y is None else y.tolist()
    fns["diffusers DDIMPipeline"] = lambda: pipe(**({"class_labels": labels} if labels else {"batch_size": B}),
                                                 num_inference_steps=NFE, output_type="np",
                                                 generator=torch.Generator(device).manual_seed(1))
    ts = alternate(fns, a.sample_reps, warmup=1, between=lambda: sync(device))
    rows.update({v: {"s": med(ts[v], 0)} for v in fns})
    return rows


def sdpa_rows(net, x, t, y, device, a) -> dict:
    """One bf16 network evaluation under each SDPA backend alone (``torch.nn.attention.sdpa_kernel``)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    ev = copy.deepcopy(net).eval()
    rows, fns = {}, {}
    for name in BACKENDS:
        backend = getattr(SDPBackend, name, None)
        if backend is None:
            rows[name] = {"note": "not in this torch"}
            continue

        def f(b=backend):
            with sdpa_kernel([b]):
                return _eval(device, torch.bfloat16, lambda: ev(x, t.float(), y))
        try:
            f()
        except RuntimeError as e:
            rows[name] = {"note": "cannot run these shapes: " + str(e).splitlines()[0][:80].replace("|", "/")}
            continue
        fns[name] = f
    ts = alternate(fns, a.reps, warmup=1, between=lambda: sync(device)) if fns else {}
    rows.update({k: {"ms": med(ts[k], 0) * 1e3} for k in ts})
    return rows


def lines_of(r: dict, peaks: dict) -> list[str]:
    name, shape = r["name"], "x".join(map(str, r["shape"]))
    out = []
    for part, title, flops in (("train", "train step", r["flops_train"]), ("eval", "network evaluation",
                                                                          r["flops_eval"])):
        rows = r[part]
        ref = rows["diffusers"]["ms"]
        out += [f"## {name} {title} ({shape}, batch {r['batch']}, {r['params']:,} parameters)", "",
                "| variant | ms | speed vs diffusers fp32 | first call s | peak memory MB | TFLOP/s | fraction of "
                "peak |", "|---|---|---|---|---|---|---|"]
        for v, m in rows.items():
            tf = flops / (m["ms"] / 1e3) / 1e12
            pk = peaks["bf16" if "bf16" in v else "fp32"]
            mem = "-" if m["mem_mb"] != m["mem_mb"] else f"{m['mem_mb']:.0f}"  # NaN off CUDA
            out.append(f"| {v} | {m['ms']:.2f} | {ref / m['ms']:.2f}x | {m['first_s']:.1f} | {mem} | "
                       f"{tf:.3f} | {tf * 1e12 / pk:.3f} |")
        out.append("")
    s = r["sample"]
    ref = s["diffusers DDIMPipeline"]["s"]
    out += [f"## {name} {NFE}-NFE sample (batch {r['batch']}, same weights)", "",
            "| variant | s | speed vs diffusers |", "|---|---|---|"]
    for v, m in s.items():
        out.append(f"| {v} | {m['s']:.3f} | {ref / m['s']:.2f}x |" if "s" in m else f"| {v} | {m['note']} | - |")
    out += ["", f"## {name} SDPA backends (one bf16 evaluation)", "", "| backend | ms |", "|---|---|"]
    for k, m in r["sdpa"].items():
        out.append(f"| {k} | {m['ms']:.2f} |" if "ms" in m else f"| {k} | {m['note']} |")
    if r["notes"]:
        out += ["", *[f"- {n}" for n in r["notes"]]]
    return [*out, ""]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--smoke", action="store_true", help="CPU, tiny shapes, no compilation: checks the script")
    ap.add_argument("--configs", default=None, help="shapes32,cifar10 (--smoke: shapes32)")
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--reps", type=int, default=10)
    ap.add_argument("--sample-reps", type=int, default=3)
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "gpu.md"))
    ap.add_argument("--note", action="append", default=[])
    a = ap.parse_args(argv)
    t0 = time.time()
    title = "# Speed on a CUDA GPU: bf16, compile, CUDA graphs, SDPA backends, against diffusers"
    head = [title, "", _report.command("gpu.py", argv), ""]
    if a.smoke:
        device = torch.device("cpu")
        a.batch, a.reps, a.sample_reps = 2, 1, 1
        a.configs = a.configs or "shapes32"
    elif not torch.cuda.is_available():
        lines = [*head, _report.machine(t0, f"{torch.get_num_threads()} threads"), "",
                 "Not measured: no CUDA device on the machine that ran this (torch.cuda.is_available() is False). Run "
                 "the command above on a machine with an NVIDIA GPU to fill this file.", ""]
        _report.write_results(Path(a.out), lines, a.note)
        return 0
    else:
        device = torch.device("cuda")
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False
    n = 256 if a.smoke else 8192
    peaks = {"fp32": matmul_peak(device, torch.float32, n), "bf16": matmul_peak(device, torch.bfloat16, n)}
    gpu = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU (--smoke)"
    body = []
    for name in [c for c in (a.configs or "shapes32,cifar10").split(",") if c]:
        print(f"[{time.time() - t0:.0f} s] {name}", flush=True)
        body += lines_of(measure(name, a, device), peaks)
    lines = [*head, _report.machine(t0, f"device {gpu}"), "",
             f"Matmul peak ({n}x{n}): fp32 (TF32 off) {peaks['fp32'] / 1e12:.2f} TFLOP/s, bf16 "
             f"{peaks['bf16'] / 1e12:.2f} TFLOP/s." + (" SMOKE MODE: tiny shapes on CPU, numbers check the script only."
                                                       if a.smoke else ""), "", *body]
    _report.write_results(Path(a.out), lines, a.note)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
