"""What the U-Net speed benchmarks share (``unet_speed.py``, ``speed.py``, ``gpu.py``): diffusers' ``UNet2DModel``
at our U-Net's architecture, the train step both are timed on, and alternating timing.

Benchmarks import this as a sibling module (``python benchmarks/NAME.py`` puts ``benchmarks/`` on the path).
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F

from torchdiffusion.parameterization.interop import diffusers_scheduler_config, unet2d_from_unet
from torchdiffusion.runs import config as config_mod
from torchdiffusion.runs.build import build_model

# the DDPM CIFAR-10 U-Net (Ho et al. 2020): 35.7M parameters
CIFAR_MODEL = {"net": "unet", "channels": 128, "channel_mult": [1, 2, 2, 2], "num_res_blocks": 2,
               "attn_resolutions": [16], "dropout": 0.1}
CIFAR_PARAMS = 35.7e6
TINY_MODEL = {"channels": 8, "channel_mult": [1, 2], "num_res_blocks": 1, "attn_resolutions": [4], "dropout": 0.0}


def diffusers_twin(mcfg: dict, shape: tuple[int, ...], num_classes: int | None):
    """A ``UNet2DModel`` with our U-Net's architecture (``model`` section ``mcfg``): the same widths, levels,
    res-blocks (``layers_per_block``), attention placement (``Attn*Block2D`` at the same resolutions, one head:
    ``attention_head_dim`` = channels), group norm, dropout, time-embedding width (4 x channels) and class embedding
    (``num_classes + 1`` rows, the last the null class)."""
    from diffusers import UNet2DModel

    C, H, _ = shape
    ch, mult = int(mcfg["channels"]), list(mcfg["channel_mult"])
    res = [H // 2**i for i in range(len(mult))]
    attn = set(mcfg["attn_resolutions"])
    down = tuple("AttnDownBlock2D" if r in attn else "DownBlock2D" for r in res)
    up = tuple("AttnUpBlock2D" if r in attn else "UpBlock2D" for r in reversed(res))
    return UNet2DModel(sample_size=H, in_channels=C, out_channels=C, block_out_channels=tuple(ch * m for m in mult),
                       layers_per_block=int(mcfg["num_res_blocks"]), down_block_types=down, up_block_types=up,
                       num_class_embeds=None if num_classes is None else num_classes + 1,
                       norm_num_groups=min(32, ch), attention_head_dim=ch * max(mult),
                       dropout=float(mcfg.get("dropout", 0.0)))


def nparams(m: torch.nn.Module) -> int:
    return sum(p.numel() for p in m.parameters())


def ours_call(net, x, t, y):
    return net(x, t, y)


def diffusers_call(net, x, t, y):
    """A ``UNet2DModel`` called as our U-Net is (label ``-1``: its last class row, the null class)."""
    if y is not None:
        y = torch.where(y < 0, int(net.config.num_class_embeds) - 1, y)
    return net(x, t, class_labels=y).sample


def step_fn(net, call, x, t, y, eps, *, optimizer: dict | None = None, autocast: torch.dtype | None = None,
            params=None) -> Callable[[], None]:
    """One train step on a fixed batch: ``loss = mse(call(net, x, t, y), eps); backward; AdamW.step``
    (``optimizer``: AdamW's keywords, e.g. ``foreach=True``; ``autocast``: the forward under CPU/CUDA autocast to
    that dtype, as ``train.precision=bf16`` does; ``params``: what AdamW updates, default ``net.parameters()``)."""
    opt = torch.optim.AdamW(net.parameters() if params is None else params, lr=1e-4, **(optimizer or {}))

    def step() -> None:
        opt.zero_grad(set_to_none=True)
        with torch.autocast(x.device.type, dtype=autocast or torch.bfloat16, enabled=autocast is not None):
            out = call(net, x, t, y)
        F.mse_loss(out.float(), eps).backward()
        opt.step()
    return step


def clock() -> tuple[float, float]:
    """(wall, CPU) seconds now: CPU of this process's threads."""
    return time.perf_counter(), time.process_time()


