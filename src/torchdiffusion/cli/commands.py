"""The registry of subcommands: ``command(name, help)((add_arguments, run))``."""

from __future__ import annotations

COMMANDS: dict[str, tuple] = {}  # name -> (add_arguments(parser), run(args) -> int)


def command(name: str, help: str):
    def deco(fn_pair):
        COMMANDS[name] = (help, *fn_pair)
        return fn_pair
    return deco
