"""pytest plugin of ``make gpu-check``'s suite tier: a per-test timeout, a deadline for the run, and
the tests only a GPU can decide first.

    pytest -p verify.pytest_deadline --per-test-timeout 120 --deadline <time.time()> \
        [--order-file PATH] ...

A test running longer than ``--per-test-timeout`` seconds fails with a message saying so
(SIGALRM in the main thread: a test stuck in Python code or between CUDA calls is stopped);
tests not started before ``--deadline`` are skipped with the reason, so the run ends on
time and still writes its JUnit XML. Needs nothing beyond pytest (pytest-timeout is not
assumed to be installed).

Order: the collected tests are sorted (stably) by the first pattern of ``PRIORITY`` their node
id matches, so paths no CPU run has computed come first: the tf32 and tf32x3 modes (the
interpreter's dot ignores the precision), small r (the one-program Newton kernels), the
device guards, compute-sanitizer; the rest keep their order. The counts per group are printed
after collection and, with ``--order-file``, written there with the whole order (JSON).
"""

from __future__ import annotations

import json
import re
import signal
import time

import pytest

# (label, pattern searched in the node id), highest priority first
PRIORITY = (
    ("tf32 modes", r"tf32"),
    ("small r", r"[\[_-]r(?:8|16|32|64)\b|one-program|small[_-]r"),
    (
        "device guard",
        r"guard|other_(?:gpu|device)|second_gpu|two_gpus|tensors?_device|wrong_device|current_device",
    ),
    ("compute-sanitizer", r"sanitizer"),
)
REST = "the rest"


def priority(nodeid: str) -> int:
    """Index into PRIORITY of the first pattern ``nodeid`` matches (len(PRIORITY): none)."""
    for i, (_, pattern) in enumerate(PRIORITY):
        if re.search(pattern, nodeid, flags=re.IGNORECASE):
            return i
    return len(PRIORITY)


def pytest_addoption(parser):
    group = parser.getgroup("deadline")
    group.addoption(
        "--per-test-timeout", type=float, default=None, help="fail a test after this many seconds"
    )
    group.addoption("--deadline", type=float, default=None, help="skip tests not started by this time.time()")
    group.addoption(
        "--order-file", default=None, help="write the test order and its group counts here (JSON)"
    )


def _counts(items) -> dict[str, int]:
    labels = [label for label, _ in PRIORITY] + [REST]
    counts = dict.fromkeys(labels, 0)
    for item in items:
        counts[labels[priority(item.nodeid)]] += 1
    return counts


@pytest.hookimpl(trylast=True)  # after -m / -k have deselected
def pytest_collection_modifyitems(session, config, items):
    items.sort(key=lambda item: priority(item.nodeid))  # stable: file order within a group
    path = config.getoption("--order-file")
    # one writer under xdist: its workers carry ``workerinput`` (not the environment, which a
    # pytest started from inside another run's worker inherits)
    worker = getattr(config, "workerinput", {}).get("workerid", "gw0")
    if path and worker == "gw0":
        with open(path, "w") as f:
            json.dump({"groups": _counts(items), "order": [item.nodeid for item in items]}, f, indent=1)


def pytest_report_collectionfinish(config, start_path, items):
    counts = _counts(items)
    return "gpu-check order: " + ", ".join(f"{n} {label}" for label, n in counts.items()) + " (in that order)"


class _Timeout(Exception):
    pass


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_call(item):
    limit = item.config.getoption("--per-test-timeout")
    if not limit or not hasattr(signal, "SIGALRM"):
        yield
        return

    def alarm(signum, frame):
        raise _Timeout(f"{item.nodeid} ran longer than the per-test timeout of {limit:g} s")

    previous = signal.signal(signal.SIGALRM, alarm)
    signal.setitimer(signal.ITIMER_REAL, limit)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def pytest_runtest_setup(item):
    deadline = item.config.getoption("--deadline")
    if deadline is not None and time.time() >= deadline:
        pytest.skip("gpu-check deadline: not started before the time budget ran out")
