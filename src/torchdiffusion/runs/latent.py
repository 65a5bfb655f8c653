"""Latent diffusion (THEORY T-LDM-1): diffusion on the scaled latents of a frozen autoencoder / VAE run.

``z = c * E(x)`` (the VAE's posterior mean, or the autoencoder's code) with the scale factor
``c = 1 / std(E(x))`` over the training split, so that the latents have unit variance (Stable Diffusion's
0.18215 plays the same role); generated latents are decoded as ``x = D(z / c)``. The factor is applied exactly
once in each direction. A latent run is an ordinary training run whose data are :func:`load_latents`
(``data.autoencoder=RUN``); its ``config.json`` ``run.latent`` section stores the autoencoder run folder, the
scale factor and the image shape, so ``torchdiffusion sample`` decodes automatically.

Autoencoder runs themselves (``model.net=autoencoder`` or ``vae``) are "sampled" by
:func:`sample_autoencoder_run`: prior samples ``D(z), z ~ N(0, I)`` for a VAE and a reconstruction grid.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import torch
from torch import Tensor

from torchdiffusion.data import datasets as data_mod
from torchdiffusion.data.datasets import examples, split_dataset
from torchdiffusion.data.folder import ImageFolder
from torchdiffusion.evaluation.viz import save_samples
from torchdiffusion.nets.autoencoder import Autoencoder, reconstruct
from torchdiffusion.runs.build import AUTOENCODER_NETS, load_run

_CACHE: dict[tuple[str, float, bool], tuple[Autoencoder, dict]] = {}


def load_autoencoder(run: str | Path | None, ema: bool = True) -> tuple[Autoencoder, dict]:
    """The frozen (eval, no-grad) autoencoder of a trained run folder and its config (cached per file)."""
    if not run:
        raise ValueError("latent diffusion needs a trained autoencoder run: set data.autoencoder=RUN (a run "
                         "folder of preset ae_digits, vae_digits, vae_images, ...)")
    run = Path(run)
    cfg_path = run / "config.json"
    if not cfg_path.is_file():
        raise ValueError(f"autoencoder run not found: {run} (no config.json); train one first, e.g. "
                         "`torchdiffusion train vae_digits --out runs/vae`")
    key = (str(run.resolve()), os.path.getmtime(cfg_path), bool(ema))
    if key not in _CACHE:
        model, cfg = load_run(run, ema=ema)
        if not isinstance(model, Autoencoder):
            raise ValueError(f"{run} is not an autoencoder run (model.net={cfg['model']['net']!r}; "
                             f"allowed: {', '.join(AUTOENCODER_NETS)})")
        _CACHE[key] = (model.eval().requires_grad_(False), cfg)
    return _CACHE[key]


@torch.no_grad()
def encode(net: Autoencoder, x: Tensor, batch: int = 512) -> Tensor:
    """``E(x)``: the VAE's posterior mean (or the autoencoder's code), in batches."""
    return torch.cat([net.encode(c)[0] for c in x.split(batch)])


@torch.no_grad()
def decode(net: Autoencoder, z: Tensor, batch: int = 512) -> Tensor:
    """``D(z)``: the decoder mean, in batches."""
    return torch.cat([net.decode(c)[0] for c in z.split(batch)])


def scale_factor(z: Tensor) -> float:
    """``c = 1 / std(z)`` over all latent entries, making ``c z`` unit-variance (T-LDM-1)."""
    s = float(z.float().std())
    if not s > 0:
        raise ValueError("the autoencoder's latents have zero variance: cannot scale them to unit variance")
    return 1.0 / s


def load_latents(run: str | Path | None, *, holdout: float = 0.0, exclude: list | None = None) -> data_mod.Dataset:
    """The autoencoder run's own data, encoded and scaled: a :class:`Dataset` of ``c E(x)`` (labels and captions
    kept), less the rows that the latent run's ``data.exclude`` (``exclude``) leaves out.

    ``c`` is computed on the training split (the same deterministic split the trainer uses with
    ``data.holdout = holdout``); ``meta["latent"]`` holds what decoding needs.
    """
    net, ae_cfg = load_autoencoder(run)
    d = {**ae_cfg["data"], **({"exclude": exclude} if exclude else {})}
    images = data_mod.load(d["name"], **{k: v for k, v in d.items() if k not in ("name", "autoencoder")})
    if isinstance(images, ImageFolder):  # streamed: decoded and encoded a batch at a time
        z = torch.cat([encode(net, x) for x, _ in images.batches(512)]) if len(images) else torch.zeros(0)
    else:
        z = encode(net, images.x)
    ds = data_mod.Dataset(z, images.y, num_classes=images.num_classes, name=f"latent:{images.name}")
    train_part, _ = split_dataset(ds, float(holdout))
    c = scale_factor(train_part.x)
    info = {"autoencoder": str(Path(run).resolve()), "autoencoder_sha256": weights_sha256(run), "scale": c,
            "image_shape": list(images.shape),
            "value_range": list(images.value_range), "levels": images.levels, "data_name": images.name}
    return data_mod.Dataset(z * c, images.y, num_classes=images.num_classes, name=f"latent:{images.name}",
                            meta={"latent": info, "classes": images.meta.get("classes", [])},
                            captions=data_mod.captions(images))


def weights_sha256(run: str | Path) -> str:
    """SHA-256 of an autoencoder run's EMA weights file (what a latent run was trained with)."""
    path = Path(run) / "ema.safetensors"
    try:
        return hashlib.sha256(path.read_bytes()).hexdigest()
    except OSError as e:
        raise ValueError(f"cannot read the autoencoder weights {path}: {e.strerror or e}") from None


