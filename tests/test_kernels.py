"""kernels.py: each Triton kernel against its PyTorch reference.

Without a GPU the kernels run on CPU tensors under TRITON_INTERPRET=1; with CUDA they run compiled,
on the device (tests/conftest.py decides). The reference is always computed in fp32 from the same
(dtype-cast) inputs, so the tolerance of a case is the rounding of the kernel's output to its dtype.
Under the interpreter fp32 agrees to the last bit (same operations in the same order); compiled, a
multiply-add may fuse into one FMA, so fp32 gets 1e-5. fp16 and bf16 outputs are the fp32 result
rounded once to the storage dtype: fp16 rounds to nearest, at most half an ulp, so rtol = 2^-11
(its 10-bit mantissa); bf16 gets one ulp, rtol = 2^-7 (7 bits), because the interpreter truncates
fp32 -> bf16 casts where a GPU rounds to nearest. Both add the fp32 allowance (1e-5) for FMA.
Shapes are tiny and odd on purpose: ragged last blocks, H*W not a multiple of anything.
"""
import json
import math

import pytest
import torch

import kernels as K

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
COMPILED = DEVICE == "cuda"  # else the interpreter
FP32_TOL = 1e-5 if COMPILED else 0.0
DTYPES = [  # (dtype, atol, rtol) for outputs stored in dtype vs the fp32 reference
    pytest.param(torch.float32, FP32_TOL, FP32_TOL, id="fp32"),
    pytest.param(torch.float16, 1e-5, 2**-11 + 1e-5, id="fp16"),  # half an ulp: round to nearest
    pytest.param(torch.bfloat16, 1e-5, 2**-7 + 1e-5, id="bf16"),  # one ulp: the interpreter truncates
]
SHAPES = [(1, 1, 17, 19), (3, 1, 32, 32), (2, 1, 33, 65), (2, 3, 9, 11)]  # last one: C > 1
STEPS = {  # (alpha_bar_t, alpha_bar_prev)
    "middle": (0.35, 0.55),
    "last": (0.97, 1.0),  # t_prev = -1: alpha_bar_prev = 1, the known pixels become y exactly
}


def make_step_inputs(shape, dtype, mask_batch, seed=0):
    """x_t, model_out, y, noise, known_noise in dtype; a {0, 1} float mask (mask_batch or B, 1, H, W)."""
    B, C, H, W = shape
    g = torch.Generator().manual_seed(seed)
    x_t, model_out, y, noise, known_noise = (torch.randn(shape, generator=g).to(DEVICE, dtype) for _ in range(5))
    known_mask = (torch.rand(mask_batch or B, 1, H, W, generator=g) < 0.5).float().to(DEVICE)
    return x_t, model_out, y, known_mask, noise, known_noise


def reference_fp32(x_t, model_out, y, known_mask, c, pred, noise, known_noise):
    f32 = lambda t: t.float()  # noqa: E731
    return K.ddim_dc_step_ref(f32(x_t), f32(model_out), f32(y), known_mask, c, pred, f32(noise), f32(known_noise))


def assert_close(actual, expected, atol, rtol, case):
    diff = (actual.float() - expected.float()).abs()
    torch.testing.assert_close(actual.float(), expected.float(), atol=atol, rtol=rtol,
                               msg=lambda m: f"{case}: max |diff| {diff.max():.3g}, mean {diff.mean():.3g}\n{m}")


# -----------------------------------------------------------------------------------------------
# DDIM step + data consistency
# -----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype, atol, rtol", DTYPES)
@pytest.mark.parametrize("pred", K.PREDS)
@pytest.mark.parametrize("eta", [0.0, 0.5, 1.0])
@pytest.mark.parametrize("step", STEPS)
def test_fused_step_matches_reference_for_every_target_and_eta(dtype, atol, rtol, pred, eta, step):
    shape = (3, 1, 32, 32)
    c = K.ddim_step_coeffs(*STEPS[step], eta)
    inputs = make_step_inputs(shape, dtype, mask_batch=1)
    x_prev, x0_hat = K.ddim_dc_step(*inputs[:4], c, pred, *inputs[4:], backend="triton")
    ref_prev, ref_x0 = reference_fp32(*inputs[:4], c, pred, *inputs[4:])
    case = f"pred={pred} eta={eta} {step} step {tuple(shape)} {dtype}"
    assert x_prev.dtype == x0_hat.dtype == dtype, case
    assert_close(x_prev, ref_prev, atol, rtol, case + " x_prev")
    assert_close(x0_hat, ref_x0, atol, rtol, case + " x0_hat")


