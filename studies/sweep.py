"""Quality against compute, on both axes: where does the network-evaluation budget go best?

Single samples get better with more DDIM steps but stay one plausible digit each: for a posterior
sample s and the truth x0, E|s - x0|^2 = 2 E|E[x0|y] - x0|^2, twice the least error any estimate can
reach, i.e. about 3 dB of PSNR below the posterior mean E[x0|y]. Averaging K samples closes that gap as
(1 + 1/K), and the network's own one-call x0_hat at t = T-1 estimates E[x0|y] directly for 1 NFE. That
is the perception-distortion trade-off (Blau & Michaeli 2018): the mean scores best but looks blurred,
a sample looks like a digit but scores worse. The per-pixel spread of the K samples shows where the
model is unsure, and it should track where its error is large.

    make -C studies sweep        # about 9 min on the 2-core CPU, on the trained default model
    python studies/sweep.py --n-eval 200 --ckpt outputs/inpaint/last.pt   # any program flag

Writes studies/sweep/: quality_vs_nfe.{png,json}, perception_distortion.png, uncertainty.png, trajectory.png.
"""
import json
import math
import sys
from dataclasses import asdict, replace
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import ddim_inpaint as di  # noqa: E402
import kernels  # noqa: E402

HERE = Path(__file__).resolve().parent
SWEEP_STEPS = (5, 10, 20, 50, 100)  # single samples at these DDIM step counts
SWEEP_ETAS = (0.0, 1.0)  # ... with each of these eta (and --eta's), deterministic DDIM to DDPM's variance
SWEEP_K, SWEEP_K_STEPS = (2, 4, 8), 20  # means of K samples (--eta), each of SWEEP_K_STEPS steps


class StepRecorder(torch.nn.Module):
    """The model, keeping each step's input x_t and the x0_hat its output gives (for the trajectory)."""

    def __init__(self, model, sched: di.Schedule, pred: str):
        super().__init__()
        self.model, self.sched, self.pred, self.self_cond = model, sched, pred, model.self_cond
        self.x_t, self.x0_hat = [], []

    def forward(self, x_t, t, known_mask, y, x0_sc=None):
        out = self.model(x_t, t, known_mask, y, x0_sc)
        ab = float(self.sched.alpha_bar64[int(t[0])])
        self.x_t.append(x_t.clamp(-1, 1).cpu())
        self.x0_hat.append(kernels.predict_x0(x_t, out.float(), math.sqrt(ab), math.sqrt(1 - ab), self.pred).cpu())
        return out


