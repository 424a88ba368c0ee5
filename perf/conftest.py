"""The perf suite: ``pytest perf/ --benchmark``.

Without ``--benchmark`` every test here is skipped, so the suite never slows
the tests. Timing is pytest-benchmark's (``--benchmark-json`` works as usual);
each test also records a row — device, shape, median time, derived rate,
fraction of the measured device ceiling, ratio to the anchor measured in the
same run — and one tabulate table per group is printed at the end.
"""

from __future__ import annotations

import os
from collections import defaultdict

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
os.environ.setdefault("OMP_NUM_THREADS", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

from perf import measure  # noqa: E402

_ROWS: dict[str, list[dict]] = defaultdict(list)


def pytest_addoption(parser):
    parser.addoption("--benchmark", action="store_true", default=False, help="run the perf suite (skipped without it)")
    parser.addoption(
        "--static-json", default="perf-static.json", help="where the static group writes its rows (JSON)"
    )


def pytest_configure(config):
    if config.getoption("--benchmark") and not torch.cuda.is_available():
        torch.set_num_threads(1)


def pytest_collection_modifyitems(config, items):
    if config.getoption("--benchmark"):
        return
    skip = pytest.mark.skip(reason="perf suite: run it with `pytest perf/ --benchmark`")
    for item in items:
        item.add_marker(skip)


@pytest.fixture(autouse=True)
def torch_twins_on_cpu(monkeypatch):
    """On a CPU the ops must run their PyTorch twins, never Triton's interpreter.

    Set in the environment, so processes a test starts (``measure.run_fresh_interpreter``) inherit it.
    """
    if measure.device().type != "cuda":
        monkeypatch.setenv("EPIKV_BACKEND", "torch")


@pytest.fixture(scope="session")
def dev() -> torch.device:
    return measure.device()


@pytest.fixture(scope="session")
def ceilings(dev):
    """Measured once per session: copy bandwidth and matmul rate of this device."""
    return measure.Ceilings.measure(dev)


@pytest.fixture
def record():
    """``record(group, **columns)`` adds one row to the group's table."""

    def add(group: str, **columns):
        _ROWS[group].append(columns)

    return add


def pytest_terminal_summary(terminalreporter):
    if not _ROWS:
        return
    from tabulate import tabulate

    terminalreporter.write_sep("=", f"epikv_triton perf on {measure.device_name(measure.device())}")
    for group, rows in _ROWS.items():
        terminalreporter.write_line(f"\n[{group}]")
        terminalreporter.write_line(tabulate(rows, headers="keys", floatfmt=".3g"))
