"""kernels.py: each Triton kernel against its PyTorch reference, on the CPU under TRITON_INTERPRET=1.

The reference is always computed in fp32 from the same (dtype-cast) inputs, so the tolerance of a
case is the rounding of the kernel's output to its dtype. fp32 must agree to the last bit under the
interpreter (same operations in the same order); fp16 to half an fp16 ulp; bf16 to one bf16 ulp,
because the interpreter truncates fp32 -> bf16 casts where a GPU rounds to nearest.
Shapes are tiny and odd on purpose: ragged last blocks, H*W not a multiple of anything.
"""
import pytest
import torch

import kernels as K

DTYPES = [  # (dtype, atol, rtol) for outputs stored in dtype vs the fp32 reference
    pytest.param(torch.float32, 0.0, 0.0, id="fp32"),
    pytest.param(torch.float16, 1e-3, 1e-3, id="fp16"),
    pytest.param(torch.bfloat16, 1e-2, 1e-2, id="bf16"),
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
    x_t, model_out, y, noise, known_noise = (torch.randn(shape, generator=g).to(dtype) for _ in range(5))
    known_mask = (torch.rand(mask_batch or B, 1, H, W, generator=g) < 0.5).float()
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


@pytest.mark.parametrize("dtype, atol, rtol", DTYPES)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("mask_batch", [1, None], ids=["mask_1x1HW", "mask_Bx1HW"])
def test_fused_step_matches_reference_for_odd_shapes_and_both_mask_shapes(dtype, atol, rtol, shape, mask_batch):
    c = K.ddim_step_coeffs(*STEPS["middle"], eta=1.0)
    inputs = make_step_inputs(shape, dtype, mask_batch)
    x_prev, x0_hat = K.ddim_dc_step(*inputs[:4], c, "v", *inputs[4:], backend="triton")
    ref_prev, ref_x0 = reference_fp32(*inputs[:4], c, "v", *inputs[4:])
    case = f"{tuple(shape)} mask {tuple(inputs[3].shape)} {dtype}"
    assert_close(x_prev, ref_prev, atol, rtol, case + " x_prev")
    assert_close(x0_hat, ref_x0, atol, rtol, case + " x0_hat")


def test_fp32_step_matches_reference_bit_for_bit_under_interpreter():
    inputs = make_step_inputs((2, 3, 9, 11), torch.float32, mask_batch=1)
    for pred in K.PREDS:
        c = K.ddim_step_coeffs(0.2, 0.4, eta=0.7)
        fused = K.ddim_dc_step(*inputs[:4], c, pred, *inputs[4:], backend="triton")
        ref = K.ddim_dc_step(*inputs[:4], c, pred, *inputs[4:], backend="torch")
        assert all(torch.equal(a, b) for a, b in zip(fused, ref)), f"pred={pred}: fp32 not bit-identical"


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
        K.ddim_dc_step_triton(x_t, model_out, y, known_mask, c, "eps", noise, known_noise, seed=0)
    with pytest.raises(ValueError, match="pred"):
        K.ddim_dc_step_triton(x_t, model_out, y, known_mask, c, "score", noise, known_noise)
    with pytest.raises(ValueError, match="known_mask"):
        K.ddim_dc_step_triton(x_t, model_out, y, known_mask[..., :-1], c, "eps", noise, known_noise)


def test_tensor_coefficient_reference_matches_reference():  # the variant the benchmark compiles
    c = K.ddim_step_coeffs(*STEPS["middle"], eta=0.5)
    x_t, model_out, y, known_mask, noise, known_noise = make_step_inputs((2, 3, 9, 11), torch.float32, 1)
    got = K.ddim_dc_step_ref_tensor_coeffs(x_t, model_out, y, known_mask, K.tensor_coeffs(c, "cpu"), "v",
                                           noise, known_noise)
    expected = K.ddim_dc_step_ref(x_t, model_out, y, known_mask, c, "v", noise, known_noise)
    for a, b in zip(got, expected):
        torch.testing.assert_close(a, b, atol=0, rtol=0)


# -----------------------------------------------------------------------------------------------
# In-kernel Philox noise. With x_t = model_out = y = 0 and pred="x0", x0_hat = eps_hat = 0, so
# x_prev = sigma * z on hole pixels and sqrt(1 - alpha_bar_prev) * z_known on known pixels: with both
# scales 1, x_prev *is* the draws.
# -----------------------------------------------------------------------------------------------
DRAW_COEFFS = K.StepCoeffs(sqrt_ab=1.0, sqrt_1m_ab=1.0, sqrt_ab_prev=1.0, sqrt_1m_ab_prev=1.0, dir_coef=0.0, sigma=1.0)
DRAW_SHAPE = (4, 1, 32, 32)  # 4096 draws


def draws(seed, offset=0, stream="noise"):
    zeros = torch.zeros(DRAW_SHAPE)
    known_mask = torch.full((1, 1, 32, 32), 1.0 if stream == "known_noise" else 0.0)
    x_prev, _ = K.ddim_dc_step(zeros, zeros, zeros, known_mask, DRAW_COEFFS, "x0", backend="triton",
                               seed=seed, offset=offset)
    return x_prev


def test_rng_same_seed_and_offset_give_identical_output():
    assert torch.equal(draws(seed=7), draws(seed=7))


def test_rng_different_seeds_or_offsets_differ():
    a = draws(seed=7)
    assert not torch.equal(a, draws(seed=8)), "seed 7 and 8 gave the same noise"
    assert not torch.equal(a, draws(seed=7, offset=2 * a.numel())), "the next step's offset gave the same noise"


def test_rng_streams_use_the_documented_counters():
    # z uses counters offset + i, known_noise offset + N + i: known_noise at offset 0 is z at offset N.
    n = torch.Size(DRAW_SHAPE).numel()
    assert torch.equal(draws(seed=3, stream="known_noise"), draws(seed=3, offset=n))
    assert not torch.equal(draws(seed=3, stream="known_noise"), draws(seed=3)), "the two streams overlap"


@pytest.mark.parametrize("stream", ["noise", "known_noise"])
def test_rng_draws_are_standard_normal(stream):
    z = draws(seed=11, stream=stream).flatten().double()
    n = z.numel()  # 4096: the mean's standard error is 1/64, the std's about 1/90
    assert abs(z.mean()) < 4 / n**0.5, f"{stream}: mean {z.mean():.4f}"
    assert abs(z.std() - 1) < 0.05, f"{stream}: std {z.std():.4f}"
    assert z.unique().numel() == n, f"{stream}: repeated draws"


def test_rng_noise_and_known_noise_are_uncorrelated():
    a, b = draws(seed=5).flatten(), draws(seed=5, stream="known_noise").flatten()
    corr = torch.corrcoef(torch.stack([a, b]))[0, 1]
    assert abs(corr) < 0.1, f"correlation {corr:.3f}"


def test_seed_on_the_reference_path_raises():
    c = K.ddim_step_coeffs(*STEPS["middle"], eta=1.0)
    x_t, model_out, y, known_mask, _, _ = make_step_inputs((1, 1, 17, 19), torch.float32, 1)
    with pytest.raises(ValueError, match="Triton"):
        K.ddim_dc_step(x_t, model_out, y, known_mask, c, "eps", backend="torch", seed=0)


# -----------------------------------------------------------------------------------------------
# Masked error sums, PSNR and L1
# -----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=["fp32", "fp16", "bf16"])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("mask_batch", [1, None], ids=["mask_1x1HW", "mask_Bx1HW"])
def test_fused_sums_match_reference(dtype, shape, mask_batch):
    g = torch.Generator().manual_seed(1)
    pred, target = (torch.rand(shape, generator=g).to(dtype) for _ in range(2))
    known_mask = (torch.rand(mask_batch or shape[0], 1, *shape[2:], generator=g) < 0.5).float()
    got = K.masked_error_sums(pred, target, known_mask, backend="triton")
    expected = K.masked_error_sums_ref(pred, target, known_mask)  # float64 sums of the same dtype-cast inputs
    case = f"{tuple(shape)} mask {tuple(known_mask.shape)} {dtype}"
    for name, a, b in zip(("sse", "sae", "count"), got, expected):
        assert a.shape == (shape[0],) and a.dtype == torch.float32, f"{case} {name}: {a.shape} {a.dtype}"
        # fp32 partial sums vs a float64 reference: a few ulp of the total; counts are exact.
        assert_close(a, b, atol=0, rtol=0 if name == "count" else 1e-5, case=f"{case} {name}")


def test_fused_sums_are_deterministic():
    g = torch.Generator().manual_seed(2)
    pred, target = torch.rand(2, 3, 33, 65, generator=g), torch.rand(2, 3, 33, 65, generator=g)
    known_mask = torch.zeros(1, 1, 33, 65)
    runs = [K.masked_error_sums(pred, target, known_mask, backend="triton") for _ in range(2)]
    assert all(torch.equal(a, b) for a, b in zip(*runs))


def test_hand_computed_values():
    # One 2x2 image; the top-right pixel is known. Hole errors: 0.5, 0.0, -1.0.
    pred = torch.tensor([[[[0.5, 0.9], [0.0, 0.0]]]])
    target = torch.tensor([[[[0.0, 0.1], [0.0, 1.0]]]])
    known_mask = torch.tensor([[[[0.0, 1.0], [0.0, 0.0]]]])
    mse, l1 = (0.25 + 0.0 + 1.0) / 3, (0.5 + 0.0 + 1.0) / 3
    for backend in ("triton", "torch"):
        sse, sae, count = K.masked_error_sums(pred, target, known_mask, backend)
        assert (sse.item(), sae.item(), count.item()) == (1.25, 1.5, 3.0), backend
        torch.testing.assert_close(K.masked_psnr(pred, target, known_mask, backend),
                                   torch.tensor([10 * torch.log10(torch.tensor(1 / mse)).item()]), msg=backend)
        torch.testing.assert_close(K.masked_l1(pred, target, known_mask, backend), torch.tensor([l1]), msg=backend)


@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_empty_hole_gives_nan(backend):
    pred, target = torch.rand(2, 1, 17, 19), torch.rand(2, 1, 17, 19)
    all_known = torch.ones(1, 1, 17, 19)
    assert K.masked_psnr(pred, target, all_known, backend).isnan().all()
    assert K.masked_l1(pred, target, all_known, backend).isnan().all()


@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_identical_images_give_infinite_psnr_and_zero_l1(backend):
    pred = torch.rand(2, 1, 17, 19)
    known_mask = (torch.rand(1, 1, 17, 19) < 0.5).float()
    assert torch.equal(K.masked_psnr(pred, pred.clone(), known_mask, backend), torch.full((2,), float("inf")))
    assert torch.equal(K.masked_l1(pred, pred.clone(), known_mask, backend), torch.zeros(2))


@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_batch_values_are_the_per_image_values(backend):
    g = torch.Generator().manual_seed(3)
    pred, target = torch.rand(3, 1, 17, 19, generator=g), torch.rand(3, 1, 17, 19, generator=g)
    known_mask = (torch.rand(3, 1, 17, 19, generator=g) < 0.5).float()
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
    inputs = make_step_inputs((1, 1, 17, 19), torch.float32, 1)
    K.ddim_dc_step(*inputs[:4], c, "eps", *inputs[4:], backend="auto")
    K.masked_psnr(inputs[0], inputs[1], inputs[3], backend="auto")


def test_unknown_backend_raises():
    c = K.ddim_step_coeffs(*STEPS["middle"], eta=0.5)
    inputs = make_step_inputs((1, 1, 17, 19), torch.float32, 1)
    with pytest.raises(ValueError, match="backend"):
        K.ddim_dc_step(*inputs[:4], c, "eps", *inputs[4:], backend="cuda")
    with pytest.raises(ValueError, match="backend"):
        K.masked_error_sums(inputs[0], inputs[1], inputs[3], backend="numpy")