ODD_CASES = [  # every shape with both mask shapes, except (3, 1, 32, 32) with one mask: the test above has it
    pytest.param(shape, mask_batch, id=f"{'x'.join(map(str, shape))}-mask_{'1' if mask_batch else 'B'}x1HW")
    for shape in SHAPES for mask_batch in (1, None) if (shape, mask_batch) != ((3, 1, 32, 32), 1)]


@pytest.mark.parametrize("dtype, atol, rtol", DTYPES)
@pytest.mark.parametrize("shape, mask_batch", ODD_CASES)
def test_fused_step_matches_reference_for_odd_shapes_and_both_mask_shapes(dtype, atol, rtol, shape, mask_batch):
    c = K.ddim_step_coeffs(*STEPS["middle"], eta=1.0)
    inputs = make_step_inputs(shape, dtype, mask_batch)
    x_prev, x0_hat = K.ddim_dc_step(*inputs[:4], c, "v", *inputs[4:], backend="triton")
    ref_prev, ref_x0 = reference_fp32(*inputs[:4], c, "v", *inputs[4:])
    case = f"{tuple(shape)} mask {tuple(inputs[3].shape)} {dtype}"
    assert_close(x_prev, ref_prev, atol, rtol, case + " x_prev")
    assert_close(x0_hat, ref_x0, atol, rtol, case + " x0_hat")


def test_fp32_step_matches_reference_bit_for_bit_under_interpreter_and_to_fma_rounding_compiled():
    inputs = make_step_inputs((2, 3, 9, 11), torch.float32, mask_batch=1)
    for pred in K.PREDS:
        c = K.ddim_step_coeffs(0.2, 0.4, eta=0.7)
        fused = K.ddim_dc_step(*inputs[:4], c, pred, *inputs[4:], backend="triton")
        ref = K.ddim_dc_step(*inputs[:4], c, pred, *inputs[4:], backend="torch")
        if COMPILED:
            for name, a, b in zip(("x_prev", "x0_hat"), fused, ref):
                assert_close(a, b, FP32_TOL, FP32_TOL, f"pred={pred} {name}, compiled")
        else:
            assert all(torch.equal(a, b) for a, b in zip(fused, ref)), f"pred={pred}: fp32 not bit-identical"


def test_nan_from_the_network_propagates_like_torch_clamp():
    # tl.clamp would turn a NaN x0_hat into a number in [-1, 1] and hide a diverged network.
    x_t, model_out, y, known_mask, noise, known_noise = make_step_inputs((2, 1, 17, 19), torch.float32, 1)
    model_out[:, :, 3:6, 4:9] = float("nan")
    model_out[0, 0, 0, 0] = float("inf")
    c = K.ddim_step_coeffs(*STEPS["middle"], eta=0.5)
    for pred in K.PREDS:
        fused = K.ddim_dc_step(x_t, model_out, y, known_mask, c, pred, noise, known_noise, backend="triton")
        ref = K.ddim_dc_step(x_t, model_out, y, known_mask, c, pred, noise, known_noise, backend="torch")
        for name, a, b in zip(("x_prev", "x0_hat"), fused, ref):
            assert torch.equal(a.isnan(), b.isnan()), f"pred={pred} {name}: NaN where the reference has none, or not"
            assert a.isnan().any() or name == "x_prev", f"pred={pred}: the NaN output vanished from x0_hat"


