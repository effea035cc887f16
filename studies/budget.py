"""Training options at equal compute: each arm trains for the steps it reaches in the default run's time,
then is scored on the 1,000 test digits; also what the other studies use to train by the clock.

    make -C studies budget-screen                   # the arms of studies/budget/screen/steps.tsv, one at a time
    python studies/budget.py ARMS.tsv --jobs 10     # ten at once (for a GPU: many small runs share it well)
    python studies/budget.py calibrate ARMS.tsv     # seconds per step of each arm here, side by side -> STEPS

ARMS.tsv has lines NAME<TAB>STEPS<TAB>FLAGS. Flags are the program's, plus the two only studies use:
--augment-shift N moves each training digit by its own random whole-pixel (dx, dy), each in [-N, N], the
classic MNIST augmentation; --time-budget M (in the mask and RePaint studies) trains for M minutes with
the learning-rate schedule following the fraction of the budget used.
"""
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import ddim_inpaint as di  # noqa: E402

HERE = Path(__file__).resolve().parent
SCREEN_EVAL = ["--ddim-steps", "50", "--num-samples", "4"]  # the sampler defaults the recorded screen was scored with
MAX_SHIFT = 4  # MNIST's digits sit in a 20x20 box inside 28x28: 4 pixels keeps them whole


class BudgetRun(di.TrainingRun):
    """A training run that ends when `minutes` have passed; the learning rate follows the budget's fraction."""

    def __init__(self, cfg, minutes: float):
        super().__init__(cfg)
        self.budget_s = 60.0 * minutes

    def progress(self) -> float:
        return min(1.0, self.elapsed() / self.budget_s)

    def keep_going(self) -> bool:  # every rank agrees: a signal anywhere, or the budget spent
        self.stop_votes, time_up = self.all_sum([float(bool(self.stop)), float(self.elapsed() >= self.budget_s)])
        return not (self.stop_votes or time_up)

    def start(self, *args):
        step = super().start(*args)
        self.bar.total = None  # counted in steps, bounded by the clock
        return step


def shifted_whole(x0: torch.Tensor, gen: torch.Generator, most: int) -> torch.Tensor:
    """Each digit moved by its own whole-pixel (dx, dy), each in [-most, most]: a plain copy, background filling in."""
    shift = torch.randint(-most, most + 1, (len(x0), 2), generator=gen)
    out = torch.full_like(x0, -1.0)  # -1 is background
    H, W = x0.shape[-2:]
    for i, (dx, dy) in enumerate(shift.tolist()):  # pixel (r, c) takes the one at (r + dy, c + dx)
        out[i, :, max(-dy, 0):H + min(-dy, 0), max(-dx, 0):W + min(-dx, 0)] = \
            x0[i, :, max(dy, 0):H + min(dy, 0), max(dx, 0):W + min(dx, 0)]
    return out


def study_flags(argv: list[str]) -> tuple[list[str], int, float]:
    """(the program's flags, --augment-shift N, --time-budget M) from a study's flags."""
    rest, shift, minutes = [], 0, 0.0
    it = iter(argv)
    for a in it:
        if a in ("--augment-shift", "--time-budget"):
            value = next(it, None)
            try:
                shift, minutes = (int(value), minutes) if a == "--augment-shift" else (shift, float(value))
            except (TypeError, ValueError):
                raise di.UserError(f"{a} needs a number, got {value!r}", 2) from None
        else:
            rest.append(a)
    if not 0 <= shift <= MAX_SHIFT or minutes < 0:
        raise di.UserError(f"--augment-shift must be 0 to {MAX_SHIFT} pixels and --time-budget 0 or more minutes", 2)
    return rest, shift, minutes


def train(argv: list[str]) -> int:
    """The program's `train`, plus --augment-shift and --time-budget."""
    try:
        flags, shift, minutes = study_flags(argv)
        _, cfg, _ = di.parse_args(["train", *flags])
        holes = di.training_holes(cfg)
        if shift:  # the batch is the loop's own fresh tensor: shifted in place before its hole is drawn
            base = holes or (lambda x0, gen, centre=di.centre_mask(cfg.hole): centre)

            def holes(x0, gen):
                x0.copy_(shifted_whole(x0, gen, shift))
                return base(x0, gen)
        with (BudgetRun(cfg, minutes) if minutes else di.TrainingRun(cfg)) as run:
            di.train(cfg, run, holes, di.load_data(cfg))
        return run.exit_code
    except di.UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return e.exit_code


def arm(name: str, steps: str, flags: str, results: Path, work: str) -> int:
    """Train one arm for its steps, then score it; its output goes to results/NAME/log.txt."""
    out = results / name
    out.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, __file__]
    with open(out / "log.txt", "w") as log:
        for argv in (["train", "--data", "mnist5k", "--steps", steps, "--panel-every", "0", "--out-dir",
                      f"{work}/{name}", *flags.split()],
                     ["eval", "--data", "mnist5k", "--out-dir", f"{work}/{name}", "--results-dir", str(out),
                      *SCREEN_EVAL]):
            code = subprocess.run([*cmd, *argv] if argv[0] == "train" else [sys.executable, str(di.__file__), *argv],
                                  stdout=log, stderr=subprocess.STDOUT).returncode
            if code:
                print(f"{name}: exit {code}")
                return code
    print(f"{name}: done")
    return 0


def calibrate(arms_file: Path, rounds: int = 12, default_steps: int = 2000) -> None:
    """Seconds per training step of each arm here, timed side by side, and the steps each reaches in the
    time the first arm (the default) takes for `default_steps`: the STEPS column of an arms file."""
    from throughput import throughput_steps

    arms = [line.split("\t") for line in arms_file.read_text().splitlines() if line and not line.startswith("#")]
    steps = {}
    for name, _, flags in arms:
        program_flags, shift, _ = study_flags(flags.split())
        _, cfg, _ = di.parse_args(["train", *program_flags])
        step = throughput_steps(cfg, torch.device("cpu"))["train"][0]
        x, gen = torch.rand(cfg.batch_size, 1, 32, 32) * 2 - 1, torch.Generator().manual_seed(0)
        steps[name] = lambda step=step, shift=shift: (step(), shift and shifted_whole(x, gen, shift))
    ms = di.kernels.time_side_by_side(steps, torch.device("cpu"), rounds)
    print(f"# {rounds} rounds, torch {torch.__version__}, {torch.get_num_threads()} threads: s/step, steps in the "
          "default's time")
    for name, _, flags in arms:
        print(f"{name}\t{ms[name][0] / 1e3:.4f}\t{round(default_steps * ms[arms[0][0]][0] / ms[name][0])}\t{flags}")


def main(argv: list[str]) -> int:
    if argv[:1] == ["train"]:
        return train(argv[1:])
    if argv[:1] == ["calibrate"]:
        calibrate(Path(argv[1]))
        return 0
    arms_file = Path(argv[0]) if argv and not argv[0].startswith("-") else HERE / "budget" / "screen" / "steps.tsv"
    jobs = int(argv[argv.index("--jobs") + 1]) if "--jobs" in argv else 1
    results = arms_file.parent
    arms = [line.split("\t") for line in arms_file.read_text().splitlines() if line and not line.startswith("#")]
    with ThreadPoolExecutor(jobs) as pool:
        codes = list(pool.map(lambda a: arm(a[0], a[1], a[2], results, "outputs/screen"), arms))
    from ablation import collect

    collect(results, results / "ablation.json")
    return max(codes)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
