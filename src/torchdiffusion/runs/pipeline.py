"""The front door for Python users (docs/design.md section 5): load any diffusion run folder and sample it.

    pipe = td.Pipeline.from_pretrained("runs/digits")       # a run folder, a diffusers folder or a Hub id
    x = pipe(n=64, sampler="unipc", steps=10, class_labels=3, guidance=0.5,
             generator=torch.Generator().manual_seed(0))

Every sample has its own noise: ``generator`` first draws one seed per sample (in sample order), and each
sample's ``x_T`` and every noise the sampler draws for it come from that sample's generator
(:class:`torchdiffusion._tensor.SampleGenerators`). So results do not depend on ``max_batch``, and the
command line's ``sample --seed S`` equals ``generator=torch.Generator().manual_seed(S)``. A list of generators
(diffusers' "one per image") is used as the samples' own generators, which is the noise diffusers draws from
such a list: the same images through a diffusers pipeline of an exported run.

diffusers' argument names have their diffusers meaning (:data:`DIFFUSERS_NAMES`; ``batch_size`` is the number
of images, ``guidance_scale`` is ``1 + guidance``); the names we do not have are refused with one line that
names ours (:data:`DIFFUSERS_REFUSED`). Those tables, the sample count and Hub ids are in ``pipeline_args.py``.
"""

from __future__ import annotations

import contextlib
import logging
import math
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from torchdiffusion._files import FileError, FolderLock, check_writable
from torchdiffusion._tensor import SampleGenerators, check_count, check_number, resolve_device
from torchdiffusion.nets.fast import check_flag, resolve_flag, speed_up_in_place
from torchdiffusion.parameterization.denoiser import Denoiser
from torchdiffusion.parameterization.guidance import CFG
from torchdiffusion.processes import Process
from torchdiffusion.runs import fits
from torchdiffusion.runs.build import load_run
from torchdiffusion.runs.config import config_binding
from torchdiffusion.runs.diffusers_io import is_diffusers_folder, load_diffusers_folder
from torchdiffusion.runs.latent import to_images
from torchdiffusion.runs.pipeline_args import (  # noqa: F401 (DIFFUSERS_*, OUTPUT_TYPES: re-exported)
    DIFFUSERS_ATTRIBUTES,
    DIFFUSERS_NAMES,
    DIFFUSERS_REFUSED,
    OUTPUT_TYPES,
    PipelineOutput,
    _count,
    _is_scalar,
    _num_threads,
    _same,
    require_kind,
    resolve_pretrained,
    sample_seeds,
)
from torchdiffusion.runs.text import load_tokenizer
from torchdiffusion.samplers import StopSampling, grids, plan, progress_bar, reporter, sample
from torchdiffusion.training.checkpoint import clear_run, model_files, save_json, save_tensors

log = logging.getLogger(__name__)
def default_guidance(config: dict, conditioned: bool) -> float:
    """The classifier-free ``w`` a run is sampled with when none is given: its ``sample.guidance`` (a preset's
    choice, e.g. 1.0 for shapes32, fixed before any scoring) when the samples are conditioned (class labels or a
    prompt), else 0 (the Pipeline, ``sample`` and ``eval`` share this rule)."""
    return float(config.get("sample", {}).get("guidance", 0.0) or 0.0) if conditioned else 0.0


