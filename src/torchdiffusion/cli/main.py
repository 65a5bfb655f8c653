"""Command line: ``torchdiffusion train | sample | demo`` (``--help`` on each).

User errors print one line (``torchdiffusion: error: ...``) and exit with status 2, without a traceback; so do
file-system failures (full disk, read-only, a folder where a file should be), naming the file. SIGINT and
SIGTERM stop training after the current step with a checkpoint (exit status 128 + the signal's number).
"""

from __future__ import annotations

import argparse
import json
import signal
import sys
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

import torch

from torchdiffusion import samplers
from torchdiffusion._files import cause, prepare_output
from torchdiffusion._tensor import check_count, check_number
from torchdiffusion.cli import eval as _eval  # noqa: F401  (torchdiffusion eval)
from torchdiffusion.cli import export as _export  # noqa: F401  (torchdiffusion export-diffusers)
from torchdiffusion.cli import fit as _fit  # noqa: F401  (torchdiffusion fit)
from torchdiffusion.cli import likelihood as _likelihood  # noqa: F401  (torchdiffusion likelihood)
from torchdiffusion.cli import makedata as _makedata  # noqa: F401  (torchdiffusion make-data)
from torchdiffusion.cli import scorefield as _scorefield  # noqa: F401  (torchdiffusion scorefield)
from torchdiffusion.cli import studio as _studio  # noqa: F401  (torchdiffusion studio)
from torchdiffusion.cli.commands import COMMANDS, StepBar, command
from torchdiffusion.cli.samplefolder import sample_folder_command
from torchdiffusion.evaluation.viz import check_sample_path, save_gif, save_samples
from torchdiffusion.parameterization import guidance as G
from torchdiffusion.runs import config as config_mod
from torchdiffusion.runs.build import load_classifier, load_run
from torchdiffusion.runs.demo import run_demo
from torchdiffusion.runs.latent import dataset_from_config, sample_autoencoder_run, to_images
from torchdiffusion.runs.pipeline import Pipeline, require_kind
from torchdiffusion.runs.sample_folder import is_folder_output
from torchdiffusion.runs.text import load_tokenizer
from torchdiffusion.runs.train import maybe_distributed_train
from torchdiffusion.samplers import grids

try:
    __version__ = version("torchdiffusion")
except PackageNotFoundError:  # running from a source tree
    __version__ = "0.1.0+source"


# --- train ---------------------------------------------------------------------------------------------------
def _train_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("config", help=f"preset ({', '.join(sorted(config_mod.PRESETS))}) or a JSON config file")
    p.add_argument("--out", required=True, help="run folder (created; resumed if it holds a checkpoint)")
    p.add_argument("--set", dest="sets", action="append", default=[], metavar="SECTION.KEY=VALUE",
                   help="override a config value, e.g. --set train.steps=2000 (repeatable)")
    p.add_argument("--no-resume", action="store_true",
                   help="start from scratch (a folder that already holds a model needs --force)")
    p.add_argument("--force", action="store_true",
                   help="overwrite the run that --out holds (its weights, log and previews are deleted)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")


def _train_run(a) -> int:
    cfg = config_mod.resolve(a.config, a.sets)
    res = maybe_distributed_train(cfg, a.out, progress=not a.quiet, resume=not a.no_resume, force=a.force)
    if res is not None:
        print(f"trained {res['steps_run']} steps (now at {res['step']}) in {res['seconds']:.1f}s, "
              f"final loss {res['loss']:.4f}; run folder: {res['out']}")
    return 0


command("train", "train a model into a run folder (resumable)")((_train_args, _train_run))


