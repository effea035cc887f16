"""Fused kernels for ddim_inpaint.py, each beside the plain-PyTorch reference it must match.

Two pieces of work run on every pixel, many times, in ddim_inpaint.py:

1. ``ddim_dc_step``: one reverse DDIM step (Song et al. 2020, arXiv:2010.02502, eq. 12) followed by
   data consistency, i.e. pasting the observation ``y``, noised to the new level, over the known
   pixels (the replacement trick of RePaint, Lugmayr et al. 2022, arXiv:2201.09865).
2. ``masked_error_sums``: per-image sums of squared and absolute error over the hole pixels only,
   from which ``masked_psnr`` and ``masked_l1`` are finished on the host.

Each has a ``*_ref`` written in plain PyTorch (the specification), a Triton kernel with its launcher
(``*_triton``), and a dispatcher that picks an implementation: ``backend="auto"`` uses the Triton
kernel on CUDA tensors and the reference elsewhere, ``backend="triton"`` forces the kernel (on CPU
tensors that needs ``TRITON_INTERPRET=1``), ``backend="torch"`` forces the reference.

Reading order, as in the Triton tutorials: for each kernel the equations and the reference, then
prose on what is fused and how many bytes that saves, the ``@triton.jit`` kernel, its launcher and
its dispatcher. The benchmark comes last. The checks live in tests/test_kernels.py (kernels against
references, under the interpreter or on a GPU) and tests/test_kernels_compile.py (every variant
compiled for sm_80 and sm_90 on this machine, no GPU needed).

Usage:
    python -m pytest tests/test_kernels.py tests/test_kernels_compile.py -q
    python kernels.py bench        # or: make bench; writes outputs/kernel_bench.json
"""
from __future__ import annotations

import argparse
import contextlib
import datetime
import functools
import json
import math
import os
import platform
import time
import types
from dataclasses import astuple, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

try:  # triton is optional: without it every call takes the reference path
    import triton
    import triton.language as tl
    from triton.language.extra import libdevice

    HAVE_TRITON = True
except ImportError:  # pragma: no cover - depends on the platform
    HAVE_TRITON = False
    # A stand-in so that the @triton.jit definitions below still import; _use_triton never routes to them.
    triton = types.SimpleNamespace(jit=lambda fn=None, **_: fn if fn is not None else (lambda f: f))

PREDS = ("eps", "v", "x0")  # what the network predicts; see ddim_inpaint.py, "Noise schedule"


# -----------------------------------------------------------------------------------------------
# DDIM step + data consistency
#
# With a = sqrt(alpha_bar_t), s = sqrt(1 - alpha_bar_t) and the network output `out`:
#
#   eps-prediction:  x0_hat = (x_t - s * out) / a
#   v-prediction:    x0_hat = a * x_t - s * out          (v = a * eps - s * x0, Salimans & Ho 2022)
#   x0-prediction:   x0_hat = out
#
# x0_hat is clipped to [-1, 1] (the data range) and eps_hat is derived from the clipped x0_hat,
#   eps_hat = (x_t - a * x0_hat) / s,
# so the step moves along the line through x_t and the clipped estimate; this is what the DDPM
# reference code does when it forms the posterior mean from a clipped x0. The DDIM update is
#
#   x_prev = sqrt(alpha_bar_prev) * x0_hat + sqrt(1 - alpha_bar_prev - sigma^2) * eps_hat + sigma * z
#   sigma  = eta * sqrt((1 - alpha_bar_prev) / (1 - alpha_bar_t)) * sqrt(1 - alpha_bar_t / alpha_bar_prev)
#
# and data consistency replaces the known pixels (known_mask == 1) by the observation at that level:
#
#   x_prev[known] = sqrt(alpha_bar_prev) * y + sqrt(1 - alpha_bar_prev) * known_noise
#
# After the last step (t_prev = -1, alpha_bar_prev = 1) that is y itself, bit for bit.
# -----------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class StepCoeffs:
    """Per-step scalars of one DDIM step from level t to t_prev, computed on the host in float64."""

    sqrt_ab: float  # sqrt(alpha_bar_t)
    sqrt_1m_ab: float  # sqrt(1 - alpha_bar_t)
    sqrt_ab_prev: float  # sqrt(alpha_bar_prev)
    sqrt_1m_ab_prev: float  # sqrt(1 - alpha_bar_prev): scale of the noise on the pasted y
    dir_coef: float  # sqrt(1 - alpha_bar_prev - sigma^2): weight of eps_hat ("direction to x_t")
    sigma: float  # eta-scaled std of the fresh noise z


def ddim_step_coeffs(alpha_bar_t: float, alpha_bar_prev: float, eta: float) -> StepCoeffs:
    """DDIM eq. 12/16 coefficients in float64; alpha_bar_prev = 1 marks the final step to x0."""
    ab, ab_prev = float(alpha_bar_t), float(alpha_bar_prev)
    sigma = eta * math.sqrt((1.0 - ab_prev) / (1.0 - ab)) * math.sqrt(max(1.0 - ab / ab_prev, 0.0))
    return StepCoeffs(
        sqrt_ab=math.sqrt(ab),
        sqrt_1m_ab=math.sqrt(1.0 - ab),
        sqrt_ab_prev=math.sqrt(ab_prev),
        sqrt_1m_ab_prev=math.sqrt(1.0 - ab_prev),
        dir_coef=math.sqrt(max(1.0 - ab_prev - sigma**2, 0.0)),
        sigma=sigma,
    )


def predict_x0(x_t, model_out, sqrt_ab, sqrt_1m_ab, pred: str):
    """x0_hat from the network output, clipped to [-1, 1]: the one place this formula lives.

    sqrt_ab, sqrt_1m_ab: floats (one level, the sampler) or tensors shaped (B, 1, 1, 1) (a level per
    image, training's self-conditioning). The fused kernel below computes the same in registers.
    """
    if pred == "eps":
        x0_hat = (x_t - sqrt_1m_ab * model_out) / sqrt_ab
    elif pred == "v":
        x0_hat = sqrt_ab * x_t - sqrt_1m_ab * model_out
    elif pred == "x0":
        x0_hat = model_out
    else:
        raise ValueError(f"pred must be one of {PREDS}, got {pred!r}")
    return x0_hat.clamp(-1.0, 1.0)


def split_prediction_ref(x_t, model_out, c: StepCoeffs, pred: str):
    """(x0_hat, eps_hat) from the network output, in the dtype given (callers pass fp32)."""
    x0_hat = predict_x0(x_t, model_out, c.sqrt_ab, c.sqrt_1m_ab, pred)
    eps_hat = (x_t - c.sqrt_ab * x0_hat) / c.sqrt_1m_ab
    return x0_hat, eps_hat


