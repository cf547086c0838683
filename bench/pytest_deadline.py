"""pytest plugin of ``make gpu-check``'s suite tier: a per-test timeout and a session deadline.

    pytest -p bench.pytest_deadline --per-test-timeout 120 --deadline <time.time()> ...

A test running longer than ``--per-test-timeout`` seconds fails with a message saying so
(SIGALRM in the main thread: a test stuck in Python code or between CUDA calls is stopped);
tests not started before ``--deadline`` are skipped with the reason, so the session ends on
time and still writes its JUnit XML. Needs nothing beyond pytest (pytest-timeout is not
assumed to be installed).
"""

from __future__ import annotations

import signal
import time

import pytest


def pytest_addoption(parser):
    group = parser.getgroup("deadline")
    group.addoption(
        "--per-test-timeout", type=float, default=None, help="fail a test after this many seconds"
    )
    group.addoption("--deadline", type=float, default=None, help="skip tests not started by this time.time()")


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