def sweep(cfg: di.Options, explicit: set[str]) -> dict:
    import matplotlib

    matplotlib.use("Agg")  # no display needed
    import matplotlib.pyplot as plt

    out = di.writable_dir(cfg.results_dir, "--results-dir")
    run_ = di.prepare_inference(cfg, explicit, cfg.n_eval)
    cfg, model, step, device, data, x0 = run_.cfg, run_.model, run_.step, run_.device, run_.data, run_.x0
    known_mask, label, sched = run_.known_mask, run_.label, run_.sched
    indices, n = list(range(len(x0))), len(x0)
    mask_dev = known_mask.to(device)

    def nfe(steps: int) -> int:  # network calls per digit of a run asked for `steps`: at most T levels exist
        return min(steps, cfg.timesteps)

    def run(steps: int, sample: int = 0, eta: float = cfg.eta):
        c = replace(cfg, ddim_steps=nfe(steps), dc_repeats=1, eta=eta)
        return di.inpaint_digits(model, sched, x0, indices, mask_dev, c, device, sample,
                                 progress=f"{steps} steps, eta {eta:g}, sample {sample + 1}", sampler=di.fast_sampler)

    judge, judge_record = di.load_judge(data, device) if cfg.perception else (None, None)
    labels = data.test_labels[:n] if cfg.perception and not cfg.images else None
    real = judge(x0)[1] if judge is not None else None  # the untouched digits' features, for every row
    points = []  # one per (method, NFE)

    def add(kind, nfe, pred):
        points.append({"kind": kind, "nfe": nfe,
                       **di.score(pred, x0, known_mask, cfg.backend, device, judge, labels, real)})

    etas = sorted({*SWEEP_ETAS, cfg.eta})
    singles = {(steps, eta): run(steps, eta=eta) for eta in etas for steps in SWEEP_STEPS}
    for (steps, eta), pred in singles.items():
        add(f"single sample (eta {eta:g})", nfe(steps), pred)
    first = singles.get((SWEEP_K_STEPS, cfg.eta))  # sample 0 of the K, when it is already drawn
    k_samples = torch.stack([first if k == 0 and first is not None else run(SWEEP_K_STEPS, k)
                             for k in range(max(SWEEP_K))])  # (K, N, 1, H, W)
    for K in SWEEP_K:
        add(f"mean of K samples ({SWEEP_K_STEPS} steps each)", K * nfe(SWEEP_K_STEPS), k_samples[:K].mean(0))
    add("one-call x0_hat", 1, run(1))
    fill_scores = {name: di.score(fill, x0, known_mask, cfg.backend, device, judge, labels, real)
                   for name, (fill, _) in di.baseline_fills(data.train, x0, known_mask).items()}
    kinds = list(dict.fromkeys(p["kind"] for p in points))  # in the order drawn
    styles = {kind: "*" if kind.startswith("one-call") else "s-" if kind.startswith("mean") else "o-" for kind in kinds}

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for ax, metric, ylabel in ((axes[0], "psnr", "hole PSNR (dB), higher is better"),
                               (axes[1], "l1", "hole L1, lower is better")):
        for kind in kinds:
            pts = [p for p in points if p["kind"] == kind]
            ax.plot([p["nfe"] for p in pts], [p[metric] for p in pts], styles[kind], ms=9 if len(pts) == 1 else 5,
                    label=kind)
        for (name, r), style in zip(fill_scores.items(), (":", "-.", "--", "--")):
            ax.axhline(r[metric], ls=style, color="grey", lw=1)
            ax.annotate(name, (1, r[metric]), fontsize=7, color="grey", va="bottom")
        ax.set_xscale("log")
        ax.set_xlabel("network evaluations per digit (NFE)")
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8, loc="lower right")
    fig.suptitle(f"{label}, checkpoint step {step}", fontsize=9)
    fig.tight_layout()
    fig.savefig(out / "quality_vs_nfe.png", dpi=120)
    plt.close(fig)
    if judge is not None and n >= 2:  # a Frechet distance needs two digits
        perception_distortion_plot(points, fill_scores, kinds, styles, f"{label}, checkpoint step {step}",
                                   out / "perception_distortion.png")

    # Uncertainty: spread of the K samples against the error of their mean, inside the hole.
    mean, std = k_samples.mean(0), k_samples.std(0)
    err = (mean - x0).abs()
    hole = (known_mask < 0.5).expand_as(x0)
    corr = float(np.corrcoef(std[hole].numpy(), err[hole].numpy())[0, 1])
    ambiguous = std.flatten(1).mean(1).topk(min(10, n)).indices  # the digits the samples disagree on most
    sel = lambda t: t[ambiguous]  # noqa: E731
    scale = lambda t: t / t.max().clamp(min=1e-8) * 2 - 1  # noqa: E731 - [0, max] -> [-1, 1] for display
    masks = known_mask if len(known_mask) == 1 else known_mask[ambiguous]
    di.save_grid([sel(x0), masks * sel(x0), *[sel(k_samples[k]) for k in range(4)], sel(mean),
               scale(sel(std)), scale(sel(err))], out / "uncertainty.png")

    # Trajectory: x_t after each step (the hole being denoised, the context pasted at the same level: the
    # next step's input, then the result) and each step's x0_hat.
    traj = x0[:4].to(device)
    c = replace(cfg, ddim_steps=10, dc_repeats=1)
    noise = di.make_noise(cfg, [(i, 0) for i in range(len(traj))], traj.shape[1:], device)
    traj_mask, recorder = mask_dev[:len(traj)], StepRecorder(model, sched, cfg.pred)
    final = di.ddim_inpaint(recorder, sched, traj_mask * traj, traj_mask, noise, c)
    frames_xt, frames_x0 = [*recorder.x_t[1:], final.clamp(-1, 1).cpu()], recorder.x0_hat
    rows = []
    for i in range(len(traj)):
        rows += [torch.stack([f[i] for f in frames_xt]), torch.stack([f[i] for f in frames_x0])]
    di.save_grid(rows, out / "trajectory.png")

    result = {"points": points, "fills": fill_scores, "perception_judge": judge_record,
              "uncertainty_error_correlation": corr,
              "ambiguous_digits": ambiguous.tolist(), "n_eval": n, "inputs": label, "checkpoint": str(run_.path),
              "checkpoint_step": step, "seed": cfg.seed, "versions": di.versions(), "config": asdict(cfg)}
    (out / "quality_vs_nfe.json").write_text(json.dumps(result, indent=2) + "\n")
    print(f"{'method':<44} {'NFE':>5} {'PSNR dB':>8} {'L1':>7}" + di.perception_columns(judge))
    for name, r in [*((p["kind"], p) for p in points), *fill_scores.items()]:
        print(f"{name:<44} {r.get('nfe', 0):5d} {r['psnr']:8.2f} {r['l1']:7.4f}" + di.perception_columns(judge, r))
    print(f"correlation of the samples' per-pixel spread with the mean's error (hole pixels): {corr:.2f}")
    print(f"wrote {out}/quality_vs_nfe.png, quality_vs_nfe.json, uncertainty.png, trajectory.png"
          + (", perception_distortion.png" if judge is not None and n >= 2 else ""))
    return result


def perception_distortion_plot(points, fill_scores, kinds, styles, title, path: Path) -> None:
    """Hole PSNR against Frechet distance, every method of the sweep and the fills, each point labelled."""
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 5))
    for kind in kinds:
        pts = [p for p in points if p["kind"] == kind]
        ax.plot([p["frechet"] for p in pts], [p["psnr"] for p in pts], styles[kind], ms=9 if len(pts) == 1 else 5,
                label=kind)
        for p in pts:
            ax.annotate(f"{p['nfe']}", (p["frechet"], p["psnr"]), fontsize=6, xytext=(3, 3), textcoords="offset points")
    for name, r in fill_scores.items():
        ax.plot(r["frechet"], r["psnr"], "x", color="grey")
        ax.annotate(name, (r["frechet"], r["psnr"]), fontsize=7, color="grey", xytext=(3, -9),
                    textcoords="offset points")
    ax.set_xscale("log")
    ax.set_xlabel("Frechet distance of the classifier's features to the untouched digits (lower looks more real)")
    ax.set_ylabel("hole PSNR (dB), higher is better")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="best")
    ax.set_title(f"perception against distortion (numbers: NFE per digit)\n{title}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    return di.main(["sweep", "--results-dir", str(HERE / "sweep"), *argv], {"sweep": sweep})


if __name__ == "__main__":
    sys.exit(main())
