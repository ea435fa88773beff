"""Dataset registry: names, cache, offline messages, checksums, shared copies (no network)."""
import datetime as dt
import hashlib
import io
import urllib.error
import zipfile

import pytest

from perseq.data import registry as reg
from perseq.data.errors import DatasetNotFoundError
from perseq.data.readers import READERS


@pytest.fixture
def cache(tmp_path, monkeypatch):
    """An empty cache, no shared copies, and a download function that must not be called."""
    root = tmp_path / "cache"
    monkeypatch.setenv("PERSEQ_DATA_DIR", str(root))
    monkeypatch.setenv("PERSEQ_SHARED_DIR", str(tmp_path / "no-shared-here"))

    def no_network(url, dest):
        raise AssertionError(f"unexpected download of {url}")

    monkeypatch.setattr(reg, "_download", no_network)
    return root


def offline(monkeypatch):
    def fail(url, dest):
        raise urllib.error.URLError("[Errno -3] Temporary failure in name resolution")

    monkeypatch.setattr(reg, "_download", fail)


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def add_spec(monkeypatch, **kw) -> reg.DatasetSpec:
    spec = reg.DatasetSpec(**kw)
    monkeypatch.setitem(reg.DATASETS, spec.name, spec)
    return spec


# ------------------------------------------------------------------------ specs


def test_required_entries_and_well_formed_specs():
    for name in ["ml-1m", "ml-20m", "ml-100k", "amazon-beauty", "amazon-sports",
                 "amazon-home", "steam", "yelp"]:
        assert name in reg.DATASETS
    for name, spec in reg.DATASETS.items():
        assert spec.name == name
        assert spec.fmt in READERS
        assert spec.url.startswith(("https://", "http://"))
        assert spec.sha256 is None or (len(spec.sha256) == 64
                                       and set(spec.sha256) <= set("0123456789abcdef"))
        assert not spec.filename.startswith("/")
        if spec.archive_member:
            assert spec.filename.endswith(".zip")


def test_known_checksums_match_the_shared_sums():
    # The Amazon user-per-line files are byte-identical to the shared copies.
    assert reg.get_spec("amazon-beauty").sha256 == (
        "226cce9c3105299ca0db9615d7d3fb32b3175e90da43100ae352599f0f0107b8")
    assert reg.get_spec("ml-1m").url == "https://files.grouplens.org/datasets/movielens/ml-1m.zip"
    assert reg.get_spec("ml-1m").archive_member == "ml-1m/ratings.dat"


def test_spec_is_frozen():
    spec = reg.get_spec("ml-1m")
    with pytest.raises(AttributeError):
        spec.url = "x"
    with pytest.raises(TypeError):
        spec.reader_kwargs["x"] = 1


def test_unknown_name_lists_names():
    with pytest.raises(ValueError) as e:
        reg.get_spec("ml-2m")
    for name in reg.DATASETS:
        assert name in str(e.value)
    with pytest.raises(ValueError) as e:
        reg.read_dataset("ml-2m")
    for name in list(reg.DATASETS) + list(reg.SHARED_DATASETS):
        assert name in str(e.value)


def test_cache_dir(monkeypatch, tmp_path):
    monkeypatch.setenv("PERSEQ_DATA_DIR", str(tmp_path / "c"))
    assert reg.cache_dir() == tmp_path / "c"
    monkeypatch.delenv("PERSEQ_DATA_DIR")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert reg.cache_dir() == tmp_path / "home" / ".cache" / "perseq"


# ----------------------------------------------------------------------- locate


def test_not_cached_message_says_what_to_put_where(cache):
    with pytest.raises(DatasetNotFoundError) as e:
        reg.locate("amazon-beauty")
    msg = str(e.value)
    target = cache / "amazon-beauty" / "Beauty.txt"
    assert str(target) in msg
    assert reg.get_spec("amazon-beauty").url in msg
    assert "226cce9c3105299ca0db9615d7d3fb32b3175e90da43100ae352599f0f0107b8" in msg


def test_offline_download_gives_the_same_instructions(cache, monkeypatch):
    offline(monkeypatch)
    with pytest.raises(DatasetNotFoundError) as e:
        reg.locate("ml-1m", download=True)
    msg = str(e.value)
    assert str(cache / "ml-1m" / "ml-1m.zip") in msg
    assert "https://files.grouplens.org/datasets/movielens/ml-1m.zip" in msg
    assert "a6898adb50b9ca05aa231689da44c217cb524e7ebd39d264c56e2832f2c54e20" in msg
    assert "ml-1m/ratings.dat" in msg and "download failed" in msg
    # No partial files are left behind.
    assert [p for p in cache.rglob("*") if p.is_file()] == []
    with pytest.raises(DatasetNotFoundError):
        reg.read_dataset("ml-1m", download=True)