@pytest.mark.parametrize("dtype, atol, rtol", DTYPES)
def test_known_pixels_are_exactly_y_after_the_last_step(dtype, atol, rtol):
    c = K.ddim_step_coeffs(*STEPS["last"], eta=1.0)
    x_t, model_out, y, known_mask, noise, _ = make_step_inputs((2, 3, 9, 11), dtype, mask_batch=1)
    x_prev, _ = K.ddim_dc_step(x_t, model_out, y, known_mask, c, "eps", noise, backend="triton")
    known = (known_mask > 0.5).expand_as(y)
    assert torch.equal(x_prev[known], y[known]), f"{dtype}: known pixels differ from y at the last step"


def test_expanded_and_bool_masks_read_like_the_plain_mask():
    c = K.ddim_step_coeffs(*STEPS["middle"], eta=0.5)
    x_t, model_out, y, known_mask, noise, known_noise = make_step_inputs((3, 2, 9, 11), torch.float32, mask_batch=1)
    expected = K.ddim_dc_step(x_t, model_out, y, known_mask, c, "eps", noise, known_noise, backend="triton")
    for mask in (known_mask.expand(3, 1, 9, 11), known_mask.bool()):  # stride-0 view; bool storage
        got = K.ddim_dc_step(x_t, model_out, y, mask, c, "eps", noise, known_noise, backend="triton")
        assert all(torch.equal(a, b) for a, b in zip(got, expected)), f"mask {mask.dtype} strides {mask.stride()}"


def test_want_x0_false_skips_x0_hat_and_keeps_x_prev():
    c = K.ddim_step_coeffs(*STEPS["middle"], eta=0.0)
    x_t, model_out, y, known_mask, _, known_noise = make_step_inputs((1, 1, 17, 19), torch.float32, mask_batch=1)
    for backend in ("triton", "torch"):
        x_prev, x0_hat = K.ddim_dc_step(x_t, model_out, y, known_mask, c, "x0", known_noise=known_noise,
                                        backend=backend, want_x0=False)
        full, _ = K.ddim_dc_step(x_t, model_out, y, known_mask, c, "x0", known_noise=known_noise, backend=backend)
        assert x0_hat is None and torch.equal(x_prev, full), backend


def test_missing_noise_and_bad_arguments_raise():
    c = K.ddim_step_coeffs(*STEPS["middle"], eta=1.0)
    x_t, model_out, y, known_mask, noise, known_noise = make_step_inputs((1, 1, 17, 19), torch.float32, 1)
    with pytest.raises(ValueError, match="noise"):
        K.ddim_dc_step_triton(x_t, model_out, y, known_mask, c, "eps", known_noise=known_noise)
    with pytest.raises(ValueError, match="not both"):
        K.ddim_dc_step_triton(x_t, model_out, y, known_mask, c, "eps", noise, known_noise,
                              keys=torch.arange(1, device=DEVICE))
    with pytest.raises(ValueError, match="pred"):
        K.ddim_dc_step_triton(x_t, model_out, y, known_mask, c, "score", noise, known_noise)
    with pytest.raises(ValueError, match="known_mask"):
        K.ddim_dc_step_triton(x_t, model_out, y, known_mask[..., :-1], c, "eps", noise, known_noise)
    with pytest.raises(ValueError, match="known_mask must be on"):  # checked like the image inputs
        K.ddim_dc_step_triton(x_t, model_out, y, known_mask.to("meta"), c, "eps", noise, known_noise)
    with pytest.raises(ValueError, match="known_mask must be on"):
        K.masked_error_sums_triton(x_t, y, known_mask.to("meta"))
    with pytest.raises(ValueError, match="keys must be"):
        K.ddim_dc_step_triton(x_t, model_out, y, known_mask, c, "eps", keys=torch.arange(2, device=DEVICE))
    with pytest.raises(ValueError, match="even draw"):  # z and the known-pixel noise are one Philox pair
        K.ddim_dc_step_triton(x_t, model_out, y, known_mask, c, "eps", keys=torch.arange(1, device=DEVICE), draw=3)


