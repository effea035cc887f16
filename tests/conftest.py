"""Shared test setup.

With a CUDA GPU the Triton kernels are tested compiled, on the device. Without one they run on CPU
tensors through Triton's interpreter, which must be switched on before `triton.jit` wraps the
kernels, i.e. before kernels.py is first imported.
"""
import os
import sys
from pathlib import Path

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the project root: ddim_inpaint, kernels
