"""What the defaults are made of: short runs that change one training option each, then their table.

    make -C studies ablation     # 1000-step runs, about 10 min each on the 2-core CPU: studies/ablation/
    make -C studies precision    # bf16 autocast against fp32 training, two seeds: studies/precision/
    python studies/ablation.py collect RUNS_DIR OUT.json   # only the table, from runs already made

Each arm trains with `train --steps 1000` plus its flags, is scored by `eval --num-samples 1`, and the
table names each run by how the config stored in its checkpoint differs from today's defaults, read
from the files themselves.
"""
import json
import sys
from dataclasses import asdict, fields
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import ddim_inpaint as di  # noqa: E402

HERE = Path(__file__).resolve().parent
STUDIES = {  # name: ({arm: flags}, where the runs go, where the table goes)
    "ablation": ({"defaults": [], "no-p2": ["--p2-gamma=0"], "no-hole-weight": ["--hole-weight=1"],
                  "neither": ["--hole-weight=1", "--p2-gamma=0"], "eps": ["--pred=eps"], "self-cond": ["--self-cond"],
                  "coord-conv": ["--coord-conv"], "linear-schedule": ["--schedule=linear"],
                  "no-ema": ["--ema-decay=0"]}, "outputs/ablation", HERE / "ablation"),
    "precision": ({"bf16-seed0": [], "fp32-seed0": ["--amp=off"], "bf16-seed1": ["--seed=1"],
                   "fp32-seed1": ["--amp=off", "--seed=1"]}, "outputs/precision", HERE / "precision"),
}


def collect(runs: Path, out: Path) -> dict:
    """Gather runs/*/inpaint_metrics.json into `out`, each row named by what its checkpoint changed."""
    defaults = asdict(di.Options())
    compared = [f.name for f in fields(di.Options) if f.metadata["group"] in ("diffusion", "model", "training")
                and f.name != "steps"] + ["seed"]
    rows = {}
    for path in sorted(runs.glob("*/inpaint_metrics.json")):
        r = json.loads(path.read_text())
        ckpt = path.parent / "last.pt" if (path.parent / "last.pt").is_file() else Path(r["checkpoint"])
        trained = di.load_checkpoint(ckpt)["config"]  # what the model was trained with
        metrics = r["metrics"]  # keyed by the table's labels, some of which name the settings
        single = next(v for k, v in metrics.items() if k.startswith("DDIM sample"))
        one_call = next(v for k, v in metrics.items() if k.startswith("one-call x0_hat"))
        rows[path.parent.name] = {
            "changed_from_defaults": {k: trained[k] for k in compared if k in trained and trained[k] != defaults[k]},
            "steps": r["checkpoint_step"], "inputs": r["inputs"],
            "single_psnr": single["psnr"], "single_l1": single["l1"],
            "one_call_psnr": one_call["psnr"], "one_call_l1": one_call["l1"],
            "mean_psnr": next(v for k, v in metrics.items() if k.startswith("mean of"))["psnr"],
            **{f"averaged_{what}": v[what] for k, v in metrics.items() if k.endswith("averaged")
               for what in ("psnr", "l1")},  # the one-call and K-mean average, when eval drew K > 1 samples
            "nn10_psnr": metrics["10-NN mean"]["psnr"], "nn1_psnr": metrics["1-NN copy"]["psnr"],
            **{f"{who}_{what}": row[what] for who, row in (("single", single), ("one_call", one_call))
               for what in ("accuracy", "frechet") if what in row}}  # the perception axis, when eval measured it
    if not rows:
        raise di.UserError(f"no */inpaint_metrics.json under {runs}; run the study first")
    print(f"{'run':<16} {'changed from the defaults':<44} {'steps':>5} {'sample dB':>9} {'L1':>7} "
          f"{'one-call dB':>11} {'L1':>7}")
    for name, r in sorted(rows.items(), key=lambda kv: -kv[1]["one_call_psnr"]):
        changed = " ".join(f"--{k.replace('_', '-')} {v}" for k, v in r["changed_from_defaults"].items()) or "-"
        print(f"{name:<16} {changed:<44} {r['steps']:5d} {r['single_psnr']:9.2f} {r['single_l1']:7.4f} "
              f"{r['one_call_psnr']:11.2f} {r['one_call_l1']:7.4f}")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"runs": rows, "defaults": defaults, "versions": di.versions()}, indent=2) + "\n")
    print(f"wrote {out}")
    return rows


def run(study: str, extra: list[str]) -> int:
    """Train and score every arm of `study` (extra flags go to both), then collect its table."""
    arms, work, results = STUDIES[study]
    for name, flags in arms.items():
        out = f"{work}/{name}"
        for argv in (["train", "--steps", "1000", "--panel-every", "0", "--out-dir", out, *flags, *extra],
                     ["eval", "--num-samples", "1", "--out-dir", out, "--results-dir", out, *extra]):
            if (code := di.main(argv)) != 0:
                return code
        if study == "precision":  # the table's files, kept beside it
            (results / name).mkdir(parents=True, exist_ok=True)
            (results / name / "inpaint_metrics.json").write_text((Path(out) / "inpaint_metrics.json").read_text())
    collect(Path(work), results / "ablation.json")
    return 0


if __name__ == "__main__":
    if sys.argv[1:2] == ["collect"]:
        collect(Path(sys.argv[2]), Path(sys.argv[3]))
    else:
        sys.exit(run(sys.argv[1], sys.argv[2:]))