def decode_latents(latent_info: dict, z: Tensor) -> Tensor:
    """Images ``D(z / c)`` from generated scaled latents, with the run's ``run.latent`` section; refused when the
    autoencoder's weights are not the ones the latent run was trained with."""
    want = latent_info.get("autoencoder_sha256")
    if want and weights_sha256(latent_info["autoencoder"]) != want:
        raise ValueError(f"autoencoder {latent_info['autoencoder']} changed since the latent run was trained "
                         "(its weights' SHA-256 differs); decode with the autoencoder run it was trained on")
    net, _ = load_autoencoder(latent_info["autoencoder"])
    return decode(net, z.detach().cpu().float() / float(latent_info["scale"]))


def reconstruction_grid(net: Autoencoder, x: Tensor) -> tuple[Tensor, int]:
    """Rows of originals and their reconstructions, interleaved (row ``2i``: data, row ``2i+1``: D(E(x)))."""
    n = len(x)
    nrow = max(1, min(10, n))
    rec = reconstruct(net, x)
    rows = []
    for i in range(0, n, nrow):
        rows += [x[i:i + nrow], rec[i:i + nrow]]
    return torch.cat(rows), nrow


def sample_autoencoder_run(run: str | Path, *, n: int = 64, seed: int = 0, out: str | Path | None = None,
                           ema: bool = True) -> list[Path]:
    """:func:`write_autoencoder_samples` for the trained autoencoder run folder ``run``."""
    net, cfg = load_autoencoder(run, ema=ema)
    return write_autoencoder_samples(net, cfg, run, n=n, seed=seed, out=out)


@torch.no_grad()
def write_autoencoder_samples(net: Autoencoder, cfg: dict, run: str | Path, *, n: int = 64, seed: int = 0,
                              out: str | Path | None = None) -> list[Path]:
    """Write a VAE's prior samples ``D(z), z ~ N(0, I)`` (to ``out``, default ``RUN/samples.png``) and a
    reconstruction grid of held-out data (``RUN/reconstructions.png``); a plain autoencoder has no prior, so
    only the reconstructions are written (to ``out`` if given). ``cfg`` is the run's config (with its ``run``
    section). Returns the written paths."""
    if int(n) < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    vr = tuple(cfg["run"].get("value_range", (-1, 1)))
    d = cfg["data"]
    ds = data_mod.load(d["name"], **{k: v for k, v in d.items() if k not in ("name", "autoencoder")})
    train_part, test_part = split_dataset(ds, float(d.get("holdout", 0.0)))
    x = examples(test_part or train_part, min(int(n), 50)).x
    paths = []
    grid, nrow = reconstruction_grid(net, x)
    rec_path = Path(run) / "reconstructions.png"
    if net.kind == "vae":
        g = torch.Generator().manual_seed(int(seed))
        z = torch.randn((int(n), *net.latent_shape), generator=g)
        paths.append(save_samples(decode(net, z).clamp(*vr), Path(out) if out else Path(run) / "samples.png",
                                  value_range=vr))
    elif out:
        rec_path = Path(out)
    paths.append(save_samples(grid, rec_path, nrow=nrow, value_range=vr))
    return paths


def to_images(x: Tensor, run_info: dict) -> tuple[Tensor, tuple[float, float]]:
    """Samples of a run as images and their value range: decoded when the run is a latent one (``run.latent``),
    unchanged otherwise."""
    lat = run_info.get("latent")
    if not lat:
        return x, tuple(run_info.get("value_range", (-1, 1)))
    vr = tuple(lat.get("value_range", (-1, 1)))
    return decode_latents(lat, x).clamp(*vr), vr


def dataset_from_config(dcfg: dict) -> data_mod.Dataset:
    """The whole dataset of a run's ``data`` section: the latents of ``data.autoencoder=RUN`` (or name ``latent``),
    otherwise :func:`torchdiffusion.data.datasets.load` (the split into train / held-out is the caller's)."""
    if dcfg.get("autoencoder") or dcfg.get("name") == "latent":
        return load_latents(dcfg.get("autoencoder"), holdout=float(dcfg.get("holdout") or 0.0),
                            exclude=dcfg.get("exclude"))
    return data_mod.load(dcfg["name"], **{k: v for k, v in dcfg.items() if k not in ("name", "autoencoder")})
