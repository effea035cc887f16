"""Scaling out: data-parallel training under torchrun."""
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import ddim_inpaint as di

ROOT = Path(__file__).resolve().parents[1]
TINY = ["--data", "mnist5k", "--base-ch", "8", "--ch-mult", "1,2", "--batch-size", "16", "--warmup", "2",
        "--panel-every", "0", "--amp", "off"]


# A constant learning rate (no warmup, min-lr-frac 1): the first 2 steps of a 4-step run are then a
# 2-step run, so stopping at 2 and resuming to 4 must repeat the 4-step run exactly.
CONSTANT_LR = ["--warmup", "0", "--min-lr-frac", "1", "--ckpt-every", "2"]


def torchrun(*args):
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
         str(ROOT / "ddim_inpaint.py"), "train", *TINY, *CONSTANT_LR, *map(str, args)],
        cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


@pytest.fixture(scope="module")
def ddp_run(tmp_path_factory):
    """4 steps on two processes: (the folder, what torchrun printed)."""
    out = tmp_path_factory.mktemp("ddp")
    return out, torchrun("--steps", "4", "--out-dir", out)


def test_ddp_on_two_cpu_processes_keeps_identical_weights_and_a_usable_checkpoint(ddp_run):
    tmp_path, proc = ddp_run
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


def test_ddp_ranks_draw_different_digits(ddp_run):
    # Identical weights would also follow if both ranks drew the same digits: look at what each rank's
    # batch generator, saved in the checkpoint, draws next (the loop's draw: B / 2 indices into 4,000).
    states = torch.load(ddp_run[0] / "last.pt", weights_only=True)["rng"]["by_rank"]
    assert len(states) == 2
    nxt = [torch.randint(0, 4000, (8,), generator=torch.Generator().set_state(st["data"])) for st in states]
    assert not torch.equal(nxt[0], nxt[1]), "both ranks would train on the same digits"
    assert not torch.equal(states[0]["noise"], states[1]["noise"]), "both ranks draw the same noise"


def test_ddp_resume_repeats_the_uninterrupted_run_bit_for_bit(ddp_run, tmp_path):
    torchrun("--steps", "2", "--out-dir", tmp_path)
    resumed = torchrun("--steps", "4", "--resume", "--out-dir", tmp_path)
    assert "resumed from" in resumed.stdout and "reseeded" not in resumed.stdout
    a = torch.load(ddp_run[0] / "last.pt", weights_only=True)
    b = torch.load(tmp_path / "last.pt", weights_only=True)
    assert a["step"] == b["step"] == 4
    for part in ("model", "ema"):
        for k in a[part]:
            torch.testing.assert_close(b[part][k], a[part][k], atol=0, rtol=0, msg=lambda m: f"{part}.{k}: {m}")


def test_learning_rate_follows_the_fraction_of_the_run_used():
    cfg = di.Config(lr=1.0, warmup=10, min_lr_frac=0.1)
    assert di.lr_at(0, 0.0, cfg) == 0.1  # warmup: (0 + 1) / 10
    assert di.lr_at(50, 0.0, cfg) == 1.0
    assert abs(di.lr_at(50, 0.5, cfg) - 0.55) < 1e-12
    assert abs(di.lr_at(50, 1.0, cfg) - 0.1) < 1e-12
