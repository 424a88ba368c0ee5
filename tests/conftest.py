"""Test-wide setup: one CPU thread, Triton's interpreter when there is no GPU, and
no deprecated-cache-keyword noise from our own calls.

TRITON_INTERPRET must be set before any kernel module is imported, which is
why it lives here and not in a fixture.
"""

import logging
import os
import sys

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
os.environ.setdefault("OMP_NUM_THREADS", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

HAS_GPU = torch.cuda.is_available()
if not HAS_GPU:
    os.environ.setdefault("TRITON_INTERPRET", "1")
torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def one_torch_thread():
    """Every test starts on one thread, whatever the one before set (``epikv-triton quality`` takes every core
    by default)."""
    torch.set_num_threads(1)
    yield


class _Records(logging.Handler):
    def __init__(self):
        super().__init__(logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


@pytest.fixture(autouse=True)
def no_deprecated_cache_keyword(request):
    """transformers >= 5.24 logs a deprecation when ``past_key_values`` reaches a forward or an output is read by
    that name; our calls must use the installed name (``FutureWarning``s are errors via pyproject's filterwarnings).
    Tests of the legacy name on purpose carry the ``legacy_cache_keyword`` marker."""
    if request.node.get_closest_marker("legacy_cache_keyword"):
        yield
        return
    hf_logging = sys.modules.get("transformers.utils.logging")
    if hf_logging is not None:
        hf_logging.warning_once.cache_clear()  # logged once per process otherwise: every test must be able to see it
    records = _Records()
    logger = logging.getLogger("transformers")
    logger.addHandler(records)
    try:
        yield
    finally:
        logger.removeHandler(records)
    deprecated = [m for m in records.messages if "past_key_values" in m]
    assert not deprecated, f"transformers logged a deprecated cache keyword: {deprecated[0]}"
