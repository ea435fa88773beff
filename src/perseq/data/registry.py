"""Registry of public datasets: where each one comes from, its checksum, and how to read it.

``DATASETS`` is an explicit dict (no discovery magic). Each :class:`DatasetSpec` names the
file served at ``url`` and its sha256; ``locate`` finds it in the cache directory
(``~/.cache/perseq``, or ``$PERSEQ_DATA_DIR``), downloading it only when asked. When the
file is missing and cannot be fetched (offline, or ``download=False``), the
:class:`~perseq.data.errors.DatasetNotFoundError` says exactly which URL to fetch, the full
path to save it as, and the sha256 to expect, so machines without network access can be
provisioned by hand.

``SHARED_DATASETS`` maps names to the read-only copies of benchmark data kept next to this
repository in ``../shared/datasets`` (see its README). ``read_dataset`` prefers such a copy
when one exists under exactly the requested name, so tests and benchmarks never need the
network. The project must never copy those files into its own tree.
"""
from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
import urllib.error
import urllib.request
import zipfile
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from types import MappingProxyType
from typing import Any, Mapping

from perseq.data.errors import DatasetNotFoundError
from perseq.data.raw import RawInteractions
from perseq.data.readers import RATED_FORMATS, READERS, read_any


class ChecksumMismatchError(ValueError):
    """A cached or downloaded file does not have the registered sha256."""


@dataclass(frozen=True)
class DatasetSpec:
    """One downloadable dataset.

    ``filename`` is where the file served at ``url`` lives, relative to the cache
    directory, and ``sha256`` is that file's checksum (``None`` where no trustworthy value
    is known; such files are used unchecked). For a zip archive, ``archive_member`` is the
    interactions file inside it, extracted next to the archive on first use.
    """

    name: str
    url: str
    sha256: str | None
    filename: str
    fmt: str
    reader_kwargs: Mapping[str, Any] = field(default_factory=dict)
    description: str = ""
    archive_member: str | None = None

    def __post_init__(self):
        if self.fmt not in READERS:
            raise ValueError(f"{self.name}: unknown reader format {self.fmt!r}")
        object.__setattr__(self, "reader_kwargs", MappingProxyType(dict(self.reader_kwargs)))

    def extracted_path(self, root: Path) -> Path | None:
        """Where the archive member is extracted to, or ``None`` for a plain file."""
        if self.archive_member is None:
            return None
        return root / Path(self.filename).parent / PurePosixPath(self.archive_member).name


_GROUPLENS = "https://files.grouplens.org/datasets/movielens"
# S3Rec/ICLRec preprocessed Amazon 5-core and Yelp files, pinned to the commit whose
# Beauty/Sports files ../shared/datasets/README.md verified byte for byte.
_ICLREC = ("https://raw.githubusercontent.com/salesforce/ICLRec/"
           "2890e6c3ff6a22c6699fc19cb863b66786c1cde4/data")


def _spec(*args, **kw) -> tuple[str, DatasetSpec]:
    s = DatasetSpec(*args, **kw)
    return s.name, s


