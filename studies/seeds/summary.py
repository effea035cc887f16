"""Tables of studies/seeds/ (written by run.sh): each seed's margins against the bars of issues 13 and 14, then
the mean, the standard deviation over seeds, the 95% interval of the mean (Student's t) and the count of seeds that
meet each line; last, the lines README quotes over seeds 0-9, seeds 0 and 1 being the CPU runs of studies/masks/ and
studies/seeds/seed1-default/. Run from the project root: python3 studies/seeds/summary.py"""
import glob
import json
import os
import re
import statistics

HERE = os.path.dirname(os.path.abspath(__file__))
CPU = os.path.join(HERE, "..", "masks", "evals-b64-1000")
CPU_SEEDS = {  # (model, seed, mask set) -> the CPU run's eval file
    ("centre", 0, "centre"): os.path.join(CPU, "default-on-centre"),
    ("centre", 1, "centre"): os.path.join(HERE, "seed1-default"),
    **{("box", seed, mask_set): os.path.join(CPU, f"box12-20+centre-hw16-3700{'-seed1' * seed}-on-{mask_set}")
       for seed in (0, 1) for mask_set in ("centre", "offcentre")},
}
T975 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262, 10: 2.228,
        11: 2.201, 12: 2.179, 13: 2.160, 14: 2.145, 15: 2.131}  # Student's t, 97.5% point, by degrees of freedom


def load(name: str, seed: int, mask_set: str) -> dict:
    folder = CPU_SEEDS.get((name, seed, mask_set), os.path.join(HERE, f"{name}-s{seed}-on-{mask_set}"))
    with open(os.path.join(folder, "inpaint_metrics.json")) as f:
        return json.load(f)


def sample(d: dict) -> dict:
    return next(v for k, v in d["metrics"].items() if k.startswith("DDIM sample"))


def posterior_mean(d: dict) -> dict:
    return d["metrics"][d["comparison"]["posterior_mean"]]


def one_call(d: dict) -> dict:
    return next(v for k, v in d["metrics"].items() if k.startswith("one-call x0_hat"))


def table(title: str, lines: list[tuple], seeds: list[int]) -> None:
    """lines: (label, seed -> value, value -> meets the bar or None, format of a value)."""
    print(f"\n## {title}\n")
    print("| | " + " | ".join(f"s{s}" for s in seeds) + " | mean ± sd (standard error) | 95% interval of the mean"
          " | seeds meeting the bar |")
    print("|---|" + "---:|" * (len(seeds) + 3))
    for label, value, meets, fmt in lines:
        v = [value(s) for s in seeds]
        mean, sd = statistics.mean(v), statistics.stdev(v)
        se, t = sd / len(v) ** 0.5, T975[len(v) - 1]
        spread = f".{int(fmt[-2]) + 1}f"  # one digit more than the values
        met = f"{sum(map(meets, v))} of {len(v)}" if meets else ""
        print(f"| {label} | " + " | ".join(format(x, fmt) for x in v)
              + f" | {format(mean, fmt)} ± {format(sd, spread)} ({format(se, spread)})"
              + f" | {format(mean - t * se, fmt)} to {format(mean + t * se, fmt)} | {met} |")


def main() -> None:
    seeds = sorted({int(m) for f in glob.glob(os.path.join(HERE, "box-s*-on-centre"))
                    for m in re.findall(r"-s(\d+)-on", f)})
    c = {s: (load("centre", s, "centre"), load("centre", s, "offcentre")) for s in seeds}
    b = {s: (load("box", s, "centre"), load("box", s, "offcentre")) for s in seeds}
    o = {s: load("old", s, "centre") for s in seeds}
    print(f"# Seeds {', '.join(map(str, seeds))}: the bars' lines per seed (python3 studies/seeds/summary.py)")
    bar14 = [
        ("centre box, sample: box − centre model", lambda s: sample(b[s][0])["psnr"] - sample(c[s][0])["psnr"],
         lambda x: x >= -0.5, "+.2f"),
        ("centre box, posterior mean: box − centre model",
         lambda s: posterior_mean(b[s][0])["psnr"] - posterior_mean(c[s][0])["psnr"], lambda x: x >= -0.5, "+.2f"),
        ("off-centre box, sample: box over the 1-NN copy",
         lambda s: sample(b[s][1])["psnr"] - b[s][1]["metrics"]["1-NN copy"]["psnr"], lambda x: x >= 2, "+.2f"),
        ("off-centre box, posterior mean: box over the 10-NN mean",
         lambda s: posterior_mean(b[s][1])["psnr"] - b[s][1]["metrics"]["10-NN mean"]["psnr"], lambda x: x >= 2, "+.2f"),
    ]
    pm15 = ("posterior mean, hole PSNR (dB)", lambda s: posterior_mean(c[s][0])["psnr"], lambda x: x >= 15.0, ".2f")
    table("Issue 14: the box recipe against the centre model of the same seed and against the fills (dB)", [
        *bar14,
        ("centre model, centre box, sample PSNR", lambda s: sample(c[s][0])["psnr"], None, ".2f"),
        ("box model, centre box, sample PSNR", lambda s: sample(b[s][0])["psnr"], None, ".2f"),
        ("centre model, off-centre box, sample PSNR", lambda s: sample(c[s][1])["psnr"], None, ".2f"),
        ("box model, off-centre box, sample PSNR", lambda s: sample(b[s][1])["psnr"], None, ".2f"),
        ("box model, off-centre box, posterior-mean PSNR", lambda s: posterior_mean(b[s][1])["psnr"], None, ".2f"),
    ], seeds)
    table("Issue 13: today's defaults (centre model) against its bar and the old defaults of the same seed", [
        pm15,
        ("posterior mean, hole L1", lambda s: posterior_mean(c[s][0])["l1"], lambda x: x <= 0.125, ".4f"),
        ("single sample, hole PSNR (dB)", lambda s: sample(c[s][0])["psnr"], lambda x: x >= 13.5, ".2f"),
        ("single sample − one-call, accuracy points",
         lambda s: sample(c[s][0])["accuracy"] - one_call(c[s][0])["accuracy"], lambda x: abs(x) <= 2, "+.1f"),
        ("sample FD, first draw", lambda s: sample(c[s][0])["frechet"], None, ".2f"),
        ("old defaults' sample FD, first draw", lambda s: sample(o[s])["frechet"], None, ".2f"),
        ("sample FD, first draw: today − old", lambda s: sample(c[s][0])["frechet"] - sample(o[s])["frechet"],
         lambda x: x <= 0, "+.2f"),
        ("sample FD, mean of the draws: today − old",
         lambda s: (statistics.mean(sample(c[s][0])["frechet_each_sample"])
                    - statistics.mean(sample(o[s])["frechet_each_sample"])), lambda x: x <= 0, "+.2f"),
        ("old defaults' sample PSNR (dB)", lambda s: sample(o[s])["psnr"], None, ".2f"),
        ("old defaults' posterior mean PSNR (dB)", lambda s: posterior_mean(o[s])["psnr"], None, ".2f"),
    ], seeds)
    for s in (0, 1):  # the CPU seeds: the centre model on the centre box, the box model on both
        c[s] = (load("centre", s, "centre"), None)
        b[s] = (load("box", s, "centre"), load("box", s, "offcentre"))
    table("Seeds 0-9 (0 and 1 trained on the CPU): the lines README quotes over all ten", [*bar14, pm15], [0, 1, *seeds])


if __name__ == "__main__":
    main()
