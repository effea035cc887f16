"""The studies' tests: the project root and studies/ on the path, Triton's interpreter without a GPU
(as tests/conftest.py explains), and the tiny run every test starts from."""
import os
import sys
from pathlib import Path

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
ROOT = Path(__file__).resolve().parents[2]
sys.path[:0] = [str(ROOT), str(ROOT / "studies")]
