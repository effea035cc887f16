"""kernels.py compiled ahead of time for NVIDIA sm_80 and sm_90 on this CPU-only machine.

No GPU is needed to see what a GPU would run: triton.compile turns a kernel and a signature into PTX
for a named target, and the ptxas that the triton wheel ships assembles it and reports registers,
stack and spills. This compiles every variant the launchers can ask for (each constexpr combination
of the step; both reduction stages, the one-block second stage included; the noise kernel), for
sm_80 (A100) and sm_90 (H100), and reports per variant: PTX instructions, integer divisions and
remainders among them, registers, spill bytes, and whether the divisions are the correctly rounded
div.rn.f32 and the clip NaN-propagating min/max.NaN. The tests assert on that report. It must be
made without TRITON_INTERPRET (the interpreter replaces the kernels), so the tests run this file as a
script in a subprocess:

    python tests/test_kernels_compile.py [--json report.json] [--targets 80,90]
"""
import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import kernels  # noqa: E402 - after the path; conftest.py has set TRITON_INTERPRET only under pytest

GPU_TARGETS = (80, 90)


def _signature(fn, constexprs: dict, pointer: str = "fp32", **types) -> dict:
    """fn's arguments in order, typed: constexprs, then `types` by name, then pointers (*_ptr) as
    `pointer` and everything else i32 (sizes, strides, the draw number)."""
    import inspect

    names = inspect.signature(getattr(fn, "fn", fn)).parameters  # JITFunction or the interpreter's wrapper
    return {n: "constexpr" if n in constexprs else types.get(n) or (f"*{pointer}" if n.endswith("_ptr") else "i32")
            for n in names}


def gpu_variants():
    """(kernel name, variant label, @triton.jit function, signature, constexprs) for every launch kind."""
    scalars = dict.fromkeys(("sqrt_ab", "sqrt_1m_ab", "sqrt_ab_prev", "sqrt_1m_ab_prev", "dir_coef", "sigma"), "fp32")
    flags = ("HAS_NOISE", "HAS_KNOWN_NOISE", "RNG", "WRITE_X0")
    storage = [("fp32", "fp32")] + [(dt, "fp32") for dt in ("bf16", "fp16")] + [("fp32", "i1")]  # (images, mask)
    for dt, mask_dt in storage:
        for pred in kernels.PREDS:
            for bits in range(16):
                on = {f: bool(bits >> j & 1) for j, f in enumerate(flags)}
                if (dt, mask_dt) != ("fp32", "fp32") and not all(on.values()) and on != dict.fromkeys(flags, False):
                    continue  # other storage types: the all-off and all-on variants are enough
                constexprs = dict(PRED=pred, **on, FAST=True, BLOCK=kernels.STEP_BLOCK)  # FAST: as on a GPU
                signature = _signature(kernels._ddim_dc_step_kernel, constexprs, dt, known_mask_ptr=f"*{mask_dt}",
                                       keys_ptr="*i64", **scalars)
                label = f"{pred} {' '.join(f for f in flags if on[f]) or '-'} ({dt}, mask {mask_dt})"
                yield "ddim_dc_step", label, kernels._ddim_dc_step_kernel, signature, constexprs
    for dt in ("fp32", "bf16"):
        for iters, count in ((1, "fp32"), (1, "i32"), (kernels.REDUCE_ITERS, "i32")):  # one partial: final sums
            constexprs = dict(ITERS=iters, BLOCK=kernels.REDUCE_BLOCK)
            signature = _signature(kernels._masked_error_partials_kernel, constexprs, dt, known_mask_ptr="*fp32",
                                   sse_part_ptr="*fp32", sae_part_ptr="*fp32", count_part_ptr=f"*{count}")
            label = f"stage 1, ITERS={iters}, counts {count} ({dt})"
            yield "masked_error_partials", label, kernels._masked_error_partials_kernel, signature, constexprs
    # What an aligned launch compiles to: the JIT marks 16-byte aligned pointers and sizes that are
    # multiples of 16 (an MNIST plane has 1024 pixels), so that contiguous loads can be 16 bytes wide.
    for dt in ("fp32", "bf16"):
        constexprs = dict(ITERS=kernels.REDUCE_ITERS, BLOCK=kernels.REDUCE_BLOCK)
        signature = _signature(kernels._masked_error_partials_kernel, constexprs, dt, known_mask_ptr="*fp32",
                               sse_part_ptr="*fp32", sae_part_ptr="*fp32", count_part_ptr="*i32")
        yield ("masked_error_partials", f"stage 1, ITERS={kernels.REDUCE_ITERS}, aligned ({dt})",
               kernels._masked_error_partials_kernel, signature, constexprs)
        constexprs = dict(PRED="eps", HAS_NOISE=True, HAS_KNOWN_NOISE=True, RNG=False, FAST=True, WRITE_X0=True,
                          BLOCK=kernels.STEP_BLOCK)
        signature = _signature(kernels._ddim_dc_step_kernel, constexprs, dt, known_mask_ptr="*fp32",
                               keys_ptr="*i64", **scalars)
        yield "ddim_dc_step", f"eps, noise tensors, aligned ({dt})", kernels._ddim_dc_step_kernel, signature, constexprs
    for block in (1, 1024):  # one partial per image (a 32x32 MNIST image), and the widest second stage
        constexprs = dict(BLOCK=block)
        signature = _signature(kernels._sum_partials_kernel, constexprs, count_part_ptr="*i32")
        yield "sum_partials", f"stage 2, BLOCK={block}", kernels._sum_partials_kernel, signature, constexprs
    for second in (False, True):
        constexprs = dict(SECOND=second, FAST=True, BLOCK=kernels.STEP_BLOCK)
        signature = _signature(kernels._keyed_randn_kernel, constexprs, keys_ptr="*i64")
        label = f"noise tensor, {'odd' if second else 'even'} draw"
        yield "keyed_randn", label, kernels._keyed_randn_kernel, signature, constexprs