# --- sample --------------------------------------------------------------------------------------------------
def _sample_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("run", nargs="?", default=None, help="run folder written by `torchdiffusion train`")
    p.add_argument("--list", action="store_true", help="list the samplers and grids, then exit")
    p.add_argument("--n", type=int, default=64, help="number of samples")
    p.add_argument("--batch-size", type=int, default=None, help="samples per batch (results do not depend on it)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.add_argument("--sampler", default=None, help="sampler name (see --list)")
    p.add_argument("--steps", type=int, default=None, help="network evaluations")
    p.add_argument("--grid", default=None, help="time grid name, or a FILE.json of times (td.grids.save)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None, help="output .png or .npz (default RUN/samples.png)")
    p.add_argument("--no-ema", action="store_true", help="use the raw weights instead of the EMA")
    p.add_argument("--class", dest="klass", type=int, default=None, help="class label for conditional models")
    p.add_argument("--prompt", default=None, help="text prompt for text-conditioned runs (\"\" = unconditional)")
    p.add_argument("--negative-prompt", default=None,
                   help="with --guidance: replaces the unconditional half, (1+w) eps(x,prompt) - w eps(x,negative)")
    p.add_argument("--guidance", type=float, default=None,
                   help="classifier-free guidance scale w: (1+w) eps(x,c) - w eps(x) (0 = plain conditional)")
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
    p.add_argument("--device", default="cpu")


def _list_samplers() -> int:
    print("samplers: " + ", ".join(samplers.names()))
    print("grids:    " + ", ".join(grids.names()))
    return 0


def _sample_run(a) -> int:
    if a.list:
        return _list_samplers()
    if a.run is None:
        raise ValueError("sample needs a RUN folder (or --list)")
    check_count(a.n, "--n")
    if a.batch_size is not None:
        check_count(a.batch_size, "--batch-size")
    for name, v in (("--guidance", a.guidance), ("--classifier-scale", a.classifier_scale)):
        if v is not None:
            check_number(v, name)
    if a.gif:
        if not a.gif.endswith(".gif"):
            raise ValueError(f"--gif must name a .gif file, got {a.gif}")
        prepare_output(a.gif)
    model, cfg = load_run(a.run, ema=not a.no_ema, device=a.device)
    kind = require_kind(cfg, a.run, ("diffusion", "latent", "autoencoder"), "sample")
    if kind == "autoencoder":  # autoencoder run: VAE prior samples and reconstructions (issue 9)
        for p in sample_autoencoder_run(a.run, n=a.n, seed=a.seed, out=a.out, ema=not a.no_ema):
            print(f"wrote {p}")
        return 0
    if a.out and is_folder_output(a.out):  # numbered PNGs: batched, resumable, sharded (issue 19)
        return sample_folder_command(a, model, cfg, _guided_model)
    out = check_sample_path(a.out if a.out else Path(a.run) / "samples.png")  # refuse before sampling
    pipe = Pipeline(model, cfg, path=a.run)
    info = cfg["run"]
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
    guided, cond = _guided_model(a, model, info)
    frames, bar = [], StepBar("sample", a.quiet)

    def cb(d: dict) -> None:
        bar(d)
        if a.gif:
            frames.append(d["x"].clone())
    try:
        x = pipe.generate(guided, a.n, cond=cond, sampler=sampler, steps=steps, grid=grid,
                          generator=torch.Generator().manual_seed(a.seed), callback=cb, batch_size=a.batch_size,
                          **opts)
    finally:
        bar.close()
    if pipe.note and pipe.note.startswith("using "):
        print(pipe.note)
    frames = [to_images(f, info)[0] for f in frames]
    if info.get("latent"):
        info = {**info, "data_shape": info["latent"]["image_shape"], "value_range": info["latent"]["value_range"]}
    data = None
    if len(info["data_shape"]) == 1 and info["data_shape"][0] == 2 and out.suffix == ".png":
        data = dataset_from_config(cfg["data"]).x[:2000]
    if a.anagram and out.suffix == ".png":  # each sample as it is and under the view, side by side
        pairs = torch.stack([x, G.get_view(a.anagram).forward(x)], 1).flatten(0, 1)
        save_samples(pairs, out, nrow=2 * min(len(x), 8), value_range=tuple(info.get("value_range", (-1, 1))))
    else:
        save_samples(x, out, data=data, value_range=tuple(info.get("value_range", (-1, 1))),
                     title=f"{sampler}, {steps} NFE")
    if a.gif:
        save_gif(frames, a.gif, value_range=tuple(info.get("value_range", (-1, 1))))
    print(f"wrote {len(x)} samples to {out}")
    return 0


def _guided_model(a, model, info: dict):
    """The model to sample from and its ``cond`` for ``--class``, ``--guidance`` (CFG), ``--classifier``
    (classifier guidance) and ``--anagram`` (multi-view denoising); misuse is a one-line ValueError."""
    ncls = info.get("num_classes")
    prompt, negative = getattr(a, "prompt", None), getattr(a, "negative_prompt", None)
    if prompt is not None or negative is not None:  # text prompts (issue 30): the Pipeline's rules
        if a.klass is not None or a.classifier or a.anagram:
            raise ValueError("--prompt / --negative-prompt exclude --class, --classifier and --anagram")
        pipe = Pipeline(model, {"run": info}, tokenizer=load_tokenizer(a.run, {"run": info}))
        return pipe.conditioned(a.n, prompt=prompt, negative_prompt=negative, guidance=a.guidance or 0.0)
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
        if a.klass is None or a.class2 is None:
            raise ValueError("--anagram needs --class and --class2 (the class seen in each view)")
    clf = None
    if a.classifier:
        clf, ccfg = load_classifier(a.classifier, device=a.device)
        kmax = int(ccfg["run"]["num_classes"])
        if a.klass is None:
            raise ValueError("--classifier needs --class (the class to guide towards)")
    elif a.klass is not None and not ncls:
        raise ValueError("--class given but this model is not class-conditional (or give --classifier RUN)")
    else:
        kmax = ncls
    for name, k in (("--class", a.klass), ("--class2", a.class2)):
        if k is not None and not 0 <= k < kmax:
            raise ValueError(f"{name} must be in 0..{kmax - 1}, got {k}")
    if a.guidance and (a.klass is None or not ncls):
        raise ValueError("--guidance needs --class and a class-conditional model")
    if a.guidance:
        model = G.CFG(model, a.guidance)
    if clf is not None:
        mc = -1 if a.null_class else ("same" if ncls else None)
        s = 1.0 if a.classifier_scale is None else a.classifier_scale
        model = G.ClassifierGuidance(model, clf, s, model_cond=mc)
    if a.anagram:
        return G.MultiView(model, ["identity", a.anagram], conds=[a.klass, a.class2],
                           shape=tuple(info["data_shape"])), None
    return model, None if a.klass is None else torch.full((a.n,), a.klass, dtype=torch.long)


command("sample", "sample from a trained run")((_sample_args, _sample_run))


# --- config --------------------------------------------------------------------------------------------------
def _config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("preset", help=f"preset ({', '.join(sorted(config_mod.PRESETS))}) or a JSON config file")
    p.add_argument("--set", dest="sets", action="append", default=[], metavar="SECTION.KEY=VALUE",
                   help="override a config value (repeatable)")


def _config_run(a) -> int:
    print(json.dumps(config_mod.resolve(a.preset, a.sets), indent=2))
    return 0


command("config", "print the resolved config of a preset (with --set overrides) as JSON")((_config_args, _config_run))


# --- demo ----------------------------------------------------------------------------------------------------
def _demo_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", default="runs/demo", help="folder for the demo runs and pictures")
    p.add_argument("--quick", action="store_true", help="a much shorter demo (smoke test)")
    p.add_argument("--force", action="store_true", help="retrain runs in --out that hold another configuration")


def _demo_run(a) -> int:
    for line in run_demo(Path(a.out), quick=a.quick, force=a.force):
        print(line)
    return 0


command("demo", "train and sample on the embedded defaults, writing pictures")((_demo_args, _demo_run))


# --- entry point ---------------------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="torchdiffusion",
                                     description="Diffusion and score-based generative models.")
    parser.add_argument("--version", action="version", version=f"torchdiffusion {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (help_, add, _) in COMMANDS.items():
        p = sub.add_parser(name, help=help_, description=help_)
        add(p)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not args.command:
        parser.print_help()
        return 2
    try:
        return COMMANDS[args.command][2](args)
    except KeyboardInterrupt as e:
        print(f"torchdiffusion: {e or 'interrupted'}", file=sys.stderr)
        return 128 + int(getattr(e, "signum", signal.SIGINT))
    except OSError as e:  # the file system's failures: one line naming the file and the cause
        where = f"{e.filename}: " if getattr(e, "filename", None) else ""
        print(f"torchdiffusion: error: {where}{cause(e)}", file=sys.stderr)
        return 2
    except KeyError as e:
        print(f"torchdiffusion: error: missing key {e.args[0]!r} (in a config or checkpoint)", file=sys.stderr)
        return 2
    except (ValueError, TypeError, RuntimeError) as e:
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        print(f"torchdiffusion: error: {msg}", file=sys.stderr)
        return 2


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