def test_transposed_mask_view_reads_like_the_plain_mask():
    c = K.ddim_step_coeffs(*STEPS["middle"], eta=0.5)
    x_t, model_out, y, known_mask, noise, known_noise = make_step_inputs((2, 1, 13, 13), torch.float32, mask_batch=2)
    view = known_mask.transpose(2, 3).contiguous().transpose(2, 3)  # same values, column-major strides
    expected = K.ddim_dc_step(x_t, model_out, y, known_mask, c, "v", noise, known_noise, backend="triton")
    got = K.ddim_dc_step(x_t, model_out, y, view, c, "v", noise, known_noise, backend="triton")
    assert all(torch.equal(a, b) for a, b in zip(got, expected))
    assert torch.equal(K.masked_error_sums(x_t, y, view, backend="triton")[0],
                       K.masked_error_sums(x_t, y, known_mask, backend="triton")[0])


def test_the_reference_takes_tensor_coefficients_as_the_benchmark_compiles_it():
    # torch.compile serves every step with one graph when the coefficients are 0-d tensors, not floats.
    c = K.ddim_step_coeffs(*STEPS["middle"], eta=0.5)
    x_t, model_out, y, known_mask, noise, known_noise = make_step_inputs((2, 3, 9, 11), torch.float32, 1)
    got = K.ddim_dc_step_ref(x_t, model_out, y, known_mask, K.tensor_coeffs(c, DEVICE), "v", noise, known_noise)
    expected = K.ddim_dc_step_ref(x_t, model_out, y, known_mask, c, "v", noise, known_noise)
    for a, b in zip(got, expected):  # on CUDA, scalar and 0-d-tensor operands take kernels that may fuse differently
        torch.testing.assert_close(a, b, atol=FP32_TOL, rtol=FP32_TOL)


# -----------------------------------------------------------------------------------------------
# Keyed Philox noise. With x_t = model_out = y = 0 and pred="x0", x0_hat = eps_hat = 0, so
# x_prev = sigma * z on hole pixels and sqrt(1 - alpha_bar_prev) * z_known on known pixels: with both
# scales 1, x_prev *is* the in-kernel draws.
# -----------------------------------------------------------------------------------------------
DRAW_COEFFS = K.StepCoeffs(sqrt_ab=1.0, sqrt_1m_ab=1.0, sqrt_ab_prev=1.0, sqrt_1m_ab_prev=1.0, dir_coef=0.0, sigma=1.0)
DRAW_SHAPE = (4, 1, 32, 32)  # 4096 draws


def keys(*values):
    return torch.tensor(values or range(DRAW_SHAPE[0]), dtype=torch.int64, device=DEVICE)


def step_draws(image_keys, draw=0, stream="noise", shape=DRAW_SHAPE):
    zeros = torch.zeros(len(image_keys), *shape[1:], device=DEVICE)
    known_mask = torch.full((1, 1, *shape[2:]), 1.0 if stream == "known_noise" else 0.0, device=DEVICE)
    x_prev, _ = K.ddim_dc_step(zeros, zeros, zeros, known_mask, DRAW_COEFFS, "x0", backend="triton",
                               keys=image_keys, draw=draw)
    return x_prev


def test_in_kernel_draws_are_keyed_randn_draws_draw_and_draw_plus_1():
    # One formula: the step's z is keyed_randn(keys, draw), its known-pixel noise keyed_randn(keys, draw + 1),
    # the two draws of one Philox pair.
    for shape in (DRAW_SHAPE, (3, 2, 9, 11)):  # C > 1: the counter runs over the whole image
        k = keys(*range(10, 10 + shape[0]))
        for stream, offset in (("noise", 0), ("known_noise", 1)):
            got, expected = step_draws(k, 6, stream, shape), K.keyed_randn(k, 6 + offset, shape)
            if COMPILED:
                assert_close(got, expected, 1e-6, 1e-6, f"{stream} {shape}")
            else:
                assert torch.equal(got, expected), f"{stream} {shape}: not keyed_randn's draws"