def ddim_dc_step_ref(x_t, model_out, y, known_mask, c: StepCoeffs, pred: str, noise=None, known_noise=None):
    """Reference DDIM step + data consistency; returns (x_prev, x0_hat) in x_t's dtype.

    x_t, model_out, y, noise, known_noise: (B, C, H, W); known_mask: (B or 1, 1, H, W), 1 = known.
    `noise` is needed when sigma > 0 and `known_noise` when alpha_bar_prev < 1; a term whose tensor
    is not given is left out. The coefficients may be floats or 0-d tensors (what torch.compile
    needs to serve every step with one graph, see the benchmark).
    """
    for name, scale, given in (("noise", c.sigma, noise), ("known_noise", c.sqrt_1m_ab_prev, known_noise)):
        if given is None and isinstance(scale, float) and scale > 0:
            raise ValueError(f"this step needs `{name}` (its scale is {scale:.3g})")
    f32 = lambda t: t.float()  # noqa: E731 - arithmetic is fp32 whatever the storage
    x0_hat, eps_hat = split_prediction_ref(f32(x_t), f32(model_out), c, pred)
    x_prev = c.sqrt_ab_prev * x0_hat + c.dir_coef * eps_hat
    if noise is not None:
        x_prev = x_prev + c.sigma * f32(noise)
    y_level = c.sqrt_ab_prev * f32(y)
    if known_noise is not None:
        y_level = y_level + c.sqrt_1m_ab_prev * f32(known_noise)
    x_prev = torch.where(known_mask > 0.5, y_level, x_prev)
    return x_prev.to(x_t.dtype), x0_hat.to(x_t.dtype)


# -----------------------------------------------------------------------------------------------
# The fused step in Triton
#
# What is fused. Eager PyTorch runs ddim_dc_step_ref as a chain of elementwise kernels, and each one
# reads its operands from global memory and writes its result back. For pred="eps", eta > 0 and a
# middle step (every input in play), counted per pixel in fp32 storage:
#
#   split_prediction_ref  mul, sub, div, clamp, mul, sub, div     7 kernels
#   DDIM update           mul, mul, add, mul, add                 5 kernels
#   data consistency      mul, mul, add, (mask > 0.5), where      5 kernels
#   total                 17 launches, 22 fp32 reads + 16 fp32 writes + the mask  ~ 158 bytes
#
# (bf16 or fp16 storage adds 7 casts to and from fp32: 24 launches, ~200 bytes per pixel.)
# The fused kernel reads every input once and writes every output once:
#
#   reads   x_t, model_out, y, noise, known_noise (5 x 4 B) + known_mask (4 B)  = 24 B
#   writes  x_prev, x0_hat                        (2 x 4 B)                      =  8 B
#   total   1 launch, 32 bytes per pixel: about 5x less traffic (about 11x in bf16)
#
# (A (1, 1, H, W) mask, as the sampler uses, is read once per image position and stays in cache,
# so its 4 B nearly vanish.) The step does a dozen flops per 32 bytes, far below what a GPU can do
# per byte, so it is memory-bound: its time is its traffic divided by the bandwidth, and fewer bytes
# is the whole game. Two options shave more: want_x0=False skips the x0_hat write (the sampler
# needs x0_hat only for self-conditioning), and the in-kernel Philox generator below replaces the two
# noise reads (and the kernels that wrote them) by arithmetic: 24 B per pixel in fp32, 20 B without
# x0_hat.
#
# Indexing without per-pixel division. Each program takes BLOCK pixels of one (H, W) plane of one
# image: program p works on plane p // blocks_per_plane (plane = b C + c) and image b = plane // C,
# a few scalar divisions per program. Inside the plane the pixel index k is also the offset into a
# mask whose (H, W) part is contiguous, so the mask is read at b * mask_stride_b + k: per pixel
# only additions, where a flat index would need a division and a remainder by C H W, H W and W for
# every pixel (integer division costs some twenty instructions on a GPU). A (1, 1, H, W) mask is read
# with mask_stride_b = 0, which is exactly how torch.expand broadcasts, so an expanded view works
# too and is never copied; one mask value serves all C channels.
#
# In-kernel noise, keyed per image. Philox (Salmon et al. 2011, "Parallel random numbers: as easy as
# 1, 2, 3") is a counter-based generator: the draw for a counter under a key is a pure function of
# (key, counter), so each pixel makes its own draws with no state to carry. Every image b brings its
# own 64-bit key keys[b] (the sampler derives it from (seed, digit index, sample index)) and the
# counter is (pixel index inside the image, pair number p). One Philox call gives four 32-bit words;
# two of them, through one Box-Muller transform, give two independent N(0, 1) draws, numbered 2p and
# 2p + 1. The step needs exactly two per pixel, z (draw 2p) and the known-pixel noise (2p + 1), so it
# takes an even draw number and makes one Philox call and one Box-Muller pair per pixel. The noise of
# a digit therefore depends on its key and the step, never on its position in the batch or on the
# batch size. keyed_randn below writes the same draws to a tensor (for the start noise, RePaint's
# resampling and the reference step), through the one helper _keyed_normal_pair. The draws are not
# the numbers torch.randn would give, so they are checked by their statistics (tests/test_kernels.py),
# and the fused step against the reference given the same draws.
#
# Fast transcendentals. Compiled for a GPU (FAST), the angle's cosine and sine are the special-function
# unit's cos.approx.f32 and sin.approx.f32, whose absolute error NVIDIA documents as at most 2^-20.9
# on [-pi, pi], where the angle lies; with r = sqrt(-2 log u) <= sqrt(-2 log 1e-7) < 5.7, a draw moves
# by at most 5.7 * 2^-20.9 < 3.1e-6 from exact Box-Muller, far below the statistical tests' reach. The
# libdevice sinf/cosf they replace cost a polynomial and a range reduction each. The interpreter has
# no special-function unit: there the kernels take tl.cos and tl.sin. The logarithm stays libdevice's
# accurate logf: near u = 1 an approximate log's absolute error would be a large relative error in r.
#
# Matching the reference. The kernel does the reference's fp32 operations in the reference's order,
# with the per-step scalars passed as fp32 (the float torch casts a Python scalar to), divides with
# div_rn, the correctly rounded division torch uses (Triton's plain `/` on fp32 may compile to an
# approximate division on NVIDIA GPUs), and clips with NaN-propagating min/max as torch.clamp does
# (tl.clamp would turn a NaN into a number and hide a diverged network). Under TRITON_INTERPRET=1
# (numpy, no fused multiply-add) the fp32 results equal the reference bit for bit; compiled for a
# GPU, a * b + c may become one FMA, so expect differences of a few 1e-7 (tests allow 1e-5).
# -----------------------------------------------------------------------------------------------
@triton.jit
def _keyed_normal_pair(key, pair, k, FAST: tl.constexpr):
    """Draws 2 pair and 2 pair + 1, N(0, 1), for pixels k of the image keyed `key`: one Philox call (10
    rounds) on the counter (k, pair), two of its words through one Box-Muller transform."""
    # randint4x splits a 64-bit offset into the counter words (low 32 bits, high 32 bits) = (k, pair).
    w0, w1, _, _ = tl.randint4x(key, k.to(tl.int64) + (pair.to(tl.int64) << 32))
    u = tl.maximum(tl.uint_to_uniform_float(w0), 1.0e-7)  # in (0, 1): log(0) would be -inf
    theta = 6.283185307179586 * tl.uint_to_uniform_float(w1) - 3.141592653589793  # in [-pi, pi], to an ulp
    r = tl.sqrt(-2.0 * tl.log(u))
    if FAST:
        return r * libdevice.fast_cosf(theta), r * libdevice.fast_sinf(theta)
    return r * tl.cos(theta), r * tl.sin(theta)