class Pipeline:
    """A trained diffusion model (``model``: its :class:`Denoiser`), its ``process`` and its run ``config``.

    ``threads``: torch's intra-op threads while sampling (None: the run's ``sample.threads``, default 1; 0
    leaves torch's setting), restored afterwards. :meth:`set_progress_bar_config` configures the tqdm bar as in
    diffusers; setting ``pipe._interrupt = True`` (e.g. in a ``callback_on_step_end``) stops sampling early.
    ``path``: its run folder, where fitted grids are kept (:mod:`torchdiffusion.runs.fits`; None: no stored fits).
    ``note`` says after each sampling call whether a stored fit was used (or why not).
    ``compile`` / ``channels_last``: ``True``, ``False`` or ``"auto"`` (None: the run's ``sample.compile`` /
    ``sample.channels_last``, default ``"auto"``; :mod:`torchdiffusion.nets.fast`): the network is compiled / laid
    out channels-last in place on the first sampling call that asks for it, once per model (one graph per input
    shape, reused by every later step and call); ``fast`` says after each call which of them are on.
    """

    def __init__(self, model: Denoiser, config: dict, *, threads: int | None = None, path: str | Path | None = None,
                 tokenizer=None, compile: bool | str | None = None, channels_last: bool | str | None = None):
        self.model, self.config = model, config
        self.switches = {"compile": None if compile is None else check_flag(compile, "compile"),
                         "channels_last": None if channels_last is None else check_flag(channels_last, "channels_last")}
        self.fast = {"compile": False, "channels_last": False}
        self.tokenizer = tokenizer  # a text run's CaptionTokenizer (its tokenizer.json), else None
        self.path = None if path is None else Path(path)
        self.note: str | None = None
        self.process: Process = model.process
        info = config["run"]
        self.data_shape = tuple(info["data_shape"])
        self.num_classes = info.get("num_classes")
        self.threads = threads
        self._progress_config: dict = {}
        self._interrupt = False

    @classmethod
    def from_pretrained(cls, path: str | Path, *, ema: bool = True, device: str | torch.device = "cpu",
                        torch_dtype: torch.dtype | None = None, revision: str | None = None,
                        local_files_only: bool | None = None, cache_dir: str | Path | None = None,
                        token: str | bool | None = None, threads: int | None = None, trust_remote_code: bool = False,
                        custom_pipeline: str | None = None, use_safetensors: bool | None = None,
                        compile: bool | str | None = None, channels_last: bool | str | None = None,
                        **kwargs) -> Pipeline:
        """Load a run folder (EMA weights by default), a local diffusers folder (``UNet2DModel`` + scheduler,
        :func:`~torchdiffusion.runs.diffusers_io.load_diffusers_folder`) or a Hugging Face Hub id ``org/name``
        holding either (:func:`resolve_pretrained`: its cache, ``revision``, offline with ``HF_HUB_OFFLINE=1``
        or ``local_files_only``); autoencoder and classifier runs are refused. ``torch_dtype`` as in diffusers
        (= ``.to(torch_dtype)``). diffusers' ``trust_remote_code`` and ``custom_pipeline`` are accepted and change
        nothing (this Pipeline runs no code from the folder: it reads weights and JSON only, which is also why
        ``use_safetensors=False`` is refused). ``compile``, ``channels_last``: see the class doc."""
        if kwargs:
            raise TypeError(f"from_pretrained got unexpected argument(s) {', '.join(map(repr, sorted(kwargs)))}; "
                            "allowed: ema, device, torch_dtype, revision, local_files_only, cache_dir, token, threads, "
                            "compile, channels_last (and diffusers' trust_remote_code, custom_pipeline, "
                            "use_safetensors)")
        if use_safetensors is False:
            raise ValueError("use_safetensors=False: this Pipeline reads safetensors only (nothing is unpickled)")
        path = resolve_pretrained(path, revision=revision, local_files_only=local_files_only, cache_dir=cache_dir,
                                  token=token)
        fast = {"compile": compile, "channels_last": channels_last}
        if is_diffusers_folder(path):
            pipe = cls(*load_diffusers_folder(path, device), threads=threads, **fast)
        else:
            model, cfg = load_run(path, ema=ema, device=device)
            require_kind(cfg, path, ("diffusion", "latent"), "a Pipeline")
            pipe = cls(model, cfg, threads=threads, path=path, tokenizer=load_tokenizer(path, cfg), **fast)
        return pipe.to(dtype=torch_dtype) if torch_dtype is not None else pipe

    def save_pretrained(self, path: str | Path, *, force: bool = False) -> Path:
        """Write a run folder that :meth:`from_pretrained` loads again (config, weights as model and EMA, in
        float32). A folder that already holds a model is refused unless ``force``, which replaces the old run whole
        (its training state, log and previews are deleted, so nothing of it is resumed); a diffusers folder, or a
        folder a trainer holds, is refused."""
        if self.config["run"].get("diffusers"):
            raise ValueError(f"this Pipeline reads the diffusers folder {self.config['run']['diffusers']}; copy that "
                             "folder instead of save_pretrained")
        path = Path(path)
        if is_diffusers_folder(path):
            raise FileError(f"{path} holds a diffusers model; a folder holds one model, so save_pretrained (a run "
                            "folder) will not write there, even with force: choose another folder")
        held = model_files(path)
        if held and not force:
            raise FileError(f"{path} already holds a model ({', '.join(held)}); pass force=True to overwrite it")
        check_writable(path / "config.json")
        with FolderLock(path, "writer"):  # not while a trainer holds the folder
            # the old run goes whole (training state, log, previews): a later `train` must not resume its
            # optimizer over these weights; the weights come before config.json, bound to it by their metadata
            clear_run(path, config=False)
            state = {k: v.float() if v.is_floating_point() else v for k, v in self.model.net.state_dict().items()}
            meta = {"saved_by": "Pipeline.save_pretrained", **config_binding(self.config)}
            for name in ("model.safetensors", "ema.safetensors"):
                save_tensors(state, path / name, meta)
            if self.tokenizer is not None:
                self.tokenizer.save(path / "tokenizer.json")
            save_json(self.config, path / "config.json")
        return path

    # --- device, dtype, progress, threads ----------------------------------------------------------------------
    @property
    def device(self) -> torch.device:
        first = next(iter(self.model.net.parameters()), None) if hasattr(self.model.net, "parameters") else None
        return first.device if first is not None else torch.device("cpu")

    @property
    def dtype(self) -> torch.dtype:
        first = next(iter(self.model.net.parameters()), None) if hasattr(self.model.net, "parameters") else None
        return first.dtype if first is not None else torch.float32

    def to(self, *args, device: str | torch.device | None = None, dtype: torch.dtype | None = None) -> Pipeline:
        """Move the network to a device and/or dtype, as diffusers' ``pipe.to("cuda")``, ``pipe.to(torch.float16)``
        or ``pipe.to("cuda", torch.float16)``; returns the pipeline. With a dtype other than float32 the network
        runs under ``torch.autocast`` while the sampler's arithmetic stays in float32."""
        for a in args:
            if isinstance(a, torch.dtype):
                dtype = a
            elif isinstance(a, str | torch.device):
                device = a
            else:
                raise TypeError(f"Pipeline.to takes a device and/or a dtype, got {type(a).__name__}")
        if dtype is not None and not dtype.is_floating_point:
            raise TypeError(f"dtype must be a floating point dtype (float32, float16, bfloat16), got {dtype}")
        if device is not None:
            device = resolve_device(device)
        if hasattr(self.model.net, "to"):
            self.model.net.to(device=device, dtype=dtype)
        return self

    def set_progress_bar_config(self, **kwargs) -> None:
        """Options for the tqdm bar of every later call (diffusers' method): e.g. ``disable=True``, ``desc``,
        ``leave``. ``progress=`` on a call overrides ``disable`` for that call."""
        self._progress_config = dict(kwargs)

    def __getattr__(self, name: str):
        if name in DIFFUSERS_ATTRIBUTES:
            raise AttributeError(f"Pipeline has no {name!r} (diffusers' name); here: {DIFFUSERS_ATTRIBUTES[name]}")
        raise AttributeError(f"{type(self).__name__!r} object has no attribute {name!r}")

    @property
    def interrupt(self) -> bool:
        """True once sampling was asked to stop (``pipe._interrupt = True``, as in diffusers)."""
        return self._interrupt

    def fast_path(self, calls: int) -> dict[str, bool]:
        """Whether sampling with ``calls`` network evaluations compiles the network and lays it out channels-last
        (the class's ``compile`` / ``channels_last``, else the run's ``sample`` settings; ``"auto"``:
        :func:`torchdiffusion.nets.fast.auto_picks` for this network and data shape)."""
        s = self.config.get("sample", {})
        net = self.model.net
        return {key: isinstance(net, torch.nn.Module) and resolve_flag(
                    s.get(key, "auto") if self.switches[key] is None else self.switches[key], f"sample.{key}", key,
                    "sample", net, self.data_shape, calls)
                for key in ("channels_last", "compile")}

    def _threads(self, threads: int | None) -> contextlib.AbstractContextManager:
        n = threads if threads is not None else self.threads
        if n is None:
            n = int(self.config.get("sample", {}).get("threads", 1) or 0)
        check_count(n, "threads", 0)
        return _num_threads(n)

    # --- sampling --------------------------------------------------------------------------------------------
    def labels(self, class_labels: int | Sequence[int] | Tensor | None, n: int) -> Tensor | None:
        """``class_labels`` (an int or a length-``n`` sequence) as a tensor of ``n`` labels, checked."""
        if class_labels is None:
            return None
        if not self.num_classes:
            raise ValueError("class_labels given but this model is not class-conditional")
        k = self.num_classes
        try:
            y = torch.as_tensor(class_labels)
        except (TypeError, ValueError, RuntimeError):
            raise ValueError(f"class_labels must be whole numbers in 0..{k - 1}, got {class_labels!r}") from None
        if y.dtype.is_floating_point or y.dtype.is_complex or y.dtype == torch.bool:  # 3.7 is refused, not truncated
            raise ValueError(f"class_labels must be whole numbers in 0..{k - 1}, got {class_labels!r}")
        y = y.to(torch.long)
        y = y.expand(n).clone() if y.ndim == 0 else y.flatten()
        if len(y) != n:
            raise ValueError(f"class_labels must be one int or {n} labels, got {len(y)}")
        if ((y < 0) | (y >= k)).any():
            raise ValueError(f"class labels must be in 0..{k - 1} (-1, the null class, is not a label), got "
                             f"{int(y[(y < 0) | (y >= k)][0])}")
        return y

    def prompts(self, prompt: str | Sequence[str] | None, n: int, what: str = "prompt") -> Tensor | None:
        """``prompt`` (one string for every sample, or ``n`` strings) as token ids ``(n, L)``: a text run's
        tokenizer (unknown words -> ``[UNK]``; a prompt over its ``max_length`` is truncated with a warning; the
        empty prompt ``""`` is the unconditional model)."""
        if prompt is None:
            return None
        if self.tokenizer is None:
            raise ValueError(f"{what} given, but this run has no text encoder (it is not text-conditioned; train "
                             "one with preset shapes32_text or latent_shapes32_text)")
        texts = [prompt] * n if isinstance(prompt, str) else list(prompt) if isinstance(prompt, (list, tuple)) else None
        if texts is None or not all(isinstance(t, str) for t in texts):
            raise TypeError(f"{what} must be a string or a list of {n} strings, got {prompt!r}"[:200])
        if len(texts) != n:
            raise ValueError(f"{what} must be one string or {n} strings (one per sample), got {len(texts)}")
        return torch.from_numpy(self.tokenizer.encode(texts))

    def default_guidance(self, conditioned: bool) -> float:
        """The classifier-free ``w`` used when none is given: :func:`default_guidance` of this run's config."""
        return default_guidance(self.config, conditioned)

    def conditioned(self, n: int, *, class_labels: int | Sequence[int] | Tensor | None = None,
                    prompt: str | Sequence[str] | None = None, negative_prompt: str | Sequence[str] | None = None,
                    guidance: float = 0.0):
        """``(model, cond)`` for :meth:`generate`: the run's model, wrapped in :class:`CFG` when ``guidance`` is
        not 0, and the condition of the ``n`` samples (labels, token ids, or (prompt, negative) pairs of token ids
        for a negative prompt); arguments as in :meth:`__call__`, misuse a one-line ``ValueError``."""
        guidance = float(guidance)
        if not torch.isfinite(torch.tensor(guidance)):
            raise ValueError(f"guidance must be a finite number, got {guidance}")
        ok_n = isinstance(n, int) and n >= 1
        if self.tokenizer is not None and class_labels is not None:
            raise ValueError("this run is conditioned on text: give prompt=..., not class_labels")
        y = self.labels(class_labels, int(n)) if ok_n else None
        tokens = self.prompts(prompt, int(n)) if ok_n else None
        negative = self.prompts(negative_prompt, int(n), "negative_prompt") if ok_n else None
        if negative is not None and not guidance:
            raise ValueError("negative_prompt needs guidance > 0 (it replaces the unconditional half of "
                             "classifier-free guidance)")
        if tokens is not None:
            y = tokens if negative is None else torch.stack([tokens, negative], 1)
        model = self.model
        if guidance:
            if y is None:
                raise ValueError("guidance needs class_labels and a class-conditional model (or a prompt and a "
                                 "text-conditioned model)")
            model = CFG(model, guidance, negative=negative is not None)
        return model, y

    def __call__(self, n: int | None = None, sampler: str | None = None, steps: int | None = None,
                 grid: str | Tensor | None = None,
                 class_labels: int | Sequence[int] | Tensor | None = None, guidance: float | None = None,
                 generator: torch.Generator | Sequence[torch.Generator] | None = None,
                 batch_size: int | None = None, *, max_batch: int | None = None, output_type: str | None = None,
                 return_dict: bool | None = None, num_inference_steps: int | None = None,
                 guidance_scale: float | None = None, num_images_per_prompt: int | None = None,
                 callback: Callable[[dict], dict | None] | None = None,
                 callback_on_step_end: Callable | None = None,
                 callback_on_step_end_tensor_inputs: Sequence[str] = ("latents",),
                 progress: bool | None = None, threads: int | None = None,
                 prompt: str | Sequence[str] | None = None, negative_prompt: str | Sequence[str] | None = None,
                 **sampler_options):
        """Samples in the data's own range and shape (a latent run decodes); defaults from the run's ``sample``
        section.

        - How many: ``n`` or ``batch_size`` (diffusers' name: the number of images, not a chunk); a sequence of
          ``class_labels`` (or a list of prompts) alone gives one sample per entry; ``num_images_per_prompt``
          repeats each (or multiplies ``n``); no count at all is 1. Counts that disagree are an error.
          ``max_batch`` bounds how many are sampled at once (results do not depend on it).
        - ``guidance`` is the classifier-free ``w`` of ``(1 + w) eps(x, c) - w eps(x)`` (needs ``class_labels``;
          not given: the run's ``sample.guidance`` when samples are conditioned, see :meth:`default_guidance`);
          diffusers' ``guidance_scale`` is ``1 + w`` (at most 1: no guidance, as in diffusers). Text runs take
          ``prompt`` (one string or one per sample; ``""`` = unconditional) and ``negative_prompt``, which
          replaces the unconditional branch: ``(1 + w) eps(x, prompt) - w eps(x, negative_prompt)``.
          ``num_inference_steps`` is ``steps``.
        - Output: without ``output_type`` a tensor ``(n, C, H, W)`` or ``(n, d)`` in the data's range (images
          clamped to it; other data raw). With ``output_type`` (or ``return_dict``) a :class:`PipelineOutput` as
          diffusers returns (``return_dict=False``: the tuple ``(images,)``), whose ``images`` are diffusers'
          ``"pt"`` (NCHW tensor in [0, 1]), ``"np"`` (NHWC float array in [0, 1]) or ``"pil"`` (a list of PIL
          images; the default when only ``return_dict`` is given); non-image data stay raw (``pil`` refused).
        - ``callback(d)`` after every step (:func:`torchdiffusion.samplers.sample`); ``callback_on_step_end(pipe,
          step_index, timestep, callback_kwargs) -> dict`` as diffusers calls it, with ``callback_kwargs``
          holding ``latents`` (the state; return a changed one to walk on from it) and ``x0`` (the prediction).
          Setting ``pipe._interrupt = True`` stops: every sample is returned at the state it reached (samples of
          batches not yet started at their initial noise), as diffusers returns the latents it has.
        - ``progress``: the tqdm bar (None: :meth:`set_progress_bar_config`, else shown on a terminal or in a
          notebook); ``threads``: see the class doc. Other keywords are the sampler's options (e.g. ``eta``).
        """
        for k in sampler_options:
            if k in DIFFUSERS_REFUSED and DIFFUSERS_REFUSED[k] is not None:
                if k == "use_clipped_model_output" and not sampler_options[k]:
                    continue
                raise ValueError(f"{k!r} is diffusers' argument; this Pipeline has no such input: use "
                                 f"{DIFFUSERS_REFUSED[k]}")
        sampler_options = {k: v for k, v in sampler_options.items() if k != "use_clipped_model_output"}
        steps = _same("steps", steps, "num_inference_steps", num_inference_steps)
        if guidance_scale is not None:
            gs = check_number(guidance_scale, "guidance_scale")
            guidance = _same("guidance", guidance, "guidance_scale - 1", max(gs - 1.0, 0.0))
        guidance = (self.default_guidance(class_labels is not None or prompt is not None) if guidance is None
                    else check_number(guidance, "guidance"))
        per = class_labels if class_labels is not None else (prompt if isinstance(prompt, list | tuple) else None)
        count = _count(n, batch_size, per, num_images_per_prompt, "class_labels" if class_labels is not None else
                       "prompt")
        if num_images_per_prompt is not None:  # each label or prompt repeated, in order (diffusers' layout)
            m = int(num_images_per_prompt)
            if class_labels is not None and not _is_scalar(class_labels):
                class_labels = torch.as_tensor(class_labels).flatten().repeat_interleave(m)
            prompt, negative_prompt = ([t for t in p for _ in range(m)] if isinstance(p, list | tuple) else p
                                       for p in (prompt, negative_prompt))
        model, y = self.conditioned(count, class_labels=class_labels, prompt=prompt, negative_prompt=negative_prompt,
                                    guidance=guidance)
        if output_type is not None and output_type not in OUTPUT_TYPES:
            raise ValueError(f"output_type must be one of {', '.join(OUTPUT_TYPES)} (or None: our tensor in the "
                             f"data's range), got {output_type!r}")
        step_cb = callback
        if callback_on_step_end is not None:
            step_cb = self._step_end(callback, callback_on_step_end, tuple(callback_on_step_end_tensor_inputs))
        seeds = gens = None
        if isinstance(generator, list | tuple):
            gens = list(generator)
            if len(gens) != count:
                raise ValueError(f"generator is a list of {len(gens)}; a list needs one generator per sample "
                                 f"({count}), as in diffusers")
            generator = None
        x = self.generate(model, count, cond=y, sampler=sampler, steps=steps, grid=grid, generator=generator,
                          max_batch=max_batch, callback=step_cb, generators=gens, seeds=seeds, progress=progress,
                          threads=threads, **sampler_options)
        if output_type is None and return_dict is None:
            return x
        images = self.postprocess(x, output_type or "pil")
        out = PipelineOutput(images, y)
        return out if return_dict is None or return_dict else (images,)

    def _step_end(self, callback, on_step_end: Callable, inputs: tuple[str, ...]) -> Callable[[dict], dict | None]:
        """Our sampler callback around diffusers' ``callback_on_step_end(pipe, i, t, callback_kwargs)``."""
        allowed = ("latents", "x0")
        bad = [k for k in inputs if k not in allowed]
        if bad:
            raise ValueError(f"callback_on_step_end_tensor_inputs may hold {', '.join(allowed)}; got {bad}")

        def cb(d: dict) -> dict | None:
            out = callback(d) if callback is not None else None
            kwargs = {k: (d["x"] if k == "latents" else d.get("x0")) for k in inputs}
            ret = on_step_end(self, d["i"], d["t"], kwargs)
            if isinstance(ret, dict) and ret.get("latents") is not None:
                return {"x": ret["latents"]}
            return out
        return cb

    def postprocess(self, x: Tensor, output_type: str = "pt"):
        """``x`` (our tensor in the data's range) as diffusers' ``output_type``: images to [0, 1] (``pt``: NCHW
        tensor, ``np``: NHWC float32 array, ``pil``: a list of PIL images); other data raw (``pil`` refused)."""
        if output_type not in OUTPUT_TYPES:
            raise ValueError(f"output_type must be one of {', '.join(OUTPUT_TYPES)}, got {output_type!r}")
        image = x.ndim == 4
        if not image:
            if output_type == "pil":
                raise ValueError(f"output_type='pil' needs image data; this run's samples are vectors of shape "
                                 f"{tuple(x.shape[1:])} (use 'np' or 'pt')")
            return x.numpy() if output_type == "np" else x
        lo, hi = self.value_range
        x01 = ((x.float() - lo) / (hi - lo)).clamp(0, 1)
        if output_type == "pt":
            return x01
        arr = x01.permute(0, 2, 3, 1).numpy()
        if output_type == "np":
            return arr
        from PIL import Image

        u8 = (arr * 255).round().astype(np.uint8)
        return [Image.fromarray(a[..., 0] if a.shape[-1] == 1 else a) for a in u8]

    @property
    def value_range(self) -> tuple[float, float]:
        """The range of the samples this pipeline returns (the decoded images' for a latent run)."""
        info = self.config["run"]
        lat = info.get("latent")
        return tuple(map(float, (lat or info).get("value_range", (-1.0, 1.0))))

    def generate(self, model, n: int, *, cond: Tensor | None = None, sampler: str | None = None,
                 steps: int | None = None, grid: str | Tensor | None = None, generator: torch.Generator | None = None,
                 max_batch: int | None = None, callback: Callable[[dict], dict | None] | None = None,
                 seeds: Sequence[int] | None = None, generators: Sequence[torch.Generator] | None = None,
                 progress: bool | None = None, threads: int | None = None, **sampler_options) -> Tensor:
        """Sample any model over this run's process and data (e.g. a guidance wrapper around ``self.model``)
        with per-sample noise (module doc), at most ``max_batch`` at a time; decoded to images for latent runs,
        images clamped to the data range. ``seeds`` (``n`` per-sample seeds, e.g. a subset of
        :func:`sample_seeds`) or ``generators`` (``n`` generators, used as they are) replace ``generator``."""
        check_count(n, "n")
        if max_batch is not None:
            check_count(max_batch, "max_batch")
        s = self.config.get("sample", {})
        sampler = sampler or s.get("sampler", "ddim")
        self.note = None
        if isinstance(grid, (str, Path)) and str(grid).endswith(".json"):  # a grid file (td.grids.save)
            grid = grids.load(grid)
        steps = steps if steps is not None or isinstance(grid, Tensor) else int(s.get("steps", 50))
        if grid is None and model is self.model:  # a stored fit for this sampler and step count (issue 33)
            grid, sampler_options = self.stored_fit(sampler, steps, sampler_options)
        grid = grid if grid is not None else s.get("grid")
        if isinstance(grid, (str, Path)) and str(grid).endswith(".json"):
            grid = grids.load(grid)
        if isinstance(grid, Tensor):  # x_T is drawn from the prior, at t_max: a grid must start there
            t0, t_max = float(grid.reshape(-1)[0]), float(self.process.t_max)
            if abs(t0 - t_max) > 1e-6 * max(1.0, abs(t_max)):
                raise ValueError(f"the grid starts at t = {t0:g}, but samples start from the prior at t_max = "
                                 f"{t_max:g}; give a grid that starts at t_max (e.g. one from td.grids.optimize)")
        p = plan(self.process, sampler, steps, grid, **sampler_options)  # checks everything before any work
        device = self.device
        if generators is None:
            seeds = sample_seeds(n, generator) if seeds is None else [int(v) for v in seeds]
            if len(seeds) != n:
                raise ValueError(f"seeds must hold n = {n} per-sample seeds, got {len(seeds)}")
        elif len(generators) != n:
            raise ValueError(f"generators must hold n = {n} generators, got {len(generators)}")
        chunk = max_batch or n
        # compiled / channels-last where chosen: in place, once per model (later calls reuse it; nets/fast.py)
        self.fast = speed_up_in_place(self.model.net, **self.fast_path(p.emits * math.ceil(n / chunk)))
        config = dict(self._progress_config)
        if progress is not None:
            config["disable"] = not progress
        bar = progress_bar(p.emits * math.ceil(n / chunk), progress, **{"desc": sampler, **config})
        report, last = reporter(callback, bar)
        self._interrupt = False

        def step(d: dict) -> dict | None:
            report(d)
            if self._interrupt:
                raise StopSampling
        dtype = self.dtype
        amp = torch.autocast(device.type, dtype=dtype) if dtype != torch.float32 else contextlib.nullcontext()
        out = []
        try:
            with self._threads(threads), amp:
                for lo in range(0, n, chunk):
                    gens = SampleGenerators(seeds[lo: lo + chunk]) if generators is None else \
                        SampleGenerators(generators=generators[lo: lo + chunk])
                    x_T = gens.randn((len(gens), *self.data_shape), dtype=torch.float32) * self.process.prior_std()
                    if self._interrupt:  # a batch not started: its initial noise
                        out.append(x_T)
                        continue
                    c = None if cond is None else cond[lo: lo + len(gens)].to(device)
                    last.clear()
                    x = sample(model, x_T.to(device), sampler, steps, grid=grid, generator=gens, cond=c,
                               callback=step, progress=False, **sampler_options)
                    out.append(x.float().cpu())
        finally:
            bar.close()
        x = torch.cat(out)
        if not torch.isfinite(x).all():
            raise ValueError(f"sampling produced non-finite values ({int((~torch.isfinite(x)).sum())} of "
                             f"{x.numel()}): the weights or the options are broken")
        x = to_images(x, self.config["run"])[0]
        return x.clamp(*self.value_range) if x.ndim == 4 else x

    # --- fitted grids (issue 33; runs/fits.py) --------------------------------------------------------------------
    def stored_fit(self, sampler: str, steps: int, options: dict) -> tuple[Tensor | None, dict]:
        """The stored fit's grid for ``sampler`` at ``steps`` (None if none applies) and the sampler options to use
        (the fit's, the caller's on top); sets :attr:`note` (logged: a fit left unused is a warning)."""
        grid, fit_opts, self.note = fits.lookup(self.path, self.model, sampler, steps, options)
        if self.note:
            (log.info if grid is not None else log.warning)(self.note)
        return grid, {**fit_opts, **options}

    def fit(self, sampler: str | None = None, steps: int | None = None, *, n_pilot: int = 256,
            max_runs: int = 30, seed: int = 0, choices: dict | None = None,
            progress: Callable[[dict], None] | None = None, **options) -> dict:
        """Fit a grid for ``sampler`` at ``steps`` NFE (defaults: the run's) to this model and store it in the run
        folder (``RUN/fits/SAMPLER-STEPS.json``, :mod:`torchdiffusion.runs.fits`): from then on every sampling
        call with that sampler and step count and no grid named uses it. The fit is
        :func:`torchdiffusion.samplers.grids.optimize` on ``n_pilot`` pilot states drawn from ``seed`` (classes in
        turn for a conditional model), at most ``max_runs`` sampling runs plus one reference solve, choosing
        ``choices`` (default :data:`fits.AUTO_CHOICES`, e.g. unipc's order and final step) and falling back to the
        best fixed grid when the fit's gain on the held-out pilot states is not significant. Returns the record
        written, with ``path``."""
        if self.path is None:
            raise ValueError("Pipeline.fit stores the fit in the run folder: load the Pipeline with "
                             "from_pretrained(RUN) (or pass path=)")
        s = self.config.get("sample", {})
        sampler = sampler or s.get("sampler", "ddim")
        steps = int(s.get("steps", 50)) if steps is None else steps
        check_count(n_pilot, "n_pilot")
        choices = fits.default_choices(sampler) if choices is None else choices
        device = self.device
        x_T = self.process.prior_sample((n_pilot, *self.data_shape), generator=torch.Generator().manual_seed(seed))
        cond = fits.pilot_labels(n_pilot, self.num_classes)
        grid, info = grids.optimize(self.model, sampler, steps, x_T=x_T.to(device),
                                    cond=None if cond is None else cond.to(device), max_runs=max_runs,
                                    choices=choices, progress=progress, return_info=True, **options)
        path, rec = fits.save_fit(self.path, grid.cpu(), info, weights=fits.weights_hash(self.model),
                                  pilot_seed=seed, choices=choices)
        return {**rec, "path": str(path)}
