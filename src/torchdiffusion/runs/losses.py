"""The loss named by a run's ``loss`` section: ``LOSSES[name](model, x0, *, cond, generator, cfg) -> scalar``."""

from __future__ import annotations

from collections.abc import Callable

from torch import Tensor

from torchdiffusion.likelihood.dequantization import dequantize
from torchdiffusion.losses.autoencoder import ae_loss, dae_loss, vae_loss
from torchdiffusion.losses.classifier import classifier_loss
from torchdiffusion.losses.score import dsm_loss, ncsn_loss, noisy_score_matching_loss, process_ncsn_sigmas
from torchdiffusion.losses.vlb import continuous_vlb_loss, hybrid_loss, importance_dsm_loss, vlb_loss
from torchdiffusion.nets.autoencoder import Autoencoder
from torchdiffusion.parameterization.denoiser import Denoiser

# ---------------------------------------------------------------------------------------------------------
LossFn = Callable[..., Tensor]


def _dsm(model: Denoiser, x0: Tensor, *, cond, generator, cfg: dict) -> Tensor:
    return dsm_loss(model, x0, weighting=cfg.get("weighting", "native"), cond=cond, generator=generator,
                    min_snr_gamma=float(cfg.get("min_snr_gamma", 5.0)))


def _vlb(model: Denoiser, x0: Tensor, *, cond, generator, cfg: dict) -> Tensor:
    return vlb_loss(model, x0, cond=cond, generator=generator)


def _hybrid(model: Denoiser, x0: Tensor, *, cond, generator, cfg: dict) -> Tensor:
    return hybrid_loss(model, x0, cond=cond, generator=generator, lambda_vlb=float(cfg.get("lambda_vlb", 0.001)))


def _dsm_is(model: Denoiser, x0: Tensor, *, cond, generator, cfg: dict) -> Tensor:
    weighting = cfg.get("weighting", "native")
    if weighting == "native":  # the default weighting would make the importance sampling uniform: refuse
        raise ValueError("loss dsm_is samples t in proportion to a weighting: set loss.weighting (g2 = the "
                         "likelihood weighting, eps, x0, v, min_snr, edm); the default 'native' would be uniform")
    return importance_dsm_loss(model, x0, weighting=weighting, cond=cond, generator=generator)


def _data_levels(cfg: dict) -> tuple[int | None, tuple[float, float]]:
    """``loss.levels`` (else the data's levels, which ``runs.train.loss_closure`` passes as ``_levels``) and the
    data's value range."""
    levels = cfg.get("levels") or cfg.get("_levels")
    return (int(levels) if levels else None), tuple(cfg.get("_value_range") or (-1.0, 1.0))


def _vdm(model: Denoiser, x0: Tensor, *, cond, generator, cfg: dict) -> Tensor:
    levels, value_range = _data_levels(cfg)
    dequantize = cfg.get("dequantize", "none")
    if dequantize != "none" and levels is None:
        raise ValueError(f"loss.dequantize={dequantize!r} needs K-level data: the data have no levels; set "
                         "loss.levels=K or loss.dequantize=none")
    return continuous_vlb_loss(model, x0, levels=levels, value_range=value_range, dequantize=dequantize,
                               time_sampler=cfg.get("time_sampler", "antithetic"), cond=cond, generator=generator)


LOSSES: dict[str, LossFn] = {"dsm": _dsm, "vlb": _vlb, "hybrid": _hybrid, "dsm_is": _dsm_is, "vdm": _vdm}


# score-matching family (NCSN, exact and sliced score matching on the noised marginals; losses.py)
def _ncsn(model: Denoiser, x0: Tensor, *, cond, generator, cfg: dict) -> Tensor:
    sigmas = process_ncsn_sigmas(model.process, int(cfg.get("ncsn_levels", 10)))
    return ncsn_loss(model, x0, sigmas, cond=cond, generator=generator)


def _score_matching(method: str) -> LossFn:
    def loss(model: Denoiser, x0: Tensor, *, cond, generator, cfg: dict) -> Tensor:
        return noisy_score_matching_loss(model, x0, method=method, weighting=cfg.get("weighting", "native"),
                                         cond=cond, generator=generator,
                                         n_projections=int(cfg.get("ssm_projections", 1)),
                                         dist=cfg.get("ssm_dist", "gaussian"),
                                         variance_reduced=bool(cfg.get("ssm_variance_reduced", True)))
    return loss