DATASETS: dict[str, DatasetSpec] = dict(
    [
        # MovieLens zip checksums from tensorflow/datasets, url_checksums/movielens.txt,
        # which also records the sizes: ml-100k 4,924,029 B, ml-1m 5,917,549 B,
        # ml-20m 198,702,078 B, ml-25m 261,978,986 B.
        _spec(
            "ml-100k", f"{_GROUPLENS}/ml-100k.zip",
            "50d2a982c66986937beb9ffb3aa76efe955bf3d5c6b761f4e3a7cd717c6a3229",
            "ml-100k/ml-100k.zip", "movielens",
            description="MovieLens 100K: 943 users, 1,682 movies, 100,000 ratings with "
                        "timestamps (GroupLens; research use, no redistribution).",
            archive_member="ml-100k/u.data",
        ),
        _spec(
            "ml-1m", f"{_GROUPLENS}/ml-1m.zip",
            "a6898adb50b9ca05aa231689da44c217cb524e7ebd39d264c56e2832f2c54e20",
            "ml-1m/ml-1m.zip", "movielens",
            description="MovieLens 1M: 6,040 users, 3,706 movies, 1,000,209 ratings with "
                        "timestamps (GroupLens; research use, no redistribution).",
            archive_member="ml-1m/ratings.dat",
        ),
        _spec(
            "ml-20m", f"{_GROUPLENS}/ml-20m.zip",
            "96f243c338a8665f6bcc89c53edf6ee39162a846940de6b7c8c48aeada765ff3",
            "ml-20m/ml-20m.zip", "movielens",
            description="MovieLens 20M: 138,493 users, 26,744 movies, 20,000,263 ratings "
                        "(GroupLens; research use, no redistribution).",
            archive_member="ml-20m/ratings.csv",
        ),
        _spec(
            "ml-25m", f"{_GROUPLENS}/ml-25m.zip",
            "8b21cfb7eb1706b4ec0aac894368d90acf26ebdfb6aced3ebd4ad5bd1eb9c6aa",
            "ml-25m/ml-25m.zip", "movielens",
            description="MovieLens 25M (GroupLens; research use, no redistribution).",
            archive_member="ml-25m/ratings.csv",
        ),
        # The sha256 values of Beauty, Sports and Home are those of the byte-identical
        # copies listed in ../shared/datasets/SHA256SUMS.
        _spec(
            "amazon-beauty", f"{_ICLREC}/Beauty.txt",
            "226cce9c3105299ca0db9615d7d3fb32b3175e90da43100ae352599f0f0107b8",
            "amazon-beauty/Beauty.txt", "user-per-line",
            description="Amazon Beauty 5-core as used by S3Rec/ICLRec: 22,363 users, "
                        "12,101 items, 198,502 interactions, time-ordered, no timestamps.",
        ),
        _spec(
            "amazon-sports", f"{_ICLREC}/Sports_and_Outdoors.txt",
            "2a095e0648872beb9982408958290f5d655db5be2911c3756b5446de9f0b8de2",
            "amazon-sports/Sports_and_Outdoors.txt", "user-per-line",
            description="Amazon Sports and Outdoors 5-core (S3Rec/ICLRec): 35,598 users, "
                        "18,357 items, 296,337 interactions, no timestamps.",
        ),
        # sha256 unknown: this file is not among the verified shared copies.
        _spec(
            "amazon-toys", f"{_ICLREC}/Toys_and_Games.txt", None,
            "amazon-toys/Toys_and_Games.txt", "user-per-line",
            description="Amazon Toys and Games 5-core (S3Rec/ICLRec), no timestamps.",
        ),
        _spec(
            "amazon-home",
            "https://raw.githubusercontent.com/KingGugu/RepPad/"
            "fc85b8237588afd788f74649968a12b4fe7dbe3e/SASRec/data/Home.txt",
            "4e472251e8bcd204fc3421c51ab7d10611a69da8e7cf313c327e0cd003a5f0dd",
            "amazon-home/Home.txt", "user-per-line",
            description="Amazon Home and Kitchen 5-core (RepPad/TiCoSeRec): 66,519 users, "
                        "28,237 items, 551,682 interactions, no timestamps.",
        ),
        # Raw 2014 McAuley review dump (JSON lines with timestamps); sha256 unknown.
        _spec(
            "amazon-beauty-reviews",
            "http://snap.stanford.edu/data/amazon/productGraph/categoryFiles/"
            "reviews_Beauty_5.json.gz",
            None, "amazon-beauty-reviews/reviews_Beauty_5.json.gz", "amazon-json",
            description="Amazon Beauty 5-core reviews (2014 dump) with unixReviewTime; the "
                        "raw source of amazon-beauty.",
        ),
        # Steam reviews from the SASRec authors; the lines are Python literals, not JSON,
        # which read_amazon_json handles. sha256 unknown.
        _spec(
            "steam", "http://cseweb.ucsd.edu/~wckang/steam_reviews.json.gz", None,
            "steam/steam_reviews.json.gz", "amazon-json",
            reader_kwargs={"fields": {"user": "username", "item": "product_id",
                                      "time": "date"}},
            description="Steam reviews (Kang & McAuley, SASRec): 7.8M reviews, dates with "
                        "day granularity.",
        ),
        # The official Yelp dump needs a licence click-through, so the registry points at
        # the preprocessed S3Rec/ICLRec file. sha256 unknown.
        _spec(
            "yelp", f"{_ICLREC}/Yelp.txt", None, "yelp/Yelp.txt", "user-per-line",
            description="Yelp as preprocessed by S3Rec/ICLRec, time-ordered, no timestamps.",
        ),
    ]
)