def test_unknown_checksum_is_stated(cache):
    with pytest.raises(DatasetNotFoundError) as e:
        reg.locate("yelp")
    assert "sha256:   unknown" in str(e.value)


def test_cached_file_checksum_mismatch(cache):
    target = cache / "amazon-beauty" / "Beauty.txt"
    target.parent.mkdir(parents=True)
    target.write_text("1 1 2 3\n")
    with pytest.raises(reg.ChecksumMismatchError) as e:
        reg.locate("amazon-beauty")
    msg = str(e.value)
    assert str(target) in msg
    assert sha(b"1 1 2 3\n") in msg
    assert "226cce9c3105299ca0db9615d7d3fb32b3175e90da43100ae352599f0f0107b8" in msg


def test_cached_file_with_right_checksum_is_read(cache, monkeypatch):
    data = b"u1 a b c\nu2 d\n"
    add_spec(monkeypatch, name="toy", url="https://example.invalid/toy.txt", sha256=sha(data),
             filename="toy/toy.txt", fmt="user-per-line")
    (cache / "toy").mkdir(parents=True)
    (cache / "toy" / "toy.txt").write_bytes(data)
    assert reg.locate("toy") == cache / "toy" / "toy.txt"
    raw = reg.read_dataset("toy")
    assert raw.frame.rows() == [("u1", "a", None), ("u1", "b", None), ("u1", "c", None),
                                ("u2", "d", None)]


def test_download_verifies_then_moves(cache, monkeypatch):
    data = b"1 1\n1 2\n2 1\n"
    add_spec(monkeypatch, name="toy", url="https://example.invalid/toy.txt", sha256=sha(data),
             filename="toy/toy.txt", fmt="pairs")
    calls = []

    def fake(url, dest):
        calls.append(url)
        dest.write_bytes(data)

    monkeypatch.setattr(reg, "_download", fake)
    path = reg.locate("toy", download=True)
    assert path == cache / "toy" / "toy.txt" and path.read_bytes() == data
    assert calls == ["https://example.invalid/toy.txt"]
    assert reg.read_dataset("toy").frame.height == 3
    assert calls == ["https://example.invalid/toy.txt"]  # cached: no second download


def test_download_with_wrong_checksum_is_not_kept(cache, monkeypatch):
    add_spec(monkeypatch, name="toy", url="https://example.invalid/toy.txt", sha256="0" * 64,
             filename="toy/toy.txt", fmt="pairs")
    monkeypatch.setattr(reg, "_download", lambda url, dest: dest.write_bytes(b"1 1\n"))
    with pytest.raises(reg.ChecksumMismatchError):
        reg.locate("toy", download=True)
    assert [p for p in cache.rglob("*") if p.is_file()] == []


def test_zip_archive_member_is_extracted(cache, monkeypatch):
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        zf.writestr("ml-toy/ratings.dat", "1::10::5::100\n1::11::4::90\n2::10::3::50\n")
        zf.writestr("ml-toy/movies.dat", "10::A::Drama\n")
    archive = buf.getvalue()
    add_spec(monkeypatch, name="ml-toy", url="https://example.invalid/ml-toy.zip",
             sha256=sha(archive), filename="ml-toy/ml-toy.zip", fmt="movielens",
             archive_member="ml-toy/ratings.dat")
    monkeypatch.setattr(reg, "_download", lambda url, dest: dest.write_bytes(archive))
    path = reg.locate("ml-toy", download=True)
    assert path == cache / "ml-toy" / "ratings.dat"
    assert (cache / "ml-toy" / "ml-toy.zip").read_bytes() == archive
    raw = reg.read_dataset("ml-toy")
    assert raw.frame.rows() == [("1", "10", 100), ("1", "11", 90), ("2", "10", 50)]


def test_archive_placed_by_hand_is_extracted_offline(cache, monkeypatch):
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        zf.writestr("d/u.data", "1\t2\t3\t4\n")
    add_spec(monkeypatch, name="hand", url="https://example.invalid/d.zip",
             sha256=sha(buf.getvalue()), filename="hand/d.zip", fmt="movielens",
             archive_member="d/u.data")
    (cache / "hand").mkdir(parents=True)
    (cache / "hand" / "d.zip").write_bytes(buf.getvalue())
    assert reg.read_dataset("hand").frame.rows() == [("1", "2", 4)]


# --------------------------------------------------------------- shared copies


def test_find_shared_dir_env(monkeypatch, tmp_path):
    (tmp_path / "shared" / "datasets").mkdir(parents=True)
    monkeypatch.setenv("PERSEQ_SHARED_DIR", str(tmp_path / "shared"))
    assert reg.find_shared_dir() == tmp_path / "shared" / "datasets"
    monkeypatch.setenv("PERSEQ_SHARED_DIR", str(tmp_path / "shared" / "datasets"))
    assert reg.find_shared_dir() == tmp_path / "shared" / "datasets"
    monkeypatch.setenv("PERSEQ_SHARED_DIR", str(tmp_path / "missing"))
    assert reg.find_shared_dir() is None


