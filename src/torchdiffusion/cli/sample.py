"""``torchdiffusion sample RUN``: a thin wrapper over :class:`torchdiffusion.Pipeline` (docs/design.md section 5).

Writes a PNG grid (images; one row per class when several classes are drawn), a scatter PNG (2-D data) or an
``.npz`` holding ``x`` (the samples in the data's range), ``labels`` (-1 where unconditional), ``seeds`` (each
sample's own seed: ``Pipeline.generate(..., seeds=...)`` redraws any of them) and ``settings`` (JSON text: run,
sampler, steps, grid, guidance, seed, options). A class-conditional run sampled without ``--class`` draws every
class (one row each); ``--unconditional`` asks for the model's null class instead.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch

from torchdiffusion import samplers
from torchdiffusion._files import atomic_write, prepare_output
from torchdiffusion._tensor import check_count, check_number
from torchdiffusion.cli.commands import command
from torchdiffusion.cli.samplefolder import sample_folder_command
from torchdiffusion.evaluation.viz import check_sample_path, save_gif, save_samples
from torchdiffusion.parameterization import guidance as G
from torchdiffusion.runs import config as config_mod
from torchdiffusion.runs.build import load_classifier, load_run
from torchdiffusion.runs.latent import dataset_from_config, sample_autoencoder_run, to_images
from torchdiffusion.runs.pipeline import Pipeline, default_guidance, require_kind, sample_seeds
from torchdiffusion.runs.sample_folder import is_folder_output
from torchdiffusion.runs.text import load_tokenizer
from torchdiffusion.samplers import grids

PER_CLASS = 8  # default --n per class when several classes are drawn


def _sample_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("run", nargs="?", default=None, help="run folder written by `torchdiffusion train`")
    p.add_argument("--list", action="store_true", help="list the samplers and grids, then exit")
    p.add_argument("--n", type=int, default=None,
                   help=f"number of samples (default 64), or per class when --class names several "
                        f"(default {PER_CLASS} each)")
    p.add_argument("--max-batch", "--batch-size", dest="batch_size", type=int, default=None,
                   help="at most this many samples at once (results do not depend on it)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.add_argument("--sampler", default=None, help="sampler name (see --list)")
    p.add_argument("--steps", type=int, default=None, help="network evaluations")
    p.add_argument("--grid", default=None, help="time grid name, or a FILE.json of times (td.grids.save)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None, help="output .png or .npz (default RUN/samples.png), or a folder/")
    p.add_argument("--no-ema", action="store_true", help="use the raw weights instead of the EMA")
    p.add_argument("--class", dest="klass", default=None, metavar="N|N,M,..|all",
                   help="class label(s) for conditional models: one class, a comma-separated list, or all (one "
                        "grid row per class); a conditional run without --class draws all classes")
    p.add_argument("--prompt", default=None, help="text prompt for text-conditioned runs (\"\" = unconditional)")
    p.add_argument("--negative-prompt", default=None,
                   help="with --guidance: replaces the unconditional half, (1+w) eps(x,prompt) - w eps(x,negative)")
    p.add_argument("--unconditional", action="store_true",
                   help="sample a class-conditional model with its null class (no label)")
    p.add_argument("--guidance", type=float, default=None,
                   help="classifier-free guidance w: (1+w) eps(x,c) - w eps(x) (0 = plain conditional; diffusers' "
                        "guidance_scale = 1 + w)")
    p.add_argument("--classifier", default=None, metavar="RUN",
                   help="classifier guidance towards --class with a noise-conditional classifier run "
                        "(preset classifier_digits): eps - s sigma grad log p(y|x_t)")
    p.add_argument("--classifier-scale", type=float, default=None, help="classifier guidance scale s (default 1)")
    p.add_argument("--null-class", action="store_true",
                   help="with --classifier: query a class-conditional model with its null class (its unconditional "
                        "half), so that only the classifier steers")
    p.add_argument("--anagram", default=None, metavar="VIEW",
                   help="visual anagram: sample x that looks like --class as it is and like --class2 under VIEW "
                        "(e.g. rot180, flip_h, transpose); the PNG shows both views side by side")
    p.add_argument("--class2", type=int, default=None, help="the class seen in the --anagram view")
    p.add_argument("--opt", action="append", default=[], metavar="KEY=VALUE", help="sampler option, e.g. eta=1")
    p.add_argument("--gif", default=None, help="also write a GIF of the reverse process")
    p.add_argument("--threads", type=int, default=None,
                   help="torch threads while sampling (default: the run's sample.threads, 1; 0 = torch's default)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--force", action="store_true",
                   help="with --out DIR/: start over when DIR holds samples of other settings (they are deleted)")


# sample options that only a diffusion (or latent) run uses: an autoencoder run refuses them instead of ignoring them
DIFFUSION_ONLY = (("--sampler", "sampler"), ("--steps", "steps"), ("--grid", "grid"), ("--class", "klass"),
                  ("--prompt", "prompt"), ("--negative-prompt", "negative_prompt"),
                  ("--unconditional", "unconditional"), ("--guidance", "guidance"), ("--classifier", "classifier"),
                  ("--classifier-scale", "classifier_scale"), ("--null-class", "null_class"),
                  ("--anagram", "anagram"), ("--class2", "class2"), ("--opt", "opt"), ("--gif", "gif"),
                  ("--max-batch", "batch_size"))


def _list_samplers() -> int:
    print("samplers: " + ", ".join(samplers.names()))
    print("grids:    " + ", ".join(grids.names()))
    return 0


def parse_classes(text: str | None, num_classes: int | None) -> list[int] | None:
    """``--class``: ``N``, ``N,M,...`` or ``all`` as a list of class indices (None if not given)."""
    if text is None:
        return None
    text = str(text).strip()
    if text == "all":
        if not num_classes:
            raise ValueError("--class all needs a class-conditional model")
        return list(range(int(num_classes)))
    try:
        out = [int(v) for v in text.split(",")]
    except ValueError:
        raise ValueError(f"--class must be N, N,M,... or all, got {text!r}") from None
    if len(set(out)) != len(out):
        raise ValueError(f"--class lists a class twice: {text}")
    return out


def _sample_run(a) -> int:
    if a.list:
        return _list_samplers()
    if a.run is None:
        raise ValueError("sample needs a RUN folder (or --list)")
    if a.n is not None:
        check_count(a.n, "--n")
    if a.batch_size is not None:
        check_count(a.batch_size, "--max-batch")
    if a.threads is not None:
        check_count(a.threads, "--threads", 0)
    for name, v in (("--guidance", a.guidance), ("--classifier-scale", a.classifier_scale)):
        if v is not None:
            check_number(v, name)
    if a.gif:
        if not a.gif.endswith(".gif"):
            raise ValueError(f"--gif must name a .gif file, got {a.gif}")
        prepare_output(a.gif)
    model, cfg = load_run(a.run, ema=not a.no_ema, device=a.device)
    kind = require_kind(cfg, a.run, ("diffusion", "latent", "autoencoder"), "sample")
    if a.guidance is None and not (a.classifier or a.null_class or a.anagram):  # the run's sample.guidance
        a.guidance = default_guidance(cfg, a.klass is not None or getattr(a, "prompt", None) is not None) or None
    if kind == "autoencoder":  # autoencoder run: VAE prior samples and reconstructions (issue 9)
        unused = [name for name, v in DIFFUSION_ONLY if getattr(a, v, None) not in (None, False, [])]
        if unused:
            raise ValueError(f"{a.run} is an autoencoder run (prior samples and reconstructions): "
                             f"{', '.join(unused)} apply to diffusion runs only")
        for p in sample_autoencoder_run(a.run, n=a.n or 64, seed=a.seed, out=a.out, ema=not a.no_ema):
            print(f"wrote {p}")
        return 0
    info = cfg["run"]
    classes = _classes(a, info.get("num_classes"))
    per_class = a.n or (PER_CLASS if classes and len(classes) > 1 else 64)
    a.n = per_class * (len(classes) if classes else 1)
    a.labels = None if classes is None else torch.tensor(classes).repeat_interleave(per_class)
    if a.out and is_folder_output(a.out):  # numbered PNGs: batched, resumable, sharded (issue 19)
        return sample_folder_command(a, model, cfg, guided_model)
    out = check_sample_path(a.out if a.out else Path(a.run) / "samples.png")  # refuse before sampling
    pipe = Pipeline(model, cfg, path=a.run)
    sampler = a.sampler or cfg["sample"]["sampler"]
    samplers.get(sampler)
    steps = a.steps if a.steps is not None else int(cfg["sample"]["steps"])
    grid = a.grid  # None: a stored fit for this sampler and steps, else the run's grid (the Pipeline decides)
    if isinstance(grid, str) and grid.endswith(".json"):  # a fitted grid fixes the intervals (issue 16)
        grid, steps = grids.load(grid), a.steps
    opts = {}
    for item in a.opt:
        if "=" not in item:
            raise ValueError(f"--opt expects key=value, got {item!r}")
        k, v = item.split("=", 1)
        opts[k] = config_mod.parse_value(v)
    image_shape = info["latent"]["image_shape"] if info.get("latent") else info["data_shape"]
    if a.gif and len(image_shape) != 3:  # refuse before sampling
        raise ValueError("--gif needs image data; this run's samples are vectors (use the PNG scatter)")
    guided, cond = guided_model(a, model, info)
    frames = []

    def cb(d: dict) -> None:
        if a.gif:
            frames.append(d["x"].clone())
    seeds = sample_seeds(a.n, torch.Generator().manual_seed(a.seed))
    x = pipe.generate(guided, a.n, cond=cond, sampler=sampler, steps=steps, grid=grid, seeds=seeds,
                      callback=cb if a.gif else None, max_batch=a.batch_size, progress=not a.quiet,
                      threads=a.threads, **opts)
    if pipe.note and pipe.note.startswith("using "):
        print(pipe.note)
    frames = [to_images(f, info)[0] for f in frames]
    if info.get("latent"):
        info = {**info, "data_shape": info["latent"]["image_shape"], "value_range": info["latent"]["value_range"]}
    vr = tuple(info.get("value_range", (-1, 1)))
    if out.suffix == ".npz":
        settings = {"run": str(a.run), "sampler": sampler, "steps": steps,
                    "grid": grid if grid is None or isinstance(grid, str) else [float(t) for t in grid],
                    "guidance": a.guidance or 0.0, "seed": a.seed, "options": opts, "ema": not a.no_ema,
                    "classifier": a.classifier, "classifier_scale": a.classifier_scale, "anagram": a.anagram,
                    "class2": a.class2, "value_range": list(vr)}
        labels = a.labels if a.labels is not None else torch.full((a.n,), -1)
        save_npz(out, x=x.numpy(), labels=labels.numpy().astype(np.int64), seeds=np.array(seeds, dtype=np.int64),
                 settings=np.array(json.dumps(settings)))
    elif a.anagram:  # each sample as it is and under the view, side by side
        pairs = torch.stack([x, G.get_view(a.anagram).forward(x)], 1).flatten(0, 1)
        save_samples(pairs, out, nrow=2 * min(len(x), 8), value_range=vr)
    else:
        data = None
        if len(info["data_shape"]) == 1 and info["data_shape"][0] == 2:
            data = dataset_from_config(cfg["data"]).x[:2000]
        nrow = per_class if classes and len(classes) > 1 else None
        save_samples(x, out, data=data, value_range=vr, title=f"{sampler}, {steps} NFE", nrow=nrow)
    if a.gif:
        save_gif(frames, a.gif, value_range=vr)
    what = f" ({per_class} per class x {len(classes)} classes)" if classes and len(classes) > 1 else ""
    print(f"wrote {len(x)} samples{what} to {out}")
    return 0


def save_npz(path: Path, **arrays) -> Path:
    """An ``.npz`` of plain arrays (no pickled objects: ``np.load`` reads it with ``allow_pickle=False``),
    written atomically."""
    def write(tmp: Path) -> None:
        with open(tmp, "wb") as f:
            np.savez(f, **arrays)
    return atomic_write(path, write)


def _classes(a, ncls: int | None) -> list[int] | None:
    """The classes to draw: ``--class``; all of them for a conditional run without it (unless
    ``--unconditional``, or a guide that names its own class)."""
    if a.unconditional:
        if a.klass is not None:
            raise ValueError("--unconditional and --class exclude each other")
        if not ncls:
            raise ValueError("--unconditional is for class-conditional models (this one is unconditional already)")
        if a.guidance:
            raise ValueError("--guidance needs a class; --unconditional samples the null class")
        return None
    classes = parse_classes(a.klass, ncls)
    if classes is not None and len(classes) > 1 and (a.anagram or a.classifier and not ncls):
        raise ValueError("--anagram takes one --class (and --class2); give a single class")
    if classes is None and ncls and not (a.anagram or a.classifier or a.null_class or a.prompt is not None
                                         or a.negative_prompt is not None):
        return list(range(int(ncls)))  # a conditional run: every class, one row each (module doc)
    return classes


def guided_model(a, model, info: dict):
    """The model to sample from and its ``cond`` for ``--class`` (``a.labels``: one label per sample),
    ``--guidance`` (CFG), ``--classifier`` (classifier guidance) and ``--anagram`` (multi-view denoising); misuse
    is a one-line ValueError."""
    ncls = info.get("num_classes")
    prompt, negative = getattr(a, "prompt", None), getattr(a, "negative_prompt", None)
    if prompt is not None or negative is not None:  # text prompts (issue 30): the Pipeline's rules
        if a.klass is not None or a.classifier or a.anagram:
            raise ValueError("--prompt / --negative-prompt exclude --class, --classifier and --anagram")
        pipe = Pipeline(model, {"run": info}, tokenizer=load_tokenizer(a.run, {"run": info}))
        return pipe.conditioned(a.n, prompt=prompt, negative_prompt=negative, guidance=a.guidance or 0.0)
    labels = getattr(a, "labels", None)
    if labels is None and a.klass is not None:
        labels = torch.tensor(parse_classes(a.klass, ncls)).repeat_interleave(a.n)[: a.n]
    klass = None if labels is None else int(labels[0])
    if a.class2 is not None and not a.anagram:
        raise ValueError("--class2 needs --anagram VIEW")
    if a.classifier_scale is not None and not a.classifier:
        raise ValueError("--classifier-scale needs --classifier RUN")
    if a.null_class and not (a.classifier and ncls):
        raise ValueError("--null-class needs --classifier RUN and a class-conditional model")
    if a.null_class and a.guidance:
        raise ValueError("--null-class and --guidance exclude each other (CFG needs the class)")
    if a.anagram:
        G.get_view(a.anagram)
        if info.get("latent"):
            raise ValueError("--anagram needs a pixel-space run: on a latent run the view would turn the latent code, "
                             "not the image (the decoder does not commute with it)")
        if labels is None or a.class2 is None:
            raise ValueError("--anagram needs --class and --class2 (the class seen in each view)")
    clf = None
    if a.classifier:
        clf, ccfg = load_classifier(a.classifier, device=a.device)
        kmax = int(ccfg["run"]["num_classes"])
        if labels is None:
            raise ValueError("--classifier needs --class (the class to guide towards)")
    elif labels is not None and not ncls:
        raise ValueError("--class given but this model is not class-conditional (or give --classifier RUN)")
    else:
        kmax = ncls
    for name, k in (("--class", None if labels is None else int(labels.max())), ("--class2", a.class2)):
        if k is not None and not 0 <= k < kmax:
            raise ValueError(f"{name} must be in 0..{kmax - 1}, got {k}")
    if labels is not None and int(labels.min()) < 0:
        raise ValueError(f"--class must be in 0..{kmax - 1}, got {int(labels.min())}")
    if a.guidance and (labels is None or not ncls):
        raise ValueError("--guidance needs --class and a class-conditional model")
    if a.guidance:
        model = G.CFG(model, a.guidance)
    if clf is not None:
        mc = -1 if a.null_class else ("same" if ncls else None)
        s = 1.0 if a.classifier_scale is None else a.classifier_scale
        model = G.ClassifierGuidance(model, clf, s, model_cond=mc)
    if a.anagram:
        return G.MultiView(model, ["identity", a.anagram], conds=[klass, a.class2],
                           shape=tuple(info["data_shape"])), None
    return model, labels


command("sample", "sample from a trained run")((_sample_args, _sample_run))
