"""Scaling out and budgets: data-parallel training under torchrun, and --time-budget."""
import subprocess
import sys
import time
from pathlib import Path

import torch

import ddim_inpaint as di

ROOT = Path(__file__).resolve().parents[1]
TINY = ["--data", "mnist5k", "--base-ch", "8", "--ch-mult", "1,2", "--batch-size", "16", "--warmup", "2",
        "--panel-every", "0", "--amp", "off"]


def test_ddp_on_two_cpu_processes_keeps_identical_weights_and_a_usable_checkpoint(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
         str(ROOT / "ddim_inpaint.py"), "train", *TINY, "--steps", "4", "--ckpt-every", "2",
         "--out-dir", str(tmp_path)],
        cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("training ") == 1, "only rank 0 may log"
    assert "on 2 x cpu" in proc.stdout
    ckpt = torch.load(tmp_path / "last.pt", weights_only=True)
    assert ckpt["step"] == 4 and ckpt["world_size"] == 2
    assert ckpt["rank_weight_gap"] == 0.0, "the two ranks' weights drifted apart"
    assert not (tmp_path / "train.lock").exists()
    # The checkpoint is an ordinary one: sample from it in this process.
    assert di.main(["sample", "--data", "mnist5k", "--ddim-steps", "2", "--num-samples", "1",
                    "--out-dir", str(tmp_path)]) == 0
    assert (tmp_path / "samples.png").is_file()


def test_time_budget_ends_the_run_on_time_with_checkpoint_and_panel(tmp_path):
    t0 = time.time()
    assert di.main(["train", *TINY, "--time-budget", "0.1", "--steps", "1000000", "--out-dir", str(tmp_path)]) == 0
    took = time.time() - t0
    ckpt = torch.load(tmp_path / "last.pt", weights_only=True)
    assert 6 <= ckpt["elapsed_s"] < 6 + 5, f"a 6 s budget ran {ckpt['elapsed_s']:.1f} s"
    assert 0 < ckpt["step"] < 1000000 and took < 60
    assert (tmp_path / "panel_final.png").is_file()


def test_learning_rate_follows_the_fraction_of_the_run_used():
    cfg = di.Config(lr=1.0, warmup=10, min_lr_frac=0.1)
    assert di.lr_at(0, 0.0, cfg) == 0.1  # warmup: (0 + 1) / 10
    assert di.lr_at(50, 0.0, cfg) == 1.0
    assert abs(di.lr_at(50, 0.5, cfg) - 0.55) < 1e-12
    assert abs(di.lr_at(50, 1.0, cfg) - 0.1) < 1e-12
