"""Seconds per training step of screen arms on this CPU, timed side by side in one process (the mean of
ROUNDS rounds, each arm once per round, after two warm-up steps), and the steps each reaches in the time
the default takes for its 2,000: the STEPS column of steps.tsv.

    .venv/bin/python results/budget/screen/cpu_steps.py ARMS.tsv    (lines NAME<TAB>ignored<TAB>FLAGS; the first is the default)
"""
import sys
import time

import numpy as np
import torch

sys.path.insert(0, ".")
import ddim_inpaint as di  # noqa: E402

ROUNDS, DEFAULT_STEPS = 12, 2000
arms = [line.split("\t") for line in open(sys.argv[1]).read().splitlines() if line and not line.startswith("#")]
steps = {}
for name, _, flags in arms:
    _, cfg, _ = di.parse_args(["train", *flags.split()])
    train_step = di.throughput_steps(cfg, torch.device("cpu"))["train"][0]
    x, gen = torch.rand(cfg.batch_size, 1, 32, 32) * 2 - 1, torch.Generator().manual_seed(0)
    shift = (lambda: di.shifted(x, gen, cfg.augment_shift, True)) if cfg.augment_shift else (lambda: None)
    steps[name] = lambda train_step=train_step, shift=shift: (train_step(), shift())
for step in steps.values():
    step(), step()
seconds = {name: [] for name in steps}
for _ in range(ROUNDS):
    for name, step in steps.items():
        t0 = time.perf_counter()
        step()
        seconds[name].append(time.perf_counter() - t0)
base = float(np.mean(seconds[arms[0][0]]))
print(f"# {ROUNDS} rounds, torch {torch.__version__}, {torch.get_num_threads()} threads: s/step, steps in the default's time")
for name, _, flags in arms:
    s = float(np.mean(seconds[name]))
    print(f"{name}\t{s:.4f}\t{round(DEFAULT_STEPS * base / s)}\t{flags}")
