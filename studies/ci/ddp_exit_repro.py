"""Minimal reproduction of the exit-time abort of DDP on gloo, and of the fix ddim_inpaint.py uses.

Two gloo processes wrap a linear layer in DDP, take two steps, gather a Python object, and destroy the
process group. The process group stays alive anyway (DDP holds it), so its worker threads outlive
`destroy_process_group`; one that frees a collective's tensors while Python finalizes needs the GIL,
cannot get it, and the process aborts with "terminate called without an active exception".

    python studies/ci/ddp_exit_repro.py 30          # 30 runs as the program used to end
    python studies/ci/ddp_exit_repro.py 30 exit     # 30 runs ending with os._exit, as it does now
    python studies/ci/ddp_exit_repro.py 60 train    # 60 runs of the tests' 2-step two-process training

As a worker (under torchrun) it runs one variant: plain, barrier, nodp (DDP freed first), sleep, exit.
"""
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def tests_training_flags() -> list[str]:
    """The flags of tests/test_scaling.py's 2-step torchrun run (the run that aborted in CI)."""
    sys.path[:0] = [str(ROOT), str(ROOT / "tests")]
    from test_scaling import CONSTANT_LR, TINY

    return [*TINY, *CONSTANT_LR, "--steps", "2"]


def worker(variant: str) -> None:
    import torch
    import torch.distributed as dist

    dist.init_process_group("gloo")
    model = torch.nn.Linear(50, 50)
    net = torch.nn.parallel.DistributedDataParallel(model)
    for _ in range(2):
        net(torch.randn(8, 50)).sum().backward()
    gathered = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, {"state": torch.Generator().get_state()})
    if variant == "nodp":
        del net
    if variant == "barrier":
        dist.barrier()
    dist.destroy_process_group()
    if variant == "sleep":
        time.sleep(1)
    if variant == "exit":
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)


def main(runs: int, variant: str) -> None:
    aborted = 0
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    train = tests_training_flags() if variant == "train" else []
    for _ in range(runs):
        with tempfile.TemporaryDirectory() as out:
            job = ([str(ROOT / "ddim_inpaint.py"), "train", *train, "--out-dir", out] if variant == "train"
                   else [__file__, "--worker", variant])
            proc = subprocess.run(torchrun + job, cwd=ROOT, capture_output=True, text=True)
        if proc.returncode and "terminate called" not in proc.stderr:
            sys.exit(f"a run failed for another reason:\n{proc.stderr[-2000:]}")
        aborted += proc.returncode != 0
    print(f"{variant}: {aborted} of {runs} runs aborted")


if __name__ == "__main__":
    if sys.argv[1] == "--worker":
        worker(sys.argv[2])
    else:
        main(int(sys.argv[1]), sys.argv[2] if len(sys.argv) > 2 else "plain")
