"""Running a network fast: what ``auto`` picks (``torch.compile``, ``channels_last``), and the switches themselves.

``train.compile``, ``train.channels_last``, ``sample.compile`` and ``sample.channels_last`` take ``true``,
``false`` or ``"auto"`` (the default). ``"auto"`` asks :func:`auto_picks`, one small rule read off the measurements
of ``benchmarks/speed.py`` (``benchmarks/results/speed.md``): an option is picked only where it was measured to win,
for the use (``train``: forward + backward; ``sample``: forward without gradients) and size measured, and only when
the run makes enough network calls to repay the option's one-time cost (compiling). Where a measurement says an
option loses or was not measured, :data:`AUTO_RULES` holds ``None`` and ``auto`` never picks it. Networks without
convolutions (the MLPs of the 2-D toys, energy nets) and images smaller than the rule's size (8x8 digits) never get
either option from ``auto``. The rule looks at the module and the example shape only: the trainer and the command
line do not branch on a model kind (docs/design.md section 4).

The switches: :class:`ChannelsLast` (the trainer's wrapper: the network called on NHWC-strided images, so that its
convolutions run in the channels-last layout), and for sampling :func:`speed_up_in_place`, which changes a loaded
network without changing its identity, weights or ``state_dict``: a forward pre-hook that lays image inputs out
channels-last, and ``nn.Module.compile`` (its forward compiled once per module, ``dynamic=False``: torch.compile
keeps one graph per input shape and reuses it on every later call with that shape, so a sampler's steps never
recompile; a new batch size compiles once more).
"""

from __future__ import annotations

import dataclasses

import torch
from torch import Tensor, nn

OPTIONS = ("compile", "channels_last")
USES = ("train", "sample")
AUTO = "auto"
BACKEND = "inductor"  # torch.compile's backend for compile_in_place (tests count compilations with another one)


@dataclasses.dataclass(frozen=True)
class AutoRule:
    """Where ``auto`` turns an option on: convolutional networks on images whose smaller side is at least
    ``min_size`` (``None``: never, the option was not measured to win), in runs that make at least ``min_calls``
    network calls (training steps, or network evaluations of one sampling call) to repay its one-time cost."""

    min_size: int | None
    min_calls: int = 0


# Read off benchmarks/results/speed.md (its "auto rule" section); an option stays None until a measurement shows it
# winning at the use and size given. From the run of 2026-12-08 (shapes32's U-Net, 3x32x32, batch 16, 1 thread, on
# the AVX-512 machine): compile 319 vs 326 ms a train step after 86 s of compiling (break-even 11804 steps), 100.0 vs
# 106 ms a network evaluation after 31 s (break-even 4975 evaluations); channels_last 0.98x (train) and 1.01x
# (evaluation): never. min_calls: about 1.5x break-even (an earlier exploratory rule, 2000 / 2500 calls, compiled
# runs too short to repay it). The DDPM CIFAR-10 configuration was not measured.
AUTO_RULES: dict[tuple[str, str], AutoRule] = {
    ("compile", "train"): AutoRule(32, 18000),
    ("compile", "sample"): AutoRule(32, 7500),
    ("channels_last", "train"): AutoRule(None),
    ("channels_last", "sample"): AutoRule(None),
}


def is_convolutional(net: nn.Module) -> bool:
    """Whether ``net`` holds a 2-D convolution (what compile / channels_last were measured on)."""
    return any(isinstance(m, nn.Conv2d) for m in net.modules())


def auto_picks(option: str, use: str, net: nn.Module, example_shape: tuple[int, ...], calls: int,
               rules: dict[tuple[str, str], AutoRule] | None = None) -> bool:
    """What ``"auto"`` means for ``option`` (``compile`` / ``channels_last``) in ``use`` (``train`` / ``sample``)
    for ``net`` on examples of ``example_shape`` (without the batch) over ``calls`` network calls: the rule of
    :data:`AUTO_RULES` (or ``rules``; module doc)."""
    if (option, use) not in AUTO_RULES:
        raise ValueError(f"no auto rule for option {option!r} in use {use!r}; options: {', '.join(OPTIONS)}, uses: "
                         f"{', '.join(USES)}")
    rule = (rules or AUTO_RULES)[(option, use)]
    if rule.min_size is None or len(example_shape) != 3 or not is_convolutional(net):
        return False
    return min(int(s) for s in example_shape[1:]) >= rule.min_size and int(calls) >= rule.min_calls


