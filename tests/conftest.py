"""Shared pytest fixtures."""
import os
import shutil

import pytest

# PERSEQ_REQUIRE_NO_SKIP=1 (.ci/run sets it): a run where any test was skipped fails. Optional
# dependencies are skipped with importorskip where a user lacks them; in CI, where the [test]
# extra and the services are installed, a skip can only mean a broken install.
_SKIPPED: list[str] = []


def pytest_collectreport(report):
    if report.skipped:
        _SKIPPED.append(report.nodeid)


def pytest_runtest_logreport(report):
    if report.skipped and not hasattr(report, "wasxfail"):
        _SKIPPED.append(report.nodeid)


def pytest_sessionfinish(session, exitstatus):
    if os.environ.get("PERSEQ_REQUIRE_NO_SKIP") == "1" and _SKIPPED and exitstatus == 0:
        print(f"\nPERSEQ_REQUIRE_NO_SKIP=1, and {len(_SKIPPED)} skipped: {', '.join(sorted(set(_SKIPPED))[:10])}")
        session.exitstatus = 1


# The automatic thread count follows the machine's load (perseq.runtime), and thread counts
# change float results at the bit level; tests that compare two trainings need one count.
os.environ.setdefault("PERSEQ_THREADS", "2")


def _need(missing: str | None, flag: str) -> None:
    """Skip a test whose data, service or package is ``missing`` (a reason), except when
    ``flag=1``: .ci/run installs everything and sets the flags, so there it fails instead."""
    if missing:
        if os.environ.get(flag) == "1":
            pytest.fail(f"{missing}, and {flag}=1")
        pytest.skip(missing)


@pytest.fixture(scope="session")
def shared_datasets():
    """Path of ``../shared/datasets`` (real benchmark data), found like the library does.

    Tests that use it are skipped where the directory is absent, except when
    ``PERSEQ_REQUIRE_SHARED=1``: then a missing directory fails them, so CI on a machine that
    is supposed to have the data cannot silently skip the real-data checks.
    """
    from perseq.data.registry import find_shared_dir

    root = find_shared_dir()
    _need(None if root else "shared datasets directory not found (set PERSEQ_SHARED_DIR)", "PERSEQ_REQUIRE_SHARED")
    return root


@pytest.fixture(scope="module")
def redis_url(tmp_path_factory):
    """A real redis-server on loopback (Debian's package). Skipped where it is not
    installed, except when PERSEQ_REQUIRE_REDIS=1 (.ci/run installs it and sets that)."""
    try:
        import redis  # noqa: F401
        missing = None if shutil.which("redis-server") else "redis-server is not installed (apt-get install redis-server)"
    except ImportError:
        missing = "redis-py is not installed (the [test] extra)"
    _need(missing, "PERSEQ_REQUIRE_REDIS")
    from perseq.bench.serve import start_redis

    p, url = start_redis(str(tmp_path_factory.mktemp("redis")))
    yield url
    p.terminate()
    p.wait()


@pytest.fixture(scope="session")
def wrk():
    """Path of the wrk load generator (Debian's package), which ``perseq bench serve`` drives.
    Skipped where it is not installed, except when PERSEQ_REQUIRE_WRK=1 (.ci/run installs it)."""
    path = shutil.which("wrk")
    _need(None if path else "wrk is not installed (apt-get install wrk)", "PERSEQ_REQUIRE_WRK")
    return path


@pytest.fixture(scope="session")
def chromium():
    """Path of Debian's Chromium, which Playwright drives (browser downloads are impossible
    here). Skipped where either is missing, except when PERSEQ_REQUIRE_BROWSER=1."""
    exe = shutil.which("chromium") or shutil.which("chromium-browser")
    try:
        import playwright  # noqa: F401
        missing = None if exe else "Chromium is not installed (apt-get install chromium)"
    except ImportError:
        missing = "playwright is not installed (the [test] extra)"
    _need(missing, "PERSEQ_REQUIRE_BROWSER")
    return exe