@dataclass(frozen=True)
class SharedCopy:
    """A dataset copy under ``../shared/datasets``; paths are relative to that directory."""

    path: str
    fmt: str
    times_path: str | None = None
    description: str = ""

    def reader_kwargs(self, root: Path) -> dict[str, Any]:
        return {} if self.times_path is None else {"times_path": root / self.times_path}


SHARED_DATASETS: dict[str, SharedCopy] = {
    # Same users and MovieLens ids as ml-1m's ratings.dat, in time order, but without the
    # timestamp values (tied timestamps may be ordered differently).
    "ml-1m": SharedCopy("ml-1m/ml-1m_seq.txt", "user-per-line",
                        description="ML-1M, original ids, time-ordered, no time values"),
    "ml-1m-5core": SharedCopy("ml-1m/ml-1m_sasrec_format.txt", "pairs",
                              description="ML-1M SASRec 5-core: 6,040 users, 3,416 items"),
    "ml-100k": SharedCopy("ml-100k/ml-100k.inter", "recbole",
                          description="ML-100K as RecBole atomic file, with timestamps"),
    "amazon-beauty": SharedCopy("amazon-beauty/Beauty.txt", "user-per-line"),
    "amazon-sports": SharedCopy("amazon-sports/Sports_and_Outdoors.txt", "user-per-line"),
    "amazon-home": SharedCopy("amazon-home/Home.txt", "user-per-line"),
    "beauty-time": SharedCopy("ticoserec-time/Beauty/Beauty_item_org_rank.txt", "user-per-line",
                              times_path="ticoserec-time/Beauty/Beauty_time_org_rank.txt",
                              description="Amazon Beauty 5-core with day-granular timestamps"),
    "sports-time": SharedCopy("ticoserec-time/Sports/Sports_item_org_rank.txt", "user-per-line",
                              times_path="ticoserec-time/Sports/Sports_time_org_rank.txt",
                              description="Amazon Sports 5-core with day-granular timestamps"),
}

_REPO_ROOT = Path(__file__).resolve().parents[3]


def cache_dir() -> Path:
    """The dataset cache: ``$PERSEQ_DATA_DIR`` if set, else ``~/.cache/perseq``."""
    env = os.environ.get("PERSEQ_DATA_DIR")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "perseq"


def find_shared_dir() -> Path | None:
    """The shared datasets directory, or ``None``.

    ``$PERSEQ_SHARED_DIR`` (the ``datasets`` directory or its parent) wins when set, even if
    it does not exist, so that it can also be used to switch shared data off. Otherwise
    ``../shared/datasets`` is tried relative to the repository root, then to the CWD.
    """
    env = os.environ.get("PERSEQ_SHARED_DIR")
    if env:
        p = Path(env).expanduser()
        if (p / "datasets").is_dir():
            return p / "datasets"
        return p if p.is_dir() else None
    for base in (_REPO_ROOT, Path.cwd()):
        cand = (base / ".." / "shared" / "datasets").resolve()
        if cand.is_dir():
            return cand
    return None