def test_keyed_draws_depend_on_the_key_and_draw_not_the_batch():
    full = K.keyed_randn(keys(5, 6, 7, 8), 3, DRAW_SHAPE)
    assert torch.equal(K.keyed_randn(keys(7, 8), 3, (2, *DRAW_SHAPE[1:])), full[2:]), "a smaller batch changed them"
    assert torch.equal(K.keyed_randn(keys(8, 5, 7, 6), 3, DRAW_SHAPE), full[[3, 0, 2, 1]]), "reordering changed them"
    assert torch.equal(K.keyed_randn(keys(5, 6, 7, 8), 3, DRAW_SHAPE), full), "not reproducible"


def test_keyed_draws_differ_across_keys_and_draws():
    a = K.keyed_randn(keys(1, 1), 0, (2, 1, 32, 32))
    assert torch.equal(a[0], a[1]), "the same key gave different noise"
    assert not torch.equal(a, K.keyed_randn(keys(1, 2), 0, (2, 1, 32, 32))), "keys 1 and 2 gave the same noise"
    assert not torch.equal(a, K.keyed_randn(keys(1, 1), 1, (2, 1, 32, 32))), "draws 0 and 1 gave the same noise"


@pytest.mark.parametrize("stream", ["noise", "known_noise"])
def test_rng_draws_are_standard_normal(stream):
    z = step_draws(keys(), draw=4, stream=stream).flatten().double().cpu()
    n = z.numel()  # 4096: the mean's standard error is 1/64, the std's about 1/90
    assert abs(z.mean()) < 4 / n**0.5, f"{stream}: mean {z.mean():.4f}"
    assert abs(z.std() - 1) < 0.05, f"{stream}: std {z.std():.4f}"
    # fp32 holds a normal draw to about 1e-7, so 4096 honest draws repeat a value about 0.2 times on
    # average (10 repeats in 60 x 4096 draws here); a counter that fails to advance repeats thousands.
    assert n - z.unique().numel() <= 3, f"{stream}: {n - z.unique().numel()} repeated draws"


def test_keyed_draws_are_uncorrelated_across_streams_and_neighbouring_keys():
    z = K.keyed_randn(keys(0, 1), 0, (2, 1, 64, 64))
    pairs = {"keys 0 and 1": (z[0], z[1]), "draws 0 and 1": (z[0], K.keyed_randn(keys(0), 1, (1, 1, 64, 64))[0]),
             "neighbouring pixels": (z[0].flatten()[:-1], z[0].flatten()[1:])}
    for name, (a, b) in pairs.items():
        corr = torch.corrcoef(torch.stack([a.flatten(), b.flatten()]).cpu())[0, 1]
        assert abs(corr) < 0.06, f"{name}: correlation {corr:.3f} (4096 draws: standard error 0.016)"


def test_fused_step_with_keys_matches_reference_given_the_same_draws():
    c = K.ddim_step_coeffs(*STEPS["middle"], eta=0.8)
    x_t, model_out, y, known_mask, _, _ = make_step_inputs((3, 1, 17, 19), torch.float32, 1)
    k = keys(11, 12, 13)
    fused = K.ddim_dc_step(x_t, model_out, y, known_mask, c, "eps", backend="triton", keys=k, draw=8)
    ref = K.ddim_dc_step(x_t, model_out, y, known_mask, c, "eps", K.keyed_randn(k, 8, x_t.shape),
                         K.keyed_randn(k, 9, x_t.shape), backend="torch")
    for name, a, b in zip(("x_prev", "x0_hat"), fused, ref):
        assert_close(a, b, FP32_TOL, FP32_TOL, name)


def test_keys_on_the_reference_path_raise():
    c = K.ddim_step_coeffs(*STEPS["middle"], eta=1.0)
    x_t, model_out, y, known_mask, _, _ = make_step_inputs((1, 1, 17, 19), torch.float32, 1)
    with pytest.raises(ValueError, match="Triton"):
        K.ddim_dc_step(x_t, model_out, y, known_mask, c, "eps", backend="torch", keys=keys(0))


