"""Hard knocks, driven through the command line as a user would: bad input, interrupted and killed
runs, untrusted checkpoints, your own digits, and determinism."""
import json
import math
import os
import pickle
import re
import signal
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import ddim_inpaint as di

ROOT = Path(__file__).resolve().parents[1]
TINY = ["--data", "mnist5k", "--base-ch", "8", "--ch-mult", "1,2", "--batch-size", "16", "--steps", "4",
        "--warmup", "2", "--panel-every", "0", "--ckpt-every", "2", "--amp", "off"]
FAST_SAMPLING = ["--data", "mnist5k", "--ddim-steps", "2", "--n-eval", "8", "--num-samples", "1",
                 "--no-perception"]  # the judge is test_perception.py's, and its cache the user's


def cli(*args, timeout=300, env=None, cwd=ROOT):
    """Run `python ddim_inpaint.py ARGS` in a fresh process; returns the CompletedProcess."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}
    return subprocess.run([sys.executable, str(ROOT / "ddim_inpaint.py"), *map(str, args)], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=timeout)


def assert_one_line_error(proc, code: int, *words):
    err = proc.stderr.strip()
    assert proc.returncode == code, f"exit {proc.returncode}, expected {code}; stderr: {err}"
    assert "Traceback" not in err, f"traceback shown without --debug:\n{err}"
    last = err.splitlines()[-1] if err else ""
    assert last.startswith("error: "), f"no one-line error: {err!r}"
    for word in words:
        assert word in last, f"{word!r} missing from {last!r}"


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A tiny trained run folder, shared by the tests that only read it."""
    out = tmp_path_factory.mktemp("trained")
    assert di.main(["train", *TINY, "--out-dir", str(out)]) == 0
    return out


# --- bad input: exit 2 for usage, 1 for runtime failures, one line, no traceback -----------------
@pytest.mark.parametrize("args,flag", [
    (["--bogus", "1"], "--bogus"),
    (["--steps", "ten"], "--steps"),
    (["--hole", "0"], "--hole"),
    (["--hole", "32"], "--hole"),
    (["--steps", "0"], "--steps"),
    (["--ddim-steps", "0"], "--ddim-steps"),
    (["--ddim-steps", "1001"], "--ddim-steps"),
    (["--eta", "-0.5"], "--eta"),
    (["--eta", "1.5"], "--eta"),  # DDIM's sigma is defined for 0 <= eta <= 1
    (["--seed", "-1"], "--seed"),
    (["--train-mask", "round"], "--train-mask"),
    (["--mask-set", "round"], "--mask-set"),
    (["--train-mask-centre", "1.5"], "--train-mask-centre"),
    (["--train-box-sides", "4,30"], "--train-box-sides"),
    (["--train-box-sides", "20-12"], "--train-box-sides"),
    (["--mask", "examples/mask_offcentre.png", "--mask-set", "box"], "--mask-set"),
    (["--dc-repeats", "0"], "--dc-repeats"),
    (["--num-samples", "0"], "--num-samples"),
    (["--batch-size", "0"], "--batch-size"),
    (["--lr", "0"], "--lr"),
    (["--ema-decay", "1"], "--ema-decay"),
    (["--ema-decay", "-0.1"], "--ema-decay"),
    (["--ch-mult", "1,x"], "--ch-mult"),
    (["--device", "gpu0"], "--device"),
    (["--device", "cuda" if not torch.cuda.is_available() else f"cuda:{torch.cuda.device_count()}"], "--device"),
])
def test_bad_flag_is_a_usage_error(args, flag, tmp_path):
    proc = cli("train", *args, "--out-dir", tmp_path)
    assert_one_line_error(proc, 2, flag)
    assert not (tmp_path / "last.pt").exists()


def test_a_numbered_gpu_is_checked_and_made_current_for_its_cuda_graphs(monkeypatch):
    made_current = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "set_device", made_current.append)
    assert di.pick_device("cuda") == torch.device("cuda") and made_current == []  # the current one already
    assert di.pick_device("cuda:1") == torch.device("cuda", 1) and made_current == [torch.device("cuda", 1)]
    with pytest.raises(di.UserError, match=r"--device cuda:2: this machine has 2 CUDA GPU\(s\), numbered from 0"):
        di.pick_device("cuda:2")