def _ptx_instructions(ptx: str) -> list[str]:
    """The opcodes of the PTX instructions (predicated ones included), in order."""
    ops = []
    for line in ptx.splitlines():
        line = line.strip()
        if not line or line.startswith((".", "//", "{", "}", "$", "(", ")")) or line.endswith(":"):
            continue
        words = line.split()
        op = words[1] if words[0].startswith("@") and len(words) > 1 else words[0]
        ops.append(op.rstrip(";"))
    return ops


ALIGNED = ("HW", "chw", "mask_stride_b")  # with every pointer: what an aligned launch of MNIST planes has


def compile_for_gpu(fn, signature: dict, constexprs: dict, capability: int, aligned: bool = False) -> dict:
    """Compile one kernel variant for sm_<capability> on this machine; what its PTX and ptxas show. With
    `aligned`, as the JIT compiles it for 16-byte aligned pointers and the ALIGNED sizes multiples of 16."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    if kernels.interpreting():
        raise RuntimeError("ahead-of-time compilation needs the real kernels: unset TRITON_INTERPRET")
    names = list(signature)
    attrs = {(names.index(n),): [["tt.divisibility", 16]] for n in names
             if aligned and (n.endswith("_ptr") or n in ALIGNED)}
    compiled = kernels.triton.compile(ASTSource(fn=fn, signature=signature, constexprs=constexprs, attrs=attrs),
                                      target=GPUTarget("cuda", capability, 32))
    ptx = compiled.asm["ptx"]
    ops = _ptx_instructions(ptx)
    arch = re.search(r"^\.target\s+(\w+)", ptx, re.M).group(1)
    from triton.backends.nvidia.compiler import get_ptxas
    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "k.ptx").write_text(ptx)
        report = subprocess.run([get_ptxas(capability).path, f"-arch={arch}", "-v", "-o", str(Path(tmp) / "k.cubin"),
                                 str(Path(tmp) / "k.ptx")], capture_output=True, text=True, check=True).stderr
    number = lambda pattern: int(re.search(pattern, report).group(1))  # noqa: E731
    return dict(
        arch=arch, ptx_instructions=len(ops),
        int_div_rem=sum(bool(re.match(r"(div|rem)\.[su](16|32|64)$", op)) for op in ops),
        div_rn_f32=ops.count("div.rn.f32"), div_approx=sum(op.startswith(("div.approx", "div.full")) for op in ops),
        nan_min_max=sum(op.startswith(("min.NaN.", "max.NaN.")) for op in ops),
        approx_sin_cos=sum(op.startswith(("sin.approx", "cos.approx")) for op in ops),
        mul_hi_u32=ops.count("mul.hi.u32"),  # Philox's rounds: two per round per 32-bit counter pair
        loads_16_byte=sum(op.startswith("ld.global.v4") for op in ops),
        loads_narrow=sum(op.startswith("ld.global") and not op.startswith("ld.global.v4") for op in ops),
        local_bytes=sum(int(n) for n in re.findall(r"^\s*\.local\s.*\[(\d+)\];", ptx, re.M)),
        registers=number(r"Used (\d+) registers"), stack_bytes=number(r"(\d+) bytes stack frame"),
        spill_stores=number(r"(\d+) bytes spill stores"), spill_loads=number(r"(\d+) bytes spill loads"),
    )


def ptx_report(targets=GPU_TARGETS, out: Path | None = None) -> list[dict]:
    """Compile every variant for every target; print one line each, optionally write JSON."""
    rows = []
    print(f"{'kernel':<22} {'variant':<44} {'arch':>6} {'PTX ins':>7} {'int div':>7} {'regs':>4} {'spill':>5} "
          f"{'div.rn':>6} {'NaN mm':>6}")
    for capability in targets:
        for name, label, fn, signature, constexprs in gpu_variants():
            r = dict(kernel=name, variant=label,
                     **compile_for_gpu(fn, signature, constexprs, capability, aligned="aligned" in label))
            rows.append(r)
            print(f"{name:<22} {label:<44} {r['arch']:>6} {r['ptx_instructions']:7d} {r['int_div_rem']:7d} "
                  f"{r['registers']:4d} {r['spill_stores'] + r['spill_loads']:5d} {r['div_rn_f32']:6d} "
                  f"{r['nan_min_max']:6d}")
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(dict(triton=kernels.triton.__version__, variants=rows), indent=1) + "\n")
        print(f"wrote {out}")
    return rows


def _missing_aot_api() -> str | None:
    try:
        from triton.backends.compiler import GPUTarget  # noqa: F401
        from triton.backends.nvidia.compiler import get_ptxas  # noqa: F401
        from triton.compiler import ASTSource  # noqa: F401
    except ImportError as e:
        return f"this triton lacks the ahead-of-time compile API ({e})"
    return None


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    if reason := _missing_aot_api():
        pytest.skip(reason)
    out = tmp_path_factory.mktemp("ptx") / "ptx.json"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    run = subprocess.run([sys.executable, __file__, "--json", str(out)], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=900)
    assert run.returncode == 0, f"the PTX report failed:\n{run.stdout[-3000:]}\n{run.stderr[-3000:]}"
    return json.loads(out.read_text())["variants"]


def test_every_launch_variant_compiles_for_sm80_and_sm90(report):
    expected = {(name, label) for name, label, *_ in gpu_variants()}
    for arch in ("sm_80", "sm_90a"):
        got = {(r["kernel"], r["variant"]) for r in report if r["arch"] == arch}
        assert got == expected, f"{arch}: missing {sorted(expected - got)[:5]}"
    step = [r for r in report if r["kernel"] == "ddim_dc_step"]
    assert len({r["variant"] for r in step if r["variant"].endswith("(fp32, mask fp32)")}) == 3 * 2**4, \
        "every PRED x HAS_NOISE x HAS_KNOWN_NOISE x RNG x WRITE_X0 combination"


def test_no_variant_spills_to_local_memory(report):
    spills = [(r["kernel"], r["variant"], r["arch"], r["spill_stores"], r["spill_loads"])
              for r in report if r["spill_stores"] or r["spill_loads"]]
    assert not spills, f"register spills (kernel, variant, arch, store bytes, load bytes): {spills[:5]}"
    # No local memory at all: libdevice's sinf/cosf would bring a 28-byte table for reducing huge
    # arguments, but the kernels take the approximate sin and cos of an angle in [-pi, pi).
    for r in report:
        assert r["local_bytes"] == 0, f"{r['kernel']} {r['variant']} {r['arch']}: {r['local_bytes']} B local"


def test_in_kernel_noise_is_one_philox_call_and_one_fast_box_muller_pair_per_pixel(report):
    # The step with both its noises in play draws them from one Philox call, as many 32-bit high
    # multiplies as the noise kernel's one call, and one approximate cos and sin per pixel.
    for arch in ("sm_80", "sm_90a"):
        one_call = {r["mul_hi_u32"] for r in report if r["kernel"] == "keyed_randn" and r["arch"] == arch}
        assert len(one_call) == 1 and min(one_call) > 0, f"{arch}: noise kernels differ in Philox work: {one_call}"
        for r in (r for r in report if r["arch"] == arch):
            case = f"{r['kernel']} {r['variant']} {arch}"
            if r["kernel"] == "ddim_dc_step" and not (" RNG" in r["variant"] and "NOISE" in r["variant"]):
                assert r["approx_sin_cos"] == r["mul_hi_u32"] == 0, f"{case}: draws noise it does not need"
            if r["kernel"] != "keyed_randn" and not (" RNG" in r["variant"] and "NOISE" in r["variant"]):
                continue
            assert r["approx_sin_cos"] > 0, f"{case}: no sin.approx / cos.approx: Box-Muller takes libdevice's"
            assert r["mul_hi_u32"] <= min(one_call), f"{case}: {r['mul_hi_u32']} mul.hi.u32, more than one Philox call"


def test_aligned_launches_read_their_images_16_bytes_at_a_time(report):
    # 8 pixels per thread: fp32 images take two 16-byte loads per tensor, bf16 one; the fp32 mask as fp32.
    for r in (r for r in report if "aligned" in r["variant"]):
        case = f"{r['kernel']} {r['variant']} {r['arch']}"
        tensors = 3 if r["kernel"] == "masked_error_partials" else 6  # with the mask
        images = tensors - 1
        expected = 2 * tensors if "fp32" in r["variant"] else images + 2  # bf16 images, the fp32 mask's two
        assert r["loads_16_byte"] == expected and r["loads_narrow"] == 0, \
            f"{case}: {r['loads_16_byte']} 16-byte and {r['loads_narrow']} narrower loads, expected {expected} and 0"


def test_step_divides_correctly_rounded_and_clips_propagating_nan(report):
    for r in (r for r in report if r["kernel"] == "ddim_dc_step"):
        case = f"{r['variant']} {r['arch']}"
        assert r["div_rn_f32"] > 0, f"{case}: no div.rn.f32 (eps_hat = (x_t - a x0_hat) / s must round correctly)"
        assert r["div_approx"] == 0, f"{case}: approximate division"
        assert r["nan_min_max"] > 0, f"{case}: the clip to [-1, 1] does not propagate NaN as torch.clamp does"


def test_no_per_pixel_integer_division(report):
    # Divisions are per program (plane, image), not per pixel: a 1024-pixel block with 8 pixels per
    # thread that divided per pixel would show dozens of div/rem instructions.
    worst = max(report, key=lambda r: r["int_div_rem"])
    assert worst["int_div_rem"] <= 2, f"{worst['kernel']} {worst['variant']}: {worst['int_div_rem']} div/rem"


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description="compile every kernel variant for NVIDIA targets, no GPU needed")
    parser.add_argument("--targets", default=",".join(map(str, GPU_TARGETS)), help="compute capabilities, e.g. 80,90")
    parser.add_argument("--json", type=Path, default=None, help="also write the report here")
    args = parser.parse_args()
    ptx_report(tuple(int(t) for t in args.targets.split(",")), args.json)
