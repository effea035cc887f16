"""Generated inputs for every flag and every file the program reads (hypothesis): each example must end in
success or in a one-line error with exit code 1 or 2, never a traceback, and must leave the last.pt
already in the output folder byte-identical (a successful `train` is the one command that may replace it).

The examples are derandomized (the same ones every run), 80 per test (320 in all, well under a minute on
2 CPU cores); FUZZ_EXAMPLES=N runs N per test. main() runs in-process, with the bundled digits loaded once
and the digit classifier a quick one in a temporary cache: neither is what is under test. Valid values are
drawn small where size means time (steps, samples, DDIM steps); out-of-range ones come from the whole line.
Flags that name files are drawn as files (the last two tests), never as text: a fuzzed --out-dir could
name any folder on the machine.
"""
import contextlib
import functools
import hashlib
import io
import os
import shutil
from dataclasses import fields
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp
from PIL import Image

import ddim_inpaint as di

FUZZ = settings(max_examples=int(os.environ.get("FUZZ_EXAMPLES", "80")), derandomize=True, deadline=None,
                database=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
TINY = ["--data", "mnist5k", "--base-ch", "8", "--ch-mult", "1,2", "--amp", "off", "--no-perception",
        "--ddim-steps", "2", "--num-samples", "1", "--batch-size", "8", "--n-eval", "4"]
PATHS = ("out_dir", "results_dir", "ckpt", "images", "mask", "data_dir")
FLAGS = [f for f in fields(di.Options) if f.name not in (*PATHS, "debug", "force")]  # --debug shows tracebacks


@pytest.fixture(scope="module", autouse=True)
def quick_inputs(tmp_path_factory):
    """The bundled digits loaded once, and a 20-step judge in a temporary cache (not the user's)."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(di, "load_mnist5k", functools.cache(di.load_mnist5k))
        mp.setattr(di, "CLASSIFIER_DIR", tmp_path_factory.mktemp("classifier"))
        mp.setattr(di, "CLASSIFIER_STEPS", 20)
        yield


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A tiny trained run: its last.pt, and the hash of the bytes no example may change."""
    out = tmp_path_factory.mktemp("trained")
    assert di.main(["train", *TINY, "--steps", "2", "--panel-every", "0", "--out-dir", str(out)]) == 0
    return out / "last.pt", digest(out / "last.pt")


def outcome(argv: list[str], protected: Path, content: str, may_replace: bool = False) -> int:
    """Run main(argv) in-process; assert it ended well (success, or one line `error: ...` with exit 1 or 2)."""
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        try:
            code = di.main(argv)
        except BaseException as e:  # what a user would have seen as a traceback
            raise AssertionError(f"{argv}: {type(e).__name__}: {e}") from e
    lines = [line for line in err.getvalue().splitlines() if line.strip() and "\r" not in line]  # not tqdm's bars
    assert code in (0, 1, 2), f"{argv}: exit {code}"
    if code:
        assert lines and lines[-1].startswith("error: "), f"{argv}: exit {code} without a one-line error: {lines[-3:]}"
    if not (may_replace and code == 0):
        assert digest(protected) == content, f"{argv} changed {protected}"
    return code


def interval_values(allowed: str, integer: bool):
    """Values in and out of an interval such as "[1, 31]": a few small valid ones, the rest from anywhere."""
    lo, hi = (float(v) for v in allowed[1:-1].split(","))
    if integer:
        small = st.integers(int(lo), int(min(lo + 4, hi)))
        return st.one_of(small, st.integers(-2**70, int(lo) - 1), st.integers(int(min(hi, 2**70)) + 1, 2**80)).map(str)
    small = st.floats(lo, min(hi, lo + 4), exclude_min=allowed[0] == "(", exclude_max=allowed[-1] == ")")
    return st.one_of(small, st.floats(allow_nan=True, allow_infinity=True), st.sampled_from(
        ["nan", "-inf", "inf", "1e400", "-0.0"])).map(str)


def flag_values(f):
    """Generated command-line values for one field: of its own type and range, of the wrong type, and junk."""
    allowed = f.metadata["allowed"]
    junk = st.one_of(st.just(""), st.text(max_size=12), st.sampled_from(["1e3", "0x10", "--", "1,,2", "-1-2", " 7"]))
    flag = "--" + f.name.replace("_", "-")
    if isinstance(f.default, bool):
        return st.sampled_from([[flag], ["--no-" + f.name.replace("_", "-")], [flag, "maybe"]])
    if f.name == "data":  # full MNIST would be a download: the fuzz stays offline
        values = st.one_of(st.just("mnist5k"), junk)
    elif isinstance(allowed, tuple):
        values = st.one_of(st.sampled_from(allowed), junk)
    elif isinstance(allowed, str):
        values = st.one_of(interval_values(allowed, isinstance(f.default, int)), junk)
    else:  # --ch-mult and --train-box-sides: lists of numbers
        sep = "-" if f.name == "train_box_sides" else ","
        values = st.one_of(junk, st.lists(st.integers(-2, 40), min_size=1, max_size=6).map(lambda v: sep.join(map(str, v))))
    return values.map(lambda v: [flag, v])


def fresh_run(trained, tmp_path_factory) -> Path:
    """A folder holding a copy of the trained last.pt, for one example to write into."""
    folder = tmp_path_factory.mktemp("run")
    shutil.copy(trained[0], folder / "last.pt")
    return folder


@FUZZ
@given(st.lists(st.sampled_from(FLAGS).flatmap(flag_values), min_size=1, max_size=3), st.sampled_from(["sample", "eval"]))
def test_generated_flags_for_sample_and_eval_end_in_a_result_or_a_one_line_error(trained, tmp_path_factory, flags,
                                                                                  command):
    folder = fresh_run(trained, tmp_path_factory)
    argv = [command, *TINY, "--out-dir", str(folder), "--results-dir", str(folder / "results"), *sum(flags, [])]
    outcome(argv, folder / "last.pt", trained[1])


@FUZZ
@given(st.lists(st.sampled_from(FLAGS).flatmap(flag_values), min_size=1, max_size=2))
def test_generated_flags_for_train_end_in_a_run_or_a_one_line_error(trained, tmp_path_factory, flags):
    folder = fresh_run(trained, tmp_path_factory)
    argv = ["train", *TINY, "--steps", "1", "--panel-every", "0", "--out-dir", str(folder), *sum(flags, [])]
    outcome(argv, folder / "last.pt", trained[1], may_replace=True)


def arrays():
    """Arrays of every number type, 0-D to 4-D, empty sides included, NaN and inf among the floats; and masks
    that are nearly masks (one value, a greyscale line, 0/1, 0/255 and booleans of random sizes)."""
    def of(dtype):
        elements = st.floats(allow_nan=True, allow_infinity=True, width=16) if np.dtype(dtype).kind == "f" else None
        return hnp.arrays(dtype, hnp.array_shapes(min_dims=0, max_dims=4, min_side=0, max_side=12), elements=elements)

    dtypes = st.sampled_from([np.uint8, np.int16, np.int64, np.float16, np.float32, np.float64, np.bool_, np.complex64])
    masks = st.tuples(st.integers(1, 40), st.integers(1, 40), st.sampled_from([(0, 1), (0, 255), (False, True)])).flatmap(
        lambda s: hnp.arrays(np.uint8 if s[2][1] == 255 else type(s[2][1]), s[:2], elements=st.sampled_from(s[2])))
    return st.one_of(dtypes.flatmap(of), masks, st.sampled_from([0, 1, 7, 255]).map(lambda v: np.full((32, 32), v, np.uint8)),
                     st.just(np.tile(np.arange(32, dtype=np.uint8) * 8, (32, 1))))


@FUZZ
@given(arrays(), st.sampled_from(["--images", "--mask"]), st.sampled_from([".npy", ".npz", ".png"]),
       st.sampled_from([[], ["--mask-threshold", "0.5"], ["--invert"]]))
def test_generated_arrays_as_images_or_masks_end_in_a_result_or_a_one_line_error(trained, tmp_path_factory, a, flag,
                                                                                  suffix, extra):
    folder = tmp_path_factory.mktemp("arrays")
    path = folder / f"input{suffix}"
    if suffix == ".png" and a.dtype == np.uint8 and a.ndim == 2 and 0 not in a.shape:
        Image.fromarray(a).save(path)  # PIL writes 2-D uint8 greyscale; the other suffixes take the rest
    elif suffix == ".npz":
        np.savez(path, a, a) if a.size % 2 else np.savez(path, a)  # one array, or two (refused)
    else:
        np.save(path.with_suffix(".npy"), a)
        path = path.with_suffix(".npy")
    outcome(["sample", *TINY, "--ckpt", str(trained[0]), "--out-dir", str(folder), flag, str(path), *extra],
            trained[0], trained[1])


def mutated(content: bytes, data) -> bytes:
    """A valid file's bytes, truncated, with bytes overwritten, or with junk spliced in."""
    how, b = data.draw(st.sampled_from(["truncate", "overwrite", "splice"])), bytearray(content)
    if how == "truncate":
        return content[:data.draw(st.integers(0, len(content)))]
    for _ in range(data.draw(st.integers(1, 8))):
        i = data.draw(st.integers(0, len(b) - 1))
        if how == "overwrite":
            b[i] = data.draw(st.integers(0, 255))
        else:
            b[i:i] = data.draw(st.binary(min_size=1, max_size=16))
    return bytes(b)


@FUZZ
@given(st.data())
def test_generated_file_bytes_for_images_masks_and_checkpoints_end_in_a_result_or_a_one_line_error(trained,
                                                                                                  tmp_path_factory,
                                                                                                  data):
    folder = tmp_path_factory.mktemp("bytes")
    flag = data.draw(st.sampled_from(["--images", "--mask", "--ckpt"]))
    if flag == "--images":
        Image.fromarray(np.zeros((28, 28), np.uint8)).save(folder / "valid.png")
    elif flag == "--mask":
        np.save(folder / "valid.npy", di.centre_mask(16)[0, 0].numpy().astype(np.uint8))
    valid = (trained[0] if flag == "--ckpt" else next(folder.glob("valid.*"))).read_bytes()
    raw = mutated(valid, data) if data.draw(st.booleans()) else data.draw(st.binary(max_size=300))
    suffix = data.draw(st.sampled_from([".png", ".npy", ".npz", ".pt", ".jpg", ".txt", ""]))
    path = folder / f"input{suffix}"
    path.write_bytes(raw)
    outcome(["sample", *TINY, "--ckpt", str(path if flag == "--ckpt" else trained[0]), "--out-dir", str(folder),
             *([] if flag == "--ckpt" else [flag, str(path)])], trained[0], trained[1])