def _all_names() -> list[str]:
    return sorted(set(DATASETS) | set(SHARED_DATASETS))


def get_spec(name: str) -> DatasetSpec:
    """The registered :class:`DatasetSpec`; an unknown name raises listing the valid ones."""
    try:
        return DATASETS[name]
    except KeyError:
        hint = (f" ({name!r} exists only as a shared copy; use read_dataset)"
                if name in SHARED_DATASETS else "")
        raise ValueError(
            f"unknown dataset {name!r}{hint}; registered datasets: {sorted(DATASETS)}"
        ) from None


def sha256_file(path: Path) -> str:
    """The file's sha256, read in 1 MiB chunks (ML-20M is 500 MB)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _verify(spec: DatasetSpec, path: Path) -> None:
    if spec.sha256 is None:
        return
    got = sha256_file(path)
    if got != spec.sha256:
        raise ChecksumMismatchError(
            f"{path}: sha256 is {got} but dataset {spec.name!r} expects {spec.sha256}. The "
            f"file is corrupt or a different version; delete it and fetch {spec.url} again."
        )


def _download(url: str, dest: Path) -> None:
    """Fetch ``url`` into ``dest``. Module-level so tests can replace it (no network)."""
    with urllib.request.urlopen(url, timeout=60) as resp, open(dest, "wb") as out:
        shutil.copyfileobj(resp, out, 1 << 20)


def _missing_message(spec: DatasetSpec, target: Path, reason: str) -> str:
    checksum = spec.sha256 or "unknown (the file will be used unchecked)"
    lines = [
        f"dataset {spec.name!r} is not available: {reason}.",
        f"  download: {spec.url}",
        f"  save as:  {target}",
        f"  sha256:   {checksum}",
    ]
    if spec.archive_member:
        lines.append(f"  (keep the archive as is; {spec.archive_member} is extracted from it "
                     "automatically)")
    lines.append("To download it: --set data.download=true (perseq train), --download (perseq "
                 "data), download=True in Python. PERSEQ_DATA_DIR sets another cache directory.")
    return "\n".join(lines)


def _extract(spec: DatasetSpec, archive: Path, dest: Path) -> Path:
    """Extract the archive member to ``dest`` atomically (temp file + rename)."""
    try:
        with zipfile.ZipFile(archive) as zf:
            try:
                src = zf.open(spec.archive_member)
            except KeyError:
                raise DatasetNotFoundError(
                    f"{archive} has no member {spec.archive_member!r} "
                    f"(members: {zf.namelist()[:20]})"
                ) from None
            fd, tmp = tempfile.mkstemp(dir=dest.parent, prefix=dest.name, suffix=".part")
            try:
                with src, os.fdopen(fd, "wb") as out:
                    shutil.copyfileobj(src, out, 1 << 20)
                os.replace(tmp, dest)
            finally:
                if os.path.exists(tmp):
                    os.unlink(tmp)
    except zipfile.BadZipFile as e:
        raise ChecksumMismatchError(
            f"{archive} is not a valid zip archive ({e}); delete it and fetch {spec.url} again."
        ) from None
    return dest


def locate(name: str, download: bool = False) -> Path:
    """Path of the dataset's interactions file in the cache, fetching it if allowed.

    A cached file is checked against the registered sha256 (archives are checked once,
    before extraction; the extracted member is trusted afterwards). Without the file and
    with ``download=False``, or when the download fails, raises ``DatasetNotFoundError``
    with the URL, target path and checksum. A downloaded file is written to a temporary
    name and only moved into place after its checksum matched.
    """
    spec = get_spec(name)
    root = cache_dir()
    target = root / spec.filename
    extracted = spec.extracted_path(root)
    if extracted is not None and extracted.is_file():
        return extracted
    if not target.is_file():
        if not download:
            raise DatasetNotFoundError(
                _missing_message(spec, target, "it is not in the cache and downloading is off")
            )
        _fetch(spec, target)
    _verify(spec, target)
    if extracted is not None:
        return _extract(spec, target, extracted)
    return target


def _fetch(spec: DatasetSpec, target: Path) -> None:
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp_name = tempfile.mkstemp(dir=target.parent, prefix=target.name, suffix=".part")
        os.close(fd)
    except OSError as e:
        raise DatasetNotFoundError(
            _missing_message(spec, target, f"cannot write to the cache ({e})")
        ) from e
    tmp = Path(tmp_name)
    try:
        try:
            _download(spec.url, tmp)
        except (urllib.error.URLError, OSError, TimeoutError, ValueError) as e:
            raise DatasetNotFoundError(
                _missing_message(spec, target, f"download failed ({e})")
            ) from e
        _verify(spec, tmp)
        os.replace(tmp, target)
    finally:
        if tmp.exists():
            tmp.unlink()


def is_registered(name: str) -> bool:
    """Whether ``name`` is a registry or shared-copy name (what ``read_dataset`` accepts)."""
    return name in DATASETS or name in SHARED_DATASETS


def all_names() -> list[str]:
    """Every name ``read_dataset`` accepts, sorted."""
    return _all_names()


@dataclass(frozen=True)
class Source:
    """The file(s) a registry name is read from, and how: what ``read_dataset`` reads and
    what a run's data fingerprint hashes."""

    path: Path
    fmt: str
    reader_kwargs: Mapping[str, Any]
    note: str

    @property
    def files(self) -> list[Path]:
        """Every file read: the interactions file and, for some shared copies, a times file."""
        extra = self.reader_kwargs.get("times_path")
        return [self.path] + ([Path(extra)] if extra is not None else [])


