# ruff: noqa: E501
"""Regenerate docs/theory.md: every item of ../shared/THEORY.md -> the code that implements it -> the tests that
check it. Tests are found by the THEORY ids in their names' lines, docstrings, comments and "# --- ID" banners,
plus EXTRA (tests whose lines do not name the id). Run: python docs/make_theory.py
"""

import collections
import pathlib
import re

ROOT = pathlib.Path(__file__).resolve().parents[1]

CODE = {
"T-BAY-1": "background (notes 000); computed in the test",
"T-BAY-2": "`likelihood.log_normal_mass` (log-space tails), `parameterization.guidance.ClassifierGuidance` (log-softmax gradients)",
"T-BAY-3": "`oracle.GaussianMixture.x0/eps/score`, `parameterization.denoiser.Denoiser.predict` (Tweedie)",
"T-BAY-4": "`losses.autoencoder.elbo`, `elbo_samples` (pPCA check), `likelihood.gaussian_log_density`",
"T-BAY-5": "background (notes 003); computed in the test",
"T-FWD-1": "`processes.make_betas`, `DDPM.step_betas`, `DDPM.transition`",
"T-FWD-2": "`DDPM.alphas_cumprod`, `Process.add_noise`, `DDPM.q_mean_var`",
"T-FWD-3": "`Process.prior_sample/prior_logp`, `likelihood.prior_kl`",
"T-FWD-4": "`DDPM` (timestep k = paper t-1, `t_zero` = -1), `DDPM.posterior`",
"T-FWD-5": "`DDPM.sde_coefficients`, `VP`",
"T-VLB-1": "`likelihood.reverse_kernel`, `likelihood.reverse_log_prob`",
"T-VLB-2": "`likelihood.vlb`, `forward_log_prob`, `reverse_log_prob`",
"T-VLB-3": "`likelihood.vlb`, `vlb_term`, `prior_kl`, `_decoder_nll`",
"T-VLB-4": "`DDPM.posterior`, `Process.posterior_coefficients`, `DDPM.posterior_variance`",
"T-VLB-5": "`likelihood.gaussian_kl`, `gaussian_kl_full`",
"T-VLB-6": "`likelihood.vlb_term`, `mean_matching_weights`",
"T-VLB-7": "(a limitation; computed in the test by quadrature)",
"T-PAR-1": "`parameterization.denoiser.Denoiser.predict` (eps -> x0), `Denoiser.mean`",
"T-PAR-2": "`Denoiser.mean`",
"T-PAR-3": "`Denoiser.mean`, `likelihood.mean_matching_weights`",
"T-PAR-4": "`Denoiser.predict` (score -> x0), `oracle.GaussianMixture.x0`",
"T-PAR-5": "`Denoiser.score`, `oracle.GaussianMixture.score`",
"T-PAR-6": "`Denoiser.mean`, `likelihood.mean_matching_weights`",
"T-PAR-7": "`losses.score.dsm_loss` (weighting `native`), `losses.score.eps_weight`, `likelihood.mean_matching_weights`",
"T-PAR-8": "`Denoiser.predict` (VE coordinates y = x/alpha), `samplers.common`",
"T-PAR-9": "`Denoiser.predict` (v), `Denoiser.v`, `losses.score.eps_weight`",
"T-PAR-10": "`parameterization.denoiser.Denoiser` (any of eps/x0/v/score in, all out), `Denoiser.mean`",
"T-ALG-1": "`losses.score.simple_loss`, `losses.score.sample_times`, `training.trainer.Trainer`",
"T-ALG-2": "`samplers.ddpm.ddpm` (variance small/large)",
"T-ALG-3": "`losses.score.dsm_loss`, `losses.score.eps_weight`",
"T-NET-1": "`nets.unet.UNet`, `nets.mlp.MLP` (t is an input)",
"T-NET-2": "`nets.embeddings.sinusoidal_embedding`, `TimeEmbedding`",
"T-NET-3": "`nets.unet.UNet(attn_resolutions=...)`, `SelfAttention2d`",
"T-EBM-1": "`nets.energy.EnergyNet`, `EnergyScoreNet`",
"T-EBM-2": "`samplers.dynamics.langevin_step`, `samplers.dynamics.langevin`",
"T-EBM-3": "`samplers.dynamics.langevin` (ULA; MALA option)",
"T-EBM-4": "`samplers.dynamics.langevin`, `samplers.dynamics.simulate_sde`",
"T-EBM-5": "`samplers.dynamics.simulate_sde`",
"T-EBM-6": "`oracle.GaussianMixture.score`, `nets.energy`",
"T-SM-1": "`losses.score.exact_score_matching_loss` (explicit form with a known score)",
"T-SM-2": "`losses.score.exact_score_matching_loss` (Hyvarinen, exact trace)",
"T-SM-3": "`losses.score.denoising_score_matching_loss`",
"T-SM-4": "`losses.score.sliced_score_matching_loss`, `_tensor.sample_projections`, `likelihood.jacobian_trace`",
"T-SM-5": "`losses.score.noisy_score_matching_loss`, `losses.score.dsm_loss` (eps weighting)",
"T-SM-6": "`losses.score.dsm_loss`, `losses.score.sample_times`",
"T-NCSN-1": "`losses.score.ncsn_loss`, `losses.score.ncsn_sigmas`",
"T-NCSN-2": "`samplers.langevin.annealed_langevin`, `level_plan`, `samplers.dynamics.annealed_step_sizes`",
"T-SDE-1": "`Process.sde`, `samplers.dynamics.simulate_sde`",
"T-SDE-2": "`Process.sde_coefficients`, closed-form `alpha/sigma`",
"T-SDE-3": "`Process.add_noise` (x_t | x_0 Gaussian)",
"T-SDE-4": "`processes.VP`, `DDPM.sde_coefficients`",
"T-SDE-5": "`processes.VE`",
"T-SDE-6": "`processes.SubVP`",
"T-SDE-7": "`samplers.sde.euler_maruyama`, `reverse_diffusion`, `em_reverse_step`",
"T-SDE-8": "`losses.score.dsm_loss` (weightings `eps`, `g2`), `oracle`",
"T-SDE-9": "(identity used by DSM; checked in the test)",
"T-SDE-10": "`samplers.ode.ode` (torchdiffeq), `samplers.ode.rk4`, `parameterization.flow.pf_ode_drift`",
"T-SDE-11": "`samplers.sde.pc`, `samplers.sde.corrector`, `snr_step_size`",
"T-SDE-12": "`oracle.GaussianMixture.class_log_prob`, `parameterization.guidance.ClassifierGuidance`",
"T-CG-1": "`parameterization.guidance.ClassifierGuidance`, `runs.build.load_classifier`",
"T-CG-2": "`parameterization.guidance.ClassifierGuidance` (eps form)",
"T-CFG-1": "`parameterization.guidance.CFG`",
"T-CFG-2": "`runs.train.drop_labels` label dropout (`loss.p_uncond`), `nets.unet.UNet` null class",
"T-DDIM-1": "`samplers.ddpm.ddim`, `samplers.common.ddim_step`, `samplers.solvers.euler`",
"T-DDIM-2": "`samplers.ddpm.py24`, `py24_levels`",
"T-DDIM-3": "`samplers.ddpm.py24` (gamma)",
"T-AE-1": "`nets.autoencoder.Autoencoder`, `losses.autoencoder.ae_loss`",
"T-AE-2": "`losses.autoencoder.reparameterize`, `losses.autoencoder.kl_standard_normal` (on `likelihood.gaussian_kl`)",
"T-AE-3": "`losses.autoencoder.decoder_log_likelihood` (Gaussian / discretized)",
"T-AE-4": "`losses.autoencoder.elbo`, `elbo_samples`, `vae_loss` (beta)",
"T-AE-5": "`losses.autoencoder.dae_loss`",
"T-LDM-1": "`runs.latent.load_latents`, `scale_factor`, `decode_latents`, `to_images`; preset `latent`; `sample` decodes",
"T-LDM-2": "`nets.unet.CrossAttention2d`, `nets.conditioning.ClassTokenEncoder` (tau(y)), `CrossAttentionUNet`",
"T-MV-1": "`parameterization.guidance.View`, `VIEWS`, `check_view`, `MultiView`",
"T-MV-2": "`parameterization.guidance.MultiView.predict`",
"B-1": "`likelihood.discretized_gaussian_log_likelihood`, `dequantization_offset`, `likelihood.dequantize_for` (uniform / `nets.VariationalDequantizer`), `likelihood.recon_term` (decoder at t_min), `data.datasets.load_npz` (`levels`)",
"B-2": "`likelihood.ode_log_likelihood`, `jacobian_trace`",
"B-3": "`samplers.ddpm.ddim` (eta)",
"B-4": "`samplers.ddpm.ddim`",
"B-5": "`samplers.solvers.dpmpp_*`, `samplers.common.exp_integrator_step`",
"B-6": "`likelihood.gaussian_reverse_variances`",
"B-7": "`samplers/grids.py` (leading/trailing), `processes.rescale_zero_terminal_snr`, `parameterization.interop.process_from_diffusers`",
"B-8": "`likelihood.continuous_vlb_weight`, `losses.vlb.importance_times`, `losses.vlb.importance_dsm_loss`, weighting `g2`; `likelihood.continuous_bound` (VDM L_infinity, `diffusion_term`, `prior_term`), `losses.vlb.continuous_vlb_loss` (loss `vdm`), `processes.LearnedVP` / `MonotoneSchedule` (learned monotone log-SNR, variance-gradient shape)",
"B-9": "`Denoiser` (precond `edm`), `samplers.grids.karras_sigmas`, weighting `edm`",
"B-10": "`oracle` marginals of `VP`, `VE`, `SubVP`",
"B-11": "`oracle.GaussianMixture.posterior_cov`",
"B-12": "`likelihood.learned_log_variance`, `losses.vlb.hybrid_loss`",
"B-13": "`nets.classifier.NoisyClassifier`, `train` loss `classifier`",
"B-14": "`samplers.sample` (Bound NFE counter, generator-only randomness), `grids`",
}