def test_read_dataset_prefers_shared_copy(cache, monkeypatch, tmp_path):
    shared = tmp_path / "shared" / "datasets"
    (shared / "amazon-beauty").mkdir(parents=True)
    (shared / "amazon-beauty" / "Beauty.txt").write_text("1 1 2\n2 3\n")
    monkeypatch.setenv("PERSEQ_SHARED_DIR", str(shared))
    raw = reg.read_dataset("amazon-beauty")
    assert raw.frame.rows() == [("1", "1", None), ("1", "2", None), ("2", "3", None)]
    assert any("shared copy" in n for n in raw.notes)
    with pytest.raises(DatasetNotFoundError):  # shared=False goes to the (empty) cache
        reg.read_dataset("amazon-beauty", shared=False)


def test_shared_only_name_without_shared_dir(cache):
    with pytest.raises(DatasetNotFoundError) as e:
        reg.read_dataset("beauty-time")
    assert "ticoserec-time/Beauty/Beauty_item_org_rank.txt" in str(e.value)


def test_shared_entries_point_at_readers():
    assert set(reg.SHARED_DATASETS) >= {"ml-1m", "ml-1m-5core", "ml-100k", "amazon-beauty",
                                        "amazon-sports", "amazon-home", "beauty-time",
                                        "sports-time"}
    for copy in reg.SHARED_DATASETS.values():
        assert copy.fmt in READERS


# (name, users, items, interactions, min len, median len, max len, has time, time range)
SHARED_STATS = [
    ("ml-1m", 6040, 3706, 1_000_209, 20, 96, 2314, False, None),
    ("ml-1m-5core", 6040, 3416, 999_611, 18, 96, 2277, False, None),
    ("ml-100k", 943, 1682, 100_000, 20, 65, 737, True, (874724710, 893286638)),
    ("amazon-beauty", 22363, 12101, 198_502, 5, 6, 204, False, None),
    ("amazon-sports", 35598, 18357, 296_337, 5, 6, 296, False, None),
    ("amazon-home", 66519, 28237, 551_682, 5, 6, 277, False, None),
    ("beauty-time", 22363, 12101, 198_502, 5, 6, 204, True,
     (dt.date(2002, 6, 12), dt.date(2014, 7, 23))),
    ("sports-time", 35598, 18357, 296_337, 5, 6, 296, True,
     (dt.date(2002, 3, 7), dt.date(2014, 7, 23))),
]


@pytest.mark.parametrize("name,users,items,n,lo,med,hi,has_time,span", SHARED_STATS,
                         ids=[s[0] for s in SHARED_STATS])
def test_shared_dataset_statistics(shared_datasets, monkeypatch, name, users, items, n, lo,
                                   med, hi, has_time, span):
    """The exact numbers of ../shared/datasets/README.md."""
    monkeypatch.setenv("PERSEQ_SHARED_DIR", str(shared_datasets))
    monkeypatch.setattr(reg, "_download", lambda url, dest: pytest.fail("no download"))
    raw = reg.read_dataset(name)
    f = raw.frame
    assert raw.skipped == 0
    assert (f["user"].n_unique(), f["item"].n_unique(), f.height) == (users, items, n)
    lens = f.group_by("user").len()["len"]
    assert (lens.min(), lens.median(), lens.max()) == (lo, med, hi)
    assert raw.has_time == has_time
    assert not any("decreasing" in note for note in raw.notes)
    if span is not None:
        t0, t1 = f["time"].min(), f["time"].max()
        if isinstance(span[0], dt.date):
            def day(t):
                return dt.datetime.fromtimestamp(t, dt.timezone.utc).date()
            t0, t1 = day(t0), day(t1)
        assert (t0, t1) == span


def test_shared_first_rows(shared_datasets):
    """Spot-check rows against the files' first lines."""
    from perseq.data.readers import read_any

    raw = read_any(shared_datasets / "ml-100k" / "ml-100k.inter")
    assert raw.frame.rows()[:2] == [("196", "242", 881250949), ("186", "302", 891717742)]
    raw = read_any(shared_datasets / "ticoserec-time" / "Beauty" / "Beauty_item_org_rank.txt",
                   times_path=shared_datasets / "ticoserec-time" / "Beauty"
                   / "Beauty_time_org_rank.txt")
    assert raw.frame["time"].to_list()[:5] == [1318896000, 1318896000, 1328140800,
                                               1391040000, 1391040000]
    assert raw.frame["user"].to_list()[:5] == ["1"] * 5
