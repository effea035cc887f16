"""The PTX report before and after the one-Philox step and the chunked sums, side by side: PTX
instructions, registers and spills of the variants that changed, per target.

    python tests/test_kernels_compile.py --json studies/kernels_ptx/after.json     # on this code
    python tests/test_kernels_compile.py --json studies/kernels_ptx/before.json    # on a checkout of ee14720
    python studies/kernels_ptx/summary.py
"""
import json
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROWS = [  # (kernel, variant before, variant after): the launches whose code changed
    ("ddim_dc_step", "eps HAS_NOISE HAS_KNOWN_NOISE RNG WRITE_X0 (fp32, mask fp32)", None),
    ("ddim_dc_step", "eps HAS_NOISE HAS_KNOWN_NOISE RNG WRITE_X0 (bf16, mask fp32)", None),
    ("ddim_dc_step", "eps HAS_NOISE RNG (fp32, mask fp32)", None),
    ("keyed_randn", "noise tensor", "noise tensor, even draw"),
    ("masked_error_partials", "stage 1 (fp32)", "stage 1, ITERS=1, counts i32 (fp32)"),
    ("masked_error_partials", None, "stage 1, ITERS=16, counts i32 (fp32)"),
    ("masked_error_partials", None, "stage 1, ITERS=16, aligned (fp32)"),
]


def table() -> str:
    runs = {name: json.loads((HERE / f"{name}.json").read_text()) for name in ("before", "after")}
    index = {name: {(r["kernel"], r["variant"], r["arch"]): r for r in run["variants"]} for name, run in runs.items()}
    lines = [f"triton {runs['before']['triton']} (before) and {runs['after']['triton']} (after)", "",
             "| kernel | variant | arch | PTX instructions | registers | spills (B) |", "|---|---|---|---:|---:|---:|"]
    for kernel, before, after in ROWS:
        for arch in ("sm_80", "sm_90a"):
            b = index["before"].get((kernel, before, arch)) if before else None
            a = index["after"].get((kernel, after or before, arch))
            cell = lambda key: f"{b[key] if b else '-'} -> {a[key]}"  # noqa: E731
            spills = lambda r: r["spill_stores"] + r["spill_loads"] if r else "-"  # noqa: E731
            lines.append(f"| {kernel} | {after or before} | {arch} | {cell('ptx_instructions')} | "
                         f"{cell('registers')} | {spills(b)} -> {spills(a)} |")
    return "\n".join(lines)


if __name__ == "__main__":
    print(table())
