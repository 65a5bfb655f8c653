"""What a Pipeline call accepts and returns, apart from sampling itself (docs/design.md section 5): diffusers'
argument names with their meaning or a one-line refusal naming ours, the count of samples a call asks for, the
output object, and Hugging Face Hub ids for ``from_pretrained``."""

from __future__ import annotations

import contextlib
import numbers
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from torchdiffusion._tensor import check_count
from torchdiffusion.runs.build import run_kind

OUTPUT_TYPES = ("pt", "np", "pil")
# diffusers' call arguments that we take with their diffusers meaning (-> our name)
DIFFUSERS_NAMES = {"prompt": "prompt (text runs)", "negative_prompt": "negative_prompt (text runs)",
                   "batch_size": "n", "num_inference_steps": "steps", "guidance_scale": "guidance + 1",
                   "num_images_per_prompt": "n per class label", "generator": "generator",
                   "output_type": "output_type", "return_dict": "return_dict",
                   "callback_on_step_end": "callback_on_step_end", "eta": "eta (ddim)"}
# diffusers' names with no counterpart here: refused with one line naming ours
DIFFUSERS_REFUSED = {
    "latents": "td.sample(pipe.model, x_T, ...) to start from your own noise",
    "height": "nothing: the run's data shape is fixed by the trained model",
    "width": "nothing: the run's data shape is fixed by the trained model",
    "timesteps": "grid= (a grid name, or a decreasing tensor of times ending at the clean time)",
    "sigmas": "grid= (a grid name, or a decreasing tensor of times ending at the clean time)",
    "callback_steps": "callback_on_step_end (called after every step) or callback",
    "callback_on_step_end_tensor_inputs": None,  # accepted (below)
    "use_clipped_model_output": "nothing: x0 is never clipped (pass False or leave it out)",
    "cross_attention_kwargs": "nothing: these runs have no cross-attention inputs",
}


# diffusers' pipeline attributes and methods with no counterpart here: a one-line AttributeError naming ours
DIFFUSERS_ATTRIBUTES = {
    "unet": "pipe.model.net (the network) and pipe.model (the Denoiser around it)",
    "scheduler": "pipe.process (the forward process) and sampler= / grid= on the call (the reverse discretization)",
    "components": "pipe.model, pipe.process, pipe.config",
    "enable_model_cpu_offload": "pipe.to(device) (the whole model moves; nothing is offloaded)",
    "enable_sequential_cpu_offload": "pipe.to(device) (the whole model moves; nothing is offloaded)",
    "enable_attention_slicing": "max_batch= on the call (fewer samples at once)",
    "enable_xformers_memory_efficient_attention": "nothing: attention uses torch's scaled_dot_product_attention",
    "enable_vae_slicing": "max_batch= on the call (fewer samples at once)",
}


def require_kind(cfg: dict, path: str | Path, allowed: Sequence[str], what: str) -> str:
    """The run's kind, or a one-line error saying what the command needs."""
    kind = run_kind(cfg)
    if kind not in allowed:
        raise ValueError(f"{path} is a{'n' if kind[0] in 'aeiou' else ''} {kind} run; {what} needs a "
                         f"{' or '.join(allowed)} run")
    return kind


def sample_seeds(n: int, generator: torch.Generator | None) -> list[int]:
    """One seed per sample, drawn in sample order from ``generator`` (the global RNG when None)."""
    return torch.randint(0, 2**62, (n,), generator=generator).tolist()


_REPO_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9][A-Za-z0-9._-]*$")