def test_debug_shows_the_traceback():
    proc = cli("train", "--hole", "0", "--debug")
    assert proc.returncode != 0 and "Traceback" in proc.stderr


def test_missing_checkpoint(tmp_path):
    # cwd: a folder without outputs/inpaint/last.pt, the default checkpoint sample falls back to
    assert_one_line_error(cli("sample", "--out-dir", tmp_path, cwd=tmp_path), 1, "no checkpoint", "make train")


def test_sample_writes_elsewhere_with_one_flag(tmp_path):
    # `make train` writes outputs/inpaint/last.pt; `sample --out-dir pics` reads it and writes pictures to pics/.
    assert cli("train", *TINY, cwd=tmp_path).returncode == 0
    proc = cli("sample", "--out-dir", "pics", *FAST_SAMPLING, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert (tmp_path / "pics" / "samples.png").is_file() and not (tmp_path / "pics" / "last.pt").exists()
    assert "checkpoint outputs/inpaint/last.pt" in proc.stdout
    help_text = " ".join(cli("--help").stdout.split())
    assert "by default <out-dir>/last.pt, or outputs/inpaint/last.pt" in help_text, "--help must say where"


def test_eval_checks_the_results_folder_before_the_work(trained, tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    proc = cli("eval", "--out-dir", trained, "--results-dir", blocker / "results", *FAST_SAMPLING)
    assert_one_line_error(proc, 1, "--results-dir")
    assert "hole-only metrics" not in proc.stdout, "the table was computed before the folder was checked"


@pytest.mark.parametrize("damage", ["truncated", "random bytes", "other format", "other version", "empty"])
def test_damaged_or_foreign_checkpoint_is_refused(damage, trained, tmp_path):
    good = (trained / "last.pt").read_bytes()
    bad = tmp_path / "last.pt"
    if damage == "truncated":
        bad.write_bytes(good[: len(good) // 2])
    elif damage == "random bytes":
        bad.write_bytes(np.random.default_rng(0).bytes(4096))
    elif damage == "empty":
        bad.write_bytes(b"")
    elif damage == "other format":
        torch.save({"state_dict": {"w": torch.zeros(3)}}, bad)
    else:
        ckpt = torch.load(trained / "last.pt", weights_only=True)
        torch.save({**ckpt, "version": 99}, bad)
    proc = cli("eval", "--ckpt", bad, "--out-dir", tmp_path, *FAST_SAMPLING)
    assert_one_line_error(proc, 1, str(bad))


def test_flags_that_contradict_the_checkpoint_are_ignored_and_named(trained, tmp_path):
    proc = cli("sample", "--out-dir", trained, "--base-ch", "64", "--pred", "x0", *FAST_SAMPLING)
    assert proc.returncode == 0, proc.stderr
    assert "ignoring --pred, --base-ch" in proc.stdout


def test_unwritable_output_folder(tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    assert_one_line_error(cli("train", *TINY, "--out-dir", blocker / "out"), 1, "--out-dir")


@pytest.mark.parametrize("case", ["missing", "empty folder", "not an image", "wrong shape", "wrong dtype",
                                  "float out of range", "too small", "too small in a folder"])
def test_bad_images_input(case, trained, tmp_path):
    path = tmp_path / "in"
    if case == "empty folder":
        path.mkdir()
    elif case == "not an image":
        path.mkdir()
        (path / "digit.png").write_text("this is text, not a PNG")
    elif case == "wrong shape":
        path = tmp_path / "x.npy"
        np.save(path, np.zeros((4, 2, 28, 28), np.uint8))
    elif case == "wrong dtype":
        path = tmp_path / "x.npy"
        np.save(path, np.zeros((4, 28, 28), np.int64))
    elif case == "float out of range":
        path = tmp_path / "x.npy"
        np.save(path, np.full((4, 28, 28), 255.0, np.float32))
    elif case == "too small":  # (3, 5): one 3x5 image, not three digits; upscaled it would be noise
        path = tmp_path / "x.npy"
        np.save(path, np.zeros((3, 5), np.uint8))
    elif case == "too small in a folder":
        path.mkdir()
        Image.fromarray(np.zeros((28, 28), np.uint8)).save(path / "a.png")
        Image.fromarray(np.zeros((6, 28), np.uint8)).save(path / "b.png")
    proc = cli("sample", "--out-dir", trained, "--images", path, *FAST_SAMPLING)
    assert_one_line_error(proc, 1, str(path))
    if case.startswith("too small"):
        assert "too small for a digit" in proc.stderr and ("3x5" in proc.stderr or "6x28" in proc.stderr)


# --- full MNIST, the default when online: torchvision's own loader on a tiny copy in its layout -----
def write_mnist_idx(root: Path, n_train: int = 48, n_test: int = 24) -> dict:
    """A tiny MNIST in torchvision's on-disk layout (<root>/MNIST/raw/*-ubyte, the idx format), made from
    the bundled digits, so that `--data mnist` runs the real loading code offline. Returns the labels."""
    import struct

    data = di.load_mnist5k()
    raw = root / "MNIST" / "raw"
    raw.mkdir(parents=True)
    labels = {}
    for prefix, x, y, n in (("train", data.train, data.train_labels, n_train), ("t10k", data.test, data.test_labels, n_test)):
        pick = torch.randperm(len(x), generator=torch.Generator().manual_seed(n))[:n]
        images = torch.nn.functional.interpolate((x[pick] + 1) / 2, size=(28, 28), mode="bilinear")
        images = (images[:, 0] * 255).round().byte().numpy()
        (raw / f"{prefix}-images-idx3-ubyte").write_bytes(struct.pack(">IIII", 2051, n, 28, 28) + images.tobytes())
        (raw / f"{prefix}-labels-idx1-ubyte").write_bytes(struct.pack(">II", 2049, n) + y[pick].byte().numpy().tobytes())
        labels[prefix] = y[pick]
    return labels


@pytest.mark.parametrize("data", ["mnist", "auto"])
def test_full_mnist_through_torchvision_from_local_files(data, tmp_path):
    labels = write_mnist_idx(tmp_path / "data")
    proc = cli("train", *TINY, "--data", data, "--data-dir", tmp_path / "data", "--out-dir", tmp_path / "out")
    assert proc.returncode == 0, proc.stderr
    assert "on mnist (48 digits)" in proc.stdout, proc.stdout
    assert "unavailable" not in proc.stdout
    loaded = di.load_data(di.Options(data="mnist", data_dir=str(tmp_path / "data")))  # in-process: as written
    assert loaded.train.shape == (48, 1, 32, 32) and loaded.test.shape == (24, 1, 32, 32)
    assert torch.equal(loaded.train_labels, labels["train"]) and torch.equal(loaded.test_labels, labels["t10k"])


def test_data_mnist_without_the_files_is_a_clear_error(tmp_path):
    proc = cli("train", *TINY, "--data", "mnist", "--data-dir", tmp_path / "empty", "--out-dir", tmp_path / "out")
    assert_one_line_error(proc, 1, "full MNIST is not in", "--data mnist5k")
    assert not (tmp_path / "out" / "last.pt").exists()


# --- your own digits and masks ------------------------------------------------------------------
def test_own_digits_from_a_folder_with_inverted_scans(trained, tmp_path):
    digits = ((di.load_mnist5k().test[:3, 0] + 1) * 127.5).round().byte().numpy()  # (3, 32, 32) uint8
    folder = tmp_path / "scans"
    folder.mkdir()
    for i, d in enumerate(digits):  # dark on light, 28x28, colour: everything a scan might be
        Image.fromarray(255 - d).resize((28, 28)).convert("RGB").save(folder / f"scan{i}.png")
    (folder / "notes.txt").write_text("ignored: not an image suffix")
    out = tmp_path / "out"
    proc = cli("sample", "--ckpt", trained / "last.pt", "--out-dir", out, "--images", folder, "--invert",
               *FAST_SAMPLING)
    assert proc.returncode == 0, proc.stderr
    assert "resizing 3 image(s) from 28x28 to 32x32" in proc.stdout
    written = sorted(p.name for p in (out / "inpainted").iterdir())
    assert written == ["scan0.png", "scan1.png", "scan2.png"]
    inpainted = np.asarray(Image.open(out / "inpainted" / "scan0.png").convert("L"))
    assert inpainted.shape == (32, 32) and inpainted[0, 0] < 50, "inverted scan: the background must come out black"

    proc = cli("eval", "--ckpt", trained / "last.pt", "--out-dir", out, "--results-dir", out, "--images", folder,
               "--invert", *FAST_SAMPLING)
    assert proc.returncode == 0, proc.stderr
    assert json.loads((out / "inpaint_metrics.json").read_text())["n_eval"] == 3


def test_own_digits_from_an_array_and_a_custom_mask(trained, tmp_path):
    x = (di.load_mnist5k().test[:4, 0] + 1) / 2  # (4, 32, 32) float in [0, 1]
    np.save(tmp_path / "digits.npy", x.numpy())
    mask = np.full((32, 32), 255, np.uint8)
    mask[:, 20:] = 0  # the right third is missing
    Image.fromarray(mask).save(tmp_path / "mask.png")
    proc = cli("sample", "--ckpt", trained / "last.pt", "--out-dir", tmp_path, "--images", tmp_path / "digits.npy",
               "--mask", tmp_path / "mask.png", *FAST_SAMPLING)
    assert proc.returncode == 0, proc.stderr
    out = np.load(tmp_path / "inpainted.npy")
    assert out.shape == (4, 32, 32)
    np.testing.assert_allclose(out[:, :, :20], x[:, :, :20].numpy(), atol=1e-6, err_msg="known pixels changed")
    assert not np.allclose(out[:, :, 20:], x[:, :, 20:].numpy(), atol=1e-3)


def test_own_digits_from_an_npz_archive(trained, tmp_path):
    x = ((di.load_mnist5k().test[:3] + 1) * 127.5).round().byte().numpy()  # (3, 1, 32, 32) uint8
    np.savez(tmp_path / "digits.npz", digits=x)
    proc = cli("sample", "--ckpt", trained / "last.pt", "--out-dir", tmp_path, "--images", tmp_path / "digits.npz",
               *FAST_SAMPLING)
    assert proc.returncode == 0, proc.stderr
    out = np.load(tmp_path / "inpainted.npy")
    assert out.shape == (3, 32, 32) and out.dtype == np.float32
    known = di.centre_mask(16)[0, 0].numpy() > 0.5
    np.testing.assert_allclose(out[:, known], x[:, 0][:, known] / 255.0, atol=1e-6, err_msg="known pixels changed")
    np.savez(tmp_path / "two.npz", a=x, b=x)
    proc = cli("sample", "--ckpt", trained / "last.pt", "--out-dir", tmp_path, "--images", tmp_path / "two.npz",
               *FAST_SAMPLING)
    assert_one_line_error(proc, 1, "holds 2 arrays", "save exactly one")


def test_bf16_sampling_stays_close_to_fp32_sampling(trained):
    # bf16 autocast rounds the U-Net's activations to 8 bits of mantissa. For this tiny model, through 10
    # deterministic steps, that moved the fills by 3e-5 on average (max 1e-3) and the hole PSNR by 1e-4 dB
    # here; the bounds leave 10x room for other CPUs' bf16 kernels. Broken casts would move them by 0.1+.
    run = di.prepare_inference(di.Options(ckpt=str(trained / "last.pt"), ddim_steps=10, data="mnist5k"), set(), n=1)
    cfg, model = run.cfg, run.model
    x0, mask = di.load_mnist5k().test[:32], di.centre_mask(16)
    sched = di.Schedule(cfg.schedule, cfg.timesteps, torch.device("cpu"))
    fills = {amp: di.inpaint_digits(model, sched, x0, list(range(32)), mask, replace(cfg, amp=amp),
                                    torch.device("cpu")) for amp in ("off", "bf16")}
    diff = (fills["bf16"] - fills["off"]).abs()
    psnr = {amp: di.score(f, x0, mask, "torch")["psnr"] for amp, f in fills.items()}
    assert 0 < diff.mean() < 5e-4 and diff.max() < 1e-2, f"bf16 - fp32: mean {diff.mean():.2e}, max {diff.max():.2e}"
    assert abs(psnr["bf16"] - psnr["off"]) < 0.01, psnr


@pytest.mark.parametrize("flag", [["--backend", "triton"], ["--noise", "philox"]], ids=["backend", "noise"])
def test_gpu_kernel_options_on_the_cpu_are_refused_before_any_work(flag, trained, tmp_path):
    # Without the interpreter a Triton kernel cannot take CPU tensors: say so, naming the flag.
    proc = cli("eval", *FAST_SAMPLING, "--device", "cpu", *flag, "--out-dir", trained, "--results-dir", tmp_path,
               env={"TRITON_INTERPRET": "0"})
    assert_one_line_error(proc, 2, flag[0], flag[1])
    assert not (tmp_path / "inpaint_metrics.json").exists()
    # train too: its panels sample with the same flags, and would fail only at the first panel
    proc = cli("train", *TINY, "--device", "cpu", *flag, "--out-dir", tmp_path / "run", env={"TRITON_INTERPRET": "0"})
    assert_one_line_error(proc, 2, flag[0], flag[1])
    assert not (tmp_path / "run" / "last.pt").exists()


def test_mask_without_hole_is_refused(trained, tmp_path):
    np.save(tmp_path / "mask.npy", np.ones((32, 32), np.float32))
    proc = cli("sample", "--out-dir", trained, "--mask", tmp_path / "mask.npy", *FAST_SAMPLING)
    assert_one_line_error(proc, 1, "no hole pixels")


# --- masks say what they are; holes the model never trained on are named -------------------------
def save_mask(tmp_path, a, name="mask.npy"):
    path = tmp_path / name
    Image.fromarray(a).save(path) if name.endswith(".png") else np.save(path, a)
    return str(path)


@pytest.mark.parametrize("dtype,known", [(bool, True), (np.uint8, 1), (np.uint8, 255), (np.int64, 1),
                                         (np.float32, 1.0), (np.float64, 255.0)])
def test_masks_of_booleans_0_1_or_0_255_in_any_exact_dtype_are_read_as_they_are(tmp_path, dtype, known):
    a = np.zeros((32, 32), dtype)
    a[:, :20] = known
    m = di.load_mask(save_mask(tmp_path, a))
    assert m.shape == (1, 1, 32, 32) and torch.equal(m[0, 0], torch.from_numpy(a != 0).float())


@pytest.mark.parametrize("value,shown", [(7, "holds 0, 7"), (0.5, "holds 0, 0.5"), (np.nan, "holds 0, nan")])
def test_a_mask_of_other_values_is_refused_with_the_values_found_and_the_threshold_fix(tmp_path, value, shown):
    a = np.zeros((32, 32), np.float32 if isinstance(value, float) else np.uint8)
    a[:, :20] = value
    with pytest.raises(di.UserError, match=f"{shown}: a mask is 0/1, 0/255 or booleans.*--mask-threshold 0.5"):
        di.load_mask(save_mask(tmp_path, a))


def test_a_greyscale_mask_is_read_only_through_its_threshold(tmp_path):
    grey = np.tile(np.arange(0, 256, 8, dtype=np.uint8), (32, 1))  # 0 .. 248 across
    path = save_mask(tmp_path, grey, "grey.png")
    assert torch.equal(di.load_mask(path, 0.5)[0, 0], torch.from_numpy(grey >= 127.5).float())
    as_float = save_mask(tmp_path, grey / 255.0, "grey.npy")
    assert torch.equal(di.load_mask(as_float, 0.5)[0, 0], torch.from_numpy(grey / 255.0 >= 0.5).float())
    with pytest.raises(di.UserError, match="NaN or inf"):
        di.load_mask(save_mask(tmp_path, np.full((32, 32), np.nan, np.float32), "nan.npy"), 0.5)


@pytest.mark.parametrize("a,words", [(np.zeros((32, 32), np.uint8), "no known pixel"),
                                     (np.ones((32, 32), np.uint8), "no hole pixels"),
                                     (np.ones((32, 32), np.complex64), "dtype complex64 is not supported"),
                                     (np.ones((2, 32, 32), np.uint8), "expected one (H, W) mask")])
def test_a_mask_with_nothing_to_inpaint_from_or_of_no_mask_shape_is_refused(tmp_path, a, words):
    with pytest.raises(di.UserError, match=re.escape(words)):
        di.load_mask(save_mask(tmp_path, a))


def test_the_mask_threshold_needs_a_mask_and_lies_in_0_1(trained):
    assert_one_line_error(cli("sample", "--out-dir", trained, "--mask-threshold", "0.5"), 2, "reads a --mask")
    assert_one_line_error(cli("sample", "--out-dir", trained, "--mask", "m.png", "--mask-threshold", "2"), 2,
                          "--mask-threshold 2.0 is out of range")


def box(top, left, h, w):
    m = torch.ones(1, 1, 32, 32)
    m[..., top:top + h, left:left + w] = 0
    return m


@pytest.mark.parametrize("trained_on,mask,fix", [
    ({}, di.centre_mask(16), None),
    ({}, di.centre_mask(12), None),  # inside the trained centre hole
    ({}, di.centre_mask(20), "--train-mask box (or free)"),
    ({}, box(2, 2, 10, 10), "--train-mask box (or free)"),
    ({"train_mask": "box", "train_box_sides": "8-20"}, box(4, 6, 12, 20), None),
    ({"train_mask": "box", "train_box_sides": "8-20"}, box(4, 6, 12, 22), "--train-mask free"),
    ({"train_mask": "box", "train_box_sides": "8-20"}, box(0, 6, 12, 12), "--train-mask free"),  # in the margin
    ({"train_mask": "box", "train_box_sides": "8-12", "train_mask_centre": 0.5}, di.centre_mask(16), None),
    ({"train_mask": "box", "train_box_sides": "8-12"}, di.centre_mask(16), "--train-mask free"),
    ({"train_mask": "free"}, box(0, 0, 30, 30), None),
])
def test_a_hole_beyond_what_the_checkpoint_trained_on_is_named_with_the_flag_that_trains_for_it(trained_on, mask,
                                                                                                  fix):
    warning = di.unseen_holes(mask, di.Options(**trained_on))
    assert warning == "" if fix is None else warning.startswith("warning: the model was trained on ") and \
        warning.endswith(f"the hole reaches beyond it, so the fills are guesses: train with {fix}")


def test_eval_names_unseen_holes_in_its_table_and_json_and_says_how_many_digits_it_scored(trained, tmp_path):
    proc = cli("eval", "--out-dir", trained, "--results-dir", tmp_path, *FAST_SAMPLING, "--n-eval", "1000000",
               "--mask-set", "box", "--batch-size", "500")
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    header = next(i for i, line in enumerate(lines) if line.startswith("hole-only metrics on"))
    warning = "warning: the model was trained on the 16x16 centre hole only; "
    assert lines[header + 1].startswith(warning) and "--train-mask box (or free)" in lines[header + 1]
    assert "note: --n-eval 1000000 asks for more digits than there are; scoring all 1000" in lines
    result = json.loads((tmp_path / "inpaint_metrics.json").read_text())
    assert result["n_eval"] == 1000 and result["warning"].startswith(warning)


def test_resume_with_other_model_flags_refuses_and_names_them(trained, tmp_path):
    import shutil

    shutil.copy(trained / "last.pt", tmp_path / "last.pt")
    before = (tmp_path / "last.pt").read_bytes()
    proc = cli("train", *TINY, "--base-ch", "16", "--pred", "eps", "--out-dir", tmp_path, "--resume")
    assert_one_line_error(proc, 2, "holds another model (--pred v, --base-ch 8)", "train into a new --out-dir")
    assert (tmp_path / "last.pt").read_bytes() == before


# --- faults: interrupts, kills, NaN, two runs at once --------------------------------------------
def test_sigint_saves_a_checkpoint_and_resume_reaches_the_final_step(tmp_path):
    args = [*TINY, "--steps", "100000", "--ckpt-every", "100000", "--out-dir", tmp_path]
    proc = subprocess.Popen([sys.executable, str(ROOT / "ddim_inpaint.py"), "train", *map(str, args)], cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    deadline = time.time() + 120
    while not (tmp_path / "train.lock").exists() and time.time() < deadline:
        time.sleep(0.2)
    time.sleep(3)  # a few training steps
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    assert "continue with --resume" in err and "Traceback" not in err
    step = torch.load(tmp_path / "last.pt", weights_only=True)["step"]
    assert 0 < step < 100000
    assert not (tmp_path / "train.lock").exists(), "the lock must be released on exit"

    final = step + 3
    done = cli("train", *TINY, "--steps", final, "--out-dir", tmp_path, "--resume")
    assert done.returncode == 0, done.stderr
    assert f"resumed from {tmp_path / 'last.pt'} at step {step}" in done.stdout
    assert torch.load(tmp_path / "last.pt", weights_only=True)["step"] == final


def test_sigkill_during_a_checkpoint_write_leaves_the_previous_checkpoint_loadable(tmp_path):
    path = tmp_path / "last.pt"
    di.save_checkpoint(path, {"step": 1, "w": torch.ones(3)})
    writer = subprocess.Popen([sys.executable, "-c", (
        "import sys, torch, ddim_inpaint as di\n"
        "big = {'step': 2, 'w': torch.randn(64, 1024, 1024)}  # 256 MB: the write takes a while\n"
        "while True: di.save_checkpoint(di.Path(sys.argv[1]), big)\n"), str(path)], cwd=ROOT)
    tmp = path.with_name(path.name + ".tmp")
    deadline = time.time() + 120
    while not (tmp.exists() and tmp.stat().st_size > 0) and time.time() < deadline:
        time.sleep(0.01)
    writer.send_signal(signal.SIGKILL)  # mid-write: the temporary file is there, last.pt untouched
    writer.wait(timeout=60)
    ckpt = torch.load(path, weights_only=True)
    assert ckpt["step"] in (1, 2) and (ckpt["step"] == 1) == (ckpt["w"].numel() == 3)


@pytest.mark.parametrize("error", [OSError(28, "No space left on device"), RuntimeError("PytorchStreamWriter failed")])
def test_a_full_disk_keeps_the_previous_checkpoint_and_says_so_on_one_line(tmp_path, monkeypatch, error):
    path = tmp_path / "last.pt"
    di.save_checkpoint(path, {"step": 1})

    def full(state, f):
        f.write(b"half a checkpoint")
        raise error

    monkeypatch.setattr(torch, "save", full)
    with pytest.raises(di.UserError, match=r"^could not write .*last.pt \((No space left on device|PytorchStreamWriter "
                       r"failed)\); the previous last.pt is kept: free some space"):
        di.save_checkpoint(path, {"step": 2})
    assert torch.load(path, weights_only=True) == {"step": 1} and not path.with_name("last.pt.tmp").exists()
    with pytest.raises(di.UserError, match="nothing was saved"):
        di.save_checkpoint(tmp_path / "new.pt", {"step": 2})


def test_nan_loss_stops_training_and_keeps_the_last_good_checkpoint(tmp_path):
    proc = cli("train", *TINY, "--steps", "50", "--ckpt-every", "1", "--lr", "1e6", "--warmup", "0",
               "--grad-clip", "0", "--out-dir", tmp_path)
    assert_one_line_error(proc, 1, "step", "keeps the last good")
    ckpt = torch.load(tmp_path / "last.pt", weights_only=True)
    assert all(torch.isfinite(v).all() for v in ckpt["model"].values())


@pytest.mark.parametrize("ckpt_every", [4, 20])
def test_losses_read_in_batches_still_stop_on_the_first_nan_before_any_file_holds_it(tmp_path, monkeypatch, ckpt_every):
    # On a GPU the losses are read every 10 steps: a NaN at step 7 has reached the weights by then, so
    # the checkpoint at step 8 (or the read at step 10) must name step 7 and save nothing after step 4.
    real, calls = di.diffusion_loss, []

    def nan_at_step_7(*args):
        calls.append(1)
        loss = real(*args)
        return loss * math.nan if len(calls) >= 7 else loss

    monkeypatch.setattr(di, "diffusion_loss", nan_at_step_7)
    cfg = di.Options(base_ch=8, ch_mult="1,2", steps=30, batch_size=8, panel_every=0, ckpt_every=ckpt_every,
                     out_dir=str(tmp_path))
    labels = torch.zeros(32, dtype=torch.long)
    data = di.Data("fake", torch.rand(32, 1, 32, 32) * 2 - 1, torch.rand(10, 1, 32, 32) * 2 - 1, labels, labels[:10])
    with di.TrainingRun(cfg) as run:
        run.read_every = 10
        with pytest.raises(di.UserError, match=r"^the loss became nan at step 7; .* keeps the last good weights"):
            di.train(cfg, run, data=data)
    assert run.step == (8 if ckpt_every == 4 else 9), "read at the checkpoint of step 8, else at the check of step 10"
    if ckpt_every == 4:
        ckpt = torch.load(tmp_path / "last.pt", weights_only=True)
        assert ckpt["step"] == 4 and all(torch.isfinite(v).all() for v in ckpt["model"].values())
    else:
        assert not (tmp_path / "last.pt").exists()


def test_second_run_in_the_same_folder_is_refused_unless_forced(tmp_path):
    holder = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        (tmp_path / "train.lock").write_text(str(holder.pid))
        assert_one_line_error(cli("train", *TINY, "--out-dir", tmp_path), 1, f"pid {holder.pid}", "--force")
        forced = cli("train", *TINY, "--steps", "1", "--out-dir", tmp_path, "--force")
        assert forced.returncode == 0, forced.stderr
    finally:
        holder.kill()
        holder.wait()
    (tmp_path / "train.lock").write_text("999999999")  # a process that is gone: a stale lock
    stale = cli("train", *TINY, "--steps", "1", "--out-dir", tmp_path)
    assert stale.returncode == 0, stale.stderr


# --- security ------------------------------------------------------------------------------------
class Payload:
    """Unpickling this runs code: it creates the file named by `marker`."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (exec, (f"open({self.marker!r}, 'w').write('pwned')",))


def test_malicious_checkpoint_is_refused_without_running_its_code(tmp_path):
    evil = tmp_path / "last.pt"
    proof = tmp_path / "proof_it_runs"
    marker = tmp_path / "pwned"
    # The payload is live: plain unpickling does run it.
    pickle.loads(pickle.dumps(Payload(proof)))
    assert proof.exists()
    torch.save({"format": di.CKPT_FORMAT, "version": di.CKPT_VERSION, "config": Payload(marker)}, evil)

    proc = cli("sample", "--out-dir", tmp_path, *FAST_SAMPLING)
    assert_one_line_error(proc, 1, str(evil))
    assert not marker.exists(), "loading the checkpoint ran code from it"


# --- determinism ---------------------------------------------------------------------------------
def test_same_seed_gives_identical_checkpoints_samples_and_metrics(tmp_path):
    runs = [tmp_path / "a", tmp_path / "b"]
    for out in runs:
        for command in ("train", "sample", "eval"):
            extra = ["--results-dir", str(out), "--batch-size", "5" if out.name == "b" and command == "eval" else "16"]
            assert di.main([command, *TINY, *FAST_SAMPLING, "--out-dir", str(out), *extra]) == 0
    a, b = (torch.load(out / "last.pt", weights_only=True) for out in runs)
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), f"weights differ at {k}"
    assert (runs[0] / "samples.png").read_bytes() == (runs[1] / "samples.png").read_bytes()
    metrics = [json.loads((out / "inpaint_metrics.json").read_text())["metrics"] for out in runs]
    for name in metrics[0]:  # run b evaluated with another batch size: each digit's noise is its own, but
        for key in ("psnr", "l1"):  # the U-Net's convolutions may round 1 ulp differently per batch shape
            assert metrics[0][name][key] == pytest.approx(metrics[1][name][key], rel=1e-6), f"{name} {key} differs"
