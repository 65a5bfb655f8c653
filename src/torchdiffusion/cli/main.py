"""Command line: ``torchdiffusion train | sample | demo`` (``--help`` on each).

User errors print one line (``torchdiffusion: error: ...``) and exit with status 2, without a traceback; so do
file-system failures (full disk, read-only, a folder where a file should be), naming the file. SIGINT and
SIGTERM stop training after the current step with a checkpoint (exit status 128 + the signal's number).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
from pathlib import Path

from torchdiffusion._files import cause, package_version
from torchdiffusion.cli import eval as _eval  # noqa: F401  (torchdiffusion eval)
from torchdiffusion.cli import export as _export  # noqa: F401  (torchdiffusion export-diffusers)
from torchdiffusion.cli import fit as _fit  # noqa: F401  (torchdiffusion fit)
from torchdiffusion.cli import likelihood as _likelihood  # noqa: F401  (torchdiffusion likelihood)
from torchdiffusion.cli import makedata as _makedata  # noqa: F401  (torchdiffusion make-data)
from torchdiffusion.cli import sample as _sample  # noqa: F401  (torchdiffusion sample)
from torchdiffusion.cli import scorefield as _scorefield  # noqa: F401  (torchdiffusion scorefield)
from torchdiffusion.cli import studio as _studio  # noqa: F401  (torchdiffusion studio)
from torchdiffusion.cli.commands import COMMANDS, command
from torchdiffusion.runs import config as config_mod
from torchdiffusion.runs.demo import run_demo
from torchdiffusion.runs.train import maybe_distributed_train

__version__ = package_version()


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
    parser.add_argument("--version", "-V", action="version", version=f"torchdiffusion {__version__}")
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
    except BrokenPipeError:  # the reader went away (`torchdiffusion config digits | head -1`): not an error
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())  # so that the flush at exit does not fail again
        return 0
    except KeyboardInterrupt as e:  # Ctrl-C: one line (the trainer's names the step it saved), 128 + the signal
        print(f"torchdiffusion: {str(e).strip() or 'interrupted'}", file=sys.stderr)
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
