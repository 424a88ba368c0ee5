"""Test-wide setup: one CPU thread, and Triton's interpreter when there is no GPU.

TRITON_INTERPRET must be set before any kernel module is imported, which is
why it lives here and not in a fixture.
"""

import os

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
os.environ.setdefault("OMP_NUM_THREADS", "1")

import torch  # noqa: E402

HAS_GPU = torch.cuda.is_available()
if not HAS_GPU:
    os.environ.setdefault("TRITON_INTERPRET", "1")
torch.set_num_threads(1)
