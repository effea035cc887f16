"""Minimal reproduction of the exit-time abort of DDP on gloo, and of the fix ddim_inpaint.py uses.

Two gloo processes wrap a linear layer in DDP, take two steps, gather a Python object, and destroy the
process group. The process group stays alive anyway (DDP holds it), so its worker threads outlive
`destroy_process_group`; one that frees a collective's tensors while Python finalizes needs the GIL,
cannot get it, and the process aborts with "terminate called without an active exception".

    python results/ci/ddp_exit_repro.py 30          # 30 runs as the program used to end
    python results/ci/ddp_exit_repro.py 30 exit     # 30 runs ending with os._exit, as it does now

As a worker (under torchrun) it runs one variant: plain, barrier, nodp (DDP freed first), sleep, exit.
"""
import os
import subprocess
import sys
import time


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
    for _ in range(runs):
        proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node",
                               "2", __file__, "--worker", variant], capture_output=True, text=True)
        aborted += proc.returncode != 0 and "terminate called" in proc.stderr
    print(f"{variant}: {aborted} of {runs} runs aborted")


if __name__ == "__main__":
    if sys.argv[1] == "--worker":
        worker(sys.argv[2])
    else:
        main(int(sys.argv[1]), sys.argv[2] if len(sys.argv) > 2 else "plain")