def dataset_source(name: str, download: bool = False, *, shared: bool = True,
                   rating: bool = False) -> Source:
    """Where ``read_dataset`` reads ``name`` from (downloading only if ``download``).

    The shared copy wins when there is one, except with ``rating=True`` when the shared
    copy's format has no ratings (the shared ml-1m is user-per-line): then the cached
    original is used, since only it can be filtered by rating.
    """
    if not is_registered(name):
        raise ValueError(f"unknown dataset {name!r}; known datasets: {_all_names()}")
    if shared and name in SHARED_DATASETS:
        root = find_shared_dir()
        copy = SHARED_DATASETS[name]
        usable = not rating or copy.fmt in RATED_FORMATS or name not in DATASETS
        if usable and root is not None and (root / copy.path).is_file():
            return Source(root / copy.path, copy.fmt, copy.reader_kwargs(root),
                          f"read the shared copy {root / copy.path}")
        if name not in DATASETS:
            where = root / copy.path if root is not None else f"<shared>/datasets/{copy.path}"
            raise DatasetNotFoundError(
                f"dataset {name!r} exists only as a shared copy and none was found: expected "
                f"{where}; set PERSEQ_SHARED_DIR to the shared datasets directory."
            )
    spec = get_spec(name)
    path = locate(name, download=download)
    return Source(path, spec.fmt, dict(spec.reader_kwargs), f"read the cached file {path}")


def read_dataset(name: str, download: bool = False, *, shared: bool = True,
                 on_error: str = "raise", rating: bool = False) -> RawInteractions:
    """Read a dataset by name: the shared copy if there is one, else the cached file.

    With ``shared=True`` and a copy under exactly this name in the shared directory, that
    copy is read (no network, no cache); note that the shared ml-1m has no timestamp values.
    The returned ``notes`` say which file was read. ``on_error`` and ``rating`` are passed
    to the reader (see :func:`perseq.data.readers.read_any` and :func:`dataset_source`).
    """
    src = dataset_source(name, download, shared=shared, rating=rating)
    raw = read_any(src.path, src.fmt, on_error=on_error, rating=rating, **src.reader_kwargs)
    raw.notes.append(src.note)
    return raw
