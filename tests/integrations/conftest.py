"""Integration tests run the ops' PyTorch twins (``EPIKV_BACKEND=torch``): the
Triton interpreter is far too slow for whole models; the kernels have their
own tests, and ``test_triton_backend.py`` runs one small model through them.
"""

import pytest


@pytest.fixture(autouse=True)
def torch_backend(monkeypatch):
    monkeypatch.setenv("EPIKV_BACKEND", "torch")