@triton.jit(do_not_specialize=["pair"])  # a new pair number every step must not recompile
def _ddim_dc_step_kernel(
    x_t_ptr,  # (B, C, H, W) contiguous: the sample at level t, any float dtype
    model_out_ptr,  # (B, C, H, W) contiguous: the network output, read as eps, v or x0 by PRED
    y_ptr,  # (B, C, H, W) contiguous: the observation; only its known pixels are used
    known_mask_ptr,  # (B or 1, 1, H, W), (H, W) contiguous; > 0.5 means known
    noise_ptr,  # (B, C, H, W) contiguous: fresh noise z; read only if HAS_NOISE and not RNG
    known_noise_ptr,  # (B, C, H, W) contiguous: noise for the pasted y; read only if HAS_KNOWN_NOISE and not RNG
    keys_ptr,  # (B,) int64: each image's Philox key; read only if RNG
    x_prev_ptr,  # (B, C, H, W) output: the sample at level t_prev, in x_t's dtype
    x0_hat_ptr,  # (B, C, H, W) output: the clipped x0 estimate; written only if WRITE_X0
    C,  # image channels
    HW,  # pixels per plane, H * W
    blocks_per_plane,  # cdiv(HW, BLOCK)
    mask_stride_b,  # known_mask's batch stride; 0 broadcasts one mask over the batch
    # The per-step scalars of StepCoeffs, host floats passed as fp32:
    sqrt_ab, sqrt_1m_ab,  # sqrt(alpha_bar_t), sqrt(1 - alpha_bar_t)
    sqrt_ab_prev, sqrt_1m_ab_prev,  # sqrt(alpha_bar_prev), sqrt(1 - alpha_bar_prev)
    dir_coef, sigma,  # sqrt(1 - alpha_bar_prev - sigma^2), the std of z
    pair,  # Philox pair number p: z is draw 2p, the known-pixel noise draw 2p + 1; unused unless RNG
    PRED: tl.constexpr,  # "eps", "v" or "x0": one compiled variant each, no branch at run time
    HAS_NOISE: tl.constexpr,  # sigma > 0: add sigma * z
    HAS_KNOWN_NOISE: tl.constexpr,  # alpha_bar_prev < 1: the pasted y gets noise too
    RNG: tl.constexpr,  # draw z and known_noise with Philox instead of loading them
    FAST: tl.constexpr,  # with RNG: the approximate cos and sin of a GPU's special-function unit
    WRITE_X0: tl.constexpr,  # store x0_hat (False saves a write per pixel)
    BLOCK: tl.constexpr,  # pixels per program
):
    # Program -> (plane, block inside the plane) -> image: scalar work, once per program.
    pid = tl.program_id(0)
    plane = pid // blocks_per_plane
    b = plane // C
    k = (pid - plane * blocks_per_plane) * BLOCK + tl.arange(0, BLOCK)  # pixel index inside the plane
    in_plane = k < HW  # the last block of a plane is ragged
    i = plane * HW + k  # flat index into the (B, C, H, W) tensors

    # Loads: whatever the storage dtype, arithmetic is fp32.
    x_t = tl.load(x_t_ptr + i, mask=in_plane, other=0.0).to(tl.float32)
    out = tl.load(model_out_ptr + i, mask=in_plane, other=0.0).to(tl.float32)
    y = tl.load(y_ptr + i, mask=in_plane, other=0.0).to(tl.float32)
    known_mask = tl.load(known_mask_ptr + b * mask_stride_b + k, mask=in_plane, other=0).to(tl.float32)

    # Network output -> (x0_hat, eps_hat), exactly as split_prediction_ref.
    if PRED == "eps":
        x0_hat = tl.math.div_rn(x_t - sqrt_1m_ab * out, sqrt_ab)
    elif PRED == "v":
        x0_hat = sqrt_ab * x_t - sqrt_1m_ab * out
    else:  # "x0"
        x0_hat = out
    x0_hat = tl.minimum(tl.maximum(x0_hat, -1.0, propagate_nan=tl.PropagateNan.ALL), 1.0,
                        propagate_nan=tl.PropagateNan.ALL)  # torch.clamp: NaN stays NaN
    eps_hat = tl.math.div_rn(x_t - sqrt_ab * x0_hat, sqrt_1m_ab)

    # DDIM eq. 12: x_prev = sqrt(ab_prev) x0_hat + sqrt(1 - ab_prev - sigma^2) eps_hat + sigma z.
    if RNG:  # one Philox call and one Box-Muller pair give both z and the known-pixel noise
        k_image = (plane - b * C) * HW + k  # the pixel's index inside its image: the counter
        z_rng, z_known_rng = _keyed_normal_pair(tl.load(keys_ptr + b), pair, k_image, FAST)
    x_prev = sqrt_ab_prev * x0_hat + dir_coef * eps_hat
    if HAS_NOISE:
        if RNG:
            z = z_rng
        else:
            z = tl.load(noise_ptr + i, mask=in_plane, other=0.0).to(tl.float32)
        x_prev = x_prev + sigma * z

    # Data consistency: known pixels get y noised to level t_prev (y itself when ab_prev = 1).
    y_level = sqrt_ab_prev * y
    if HAS_KNOWN_NOISE:
        if RNG:
            z_known = z_known_rng
        else:
            z_known = tl.load(known_noise_ptr + i, mask=in_plane, other=0.0).to(tl.float32)
        y_level = y_level + sqrt_1m_ab_prev * z_known
    x_prev = tl.where(known_mask > 0.5, y_level, x_prev)

    tl.store(x_prev_ptr + i, x_prev.to(x_prev_ptr.dtype.element_ty), mask=in_plane)
    if WRITE_X0:
        tl.store(x0_hat_ptr + i, x0_hat.to(x0_hat_ptr.dtype.element_ty), mask=in_plane)


STEP_BLOCK = 1024  # pixels per program of the step kernel: 8 per thread with 4 warps; one 32x32 plane