def alternate(fns: dict[str, Callable[[], object]], reps: int, warmup: int = 2,
              between: Callable[[], None] | None = None) -> dict[str, list[tuple[float, float]]]:
    """Call the functions in turn, ``reps`` rounds after ``warmup`` untimed ones, so that a change in machine load
    hits them alike; per call ``(wall, cpu)`` seconds of each (``between``: called before every timed call, untimed,
    e.g. to synchronize a GPU)."""
    for _ in range(warmup):
        for f in fns.values():
            f()
    out: dict[str, list] = {k: [] for k in fns}
    for _ in range(reps):
        for k, f in fns.items():
            if between is not None:
                between()
            w, c = clock()
            f()
            if between is not None:
                between()
            out[k].append((time.perf_counter() - w, time.process_time() - c))
    return out


def time_pair(fa, fb, reps: int, warmup: int = 2) -> tuple[list, list]:
    """Alternate ``fa`` and ``fb``; per-call (wall, cpu) seconds."""
    ts = alternate({"a": fa, "b": fb}, reps, warmup)
    return ts["a"], ts["b"]


def med(ts: list, i: int) -> float:
    """The median of the ``i``-th entries (0: wall, 1: CPU)."""
    return statistics.median(t[i] for t in ts)


# --- the configurations ------------------------------------------------------------------------------------------
def config_of(name: str, quick: bool) -> tuple[dict, tuple[int, int, int], int | None]:
    """(full config, example shape, classes) of ``shapes32`` or ``cifar10`` (``quick``: tiny widths, 8x8)."""
    if name == "shapes32":
        cfg, shape, ncls = config_mod.resolve("shapes32"), (3, 32, 32), 10
    elif name == "cifar10":
        cfg = config_mod.resolve({"model": CIFAR_MODEL, "process": {"name": "ddpm", "betas": "linear"},
                                  "data": {"size": 32, "channels": 3}})
        shape, ncls = (3, 32, 32), None
    else:
        raise ValueError(f"unknown config {name!r}; allowed: shapes32, cifar10")
    if quick:
        cfg = config_mod.deep_update(cfg, {"model": TINY_MODEL})
        shape = (3, 8, 8)
    return cfg, shape, ncls


def build(name: str, quick: bool, size: int | None = None, checkpointing: bool = False):
    """Ours (a Denoiser, seed 0) and its config, shape and classes; ``size``: another image side, attention kept at
    the same levels."""
    cfg, shape, ncls = config_of(name, quick)
    if size is not None:
        f = size // shape[1]
        attn = [r * f for r in cfg["model"]["attn_resolutions"]]
        cfg = config_mod.deep_update(cfg, {"model": {"attn_resolutions": attn, "checkpointing": checkpointing}})
        shape = (shape[0], size, size)
    torch.manual_seed(0)
    return build_model(cfg, shape, ncls), cfg, shape, ncls


def diffusers_of(model, cfg: dict, shape, ncls):
    """diffusers' ``UNet2DModel`` with our weights (the export path), its parameter count checked twice."""
    from diffusers import UNet2DModel

    ucfg, tensors = unet2d_from_unet(model.net)
    twin = UNet2DModel.from_config({k: v for k, v in ucfg.items() if not k.startswith("_")})
    twin.load_state_dict(tensors, strict=True)
    n = nparams(model.net)
    assert nparams(twin) == n, (nparams(twin), n)
    assert nparams(diffusers_twin(cfg["model"], shape, ncls)) == n
    return twin


def diffusers_pipeline(twin, model, ncls):
    """diffusers' DDIM pipeline over ``twin`` with our process and prediction (the exported scheduler)."""
    from diffusers import DDIMPipeline, DDIMScheduler

    sched = DDIMScheduler.from_config(diffusers_scheduler_config(model.process, model.prediction, "DDIMScheduler"))
    if ncls:
        from torchdiffusion.runs.diffusers_pipeline import ClassConditionalPipeline

        pipe = ClassConditionalPipeline(unet=twin, scheduler=sched, num_classes=ncls)
    else:
        pipe = DDIMPipeline(unet=twin, scheduler=sched)
    pipe.set_progress_bar_config(disable=True)
    return pipe
