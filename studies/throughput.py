"""U-Net throughput: training and sampling images/s for each way PyTorch can speed the U-Net up
without changing its maths (bf16 autocast, channels-last memory, torch.compile), with achieved GFLOP/s.

    make -C studies throughput        # CPU: a few minutes; writes studies/throughput/throughput.json
    python studies/throughput.py --batch-size 64 --profile   # any program flag; --profile adds the top operators

Training images/s is forward, backward and AdamW on one batch; sampling images/s is one DDIM step
on a batch (the U-Net and the fused step), counted as batch images per step. FLOPs come from
torch.utils.flop_counter (convolutions and matmuls, counted once per configuration) divided by the
measured time; a large matmul in fp32 and in bf16 gives the machine's practical peak to hold it
against. The steps of one kind are timed side by side (kernels.time_side_by_side), so a clock or
neighbour that drifts during the run moves every configuration together; training and sampling are
timed apart, each among its own kind, as `train` and `eval` run them.
"""
import json
import os
import sys
from dataclasses import asdict, replace
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import ddim_inpaint as di  # noqa: E402
import kernels  # noqa: E402

HERE = Path(__file__).resolve().parent
CONFIGS = {  # name: (amp, channels_last, compile)
    "eager fp32": ("off", False, False),
    "bf16 autocast": ("bf16", False, False),
    "bf16 + channels-last": ("bf16", True, False),
    "bf16 + compile": ("bf16", False, True),
    "bf16 + channels-last + compile": ("bf16", True, True),
}
PEAK_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def speed_up(model: torch.nn.Module, channels_last: bool, compiled: bool) -> torch.nn.Module:
    """The speed options that do not change the maths: memory format and compilation."""
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    return torch.compile(model) if compiled else model