LOSSES.update({"ncsn": _ncsn, "esm": _score_matching("esm"), "ssm": _score_matching("ssm")})


def _classifier(model: Denoiser, x0: Tensor, *, cond, generator, cfg: dict) -> Tensor:
    if cond is None:
        raise ValueError("loss 'classifier' needs labels: set data.conditional=true")
    return classifier_loss(model.net, model.process, x0, cond, generator=generator)


LOSSES["classifier"] = _classifier


# autoencoders: ae, dae, vae on model.net (losses/autoencoder.py)
def _autoencoder(model) -> Autoencoder:
    """The autoencoder the loss trains. A torch.compile wrapper (``train.compile``, e.g. chosen by "auto" for a
    32x32 run) is looked through: the losses call ``encode`` / ``decode``, not ``forward``, so the autoencoder
    trains uncompiled (the same parameters); a DDP wrapper is refused (its gradient hooks need its forward)."""
    model = getattr(model, "_orig_mod", model)
    if not isinstance(model, Autoencoder):
        raise ValueError(f"autoencoder losses (ae, dae, vae) need model.net=autoencoder or vae, got a "
                         f"{type(model).__name__} (distributed / compiled training of autoencoders is not supported)")
    return model


def _train_ae(model, x0: Tensor, *, cond, generator, cfg: dict) -> Tensor:
    return ae_loss(_autoencoder(model), x0)


def _train_dae(model, x0: Tensor, *, cond, generator, cfg: dict) -> Tensor:
    return dae_loss(_autoencoder(model), x0, float(cfg.get("dae_sigma", 0.2)), generator=generator)


def _train_vae(model, x0: Tensor, *, cond, generator, cfg: dict) -> Tensor:
    return vae_loss(_autoencoder(model), x0, beta=float(cfg.get("beta", 1.0)),
                    likelihood=cfg.get("likelihood", "gaussian"), levels=cfg.get("levels"),
                    n_samples=int(cfg.get("vae_samples", 1)), generator=generator)


LOSSES.update({"ae": _train_ae, "dae": _train_dae, "vae": _train_vae})


KIND_LOSSES = {"autoencoder": ("ae", "dae", "vae"), "classifier": ("classifier",)}


def losses_for(kind: str) -> tuple[str, ...]:
    """The loss names that train a run of ``kind`` (diffusion and latent runs: all the others)."""
    special = {n for names in KIND_LOSSES.values() for n in names}
    return KIND_LOSSES.get(kind) or tuple(sorted(n for n in LOSSES if n not in special))


def with_dequantization(fn: LossFn, name: str) -> LossFn:
    """``fn`` on uniformly dequantized batches when ``loss.dequantize=uniform`` (the bins that the ODE likelihood
    scores, ``likelihood.dequantize``); the continuous-time bound (``vdm``) dequantizes itself and alone supports
    ``variational``."""
    if name == "vdm":
        return fn

    def loss(model, x0: Tensor, *, cond, generator, cfg: dict) -> Tensor:
        kind = cfg.get("dequantize", "none")
        if kind == "none":
            return fn(model, x0, cond=cond, generator=generator, cfg=cfg)
        if kind != "uniform":
            raise ValueError(f"loss.dequantize={kind!r} with loss {name!r}: allowed none, uniform "
                             "(variational dequantization needs loss.name=vdm)")
        levels, value_range = _data_levels(cfg)
        if levels is None:
            raise ValueError("loss.dequantize=uniform needs K-level data: the data have no levels; set loss.levels=K")
        return fn(model, dequantize(x0, levels, value_range, generator), cond=cond, generator=generator, cfg=cfg)
    return loss


def get_loss(name: str, kind: str | None = None) -> LossFn:
    """The loss ``name`` (for a run of ``kind``: refused with one line when it does not train that kind)."""
    if name not in LOSSES:
        raise ValueError(f"unknown loss {name!r}; allowed: {', '.join(sorted(LOSSES))}")
    if kind is not None and name not in losses_for(kind):
        article = "an" if kind[0] in "aeiou" else "a"
        raise ValueError(f"loss {name!r} does not train {article} {kind} run (model.net); allowed: "
                         f"{', '.join(losses_for(kind))}")
    return with_dequantization(LOSSES[name], name)


