"""Shared test setup.

With a CUDA GPU the Triton kernels are tested compiled, on the device. Without one they run on CPU
tensors through Triton's interpreter, which must be switched on before `triton.jit` wraps the
kernels, i.e. before kernels.py is first imported. The tests write only to temporary folders: the
project's own cache of the digit classifier is checked to come out of the session as it went in.
"""
import os
import sys
from pathlib import Path

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # the project root: ddim_inpaint, kernels


def files_under(folder: Path) -> dict:
    return {p: (p.stat().st_size, p.stat().st_mtime_ns) for p in folder.rglob("*") if p.is_file()}


@pytest.fixture(scope="session", autouse=True)
def the_users_classifier_cache_is_left_alone():
    """A test that let eval train the judge in the project's outputs/classifier/ would hand the user's next
    `make eval` a judge made under a test's settings, and every Frechet distance after it would move."""
    cache = ROOT / "outputs" / "classifier"
    before = files_under(cache)
    yield
    changed = sorted({str(p.relative_to(ROOT)) for p, _ in files_under(cache).items() ^ before.items()})
    assert not changed, f"the tests wrote to the project's classifier cache: {changed}"
