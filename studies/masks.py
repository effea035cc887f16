"""Holes beyond the centre box: one model per training-hole recipe at the same wall-clock budget, each
scored on every mask set and on the off-centre box of examples/mask_offcentre.png.

    make -C studies mask-study        # 12.5 min of training per recipe on the 2-core CPU, then about 2 min per eval

Each recipe trains for MINUTES (the default run's time here; keep the machine otherwise idle), is scored on
500 test digits of each set (studies/masks/evals/RECIPE-on-SET/) and drawn (studies/masks/samples/), and
the table of every pair goes to studies/masks/ablation.json. Extra flags go to every command.
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import ddim_inpaint as di  # noqa: E402
from ablation import collect  # noqa: E402
from budget import train  # noqa: E402

HERE, WORK, MINUTES = Path(__file__).resolve().parent / "masks", "outputs/masks", 12.5
RECIPES = {"centre": ["--train-mask=centre"], "box": ["--train-mask=box"], "free": ["--train-mask=free"],
           "box+centre": ["--train-mask=box", "--train-mask-centre=0.5"],
           "box12-20+centre": ["--train-mask=box", "--train-box-sides=12-20", "--train-mask-centre=0.5"]}
EVALS = {"centre": ["--mask-set", "centre"], "box": ["--mask-set", "box"], "free": ["--mask-set", "free"],
         "offcentre": ["--mask", str(HERE.parents[1] / "examples" / "mask_offcentre.png")]}


def main(extra: list[str]) -> int:
    for name, flags in RECIPES.items():
        code = train([*flags, "--time-budget", str(MINUTES), "--steps", "10000000", "--panel-every", "0",
                      "--out-dir", f"{WORK}/{name}", *extra])
        if code:
            return code
    for name in RECIPES:
        for kind, holes in EVALS.items():
            ckpt, out = ["--ckpt", f"{WORK}/{name}/last.pt"], HERE / "evals" / f"{name}-on-{kind}"
            for argv in (["eval", "--n-eval", "500", *holes, *ckpt, "--out-dir", str(out), "--results-dir", str(out)],
                         ["sample", *holes, *ckpt, "--out-dir", str(HERE / "samples" / f"{name}-on-{kind}")]):
                if code := di.main([*argv, *extra]):
                    return code
    collect(HERE / "evals", HERE / "ablation.json")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