EXTRA = {
    'T-NET-3': ['test_unet::test_attention_runs_at_requested_resolution', 'test_unet::test_self_attention_permutation_equivariant'],
    'T-LDM-2': ['test_unet::test_cross_attention_single_token_is_constant_over_positions', 'test_unet::test_cross_attention_token_permutation_invariant', 'test_unet::test_cross_attention_mask_equals_dropping_tokens', 'test_unet::test_unet_with_context', 'test_latent::test_class_token_encoder', 'test_latent::test_cross_attention_unet_conditions_and_works_with_cfg_and_samplers'],
    'T-NET-1': ['test_unet::test_output_shape_matches_input', 'test_unet::test_time_dependence_and_time_mlp_gradient'],
    'T-AE-2': ['test_autoencoder::test_kl_standard_normal_matches_torch_and_monte_carlo', 'test_autoencoder::test_reparameterization_gradient_is_unbiased', 'test_autoencoder::test_vae_loss_gradients_finite_and_nonzero'],
    'T-AE-4': ['test_autoencoder::test_elbo_equals_log_likelihood_at_the_exact_posterior', 'test_autoencoder::test_elbo_is_below_log_likelihood_for_other_encoders', 'test_autoencoder::test_beta_weights_only_the_kl'],
    'T-BAY-4': ['test_autoencoder::test_elbo_equals_log_likelihood_at_the_exact_posterior', 'test_autoencoder::test_elbo_is_below_log_likelihood_for_other_encoders'],
    'T-LDM-1': ['test_latent::test_scale_factor_gives_unit_variance', 'test_latent::test_latent_config_errors'],
    'B-13': ['test_guidance::test_classifier_loss_bayes_optimum_is_the_oracle_posterior'],
}

