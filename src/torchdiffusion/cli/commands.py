"""The registry of subcommands: ``command(name, help)((add_arguments, run))``."""

from __future__ import annotations

from tqdm.auto import tqdm

COMMANDS: dict[str, tuple] = {}  # name -> (add_arguments(parser), run(args) -> int)


def command(name: str, help: str):
    def deco(fn_pair):
        COMMANDS[name] = (help, *fn_pair)
        return fn_pair
    return deco


class StepBar:
    """A tqdm bar over sampler steps, used as (part of) a sampler ``callback``; it starts with the first step,
    so that a command that fails on its options prints one line and no bar."""

    def __init__(self, desc: str, quiet: bool = False):
        self.desc, self.quiet, self.bar = desc, quiet, None

    def __call__(self, d: dict) -> None:
        if self.bar is None:
            self.bar = tqdm(desc=self.desc, unit="step", disable=self.quiet, dynamic_ncols=True)
        self.bar.update(1)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