def throughput_steps(cfg: di.Options, device: torch.device, channels_last=False, compiled=False) -> dict:
    """{"train": (fn, flops), "sample": (fn, flops)} for the U-Net configured by cfg, on a fixed batch."""
    from torch.utils.flop_counter import FlopCounterMode

    torch.manual_seed(cfg.seed)
    model = di.build_model(cfg).to(device)
    net = speed_up(model, channels_last, compiled)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    sched = di.Schedule(cfg.schedule, cfg.timesteps, device)
    B = cfg.batch_size
    x0 = torch.rand(B, 1, di.IMAGE_SIZE, di.IMAGE_SIZE, generator=torch.Generator().manual_seed(0)).to(device) * 2 - 1
    mask = di.centre_mask(cfg.hole).to(device)
    gen = torch.Generator(device).manual_seed(0)

    def train_step():
        model.train()
        loss = di.diffusion_loss(net, sched, x0, mask, cfg, gen)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    t = torch.full((B,), sched.T // 2, device=device, dtype=torch.long)
    c = kernels.ddim_step_coeffs(float(sched.alpha_bar64[sched.T // 2]), float(sched.alpha_bar64[sched.T // 4]), 0.0)
    known_noise = torch.randn(x0.shape, generator=gen, device=device)

    @torch.no_grad()
    def sample_step():
        model.eval()
        with di.autocast(cfg, device):
            out = net(x0, t, mask, mask * x0).float()
        kernels.ddim_dc_step(x0, out, mask * x0, mask, c, cfg.pred, known_noise=known_noise, backend=cfg.backend)

    with FlopCounterMode(display=False) as counter:  # counted on the eager model: the maths is the same
        di.diffusion_loss(model, sched, x0, mask, cfg, gen).backward()
    train_flops = counter.get_total_flops()
    opt.zero_grad(set_to_none=True)
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        model(x0, t, mask, mask * x0)
    return {"train": (train_step, train_flops), "sample": (sample_step, counter.get_total_flops())}


def matmul_step(dtype: torch.dtype, device: torch.device, n: int = 2048) -> tuple:
    """(fn, flops) of an n x n matmul: what the machine's BLAS reaches in that dtype."""
    a = torch.randn(n, n, device=device).to(dtype)
    b = torch.randn(n, n, device=device).to(dtype)
    return (lambda: a @ b), 2 * n ** 3


def profile_sampling(steps: dict, device: torch.device, calls: int = 3) -> str:
    """Where each configuration's sampling step spends its time: torch.profiler's top operators."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    sort_by = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
    report = []
    for name, fn in steps.items():
        with profile(activities=activities) as prof:
            for _ in range(calls):
                fn()
            if device.type == "cuda":
                torch.cuda.synchronize()
        report.append(f"{name}: sampling step x {calls}, top operators by self time\n"
                      + prof.key_averages().table(sort_by=sort_by, row_limit=8, max_name_column_width=48))
        print("\n" + report[-1])
    return "\n".join(report)


def throughput_bench(cfg: di.Options, explicit: set[str], configs=CONFIGS, rounds: int = 7,
                     profile: bool = False) -> dict:
    results = di.writable_dir(cfg.results_dir, "--results-dir")
    device = di.pick_device(cfg.device)
    print(f"U-Net throughput on {kernels.device_name(device)}, batch {cfg.batch_size}, "
          f"{sum(p.numel() for p in di.build_model(cfg).parameters()) / 1e6:.2f}M parameters; "
          f"median of {rounds} rounds, every configuration timed once per round")
    cases = {name: throughput_steps(replace(cfg, amp=amp), device, channels_last, compiled)
             for name, (amp, channels_last, compiled) in configs.items()}
    peaks = {dt: matmul_step(dtype, device) for dt, dtype in PEAK_DTYPES.items()}
    ms = {}  # training steps are timed among training steps, sampling among sampling, as in use
    for kind in ("train", "sample"):
        ms.update(kernels.time_side_by_side({f"{name}/{kind}": case[kind][0] for name, case in cases.items()},
                                            device, rounds))
    ms.update(kernels.time_side_by_side({f"peak/{dt}": fn for dt, (fn, _) in peaks.items()}, device, rounds))
    seconds = {name: v[0] / 1e3 for name, v in ms.items()}  # the medians

    peak = {f"matmul_{dt}_gflops": flops / seconds[f"peak/{dt}"] / 1e9 for dt, (_, flops) in peaks.items()}
    print(f"machine peak (2048^3 matmul): fp32 {peak['matmul_fp32_gflops']:.0f} GFLOP/s, "
          f"bf16 {peak['matmul_bf16_gflops']:.0f} GFLOP/s")
    print(f"{'configuration':<34} {'train img/s':>11} {'GFLOP/s':>8} {'sample img/s':>12} {'GFLOP/s':>8}")
    rows = {}
    for name, (amp, channels_last, compiled) in configs.items():
        r = {"amp": amp, "channels_last": channels_last, "compile": compiled}
        for kind in ("train", "sample"):
            r[f"{kind}_images_per_s"] = cfg.batch_size / seconds[f"{name}/{kind}"]
            r[f"{kind}_gflops"] = cases[name][kind][1] / seconds[f"{name}/{kind}"] / 1e9
        rows[name] = r
        print(f"{name:<34} {r['train_images_per_s']:11.0f} {r['train_gflops']:8.1f} "
              f"{r['sample_images_per_s']:12.0f} {r['sample_gflops']:8.1f}")
    base, default = rows["eager fp32"], next(name for name, (amp, *_) in configs.items() if amp == cfg.amp)
    speedups = {"train_speedup": rows[default]["train_images_per_s"] / base["train_images_per_s"],
                "sample_speedup": rows[default]["sample_images_per_s"] / base["sample_images_per_s"]}
    rows[default].update(speedups)
    print(f"default = {default}: training {speedups['train_speedup']:.2f}x, sampling "
          f"{speedups['sample_speedup']:.2f}x eager fp32 (bf16/fp32 matmul peak: "
          f"{peak['matmul_bf16_gflops'] / peak['matmul_fp32_gflops']:.2f}x)")
    if profile:
        report = profile_sampling({name: case["sample"][0] for name, case in cases.items()}, device)
        (results / "throughput_profile.txt").write_text(report + "\n")
        print(f"wrote {results / 'throughput_profile.txt'}")
    result = {"device": str(device), "batch_size": cfg.batch_size, "rounds": rounds, "default": default,
              "peak": peak, "configs": rows, "versions": di.versions(), "config": asdict(cfg),
              "cpus": os.cpu_count()}
    path = results / "throughput.json"
    path.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {path}")
    return result


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    profile = "--profile" in argv
    argv = [a for a in argv if a != "--profile"]
    return di.main(["throughput", "--batch-size", "128", "--results-dir", str(HERE / "throughput"), *argv],
                   {"throughput": lambda cfg, explicit: throughput_bench(cfg, explicit, profile=profile)})


if __name__ == "__main__":
    sys.exit(main())