# -----------------------------------------------------------------------------------------------
# Masked error sums, PSNR and L1
# -----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=["fp32", "fp16", "bf16"])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("mask_batch", [1, None], ids=["mask_1x1HW", "mask_Bx1HW"])
def test_fused_sums_match_reference(dtype, shape, mask_batch):
    g = torch.Generator().manual_seed(1)
    pred, target = (torch.rand(shape, generator=g).to(DEVICE, dtype) for _ in range(2))
    known_mask = (torch.rand(mask_batch or shape[0], 1, *shape[2:], generator=g) < 0.5).float().to(DEVICE)
    got = K.masked_error_sums(pred, target, known_mask, backend="triton")
    expected = K.masked_error_sums_ref(pred, target, known_mask)  # float64 sums of the same dtype-cast inputs
    case = f"{tuple(shape)} mask {tuple(known_mask.shape)} {dtype}"
    for name, a, b in zip(("sse", "sae", "count"), got, expected):
        assert a.shape == (shape[0],) and a.dtype == torch.float32, f"{case} {name}: {a.shape} {a.dtype}"
        # fp32 partial sums vs a float64 reference: a few ulp of the total; counts are exact.
        assert_close(a, b, atol=0, rtol=0 if name == "count" else 1e-5, case=f"{case} {name}")


@pytest.mark.parametrize("mask_batch", [1, None], ids=["mask_1x1HW", "mask_Bx1HW"])
def test_fused_sums_of_chunked_planes_match_reference(mask_batch):
    # 300 x 301 = 89 blocks per plane: chunks of 16 blocks, the last chunk and its last block ragged; C = 2.
    shape = (2, 2, 300, 301)
    assert K.REDUCE_CHUNKED_FROM <= math.ceil(300 * 301 / K.REDUCE_BLOCK), "this plane must be chunked"
    g = torch.Generator().manual_seed(3)
    pred, target = (torch.rand(shape, generator=g).to(DEVICE) for _ in range(2))
    known_mask = (torch.rand(mask_batch or shape[0], 1, *shape[2:], generator=g) < 0.5).float().to(DEVICE)
    got = K.masked_error_sums(pred, target, known_mask, backend="triton")
    for name, a, b in zip(("sse", "sae", "count"), got, K.masked_error_sums_ref(pred, target, known_mask)):
        assert_close(a, b, atol=0, rtol=0 if name == "count" else 1e-5, case=f"{shape} mask {mask_batch} {name}")


def test_fused_sums_add_in_their_fixed_order():
    # 1025 blocks of 1024 pixels, in chunks of REDUCE_ITERS = 16 blocks: 65 partials. Squared errors
    # 2^24 (block 0, pixel 0), 1 (block 1, pixel 0) and 1 (block 1024, pixel 0) sum to 2^24 + 2 exactly.
    # In the kernel's order lane 0 of chunk 0 adds block 0's pixel and then block 1's: 2^24 + 1 rounds
    # to 2^24 (ties to even); chunk 64 holds the other 1, and stage 2's 2^24 + 1 rounds to 2^24 again.
    # Every order that adds the two ones first gives 2^24 + 2.
    assert (K.REDUCE_ITERS, K.REDUCE_CHUNKED_FROM) == (16, 64), "the layout this test works by hand"
    pred = torch.zeros(1, 1, 1025, 1024)
    pred[0, 0, 0, 0], pred[0, 0, 1, 0], pred[0, 0, 1024, 0] = 4096.0, 1.0, 1.0  # blocks 0, 1 and 1024
    hole = torch.zeros(1, 1, 1025, 1024)
    chunk_0 = torch.tensor(2.0**24) + 1.0  # fp32: lane 0 of chunk 0
    expected = torch.stack([chunk_0, torch.tensor(1.0)]).sum()  # stage 2: partials 0 and 64, the rest 0
    sse, sae, count = K.masked_error_sums(pred.to(DEVICE), torch.zeros_like(pred).to(DEVICE), hole.to(DEVICE),
                                          backend="triton")
    assert sse.item() == expected.item() == 2.0**24, f"sse {sse.item():.1f}: not the kernel's fixed order"
    assert K.masked_error_sums_ref(pred, torch.zeros_like(pred), hole)[0].item() == 2.0**24 + 2  # float64 sums
    assert sae.item() == 4098.0 and count.item() == 1025 * 1024


