"""``sample RUN --n N --out DIR/``: the folder-of-PNGs output of ``sample`` (issue 19), called from
:func:`torchdiffusion.cli.main._sample_run`; the work is :func:`torchdiffusion.runs.sample_folder.sample_to_folder`.
Under ``torchrun --nproc_per_node W`` every rank writes its share and rank 0 prints one summary line."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from torchdiffusion import samplers
from torchdiffusion.cli.commands import StepBar
from torchdiffusion.runs import config as config_mod
from torchdiffusion.runs.pipeline import Pipeline
from torchdiffusion.runs.sample_folder import done_samples, prepare_folder, rank_and_world, sample_to_folder
from torchdiffusion.samplers import grids
from torchdiffusion.training import distributed
from torchdiffusion.training.checkpoint import tensors_checksum


def sampler_options(items: list[str]) -> dict:
    """``--opt key=value`` items as a dict of parsed values."""
    opts = {}
    for item in items:
        if "=" not in item:
            raise ValueError(f"--opt expects key=value, got {item!r}")
        k, v = item.split("=", 1)
        opts[k] = config_mod.parse_value(v)
    return opts


def sample_folder_command(a, model, cfg: dict, guided_model: Callable) -> int:
    """Write ``a.n`` numbered PNGs to the folder ``a.out`` (resumable; sharded under torchrun)."""
    if a.gif or a.anagram:
        raise ValueError("--gif and --anagram write one picture; give --out a .png file, not a folder")
    rank, world = rank_and_world()
    if world > 1:
        distributed.init_from_env(a.device)
    sampler = a.sampler or cfg["sample"]["sampler"]
    samplers.get(sampler)
    steps = a.steps if a.steps is not None else int(cfg["sample"]["steps"])
    grid = a.grid or cfg["sample"].get("grid")
    opts = sampler_options(a.opt)
    guided, cond = guided_model(a, model, cfg["run"])
    out = Path(a.out)
    pipe = Pipeline(model, cfg, path=a.run)
    fit = None
    if a.grid is None and guided is model:  # a stored fit (issue 33) decides the grid: recorded too
        fit, _ = pipe.stored_fit(sampler, steps, opts)
    settings = {"weights": tensors_checksum(model.net.state_dict()), "ema": not a.no_ema,
                "fit": None if fit is None else [float(t) for t in fit],
                "decoder": cfg["run"].get("latent"), "sampler": sampler,
                "steps": None if isinstance(a.grid, str) and a.grid.endswith(".json") and a.steps is None else steps,
                "grid": grids.load(grid).tolist() if isinstance(grid, str) and grid.endswith(".json") else grid,
                "seed": a.seed, "class": a.klass, "guidance": a.guidance, "prompt": getattr(a, "prompt", None),
                "negative_prompt": getattr(a, "negative_prompt", None),
                "unconditional": getattr(a, "unconditional", False),
                "classifier": str(Path(a.classifier).resolve()) if a.classifier else None,
                "classifier_scale": a.classifier_scale, "null_class": a.null_class, "options": opts}
    prepare_folder(out, settings, force=a.force, write=rank == 0)  # every rank checks; rank 0 changes the folder
    distributed.barrier()
    before = len([i for i in done_samples(out) if i < a.n])
    bar = StepBar(f"sample (rank {rank})" if world > 1 else "sample", a.quiet or rank > 0)
    try:
        written = sample_to_folder(pipe, guided, a.n, out, seed=a.seed, cond=cond, batch_size=a.batch_size,
                                   rank=rank, world=world, sampler=sampler, steps=settings["steps"], grid=a.grid,
                                   callback=bar, **opts)
    finally:
        bar.close()
    total = sum(distributed.gather_objects(len(written)))
    distributed.barrier()
    if rank == 0:
        print(f"wrote {total} samples to {out}/ ({before} were already there; {a.n} in all)")
    return 0