def _plane_mask(known_mask: torch.Tensor, like: torch.Tensor) -> tuple[torch.Tensor, int]:
    """(mask with contiguous (H, W), batch stride) that reads a (B or 1, 1, H, W) mask at (b, h, w)."""
    B, _, H, W = like.shape
    if (known_mask.dim() != 4 or known_mask.shape[0] not in (1, B) or known_mask.shape[1] != 1
            or tuple(known_mask.shape[2:]) != (H, W)):
        raise ValueError(f"known_mask must be (B or 1, 1, H, W) = ({B} or 1, 1, {H}, {W}), "
                         f"got {tuple(known_mask.shape)}")
    if known_mask.device != like.device:
        raise ValueError(f"known_mask must be on {like.device}, got {known_mask.device}")
    if known_mask.stride(3) != 1 or known_mask.stride(2) != W:  # a transposed or sliced view: copy the mask
        known_mask = known_mask.contiguous()
    stride_b = known_mask.stride(0) if known_mask.shape[0] == B else 0  # 0: one mask for every image
    return known_mask, stride_b


def _image_input(t: torch.Tensor, like: torch.Tensor, name: str) -> torch.Tensor:
    """An image-shaped kernel input: checked against x_t, made contiguous (a no-op for the sampler's)."""
    if t.shape != like.shape or t.device != like.device:
        raise ValueError(f"{name} must be {tuple(like.shape)} on {like.device}, got {tuple(t.shape)} on {t.device}")
    return t.contiguous()


