"""Shared pytest fixtures."""
import os

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