def resolve_pretrained(path: str | Path, *, revision: str | None = None, local_files_only: bool | None = None,
                       cache_dir: str | Path | None = None, token: str | bool | None = None) -> Path:
    """A local folder as it is; otherwise a Hugging Face Hub id ``org/name`` through ``huggingface_hub``'s
    ``snapshot_download`` (its cache, ``revision``, and offline mode: ``HF_HUB_OFFLINE=1`` or
    ``local_files_only=True`` read the cache only). Anything else is a one-line error."""
    p = Path(path)
    if p.exists() or not (isinstance(path, str) and _REPO_ID.match(path) and not path.endswith((".json", "/"))):
        if not p.exists():
            raise ValueError(f"run folder not found: {path} (nor a Hugging Face Hub id org/name)")
        return p
    try:
        from huggingface_hub import snapshot_download
        from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError
    except ImportError:
        raise ValueError(f"{path} is not a local folder; to read it as a Hugging Face Hub id install "
                         "huggingface_hub (pip install 'torchdiffusion[hub]')") from None
    try:
        return Path(snapshot_download(path, revision=revision, local_files_only=bool(local_files_only),
                                      cache_dir=None if cache_dir is None else str(cache_dir), token=token))
    except LocalEntryNotFoundError:
        raise ValueError(f"{path} is not a local folder and not in the Hugging Face cache"
                         f"{'' if revision is None else f' at revision {revision}'} (offline: HF_HUB_OFFLINE or "
                         "local_files_only); download it once online, or give a folder") from None
    except (HfHubHTTPError, OSError, ValueError) as e:
        raise ValueError(f"{path}: not a local folder, and the Hub said: {str(e).strip().splitlines()[0]}") \
            from None


@dataclass
class PipelineOutput:
    """What a call with ``output_type`` (or ``return_dict``) returns, shaped like diffusers' ``ImagePipelineOutput``:
    ``images`` (``output[0]`` too), plus the ``class_labels`` each sample was drawn for (None if none)."""

    images: Any
    class_labels: Tensor | None = None

    def __getitem__(self, i):
        return (self.images,)[i] if isinstance(i, int | slice) else getattr(self, i)

@contextlib.contextmanager
def _num_threads(n: int):
    """torch's intra-op threads set to ``n`` (0: unchanged) inside the block, restored after."""
    before = torch.get_num_threads()
    if n > 0:
        torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _same(name: str, value, other_name: str, other):
    """``value`` or ``other`` (the same setting under diffusers' name); both given and different is an error."""
    if other is None:
        return value
    if value is not None and value != other:
        raise ValueError(f"{name}={value!r} and {other_name.split(' ')[0]} (= {name} {other!r}) disagree; give one")
    return other


def _is_scalar(labels) -> bool:
    """One label (a number of any type, checked later: ``3.7`` is refused by :meth:`Pipeline.labels`)."""
    return isinstance(labels, numbers.Number) or (isinstance(labels, Tensor) and labels.ndim == 0)


def _count(n: int | None, batch_size: int | None, per, per_label: int | None, what: str = "class_labels") -> int:
    """The number of samples a call asks for (see :meth:`Pipeline.__call__`): ``per`` is the class labels or
    prompts when they are a sequence (one sample each, times ``per_label``); or a one-line error."""
    for name, v in (("n", n), ("batch_size", batch_size), ("num_images_per_prompt", per_label)):
        if v is not None:
            check_count(v, name)
    if n is not None and batch_size is not None and n != batch_size:
        raise ValueError(f"n={n} and batch_size={batch_size} disagree: both are the number of samples (batch_size "
                         "as in diffusers); give one (max_batch bounds how many are sampled at once)")
    count = n if n is not None else batch_size
    m = per_label or 1
    if per is not None and not _is_scalar(per) and not isinstance(per, str):
        try:
            k = len(per) if isinstance(per, list | tuple) else len(torch.as_tensor(per).flatten())
        except TypeError:
            raise ValueError(f"{what} must be one value or a sequence, got {per!r}"[:200]) from None
        total = k * m
        if count is not None and count != total:
            if m == 1:
                raise ValueError(f"{what} must be one {'int' if what == 'class_labels' else 'string'} or {count} "
                                 f"{'labels' if what == 'class_labels' else 'strings'}, got {total}")
            raise ValueError(f"{k} {what} x {m} each = {total} samples, but n/batch_size asks for {count}")
        return total
    return (count or 1) * m
