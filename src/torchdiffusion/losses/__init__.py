"""L3 losses (axis 3 of docs/design.md): weighted denoising score matching, exact / sliced / NCSN score matching,
autoencoder losses. Each is a plain function ``loss(model, x0, ...) -> tensor``."""

from .autoencoder import (  # noqa: F401
    KL_ESTIMATES,
    LIKELIHOODS,
    Decoder,
    ae_loss,
    dae_loss,
    decoder_log_likelihood,
    elbo,
    elbo_samples,
    kl_standard_normal,
    reparameterize,
    vae_loss,
)
from .score import (  # noqa: F401
    WEIGHTINGS,
    denoising_score_matching_loss,
    dsm_loss,
    eps_weight,
    exact_score_matching_loss,
    ncsn_loss,
    ncsn_sigmas,
    noisy_score_matching_loss,
    process_ncsn_sigmas,
    sample_times,
    simple_loss,
    sliced_score_matching_loss,
)
from .vlb import continuous_vlb_loss, hybrid_loss, importance_dsm_loss, importance_times, vlb_loss  # noqa: F401