theory = (ROOT.parent / "shared" / "THEORY.md").read_text()
# sections and ids with short claims
rows = []
section = None
lines = theory.splitlines()
for i, ln in enumerate(lines):
    if ln.startswith("## "):
        section = ln[3:].strip()
    m = re.match(r"^\*\*((?:T-[A-Z]+|B)-\d+)\*\*(.*)", ln)
    if m:
        claim = ""
        for nxt in lines[i + 1:i + 4]:
            if nxt.startswith("- Claim"):
                claim = nxt.split(":", 1)[1].strip()
                break
        claim = re.sub(r"\s+", " ", claim)
        if len(claim) > 110:
            claim = claim[:107].rsplit(" ", 1)[0] + " ..."
        claim = claim.replace("|", "\\|")
        rows.append((section, m.group(1), claim))
# tests
m = collections.defaultdict(list)
for f in sorted((ROOT / "tests").glob("test_*.py")):
    cur, section_tags = None, set()
    for ln in f.read_text().splitlines():
        mm = re.match(r"def (test_\w+)", ln)
        if mm:
            cur = mm.group(1)
            for tag in section_tags:  # a "# --- T-XXX: ..." banner tags the tests below it
                m[tag].append(f"`{f.stem}::{cur}`")
        elif ln.startswith("# ---"):
            cur = None
            section_tags = set(re.findall(r"((?:T-[A-Z]+|B)-\d+)(?![\d.])", ln))
            continue
        elif re.match(r"^(def|class)", ln):
            cur = None
        if cur:
            tags = set(re.findall(r"((?:T-[A-Z]+|B)-\d+)(?![\d.])", ln))
            for a, lo, hi in re.findall(r"((?:T-[A-Z]+|B)-)(\d+)\.\.(\d+)", ln):
                tags |= {f"{a}{k}" for k in range(int(lo), int(hi) + 1)}
            for tag in tags:
                key = f"`{f.stem}::{cur}`"
                if key not in m[tag]:
                    m[tag].append(key)
for k, v in EXTRA.items():
    for t in v:
        if f"`{t}`" not in m[k]:
            m[k].append(f"`{t}`")
out = ["# Theory checklist: equation -> code -> test", "",
       "Every item of `../shared/THEORY.md` (the equations of the five lecture notes, plus the facts a serious",
       "library needs, B-*), the code that implements it and the tests that would fail if it were wrong. Tests are",
       "`tests/<file>.py::<test>`; those marked slow run in `make test-all`. `tests/test_theory_doc.py` checks that",
       "every id of THEORY.md has a row here and that every test named here exists; `python docs/make_theory.py`",
       "regenerates this file.", ""]
cur = None
for section, i, claim in rows:
    if section != cur:
        out += ["", f"## {section}", "", "| id | claim | code | tests |", "|---|---|---|---|"]
        cur = section
    tests = ", ".join(m.get(i, [])) or "**none**"
    out.append(f"| {i} | {claim} | {CODE.get(i, '?')} | {tests} |")
(ROOT / "docs" / "theory.md").write_text("\n".join(out) + "\n")
missing = [i for _, i, _ in rows if not m.get(i)]
print("rows", len(rows), "missing tests", missing, "missing code", [i for _, i, _ in rows if i not in CODE])
