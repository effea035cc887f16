"""Shared test setup.

The Triton kernels are tested on the CPU through Triton's interpreter, which must be switched on
before `triton.jit` wraps the kernels, i.e. before kernels.py is first imported.
"""
import os
import sys
from pathlib import Path

os.environ.setdefault("TRITON_INTERPRET", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the project root: ddim_inpaint, kernels
