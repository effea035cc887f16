"""Mutation score of the lesson's maths: mutmut over Part I of ddim_inpaint.py and the reference and
coefficient helpers of kernels.py, run against the oracle tests (tests/test_oracles.py).

    make -C studies mutants      # installs mutmut into .venv; writes studies/mutants/score.json and survivors.md

Each mutant is one small edit of the kind a typo makes (a flipped sign, an off-by-one, a swapped
argument); the score is the share the tests kill. A surviving mutant is either a gap in the tests or
equivalent: it changes no behaviour the program has. The equivalent ones are named, with the reason,
in equivalent.json (matched by function and mutated line), so a new survivor stands out.
"""
from __future__ import annotations

import argparse
import ast
import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
PART_TWO = "# # Part II"  # the banner that ends the lesson in ddim_inpaint.py
PART_TWO_MATHS = ("bootstrap_ci", "frechet_distance", "score", "eval_table")  # the eval table's formulas
KERNEL_MATHS = ("ddim_step_coeffs", "predict_x0", "split_prediction_ref", "ddim_dc_step_ref",
                "masked_error_sums_ref", "masked_psnr", "masked_l1")


def lesson_functions(path: Path) -> list[str]:
    """mutmut's keys ("x_name", "xǁClassǁmethod") of every function and method defined before Part II."""
    source = path.read_text()
    end = source.index(PART_TWO)
    end_line = source[:end].count("\n") + 1
    keys = []
    for node in ast.parse(source).body:
        if isinstance(node, ast.FunctionDef) and (node.lineno < end_line or node.name in PART_TWO_MATHS):
            keys.append(f"x_{node.name}")
        if node.lineno >= end_line:
            continue
        elif isinstance(node, ast.ClassDef):
            keys += [f"xǁ{node.name}ǁ{f.name}" for f in node.body if isinstance(f, ast.FunctionDef)]
    return keys


def prepare(work: Path, tests: list[str]) -> None:
    """A copy of the two files and the oracle tests, with mutmut's config, so the checkout stays clean."""
    shutil.rmtree(work, ignore_errors=True)
    (work / "tests").mkdir(parents=True)
    for name in ("ddim_inpaint.py", "kernels.py", "tests/conftest.py", *tests):
        shutil.copy(ROOT / name, work / name)
    (work / "setup.cfg").write_text(
        "[mutmut]\nsource_paths =\n    ddim_inpaint.py\n    kernels.py\n"
        "pytest_add_cli_args_test_selection =\n" + "".join(f"    {t}\n" for t in tests)
        + "pytest_add_cli_args =\n    -p\n    no:cacheprovider\n    -q\n"
        "process_isolation = forkserver\nuse_git_change_detection = false\n")


def mutmut(work: Path, *args: str, check=True) -> str:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "mutmut", *args], cwd=work, env=env, capture_output=True,
                          text=True)
    if check and proc.returncode != 0:
        sys.exit(f"mutmut {' '.join(args[:1])} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return proc.stdout


SHOW_DIFFS = """import json, sys
from mutmut.mutation.diff_apply import find_mutant, get_diff_for_mutant
names = json.load(sys.stdin)
print(json.dumps({n: get_diff_for_mutant(n, path=find_mutant(n).path) for n in names}))
"""  # what `mutmut show` prints, for many mutants in one process


def mutmut_python(work: Path, code: str, stdin: str) -> str:
    proc = subprocess.run([sys.executable, "-c", code], cwd=work, input=stdin, capture_output=True, text=True)
    if proc.returncode != 0:
        sys.exit(f"reading the mutants' diffs failed:\n{proc.stderr[-3000:]}")
    return proc.stdout


def mutated_line(diff: str) -> str:
    """The first added line of a mutant's diff, stripped: what the mutant changed the code to."""
    added = [line[1:].strip() for line in diff.splitlines() if line.startswith("+") and not line.startswith("+++")]
    return added[0] if added else ""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tests", nargs="+", default=["tests/test_oracles.py"], help="test files to run")
    parser.add_argument("--out", type=Path, default=HERE, help="where score.json and survivors.md go")
    parser.add_argument("--jobs", type=int, default=os.cpu_count() or 2, help="mutants tested at once")
    args = parser.parse_args()

    work = HERE / "work"
    prepare(work, args.tests)
    targets = [f"ddim_inpaint.{k}" for k in lesson_functions(ROOT / "ddim_inpaint.py")] + \
              [f"kernels.x_{name}" for name in KERNEL_MATHS]
    t0 = time.time()
    print(f"mutmut over {len(targets)} functions against {' '.join(args.tests)} ({args.jobs} at once)", flush=True)
    mutmut(work, "run", "--max-children", str(args.jobs), *[f"{t}__mutmut_*" for t in targets])
    seconds = time.time() - t0

    statuses = {}
    for line in mutmut(work, "results", "--all", "true").splitlines():
        m = re.match(r"\s+(\S+): (.+)$", line)
        if m and any(m.group(1).startswith(t + "__mutmut_") for t in targets):
            statuses[m.group(1)] = m.group(2)
    notes = json.loads((HERE / "equivalent.json").read_text()) if (HERE / "equivalent.json").is_file() else []
    diffs = json.loads(mutmut_python(work, SHOW_DIFFS, json.dumps([n for n, s in statuses.items() if s != "killed"])))
    rows = []
    for name, status in sorted(statuses.items()):
        row = {"mutant": name, "function": name.split(".", 1)[1].rsplit("__mutmut_", 1)[0], "status": status}
        if status != "killed":
            row["diff"], row["line"] = diffs[name], mutated_line(diffs[name])
            why = [n["why"] for n in notes if n["function"] == row["function"] and n["line"] == row["line"]]
            if why and status == "survived":
                row["status"], row["why"] = "equivalent", why[0]
        rows.append(row)
    count = {s: sum(r["status"] == s for r in rows) for s in sorted({r["status"] for r in rows})}
    changes_behaviour = len(rows) - count.get("equivalent", 0)
    score = {"tests": args.tests, "functions": len(targets), "mutants": len(rows), "count": count,
             "killed_of_behaviour_changing": f"{count.get('killed', 0)} / {changes_behaviour}",
             "seconds": round(seconds), "mutmut": mutmut(work, "--version").strip(), "machine": os.uname().machine,
             "cpus": os.cpu_count()}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "score.json").write_text(json.dumps({**score, "mutants_not_killed": [
        {k: r[k] for k in ("mutant", "status", "line", "why") if k in r} for r in rows if r["status"] != "killed"]},
        indent=1) + "\n")
    with open(args.out / "survivors.md", "w") as f:
        f.write(f"# Mutants not killed ({' '.join(args.tests)})\n\n{json.dumps(count)}\n\n")
        for r in rows:
            if r["status"] != "killed":
                f.write(f"## {r['mutant']}: {r['status']}\n{r.get('why', '')}\n\n```diff\n{r['diff'].strip()}\n```\n\n")
    print(json.dumps(score, indent=1))
    print(f"wrote {args.out / 'score.json'} and {args.out / 'survivors.md'}")


if __name__ == "__main__":
    main()
