"""L3 likelihoods: Gaussian helpers, the variational bound, the probability-flow ODE likelihood, bits/dim."""

from .bpd import bits_per_dim, nll_to_bpd  # noqa: F401
from .continuous import (  # noqa: F401
    DEQUANTIZATIONS,
    TIME_SAMPLERS,
    continuous_bound,
    continuous_vlb,
    dequantize_for,
    dequantizer_of,
    diffusion_term,
    prior_term,
    recon_term,
    unit_times,
)
from .dequantization import dequantization_offset, dequantize  # noqa: F401
from .gaussian import (  # noqa: F401
    discretized_gaussian_log_likelihood,
    gaussian_kl,
    gaussian_kl_full,
    gaussian_log_density,
    learned_log_variance,
    log_normal_mass,
)
from .ode import (  # noqa: F401
    ADAPTIVE_METHODS,
    DIVERGED_TAIL,
    DIVERGENCES,
    ODELikelihood,
    jacobian_trace,
    ode_log_likelihood,
    prior_norm_bound,
)
from .vlb import (  # noqa: F401
    VARIANCES,
    LikelihoodResult,
    continuous_vlb_weight,
    forward_log_prob,
    forward_trajectory,
    gaussian_reverse_variances,
    mean_matching_weights,
    prior_kl,
    reverse_kernel,
    reverse_log_prob,
    reverse_log_variance_bounds,
    reverse_variances,
    time_at_sigma,
    truncate_times,
    vlb,
    vlb_term,
    vlb_times,
)