@pytest.mark.skipif(not COMPILED, reason="the interpreter runs programs one after another: only a GPU can race")
def test_fused_sums_are_deterministic():
    # Compiled on a GPU, programs race; the fixed two-stage order must still give the same bits every run.
    g = torch.Generator().manual_seed(2)
    pred, target = (torch.rand(16, 3, 333, 65, generator=g).to(DEVICE) for _ in range(2))
    known_mask = torch.zeros(1, 1, 333, 65, device=DEVICE)
    first, *others = [K.masked_error_sums(pred, target, known_mask, backend="triton") for _ in range(5)]
    for run in others:
        assert all(torch.equal(a, b) for a, b in zip(first, run)), "the same inputs gave other sums"


def test_hand_computed_values():
    # One 2x2 image; the top-right pixel is known. Hole errors: 0.5, 0.0, -1.0.
    pred = torch.tensor([[[[0.5, 0.9], [0.0, 0.0]]]], device=DEVICE)
    target = torch.tensor([[[[0.0, 0.1], [0.0, 1.0]]]], device=DEVICE)
    known_mask = torch.tensor([[[[0.0, 1.0], [0.0, 0.0]]]], device=DEVICE)
    mse, l1 = (0.25 + 0.0 + 1.0) / 3, (0.5 + 0.0 + 1.0) / 3
    for backend in ("triton", "torch"):
        sse, sae, count = K.masked_error_sums(pred, target, known_mask, backend)
        assert (sse.item(), sae.item(), count.item()) == (1.25, 1.5, 3.0), backend
        torch.testing.assert_close(K.masked_psnr(pred, target, known_mask, backend),
                                   torch.tensor([10 * torch.log10(torch.tensor(1 / mse)).item()], device=DEVICE),
                                   msg=backend)
        torch.testing.assert_close(K.masked_l1(pred, target, known_mask, backend), torch.tensor([l1], device=DEVICE),
                                   msg=backend)


@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_empty_hole_gives_nan(backend):
    pred, target = torch.rand(2, 1, 17, 19, device=DEVICE), torch.rand(2, 1, 17, 19, device=DEVICE)
    all_known = torch.ones(1, 1, 17, 19, device=DEVICE)
    assert K.masked_psnr(pred, target, all_known, backend).isnan().all()
    assert K.masked_l1(pred, target, all_known, backend).isnan().all()


@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_identical_images_give_infinite_psnr_and_zero_l1(backend):
    pred = torch.rand(2, 1, 17, 19, device=DEVICE)
    known_mask = (torch.rand(1, 1, 17, 19, device=DEVICE) < 0.5).float()
    assert torch.equal(K.masked_psnr(pred, pred.clone(), known_mask, backend), torch.full((2,), float("inf"), device=DEVICE))
    assert torch.equal(K.masked_l1(pred, pred.clone(), known_mask, backend), torch.zeros(2, device=DEVICE))


@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_batch_values_are_the_per_image_values(backend):
    g = torch.Generator().manual_seed(3)
    pred, target = (torch.rand(3, 1, 17, 19, generator=g).to(DEVICE) for _ in range(2))
    known_mask = (torch.rand(3, 1, 17, 19, generator=g) < 0.5).float().to(DEVICE)
    for metric in (K.masked_psnr, K.masked_l1):
        batch = metric(pred, target, known_mask, backend)
        single = torch.cat([metric(pred[i:i + 1], target[i:i + 1], known_mask[i:i + 1], backend) for i in range(3)])
        torch.testing.assert_close(batch, single, msg=f"{metric.__name__}: batch vs one image at a time")
        torch.testing.assert_close(batch.mean(), single.mean(), msg=f"{metric.__name__}: batch mean")