def _check_keys(keys: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    if keys.shape != (like.shape[0],) or keys.dtype != torch.int64 or keys.device != like.device:
        raise ValueError(f"keys must be ({like.shape[0]},) int64 on {like.device}, "
                         f"got {tuple(keys.shape)} {keys.dtype} on {keys.device}")
    return keys.contiguous()


def _check_size(t: torch.Tensor) -> None:
    if t.dim() != 4:
        raise ValueError(f"images must be (B, C, H, W), got {tuple(t.shape)}")
    if t.numel() + REDUCE_ITERS * REDUCE_BLOCK >= 2**31:  # with the last program's masked overrun
        raise ValueError("the kernels index pixels with int32: split the batch")


def ddim_dc_step_triton(x_t, model_out, y, known_mask, c: StepCoeffs, pred: str, noise=None, known_noise=None,
                        keys: torch.Tensor | None = None, draw: int = 0, want_x0: bool = True):
    """Fused DDIM step + data consistency in one launch; returns (x_prev, x0_hat) in x_t's dtype.

    Arguments as ddim_dc_step_ref. With `keys` ((B,) int64, one Philox key per image) the noise is
    drawn in the kernel, z as draw `draw` (even) and the known-pixel noise as draw `draw + 1` (see
    keyed_randn), and `noise`/`known_noise` must be None. With want_x0=False, x0_hat is not
    written and None is returned.
    """
    if pred not in PREDS:
        raise ValueError(f"pred must be one of {PREDS}, got {pred!r}")
    _check_size(x_t)
    has_noise, has_known_noise, rng = c.sigma > 0, c.sqrt_1m_ab_prev > 0, keys is not None
    if rng and (noise is not None or known_noise is not None):
        raise ValueError("pass either keys (in-kernel noise) or noise tensors, not both")
    if not rng and ((has_noise and noise is None) or (has_known_noise and known_noise is None)):
        raise ValueError("this step needs `noise` (sigma > 0) and/or `known_noise` (alpha_bar_prev < 1), or keys")
    if rng and draw % 2:
        raise ValueError(f"in-kernel noise takes an even draw (z is draw 2p, the known-pixel noise 2p + 1), got {draw}")

    x_t = x_t.contiguous()
    model_out, y = _image_input(model_out, x_t, "model_out"), _image_input(y, x_t, "y")
    # Unused pointer slots get x_t: the constexpr flags compile their loads away.
    noise = _image_input(noise, x_t, "noise") if has_noise and not rng else x_t
    known_noise = _image_input(known_noise, x_t, "known_noise") if has_known_noise and not rng else x_t
    keys = _check_keys(keys, x_t) if rng else x_t
    known_mask, mask_stride_b = _plane_mask(known_mask, x_t)
    x_prev = torch.empty_like(x_t)
    x0_hat = torch.empty_like(x_t) if want_x0 else None
    B, C, H, W = x_t.shape
    if x_t.numel() == 0:
        return x_prev, x0_hat

    blocks_per_plane = triton.cdiv(H * W, STEP_BLOCK)
    _ddim_dc_step_kernel[(B * C * blocks_per_plane,)](
        x_t, model_out, y, known_mask, noise, known_noise, keys, x_prev, x0_hat if want_x0 else x_prev,
        C, H * W, blocks_per_plane, mask_stride_b,
        c.sqrt_ab, c.sqrt_1m_ab, c.sqrt_ab_prev, c.sqrt_1m_ab_prev, c.dir_coef, c.sigma, draw // 2,
        PRED=pred, HAS_NOISE=has_noise, HAS_KNOWN_NOISE=has_known_noise, RNG=rng, FAST=_fast_math(),
        WRITE_X0=want_x0, BLOCK=STEP_BLOCK, num_warps=4,
    )
    return x_prev, x0_hat


def ddim_dc_step(x_t, model_out, y, known_mask, c: StepCoeffs, pred: str, noise=None, known_noise=None,
                 backend: str = "auto", keys: torch.Tensor | None = None, draw: int = 0, want_x0: bool = True):
    """Dispatcher for the DDIM + data-consistency step (see module docstring for `backend`).

    `keys`/`draw` (in-kernel noise) need the Triton path; want_x0=False returns None for x0_hat.
    """
    if uses_triton(x_t, backend):
        return ddim_dc_step_triton(x_t, model_out, y, known_mask, c, pred, noise, known_noise,
                                   keys=keys, draw=draw, want_x0=want_x0)
    if keys is not None:
        raise ValueError("keys (in-kernel Philox noise) need the Triton backend; the reference takes noise tensors")
    x_prev, x0_hat = ddim_dc_step_ref(x_t, model_out, y, known_mask, c, pred, noise, known_noise)
    return x_prev, x0_hat if want_x0 else None


# The same keyed draws as a tensor: the sampler's start noise, RePaint's resampling noise, and the
# noise tensors of the reference step when it must match the fused step's in-kernel draws.
@triton.jit(do_not_specialize=["pair"])
def _keyed_randn_kernel(
    keys_ptr,  # (B,) int64: each image's Philox key
    out_ptr,  # (B, C, H, W) fp32 output
    chw,  # pixels per image, C * H * W
    blocks_per_image,  # cdiv(chw, BLOCK)
    pair,  # Philox pair number p of draw 2p + SECOND
    SECOND: tl.constexpr,  # the pair's second draw (an odd draw number)
    FAST: tl.constexpr,  # the approximate cos and sin, as the fused step compiled for a GPU takes them
    BLOCK: tl.constexpr,  # pixels per program
):
    pid = tl.program_id(0)
    b = pid // blocks_per_image
    k = (pid - b * blocks_per_image) * BLOCK + tl.arange(0, BLOCK)  # pixel index inside image b
    first, second = _keyed_normal_pair(tl.load(keys_ptr + b), pair, k, FAST)
    tl.store(out_ptr + b * chw + k, second if SECOND else first, mask=k < chw)


def keyed_randn(keys: torch.Tensor, draw: int, shape) -> torch.Tensor:
    """(B, C, H, W) fp32 N(0, 1) noise: image b is Philox draw `draw` under key keys[b], on keys' device.

    The same numbers the fused step draws in-kernel for that key and draw (an even draw is the first of
    pair draw // 2, an odd one its second); they depend on the key and the draw number only, not on the
    batch. Needs Triton (on CPU tensors, TRITON_INTERPRET=1).
    """
    out = torch.empty(shape, device=keys.device, dtype=torch.float32)
    _check_size(out)
    uses_triton(out, "triton")  # there is no reference to fall back to: raises where Triton cannot run
    keys = _check_keys(keys, out)
    chw = math.prod(shape[1:])
    if out.numel() == 0:
        return out
    blocks_per_image = triton.cdiv(chw, STEP_BLOCK)
    _keyed_randn_kernel[(shape[0] * blocks_per_image,)](keys, out, chw, blocks_per_image, draw // 2,
                                                        SECOND=draw % 2 == 1, FAST=_fast_math(),
                                                        BLOCK=STEP_BLOCK, num_warps=4)
    return out


# -----------------------------------------------------------------------------------------------
# Masked error sums: the reductions behind hole-only PSNR and L1
#
# For image b with hole pixels H_b = {i : known_mask_i == 0}:
#   sse_b = sum_{i in H_b} (pred_i - target_i)^2,   sae_b = sum_{i in H_b} |pred_i - target_i|,
#   n_b = |H_b| (times channels).
# PSNR_b = 10 log10(1 / (sse_b / n_b)) for images in [0, 1] (data range 1), L1_b = sae_b / n_b.
# -----------------------------------------------------------------------------------------------
def masked_error_sums_ref(pred, target, known_mask):
    """Per-image (sse, sae, count) over hole pixels, each (B,) float32 (accumulated in float64)."""
    hole = (known_mask <= 0.5).expand_as(pred).double()
    diff = pred.double() - target.double()
    dims = tuple(range(1, pred.dim()))
    sse = (diff.square() * hole).sum(dims)
    sae = (diff.abs() * hole).sum(dims)
    count = hole.sum(dims)
    return sse.float(), sae.float(), count.float()


# -----------------------------------------------------------------------------------------------
# The masked error sums in Triton: a deterministic two-stage reduction
#
# What is fused. masked_error_sums_ref builds the hole mask, casts three tensors to float64, and
# runs a dozen kernels over full-size float64 temporaries: per pixel in fp32 storage it reads about
# 100 bytes and writes about 66. The fused version reads pred, target and the mask once
# (4 + 4 + 4 = 12 bytes per pixel for a (B, 1, H, W) fp32 mask, 8 when the mask is broadcast) and
# writes only three numbers per block of pixels: over 10x less traffic, and no temporaries.
#
# Why two stages and no atomics. A single kernel could let every block tl.atomic_add its sums into
# the per-image totals, but floating-point addition is not associative and the order in which blocks
# finish is up to the scheduler, so the last bits of a metric would change between identical runs.
# Instead:
#   stage 1  program (b, j) reduces chunk j of image b (ITERS consecutive blocks of BLOCK pixels of
#            one (H, W) plane, indexed as in the step kernel: scalar divisions per program, additions
#            per pixel; each lane adds its pixel of every block in turn) to partial sums and stores
#            them at partials[b, j]                       (grid: B * n_partials programs)
#   stage 2  program b adds partials[b, 0 .. n_partials) in a fixed order  (grid: B programs)
# Every addition happens in the same order on every run, so the result is reproducible bit for bit.
# Work per program: a plane of 64 blocks or more (a 256x256 image and up) is cut into chunks of
# ITERS = 16 blocks, so a 8192x8192 image leaves 4,096 partials for stage 2 instead of 65,536, and
# each program streams 16K pixels. A plane of one block (an MNIST image) is one partial: stage 1
# then writes the final sums itself and stage 2 is not launched.
# Sums are fp32 (tree-shaped inside tl.sum, so the rounding error grows like log2 of the count, not
# the count) and hole counts are exact int32; the reference accumulates in float64, so the two agree
# to about 1e-6 relative.
# -----------------------------------------------------------------------------------------------
@triton.jit
def _masked_error_partials_kernel(
    pred_ptr,  # (B, C, H, W) contiguous, any float dtype
    target_ptr,  # (B, C, H, W) contiguous, any float dtype
    known_mask_ptr,  # (B or 1, 1, H, W), (H, W) contiguous; <= 0.5 means hole
    sse_part_ptr,  # (B, n_partials) fp32 output: partial sums of squared error
    sae_part_ptr,  # (B, n_partials) fp32 output: partial sums of absolute error
    count_part_ptr,  # (B, n_partials) int32 output: partial hole-pixel counts (fp32: the final counts)
    HW,  # pixels per plane, H * W
    chunks_per_plane,  # cdiv(HW, ITERS * BLOCK)
    n_partials,  # partials per image, C * chunks_per_plane
    mask_stride_b,  # known_mask's batch stride; 0 broadcasts one mask over the batch
    ITERS: tl.constexpr,  # blocks per program
    BLOCK: tl.constexpr,  # pixels per block
):
    # A flat grid (axis 0 allows 2^31 - 1 programs; axis 1 only 65535, too few for B = 65536).
    pid = tl.program_id(0)
    b = pid // n_partials
    plane = pid // chunks_per_plane  # = b C + c, since every image has C * chunks_per_plane chunks
    first = (pid - plane * chunks_per_plane) * ITERS * BLOCK  # the chunk's first pixel inside the plane
    sse = tl.zeros([BLOCK], dtype=tl.float32)
    sae = tl.zeros([BLOCK], dtype=tl.float32)
    count = tl.zeros([BLOCK], dtype=tl.int32)
    for it in range(ITERS):  # fixed order: lane l adds pixel l of block 0, then of block 1, ...
        k = first + it * BLOCK + tl.arange(0, BLOCK)  # pixel index inside the plane
        in_plane = k < HW
        known_mask = tl.load(known_mask_ptr + b * mask_stride_b + k, mask=in_plane, other=1).to(tl.float32)
        hole = in_plane & (known_mask <= 0.5)
        pred = tl.load(pred_ptr + plane * HW + k, mask=in_plane, other=0.0).to(tl.float32)
        target = tl.load(target_ptr + plane * HW + k, mask=in_plane, other=0.0).to(tl.float32)
        diff = tl.where(hole, pred - target, 0.0)
        sse += diff * diff
        sae += tl.abs(diff)
        count += hole.to(tl.int32)

    tl.store(sse_part_ptr + pid, tl.sum(sse, axis=0))  # partials[b, j] sits at b * n_partials + j = pid
    tl.store(sae_part_ptr + pid, tl.sum(sae, axis=0))
    tl.store(count_part_ptr + pid, tl.sum(count, axis=0).to(count_part_ptr.dtype.element_ty))


@triton.jit
def _sum_partials_kernel(
    sse_part_ptr, sae_part_ptr, count_part_ptr,  # (B, n_partials) partials from stage 1
    sse_ptr, sae_ptr, count_ptr,  # (B,) fp32 outputs
    n_partials,  # partials per image
    BLOCK: tl.constexpr,  # partials read per loop iteration
):
    b = tl.program_id(0)
    sse = tl.zeros([BLOCK], dtype=tl.float32)
    sae = tl.zeros([BLOCK], dtype=tl.float32)
    count = tl.zeros([BLOCK], dtype=tl.int32)
    for start in range(0, n_partials, BLOCK):  # fixed order: lane k always adds partials k, k + BLOCK, ...
        k = start + tl.arange(0, BLOCK)
        ok = k < n_partials
        sse += tl.load(sse_part_ptr + b * n_partials + k, mask=ok, other=0.0)
        sae += tl.load(sae_part_ptr + b * n_partials + k, mask=ok, other=0.0)
        count += tl.load(count_part_ptr + b * n_partials + k, mask=ok, other=0)
    tl.store(sse_ptr + b, tl.sum(sse, axis=0))
    tl.store(sae_ptr + b, tl.sum(sae, axis=0))
    tl.store(count_ptr + b, tl.sum(count, axis=0).to(tl.float32))


REDUCE_BLOCK = 1024  # pixels per block of stage 1; one MNIST image (1 x 32 x 32) is one block
REDUCE_ITERS = 16  # blocks per stage-1 program for planes of REDUCE_CHUNKED_FROM blocks or more
REDUCE_CHUNKED_FROM = 64


def masked_error_sums_triton(pred, target, known_mask):
    """Per-image (sse, sae, count) over hole pixels, each (B,) float32, as masked_error_sums_ref."""
    _check_size(pred)
    pred, target = pred.contiguous(), _image_input(target, pred, "target")
    known_mask, mask_stride_b = _plane_mask(known_mask, pred)
    B, C, H, W = pred.shape
    blocks_per_plane = max(triton.cdiv(H * W, REDUCE_BLOCK), 1)
    iters = REDUCE_ITERS if blocks_per_plane >= REDUCE_CHUNKED_FROM else 1
    chunks_per_plane = triton.cdiv(blocks_per_plane, iters)
    n_partials = C * chunks_per_plane
    sse, sae, count = (torch.empty(B, device=pred.device, dtype=torch.float32) for _ in range(3))
    if pred.numel() == 0:
        return sse.zero_(), sae.zero_(), count.zero_()
    if n_partials == 1:  # one partial per image is its total: stage 1 writes the results
        parts = sse, sae, count
    else:
        part = lambda dtype: torch.empty(B, n_partials, device=pred.device, dtype=dtype)  # noqa: E731
        parts = part(torch.float32), part(torch.float32), part(torch.int32)

    _masked_error_partials_kernel[(B * n_partials,)](
        pred, target, known_mask, *parts,
        H * W, chunks_per_plane, n_partials, mask_stride_b, ITERS=iters, BLOCK=REDUCE_BLOCK, num_warps=4,
    )
    if n_partials > 1:
        _sum_partials_kernel[(B,)](*parts, sse, sae, count, n_partials,
                                   BLOCK=min(triton.next_power_of_2(n_partials), 1024), num_warps=4)
    return sse, sae, count


def masked_error_sums(pred, target, known_mask, backend: str = "auto"):
    """Dispatcher for the per-image hole error sums."""
    if uses_triton(pred, backend):
        return masked_error_sums_triton(pred, target, known_mask)
    return masked_error_sums_ref(pred, target, known_mask)


def masked_psnr(pred, target, known_mask, backend: str = "auto"):
    """Per-image hole-only PSNR in dB, (B,) float32, for images in [0, 1] (data range 1).

    A perfect fill gives +inf; an image with no hole pixels gives NaN (there is nothing to score).
    """
    sse, _, count = masked_error_sums(pred, target, known_mask, backend)
    mse = sse.double() / count.double()  # 0/0 = NaN for an empty hole
    return (10.0 * torch.log10(1.0 / mse)).float()  # mse = 0 gives +inf


def masked_l1(pred, target, known_mask, backend: str = "auto"):
    """Per-image mean absolute error over the hole pixels, (B,) float32; NaN for an empty hole."""
    _, sae, count = masked_error_sums(pred, target, known_mask, backend)
    return (sae.double() / count.double()).float()


# -----------------------------------------------------------------------------------------------
# Dispatch
# -----------------------------------------------------------------------------------------------
BACKENDS = ("auto", "torch", "triton")


def _fast_math() -> bool:
    """Whether the noise takes the approximate cos and sin of NVIDIA's special-function unit (see the step)."""
    return not interpreting() and torch.version.hip is None  # ROCm's libdevice has no fast_cosf / fast_sinf


def interpreting() -> bool:
    """True when TRITON_INTERPRET=1: Triton kernels then run on CPU tensors through numpy."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def uses_triton(t: torch.Tensor, backend: str) -> bool:
    """Whether `backend` runs the Triton kernel on tensors that live where `t` does."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "torch":
        return False
    if backend == "triton":
        if not HAVE_TRITON:
            raise RuntimeError("backend='triton' needs the triton package: pip install triton")
        if not t.is_cuda and not interpreting():
            raise ValueError(f"backend='triton' got tensors on {t.device}: Triton kernels run on CUDA tensors, "
                             "or on CPU tensors under TRITON_INTERPRET=1")
        return True
    return HAVE_TRITON and t.is_cuda


# -----------------------------------------------------------------------------------------------
# Benchmark: python kernels.py bench
#
# Providers, timed on the same inputs: the eager reference, torch.compile of the reference, the fused
# kernel reading noise tensors ("triton") and the fused kernel drawing its noise itself ("triton+rng").
# Timing is triton.testing.do_bench on a GPU (median, 20th and 80th percentile, in ms, with the L2
# cache flushed between runs); on a CPU a wall-clock median, the providers of a row timed in turn
# once per round so that a machine that drifts moves them together. Throughput is logical bytes /
# time, the logical bytes being the least the operation must move: every input read once, every
# output written once (triton+rng never reads the noise tensors, so they do not count for it).
# A memory-bound kernel cannot beat the device's copy bandwidth, measured as dst.copy_(src), so
# "% copy" says how close a provider gets to the hardware.
# The loop table runs a whole DDIM inpainting loop with the U-Net replaced by a fixed 3x3 convolution,
# so the step's share of a sampler's time, and what fusing it buys there, is visible.
# -----------------------------------------------------------------------------------------------
def tensor_coeffs(c: StepCoeffs, device) -> StepCoeffs:
    """The coefficients as 0-d float32 tensors: torch.compile guards on Python floats and would recompile
    the reference at every step; as tensors they are data, and one graph serves every step."""
    return StepCoeffs(*(torch.tensor(v, dtype=torch.float32, device=device) for v in astuple(c)))


GPU_STEP_SHAPES = [(B, 1, 32, 32) for B in (64, 256, 1024, 4096, 16384, 65536)] + [(1, 1, 8192, 8192)]
CPU_STEP_SHAPES = [(B, 1, 32, 32) for B in (64, 256, 1024)]  # the CPU has no Triton rows: keep it short
GPU_LOOP_SHAPES = [(64, 1, 32, 32), (4096, 1, 32, 32)]  # launch-bound and bandwidth-bound batches
CPU_LOOP_SHAPES = [(64, 1, 32, 32)]


def _nbytes(*tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors if t is not None)


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    name = platform.processor() or platform.machine()
    with contextlib.suppress(OSError, StopIteration), open("/proc/cpuinfo") as cpuinfo:  # Linux: the model name
        name = next(line.split(":", 1)[1].strip() for line in cpuinfo if line.startswith("model name"))
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return f"{name}, {cores} cores"


def time_side_by_side(fns: dict, device: torch.device, reps: int = 10) -> dict[str, tuple[float, float, float]]:
    """{name: (median, p20, p80) of fn's run time in ms} for each fn in `fns`.

    On a CUDA GPU, triton.testing.do_bench per function. Elsewhere each function is called twice to
    warm up (torch.compile compiles then), then once per round for `reps` rounds, in turn.
    """
    if device.type == "cuda" and HAVE_TRITON:
        return {name: tuple(triton.testing.do_bench(fn, quantiles=[0.5, 0.2, 0.8])) for name, fn in fns.items()}
    for fn in fns.values():
        fn()
        fn()
    times = {name: [] for name in fns}
    for _ in range(reps):
        for name, fn in fns.items():
            if device.type == "cuda":
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            fn()
            if device.type == "cuda":
                torch.cuda.synchronize()
            times[name].append((time.perf_counter() - t0) * 1e3)
    quantile = lambda ts, q: sorted(ts)[round(q * (len(ts) - 1))]  # noqa: E731
    return {name: tuple(quantile(ts, q) for q in (0.5, 0.2, 0.8)) for name, ts in times.items()}


def _copy_bandwidth(device: torch.device, nbytes: int) -> float:
    """GB/s of dst.copy_(src) on an nbytes tensor: nbytes read + nbytes written."""
    src = torch.empty(nbytes // 4, device=device)
    dst = torch.empty_like(src)
    return 2 * nbytes / time_side_by_side({"copy": lambda: dst.copy_(src)}, device)["copy"][0] / 1e6


def _step_providers(shape, dtype, device, eta, compiled_step, with_triton):
    """{provider: (fn, logical bytes)} for one middle step (alpha_bar 0.5 -> 0.6), pred="eps"."""
    g = torch.Generator(device).manual_seed(0)
    randn = lambda: torch.randn(shape, generator=g, device=device).to(dtype)  # noqa: E731
    c = ddim_step_coeffs(0.5, 0.6, eta)
    x_t, model_out, y, known_noise = randn(), randn(), randn(), randn()
    noise = randn() if c.sigma > 0 else None
    known_mask = (torch.rand(shape[0], 1, *shape[2:], generator=g, device=device) < 0.5).to(dtype)
    k = tensor_coeffs(c, device)
    io = _nbytes(x_t, model_out, y, known_mask, noise, known_noise) + 2 * _nbytes(x_t)  # + x_prev, x0_hat
    providers = {
        "eager": (lambda: ddim_dc_step_ref(x_t, model_out, y, known_mask, c, "eps", noise, known_noise), io),
        "torch.compile": (lambda: compiled_step(x_t, model_out, y, known_mask, k, "eps", noise, known_noise), io),
    }
    if with_triton:
        providers["triton"] = (
            lambda: ddim_dc_step_triton(x_t, model_out, y, known_mask, c, "eps", noise, known_noise), io)
        keys = torch.arange(shape[0], device=device)  # one Philox key per image
        providers["triton+rng"] = (lambda: ddim_dc_step_triton(x_t, model_out, y, known_mask, c, "eps", keys=keys),
                                   io - _nbytes(noise, known_noise))
    return providers


def _sums_providers(shape, dtype, device, compiled_sums, with_triton):
    """{provider: (fn, logical bytes)} for the masked error sums of one batch."""
    g = torch.Generator(device).manual_seed(0)
    pred, target = (torch.rand(shape, generator=g, device=device).to(dtype) for _ in range(2))
    known_mask = (torch.rand(shape[0], 1, *shape[2:], generator=g, device=device) < 0.5).to(dtype)
    io = _nbytes(pred, target, known_mask) + 3 * 4 * shape[0]  # + three (B,) fp32 outputs
    providers = {
        "eager": (lambda: masked_error_sums_ref(pred, target, known_mask), io),
        "torch.compile": (lambda: compiled_sums(pred, target, known_mask), io),
    }
    if with_triton:
        providers["triton"] = (lambda: masked_error_sums_triton(pred, target, known_mask), io)
    return providers


def _time_providers(label: str, dtype, providers: dict, device, copy_gbps: float) -> list[dict]:
    """Time each provider; print and return one row per provider."""
    timed = time_side_by_side({name: fn for name, (fn, _) in providers.items()}, device)
    rows = []
    for name, (_, nbytes) in providers.items():
        ms, p20, p80 = timed[name]
        rows.append(dict(size=label, dtype=str(dtype).removeprefix("torch."), provider=name, ms=ms, ms_p20=p20,
                         ms_p80=p80, GBps=nbytes / ms / 1e6, pct_copy=100 * nbytes / ms / 1e6 / copy_gbps))
    base = {r["provider"]: r["ms"] for r in rows}
    for r in rows:
        r["x_eager"] = base["eager"] / r["ms"]
        r["x_compile"] = base["torch.compile"] / r["ms"]
        print(f"{r['size']:>16} {r['dtype']:>8} {r['provider']:>14} {r['ms']:9.3f} [{r['ms_p20']:8.3f},"
              f"{r['ms_p80']:8.3f}] {r['GBps']:8.1f} {r['pct_copy']:6.1f}% {r['x_eager']:7.2f}x {r['x_compile']:8.2f}x")
    return rows


def _loop_providers(shape, device, eta, steps, compiled_step, with_triton):
    """{provider: fn} running a whole DDIM inpainting loop in fp32 with a 3x3 conv as the network."""
    import ddim_inpaint  # the sampler's own schedule and levels (imported here: it imports this file)

    B, C, H, W = shape
    g = torch.Generator(device).manual_seed(0)
    x_T, y = (torch.randn(shape, generator=g, device=device) for _ in range(2))
    known_mask = torch.ones(1, 1, H, W, device=device)
    known_mask[..., H // 4:3 * H // 4, W // 4:3 * W // 4] = 0  # a centre hole, one mask for the batch
    weight = torch.randn(C, C, 3, 3, generator=g, device=device) / 3
    ab = ddim_inpaint.make_alpha_bar("cosine", 1000).tolist()
    ts = ddim_inpaint.ddim_timesteps(1000, steps)
    coeffs = [ddim_step_coeffs(ab[t], ab[t_prev] if t_prev is not None else 1.0, eta)
              for t, t_prev in zip(ts, [*ts[1:], None])]
    k = [tensor_coeffs(c, device) for c in coeffs]
    keys = torch.arange(B, device=device)  # one Philox key per image

    def noises(c, x):  # the sampler's fresh noise tensors, made every step
        return (torch.randn_like(x) if c.sigma > 0 else None), (torch.randn_like(x) if c.sqrt_1m_ab_prev > 0 else None)

    step_fns = {  # (step index, x_t, network output, coefficients) -> x_prev
        "stand-in only": lambda i, x, out, c: x,
        "eager": lambda i, x, out, c: ddim_dc_step_ref(x, out, y, known_mask, c, "eps", *noises(c, x))[0],
        "torch.compile": lambda i, x, out, c: compiled_step(x, out, y, known_mask, k[i], "eps", *noises(c, x))[0],
    }
    if with_triton:
        step_fns["triton"] = lambda i, x, out, c: ddim_dc_step_triton(
            x, out, y, known_mask, c, "eps", *noises(c, x), want_x0=False)[0]
        step_fns["triton+rng"] = lambda i, x, out, c: ddim_dc_step_triton(
            x, out, y, known_mask, c, "eps", keys=keys, draw=2 * i, want_x0=False)[0]

    def loop(step):
        x = x_T
        for i, c in enumerate(coeffs):
            x = step(i, x, F.conv2d(x, weight, padding=1), c)
        return x

    return {name: functools.partial(loop, step) for name, step in step_fns.items()}


def _time_loop(shape, device, eta, steps, compiled_step, with_triton) -> list[dict]:
    """Time the whole loop per provider; print and return one row per provider."""
    timed = time_side_by_side(_loop_providers(shape, device, eta, steps, compiled_step, with_triton), device, reps=3)
    rows = [dict(size="x".join(map(str, shape)), provider=name, ms=ms, ms_p20=p20, ms_p80=p80, ms_per_step=ms / steps)
            for name, (ms, p20, p80) in timed.items()]
    standin, eager = rows[0]["ms"], rows[1]["ms"]  # "stand-in only" and "eager" come first
    for r in rows:
        r["step_share"] = max(r["ms"] - standin, 0.0) / r["ms"]  # what the DDIM steps add to the network's time
        r["x_eager"] = eager / r["ms"]
        print(f"{r['size']:>16} {r['provider']:>14} {r['ms']:9.2f} [{r['ms_p20']:8.2f},{r['ms_p80']:8.2f}] "
              f"{r['ms_per_step']:8.3f} {100 * r['step_share']:9.1f}% {r['x_eager']:7.2f}x")
    return rows


def bench(eta: float, steps: int, out: Path) -> None:
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    on_gpu = device.type == "cuda"
    with_triton = on_gpu and HAVE_TRITON
    copy_gbps = _copy_bandwidth(device, 2**30 if on_gpu else 2**26)
    print(f"device: {device_name(device)} | torch {torch.__version__} | "
          f"triton {triton.__version__ if HAVE_TRITON else 'not installed'} | copy bandwidth {copy_gbps:.1f} GB/s")
    if not on_gpu:
        print("no CUDA GPU: the Triton rows are skipped; eager and torch.compile are timed on the CPU, "
              "small sizes, wall-clock median of 10 rounds (3 for the loop)")
    step_shapes = GPU_STEP_SHAPES if on_gpu else CPU_STEP_SHAPES
    dtypes = (torch.float32, torch.bfloat16)
    # One compiled function each; after the first new shape torch.compile makes the sizes dynamic.
    compiled_step, compiled_sums = torch.compile(ddim_dc_step_ref), torch.compile(masked_error_sums_ref)
    header = (f"{'size':>16} {'dtype':>8} {'provider':>14} {'ms':>9} {'[p20, p80]':>19} {'GB/s':>8} "
              f"{'%copy':>7} {'x eager':>8} {'x compile':>9}")

    print(f"\nDDIM step + data consistency (pred=eps, eta={eta}, middle step, x0_hat written)\n{header}")
    step_rows = [row for dtype in dtypes for shape in step_shapes for row in _time_providers(
        "x".join(map(str, shape)), dtype, _step_providers(shape, dtype, device, eta, compiled_step, with_triton),
        device, copy_gbps)]
    print(f"\nMasked error sums (per-image SSE, SAE, hole count)\n{header}")
    sums_rows = [row for dtype in dtypes for shape in step_shapes for row in _time_providers(
        "x".join(map(str, shape)), dtype, _sums_providers(shape, dtype, device, compiled_sums, with_triton),
        device, copy_gbps)]
    print(f"\nWhole {steps}-step DDIM inpainting loop, fp32, eta={eta}, a 3x3 conv standing in for the U-Net "
          f"(Triton rows skip the x0_hat write)")
    print(f"{'size':>16} {'provider':>14} {'ms':>9} {'[p20, p80]':>19} {'ms/step':>8} {'step share':>10} "
          f"{'x eager':>8}")
    loop_rows = [row for shape in (GPU_LOOP_SHAPES if on_gpu else CPU_LOOP_SHAPES)
                 for row in _time_loop(shape, device, eta, steps, compiled_step, with_triton)]

    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(dict(
        device=device_name(device), device_type=device.type, torch=torch.__version__,
        triton=triton.__version__ if HAVE_TRITON else None,
        timestamp=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        config=dict(eta=eta, steps=steps), copy_GBps=copy_gbps,
        note=None if with_triton else "no CUDA GPU (or no triton): Triton rows skipped",
        step=step_rows, masked_error_sums=sums_rows, loop=loop_rows), indent=1))
    print(f"\nwrote {out}")


# -----------------------------------------------------------------------------------------------
# CLI
# -----------------------------------------------------------------------------------------------
def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description="Benchmark the fused DDIM-step and masked-metric kernels "
                                     "against their references (see the docstring).")
    commands = parser.add_subparsers(dest="command", required=True)
    b = commands.add_parser("bench", help="time eager / torch.compile / Triton, write --out (JSON)")
    b.add_argument("--eta", type=float, default=1.0,
                   help="DDIM eta of the timed steps (1, the sampler's default: every noise input in play)")
    b.add_argument("--steps", type=int, default=50, help="DDIM steps of the whole-loop table")
    b.add_argument("--out", type=Path, default=Path("outputs/kernel_bench.json"), help="where to write the results")
    args = parser.parse_args(argv)
    bench(args.eta, args.steps, args.out)


if __name__ == "__main__":
    main()
