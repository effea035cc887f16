"""Tables of results/seeds/ (written by run.sh): each seed's margins against the bars of issues 13 and 14, then
the mean, the standard deviation over seeds and the count of seeds that meet each line. Run from the project root:
python3 results/seeds/summary.py"""
import glob
import json
import os
import re
import statistics

HERE = os.path.dirname(os.path.abspath(__file__))


def load(name: str, seed: int, mask_set: str) -> dict:
    with open(os.path.join(HERE, f"{name}-s{seed}-on-{mask_set}", "inpaint_metrics.json")) as f:
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
    print("| | " + " | ".join(f"s{s}" for s in seeds) + " | mean ± sd (standard error) | seeds meeting the bar |")
    print("|---|" + "---:|" * (len(seeds) + 2))
    for label, value, meets, fmt in lines:
        v = [value(s) for s in seeds]
        mean, sd = statistics.mean(v), statistics.stdev(v)
        spread = f".{int(fmt[-2]) + 1}f"  # one digit more than the values
        met = f"{sum(map(meets, v))} of {len(v)}" if meets else ""
        print(f"| {label} | " + " | ".join(format(x, fmt) for x in v)
              + f" | {format(mean, fmt)} ± {format(sd, spread)} ({format(sd / len(v) ** 0.5, spread)}) | {met} |")


def main() -> None:
    seeds = sorted({int(m) for f in glob.glob(os.path.join(HERE, "box-s*-on-centre"))
                    for m in re.findall(r"-s(\d+)-on", f)})
    c = {s: (load("centre", s, "centre"), load("centre", s, "offcentre")) for s in seeds}
    b = {s: (load("box", s, "centre"), load("box", s, "offcentre")) for s in seeds}
    o = {s: load("old", s, "centre") for s in seeds}
    print(f"# Seeds {', '.join(map(str, seeds))}: the bars' lines per seed (python3 results/seeds/summary.py)")
    table("Issue 14: the box recipe against the centre model of the same seed and against the fills (dB)", [
        ("centre box, sample: box − centre model", lambda s: sample(b[s][0])["psnr"] - sample(c[s][0])["psnr"],
         lambda x: x >= -0.5, "+.2f"),
        ("centre box, posterior mean: box − centre model",
         lambda s: posterior_mean(b[s][0])["psnr"] - posterior_mean(c[s][0])["psnr"], lambda x: x >= -0.5, "+.2f"),
        ("off-centre box, sample: box over the 1-NN copy",
         lambda s: sample(b[s][1])["psnr"] - b[s][1]["metrics"]["1-NN copy"]["psnr"], lambda x: x >= 2, "+.2f"),
        ("off-centre box, posterior mean: box over the 10-NN mean",
         lambda s: posterior_mean(b[s][1])["psnr"] - b[s][1]["metrics"]["10-NN mean"]["psnr"], lambda x: x >= 2, "+.2f"),
        ("centre model, centre box, sample PSNR", lambda s: sample(c[s][0])["psnr"], None, ".2f"),
        ("box model, centre box, sample PSNR", lambda s: sample(b[s][0])["psnr"], None, ".2f"),
        ("centre model, off-centre box, sample PSNR", lambda s: sample(c[s][1])["psnr"], None, ".2f"),
        ("box model, off-centre box, sample PSNR", lambda s: sample(b[s][1])["psnr"], None, ".2f"),
        ("box model, off-centre box, posterior-mean PSNR", lambda s: posterior_mean(b[s][1])["psnr"], None, ".2f"),
    ], seeds)
    table("Issue 13: today's defaults (centre model) against its bar and the old defaults of the same seed", [
        ("posterior mean, hole PSNR (dB)", lambda s: posterior_mean(c[s][0])["psnr"], lambda x: x >= 15.0, ".2f"),
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


if __name__ == "__main__":
    main()
