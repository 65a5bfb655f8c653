"""The front door for Python users (docs/design.md section 5): load any diffusion run folder and sample it.

    pipe = td.Pipeline.from_pretrained("runs/digits")
    x = pipe(n=64, sampler="unipc", steps=10, class_labels=3, guidance=0.5,
             generator=torch.Generator().manual_seed(0))

Every sample has its own noise: ``generator`` first draws one seed per sample (in sample order), and each
sample's ``x_T`` and every noise the sampler draws for it come from that sample's generator
(:class:`torchdiffusion._tensor.SampleGenerators`). So results do not depend on ``batch_size``, and the
command line's ``sample --seed S`` equals ``generator=torch.Generator().manual_seed(S)``.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
from torch import Tensor

from torchdiffusion._files import FileError, FolderLock, check_writable
from torchdiffusion._tensor import SampleGenerators, check_count
from torchdiffusion.parameterization.denoiser import Denoiser
from torchdiffusion.parameterization.guidance import CFG
from torchdiffusion.processes import Process
from torchdiffusion.runs import fits
from torchdiffusion.runs.build import load_run, run_kind
from torchdiffusion.runs.config import config_binding
from torchdiffusion.runs.diffusers_io import is_diffusers_folder, load_diffusers_folder
from torchdiffusion.runs.latent import to_images
from torchdiffusion.runs.text import load_tokenizer
from torchdiffusion.samplers import grids, sample
from torchdiffusion.training.checkpoint import clear_run, model_files, save_json, save_tensors


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


log = logging.getLogger(__name__)


class Pipeline:
    """A trained diffusion model (``model``: its :class:`Denoiser`), its ``process`` and its run ``config``;
    ``path``: its run folder, where fitted grids are kept (:mod:`torchdiffusion.runs.fits`; None: no stored fits).
    ``note`` says after each sampling call whether a stored fit was used (or why not)."""

    def __init__(self, model: Denoiser, config: dict, *, path: str | Path | None = None, tokenizer=None):
        self.model, self.config = model, config
        self.path = None if path is None else Path(path)
        self.note: str | None = None
        self.process: Process = model.process
        info = config["run"]
        self.data_shape = tuple(info["data_shape"])
        self.num_classes = info.get("num_classes")
        self.tokenizer = tokenizer  # a text run's CaptionTokenizer (its tokenizer.json), else None

    @classmethod
    def from_pretrained(cls, path: str | Path, *, ema: bool = True, device: str | torch.device = "cpu") -> Pipeline:
        """Load a run folder (EMA weights by default), or a local diffusers folder (``UNet2DModel`` + scheduler,
        :func:`~torchdiffusion.runs.diffusers_io.load_diffusers_folder`); autoencoder and classifier runs are
        refused."""
        if is_diffusers_folder(path):
            return cls(*load_diffusers_folder(path, device))
        model, cfg = load_run(path, ema=ema, device=device)
        require_kind(cfg, path, ("diffusion", "latent"), "a Pipeline")
        return cls(model, cfg, path=path, tokenizer=load_tokenizer(path, cfg))

    def save_pretrained(self, path: str | Path, *, force: bool = False) -> Path:
        """Write a run folder that :meth:`from_pretrained` loads again (config, weights as model and EMA). A
        folder that already holds a model is refused unless ``force``, which replaces the old run whole (its
        training state, log and previews are deleted, so nothing of it is resumed); a diffusers folder, or a
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
            state, meta = self.model.net.state_dict(), {"saved_by": "Pipeline.save_pretrained",
                                                        **config_binding(self.config)}
            for name in ("model.safetensors", "ema.safetensors"):
                save_tensors(state, path / name, meta)
            if self.tokenizer is not None:
                self.tokenizer.save(path / "tokenizer.json")
            save_json(self.config, path / "config.json")
        return path

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

    def __call__(self, n: int = 1, sampler: str | None = None, steps: int | None = None,
                 grid: str | Tensor | None = None,
                 class_labels: int | Sequence[int] | Tensor | None = None, guidance: float = 0.0,
                 generator: torch.Generator | None = None, batch_size: int | None = None,
                 callback: Callable[[dict], None] | None = None, *, prompt: str | Sequence[str] | None = None,
                 negative_prompt: str | Sequence[str] | None = None, **sampler_options) -> Tensor:
        """``n`` samples in the data's own range and shape (a latent run decodes); defaults from the run's
        ``sample`` section; ``guidance`` is the classifier-free scale ``w`` (needs ``class_labels``, or a
        ``prompt`` for a text run). ``prompt``: one string or ``n`` strings (text runs; ``""`` or None = the
        unconditional model); ``negative_prompt`` (one or ``n`` strings) replaces the unconditional branch of
        guidance: ``(1 + w) eps(x, prompt) - w eps(x, negative_prompt)``."""
        model, y = self.conditioned(n, class_labels=class_labels, prompt=prompt, negative_prompt=negative_prompt,
                                    guidance=guidance)
        return self.generate(model, n, cond=y, sampler=sampler, steps=steps, grid=grid, generator=generator,
                             batch_size=batch_size, callback=callback, **sampler_options)

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

    def generate(self, model, n: int, *, cond: Tensor | None = None, sampler: str | None = None,
                 steps: int | None = None, grid: str | Tensor | None = None, generator: torch.Generator | None = None,
                 batch_size: int | None = None, callback: Callable[[dict], None] | None = None,
                 seeds: Sequence[int] | None = None, **sampler_options) -> Tensor:
        """Sample any model over this run's process and data (e.g. a guidance wrapper around ``self.model``)
        with per-sample noise (module doc), in batches of ``batch_size``; decoded to images for latent runs.
        ``seeds`` (``n`` per-sample seeds, e.g. a subset of :func:`sample_seeds`) replaces ``generator``."""
        check_count(n, "n")
        if batch_size is not None:
            check_count(batch_size, "batch_size")
        s = self.config.get("sample", {})
        sampler = sampler or s.get("sampler", "ddim")
        steps = steps if steps is not None or isinstance(grid, Tensor) else int(s.get("steps", 50))
        self.note = None
        if grid is None and model is self.model:  # a stored fit for this sampler and step count (issue 33)
            grid, sampler_options = self.stored_fit(sampler, steps, sampler_options)
        grid = grid if grid is not None else s.get("grid")
        first = next(iter(self.model.net.parameters()), None) if hasattr(self.model.net, "parameters") else None
        device = first.device if first is not None else "cpu"
        seeds = sample_seeds(n, generator) if seeds is None else [int(v) for v in seeds]
        if len(seeds) != n:
            raise ValueError(f"seeds must hold n = {n} per-sample seeds, got {len(seeds)}")
        out = []
        for lo in range(0, n, batch_size or n):
            gens = SampleGenerators(seeds[lo: lo + (batch_size or n)])
            x_T = gens.randn((len(gens), *self.data_shape), dtype=torch.float32) * self.process.prior_std()
            c = None if cond is None else cond[lo: lo + len(gens)].to(device)
            x = sample(model, x_T.to(device), sampler, steps, grid=grid, generator=gens, cond=c,
                       callback=callback, **sampler_options)
            out.append(x.cpu())
        x = torch.cat(out)
        if not torch.isfinite(x).all():
            raise ValueError(f"sampling produced non-finite values ({int((~torch.isfinite(x)).sum())} of "
                             f"{x.numel()}): the weights or the options are broken")
        return to_images(x, self.config["run"])[0]

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
        first = next(iter(self.model.net.parameters()), None) if hasattr(self.model.net, "parameters") else None
        device = first.device if first is not None else "cpu"
        x_T = self.process.prior_sample((n_pilot, *self.data_shape), generator=torch.Generator().manual_seed(seed))
        cond = fits.pilot_labels(n_pilot, self.num_classes)
        grid, info = grids.optimize(self.model, sampler, steps, x_T=x_T.to(device),
                                    cond=None if cond is None else cond.to(device), max_runs=max_runs,
                                    choices=choices, progress=progress, return_info=True, **options)
        path, rec = fits.save_fit(self.path, grid.cpu(), info, weights=fits.weights_hash(self.model),
                                  pilot_seed=seed, choices=choices)
        return {**rec, "path": str(path)}
