"""Shared pytest fixtures."""
import os
import shutil

import pytest

# The automatic thread count follows the machine's load (perseq.runtime), and thread counts
# change float results at the bit level; tests that compare two trainings need one count.
os.environ.setdefault("PERSEQ_THREADS", "2")


@pytest.fixture(scope="session")
def shared_datasets():
    """Path of ``../shared/datasets`` (real benchmark data), found like the library does.

    Tests that use it are skipped where the directory is absent, except when
    ``PERSEQ_REQUIRE_SHARED=1``: then a missing directory fails them, so CI on a machine that
    is supposed to have the data cannot silently skip the real-data checks.
    """
    from perseq.data.registry import find_shared_dir

    root = find_shared_dir()
    if root is None:
        msg = "shared datasets directory not found (set PERSEQ_SHARED_DIR)"
        if os.environ.get("PERSEQ_REQUIRE_SHARED") == "1":
            pytest.fail(f"{msg}, and PERSEQ_REQUIRE_SHARED=1")
        pytest.skip(msg)
    return root


@pytest.fixture(scope="module")
def redis_url(tmp_path_factory):
    """A real redis-server on loopback (Debian's package). Skipped where it is not
    installed, except when PERSEQ_REQUIRE_REDIS=1 (.ci/run installs it and sets that)."""
    if shutil.which("redis-server") is None:
        if os.environ.get("PERSEQ_REQUIRE_REDIS") == "1":
            pytest.fail("redis-server is not installed, and PERSEQ_REQUIRE_REDIS=1")
        pytest.skip("redis-server not installed (apt-get install redis-server)")
    pytest.importorskip("redis")
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
    if path is None:
        if os.environ.get("PERSEQ_REQUIRE_WRK") == "1":
            pytest.fail("wrk is not installed, and PERSEQ_REQUIRE_WRK=1")
        pytest.skip("wrk not installed (apt-get install wrk)")
    return path