def check_flag(value, key: str) -> bool | str:
    """``value`` of the config key ``key`` if it is ``true``, ``false`` or ``"auto"``; else a one-line error."""
    if isinstance(value, bool) or value == AUTO:
        return value
    raise ValueError(f"{key} must be true, false or \"auto\", got {value!r}")


def resolve_flag(value, key: str, option: str, use: str, net: nn.Module, example_shape: tuple[int, ...],
                 calls: int) -> bool:
    """The setting ``value`` (``true`` / ``false`` / ``"auto"``, checked) as a decision (``"auto"``:
    :func:`auto_picks`)."""
    value = check_flag(value, key)
    return auto_picks(option, use, net, example_shape, calls) if value == AUTO else bool(value)


class ChannelsLast(nn.Module):
    """``module`` called with its image input in the channels-last (NHWC) memory layout, so that convolutions and
    the element-wise operations after them run in that layout; other inputs pass unchanged, and the output is
    returned as the module gives it (same shape and values; only its strides differ). ``.module`` is the wrapped
    network (``parameterization.denoiser.unwrap`` reaches it)."""

    def __init__(self, module: nn.Module):
        super().__init__()
        self.module = module

    def forward(self, x: Tensor, *args, **kwargs) -> Tensor:
        if isinstance(x, Tensor) and x.ndim == 4:
            x = x.contiguous(memory_format=torch.channels_last)
        return self.module(x, *args, **kwargs)


def compile_in_place(net: nn.Module, backend=None) -> bool:
    """Compile ``net``'s forward once (``nn.Module.compile``, ``dynamic=False``, ``backend`` or :data:`BACKEND`;
    module doc); a module already compiled is left as it is. Returns whether this call compiled it."""
    if getattr(net, "_compiled_call_impl", None) is not None:
        return False
    net.compile(backend=backend or BACKEND, dynamic=False)
    return True


def _channels_last_inputs(module: nn.Module, args: tuple, kwargs: dict):
    x = args[0] if args else None
    if isinstance(x, Tensor) and x.ndim == 4:
        return (x.contiguous(memory_format=torch.channels_last), *args[1:]), kwargs
    return None


def channels_last_in_place(net: nn.Module) -> bool:
    """Lay ``net``'s image input (its first argument, when 4-D) out channels-last on every call, by a forward
    pre-hook (weights, identity and ``state_dict`` unchanged); once per module. Returns whether this call added it."""
    if getattr(net, "_channels_last_hook", None) is not None:
        return False
    net._channels_last_hook = net.register_forward_pre_hook(_channels_last_inputs, with_kwargs=True)
    return True


def speed_up_in_place(net, *, channels_last: bool, compile: bool) -> dict[str, bool]:
    """Apply the chosen switches to a network used for sampling (:func:`channels_last_in_place` first, so that the
    compiled call includes it, then :func:`compile_in_place`); a callable that is not a module is left alone.
    Returns whether each is now on."""
    if not isinstance(net, nn.Module):
        return {"channels_last": False, "compile": False}
    if channels_last:
        channels_last_in_place(net)
    if compile:
        compile_in_place(net)
    return {"channels_last": getattr(net, "_channels_last_hook", None) is not None,
            "compile": getattr(net, "_compiled_call_impl", None) is not None}


def enable_checkpointing(net: nn.Module, on: bool = True) -> int:
    """Switch activation checkpointing of every U-Net inside ``net`` (``UNet.checkpointing``); returns how many
    modules were switched (0: ``net`` holds no network that supports it)."""
    found = [m for m in net.modules() if isinstance(getattr(m, "checkpointing", None), bool)]
    for m in found:
        m.checkpointing = bool(on)
    return len(found)
