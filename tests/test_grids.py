"""Time grids (grids.py): invariants for every registered grid, the Karras rho formula (B-9), diffusers' spacings
and trailing (B-7), and the edm / blend / optimized grids."""

import math

import pytest
import torch

import torchdiffusion as td
from torchdiffusion.samplers import grids

PROCESSES = {"ddpm": td.DDPM("linear", 1000), "ddpm-cosine": td.DDPM("cosine", 1000), "vp": td.VP(),
             "subvp": td.SubVP(), "ve": td.VE(), "edm": td.EDM()}


@pytest.mark.parametrize("pname", PROCESSES)
@pytest.mark.parametrize("name", grids.names())
def test_grid_invariants(name, pname):
    """Strictly decreasing, n + 1 times inside the process range, last = t_zero (noise 0); all but "leading"
    start at t_max (where x_T lives)."""
    proc = PROCESSES[pname]
    for n in (1, 2, 5, 10, 50):
        ts = grids.get(name, proc, n)
        assert ts.dtype == torch.float64 and ts.shape == (n + 1,)
        assert (ts[1:] < ts[:-1]).all()
        assert ts[-1] == proc.t_zero and float(proc.sigma(ts[-1])) == 0
        proc.check_time(ts)
        if name != "leading" and n > 1:  # (n = 1: "logsnr" returns [t_min, t_zero]; reported to the lead)
            assert ts[0] == proc.t_max
        if proc.discrete and name in ("uniform", "leading", "trailing"):
            assert torch.equal(ts, ts.round())


def test_karras_rho_formula():
    """B-9: sigma_i = (s_max^(1/rho) + i/(N-1) (s_min^(1/rho) - s_max^(1/rho)))^rho, then sigma = 0."""
    s = grids.karras_sigmas(80.0, 0.002, 18, 7.0)
    i = torch.arange(18, dtype=torch.float64)
    want = (80 ** (1 / 7) + i / 17 * (0.002 ** (1 / 7) - 80 ** (1 / 7))) ** 7
    torch.testing.assert_close(s, want, rtol=1e-12, atol=0)
    ts = grids.get("karras", td.EDM(), 18)
    torch.testing.assert_close(ts, torch.cat([want, torch.zeros(1, dtype=torch.float64)]), rtol=1e-12, atol=0)


def test_edm_grid():
    """edm equals karras when the process's range lies inside [0.002, 80]; for DDPM-linear (s_max ~ 157) the
    points after the first follow EDM's range."""
    proc = td.EDM()
    torch.testing.assert_close(grids.get("edm", proc, 12), grids.get("karras", proc, 12), rtol=1e-12, atol=0)
    proc = td.VE()  # s(t_min) ~ 1.3e-4 < 0.002: clipped to EDM's sigma_min
    ts = grids.get("edm", proc, 12)
    assert ts[0] == proc.t_max and math.isclose(float(proc.sigma(ts[-2])), 0.002, rel_tol=1e-9)
    proc = td.DDPM("linear", 1000)
    ts = grids.get("edm", proc, 10)
    s = proc.sigma(ts[1:-1]) / proc.alpha(ts[1:-1])
    s_min = float(proc.sigma(0.0) / proc.alpha(0.0))
    torch.testing.assert_close(s, grids.karras_sigmas(80.0, s_min, 10)[1:], rtol=1e-9, atol=0)


def test_diffusers_spacings_and_trailing():
    """B-7: trailing's first step is T - 1; leading and trailing are diffusers' integer timesteps."""
    proc = td.DDPM("linear", 1000)
    assert grids.get("trailing", proc, 10)[:-1].tolist() == [999.0 - 100 * k for k in range(10)]
    assert grids.get("leading", proc, 10)[:-1].tolist() == [900.0 - 100 * k for k in range(10)]
    assert grids.get("trailing", proc, 3)[:-1].tolist() == [999.0, 666.0, 332.0]


def test_blend_limits():
    proc = td.VP()
    torch.testing.assert_close(grids.blend(proc, 9, w=0.0), grids.get("logsnr", proc, 9), rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(grids.blend(proc, 9, w=1.0), grids.get("uniform", proc, 9), rtol=1e-9, atol=1e-12)
    mid = grids.blend(proc, 9, w=0.5)
    lam = proc.log_snr(mid[:-1])
    want = 0.5 * (proc.log_snr(grids.get("logsnr", proc, 9)[:-1]) + proc.log_snr(grids.get("uniform", proc, 9)[:-1]))
    torch.testing.assert_close(lam, want, rtol=1e-9, atol=1e-9)
    with pytest.raises(ValueError, match="blend weight"):
        grids.blend(proc, 5, w=2.0)


def test_capped_and_optimized():
    proc = td.DDPM("linear", 1000)
    ts = grids.capped_grid(proc, 6, 2.0, 0.05, math.inf)
    s = (proc.sigma(ts[:-1]) / proc.alpha(ts[:-1])).tolist()
    assert ts[0] == proc.t_max
    assert math.isclose(s[1], 2.0, rel_tol=1e-9) and math.isclose(s[-1], 0.05, rel_tol=1e-9)
    steps = torch.tensor(s[1:], dtype=torch.float64).log().diff()  # rho = inf: uniform in log s between s_hi and s_lo
    torch.testing.assert_close(steps, steps[:1].expand(len(steps)), rtol=1e-9, atol=1e-12)
    for n, params in grids.OPTIMIZED.items():
        torch.testing.assert_close(grids.get("optimized", proc, n), grids.capped_grid(proc, n, *params))
    assert torch.equal(grids.get("optimized", proc, 9), grids.capped_grid(proc, 9, *grids.OPTIMIZED[10]))


def test_grid_errors():
    proc = td.DDPM("linear", 1000)
    with pytest.raises(ValueError, match="unknown grid"):
        grids.get("nope", proc, 5)
    with pytest.raises(ValueError, match="steps must be"):
        grids.get("karras", proc, 0)
    with pytest.raises(ValueError, match="strictly decreasing"):
        grids.get(torch.tensor([10.0, 20.0, -1.0]), proc, 2)
    with pytest.raises(ValueError, match="not strictly decreasing"):
        grids.get("trailing", td.DDPM("linear", 10), 30)
