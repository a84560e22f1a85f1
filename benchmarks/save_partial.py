"""A pytest plugin: an interrupted benchmark run still saves what finished.

A benchmark interrupted in the middle of its timing (SIGINT from bench.py's time limit,
or Ctrl-C) is left with no rounds, and pytest-benchmark then fails to write the JSON of
the whole run (min() of no data). This wrapper of pytest_sessionfinish runs before
pytest-benchmark's and drops such benchmarks. Loaded by benchmarks/conftest.py.
"""
import pytest


@pytest.hookimpl(hookwrapper=True, tryfirst=True)
def pytest_sessionfinish(session, exitstatus):
    bs = getattr(session.config, "_benchmarksession", None)
    if bs is not None:
        bs.benchmarks[:] = [b for b in bs.benchmarks if b.stats.data]
    yield