# -----------------------------------------------------------------------------------------------
# Dispatch
# -----------------------------------------------------------------------------------------------
def test_auto_backend_takes_the_reference_on_cpu_tensors(monkeypatch):
    def fail(*args, **kwargs):
        raise AssertionError("auto dispatched a CPU tensor to Triton")

    monkeypatch.setattr(K, "ddim_dc_step_triton", fail)
    monkeypatch.setattr(K, "masked_error_sums_triton", fail)
    c = K.ddim_step_coeffs(*STEPS["middle"], eta=0.5)
    inputs = [t.cpu() for t in make_step_inputs((1, 1, 17, 19), torch.float32, 1)]
    K.ddim_dc_step(*inputs[:4], c, "eps", *inputs[4:], backend="auto")
    K.masked_psnr(inputs[0], inputs[1], inputs[3], backend="auto")


def test_triton_backend_refuses_cpu_tensors_without_the_interpreter(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")  # as on a CUDA machine: CPU tensors cannot go to a GPU kernel
    c = K.ddim_step_coeffs(*STEPS["middle"], eta=0.5)
    inputs = [t.cpu() for t in make_step_inputs((1, 1, 17, 19), torch.float32, 1)]
    with pytest.raises(ValueError, match="TRITON_INTERPRET"):
        K.ddim_dc_step(*inputs[:4], c, "eps", *inputs[4:], backend="triton")
    with pytest.raises(ValueError, match="TRITON_INTERPRET"):
        K.masked_psnr(inputs[0], inputs[1], inputs[3], backend="triton")


def test_unknown_backend_raises():
    c = K.ddim_step_coeffs(*STEPS["middle"], eta=0.5)
    inputs = make_step_inputs((1, 1, 17, 19), torch.float32, 1)
    with pytest.raises(ValueError, match="backend"):
        K.ddim_dc_step(*inputs[:4], c, "eps", *inputs[4:], backend="cuda")
    with pytest.raises(ValueError, match="backend"):
        K.masked_error_sums(inputs[0], inputs[1], inputs[3], backend="numpy")


# -----------------------------------------------------------------------------------------------
# The benchmark's plumbing (the timings themselves are for `make bench`, not for tests)
# -----------------------------------------------------------------------------------------------
def test_side_by_side_timing_calls_every_step_once_per_round():
    calls = []
    steps = {name: (lambda name=name: calls.append(name)) for name in "abc"}
    timed = K.time_side_by_side(steps, torch.device("cpu"), reps=3)
    assert calls == list("aabbcc") + list("abc") * 3  # two warm-up calls each, then round-robin
    assert set(timed) == set("abc") and all(p20 <= ms <= p80 for ms, p20, p80 in timed.values())


def test_kernel_bench_writes_every_row_at_a_tiny_size(tmp_path, monkeypatch):
    tiny = [(2, 1, 9, 11)]
    for name in ("GPU_STEP_SHAPES", "CPU_STEP_SHAPES", "GPU_LOOP_SHAPES", "CPU_LOOP_SHAPES"):
        monkeypatch.setattr(K, name, tiny)
    monkeypatch.setattr(K.torch, "compile", lambda fn: fn)  # the rows stay; compiling would take minutes
    K.main(["bench", "--steps", "3", "--out", str(tmp_path / "bench.json")])
    result = json.loads((tmp_path / "bench.json").read_text())
    providers = ["eager", "torch.compile"] + (["triton", "triton+rng"] if COMPILED else [])
    assert [(r["dtype"], r["provider"]) for r in result["step"]] == [
        (dtype, p) for dtype in ("float32", "bfloat16") for p in providers]
    assert len(result["masked_error_sums"]) == 2 * (3 if COMPILED else 2) and result["copy_GBps"] > 0
    eager = result["step"][0]
    nbytes = 8 * 2 * 9 * 11 * 4  # x_t, model_out, y, noise, known_noise, the mask (fp32 here), x_prev, x0_hat
    assert eager["size"] == "2x1x9x11" and eager["x_eager"] == 1.0
    assert eager["GBps"] == pytest.approx(nbytes / eager["ms"] / 1e6), "GB/s must come from the logical bytes"
    assert [r["provider"] for r in result["loop"]][:3] == ["stand-in only", "eager", "torch.compile"]
    assert all(0 <= r["step_share"] <= 1 and r["ms_per_step"] == r["ms"] / 3 for r in result["loop"])
