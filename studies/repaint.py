"""RePaint's recipe at the same wall-clock budget: an unconditional DDPM (it never sees m or y: every pixel a
hole while it trains, the observation zeroed while it samples), inpainting by data consistency alone
(--dc-repeats 1) and with RePaint's resampling (--dc-repeats 5), against the conditional model trained for
the same budget (the mask study's centre run, trained here if missing), all on the same 500 test digits.

    make -C studies repaint-study     # 12.5 min of training here, then the three evals: studies/repaint/
"""
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import ddim_inpaint as di  # noqa: E402
from ablation import collect  # noqa: E402
from budget import BudgetRun  # noqa: E402
from masks import MINUTES  # noqa: E402

HERE, WORK = Path(__file__).resolve().parent / "repaint", "outputs/repaint"


class Blind(torch.nn.Module):
    """The network as RePaint trains and samples it: it sees x_t (and its own x0 estimate), never m or y."""

    def __init__(self, net):
        super().__init__()
        self.net, self.self_cond = net, net.self_cond

    def forward(self, x_t, t, known_mask, y, x0_sc=None):
        return self.net(x_t, t, torch.zeros_like(known_mask), torch.zeros_like(y), x0_sc)


def every_pixel_a_hole(x0, gen):
    """The unconditional model's 'holes': every pixel (m = 0, so y = 0 and the loss weighs all alike)."""
    return torch.zeros(1, 1, *x0.shape[-2:])


def train_uncond(cfg: di.Options, explicit: set[str]) -> None:
    with BudgetRun(cfg, MINUTES) as run:
        di.train(cfg, run, every_pixel_a_hole, di.load_data(cfg))
    if run.exit_code:
        raise di.UserError("the unconditional training was stopped; run again with --resume", run.exit_code)


def blind_prepare(*args, **kwargs):
    run = PREPARE(*args, **kwargs)
    run.model = Blind(run.model)
    return run


PREPARE = di.prepare_inference


def main(extra: list[str]) -> int:
    uncond = ["--steps", "10000000", "--panel-every", "0", "--out-dir", f"{WORK}/uncond"]
    if code := di.main(["train-uncond", *uncond, *extra], {"train-uncond": train_uncond}):
        return code
    centre = Path("outputs/masks/centre/last.pt")
    if not centre.is_file():
        from budget import train

        if code := train(["--time-budget", str(MINUTES), "--steps", "10000000", "--panel-every", "0",
                          "--out-dir", str(centre.parent), *extra]):
            return code
    for name, ckpt, repeats, blind in (("uncond-dc1", f"{WORK}/uncond/last.pt", "1", True),
                                       ("uncond-dc5", f"{WORK}/uncond/last.pt", "5", True),
                                       ("conditional", str(centre), "1", False)):
        out = HERE / name
        di.prepare_inference = blind_prepare if blind else PREPARE  # eval and sample read it when they run
        try:
            for argv in (["eval", "--n-eval", "500", "--results-dir", str(out)], ["sample"]):
                if code := di.main([*argv, "--dc-repeats", repeats, "--ckpt", ckpt, "--out-dir", str(out), *extra]):
                    return code
        finally:
            di.prepare_inference = PREPARE
    collect(HERE, HERE / "ablation.json")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
