"""From a DataConfig to prepared sequences: the one place that knows every data source.

``data.dataset`` names the data in one of three ways, tried in this order (the first that
matches wins):

1. a registry name (``ml-1m``, ``amazon-beauty``, ... see ``perseq.data.registry``) or
   ``"synthetic"``;
2. a folder written by ``perseq data prepare`` (it holds ``sequences.npz``);
3. a data file, whose format is guessed (``data.format`` overrides it).

So a folder that happens to be called ``ml-1m`` is reached as ``./ml-1m``. The older
spelling ``dataset: file`` + ``path: ...`` still works (run folders written before hold it).

:func:`resolve_data_config` turns any of these into one canonical config with absolute
paths, so that a run folder can be evaluated from any directory. It also fixes what the
file will be read as: a data file becomes ``dataset="file"`` with ``path`` absolute and
``format`` set to the guessed reader (and a generic table's ``columns`` to the guessed
mapping), so ``config.json`` says exactly how the data was read, and a later change to the
guessing cannot change how an old run's data is read. :func:`data_fingerprint` records
sha256 and size of the files read; :func:`check_fingerprint` says when they moved or
changed since.
"""
from __future__ import annotations

import dataclasses
import os
from pathlib import Path

from .sequences import SequenceData, prepare

# the files `perseq data prepare` writes (SequenceData.save); all are read back by load
PREPARED_FILES = ("sequences.npz", "users.parquet", "items.parquet", "meta.json")


def _abs(path) -> str:
    """Absolute, with ``~`` expanded and ``..`` removed; symlinks are kept as written."""
    return os.path.abspath(os.path.expanduser(str(path)))


def _registry_names() -> list[str]:
    from .registry import all_names

    return all_names()


def _is_registry_name(name: str) -> bool:
    from .registry import is_registered

    return name == "synthetic" or is_registered(name)


def _is_prepared(path: str) -> bool:
    return os.path.isfile(os.path.join(_abs(path), "sequences.npz"))


def _unknown(dataset: str, cwd_note: str) -> ValueError:
    return ValueError(
        f"data.dataset={dataset!r} is not a registry name, a folder written by 'perseq data prepare' or a "
        f"data file{cwd_note}; registry names: {', '.join(['synthetic'] + _registry_names())}. For a file of "
        "your own: --set data.dataset=/path/to/file (format guessed, --set data.format=... overrides), or "
        "'perseq data prepare --path FILE --out FOLDER' and then --set data.dataset=FOLDER")


def resolve_data_config(dc):
    """The canonical form of ``dc`` (a DataConfig): same data, absolute paths, format fixed.

    * registry name or "synthetic": unchanged (``data.path``/``times_path`` must be unset:
      they would be silently ignored);
    * prepared folder: ``dataset`` becomes its absolute path;
    * data file, given as ``dataset`` or as ``dataset="file"`` + ``path``: ``dataset="file"``,
      ``path`` and ``times_path`` absolute, ``format`` the given one or the guessed one, and
      for a generic table without ``columns`` the guessed column mapping.

    Idempotent. Raises ``ValueError`` with one line for a name that is none of these or a
    path that does not exist.
    """
    from .readers import READERS, guess_table_columns, sniff_format

    ds = dc.dataset
    if _is_registry_name(ds):
        if dc.path or dc.times_path:
            raise ValueError(f"data.path/data.times_path are set, but data.dataset={ds!r} is a registry name and "
                             "reads its own file; to read your file: --set data.dataset=/path/to/file")
        return dc
    if ds != "file":
        if _is_prepared(ds):
            return dataclasses.replace(dc, dataset=_abs(ds))
        if os.path.isdir(_abs(ds)):
            raise ValueError(f"data.dataset={ds!r}: the folder {_abs(ds)} holds no sequences.npz, so it was not "
                             "written by 'perseq data prepare'; point data.dataset at a data file, or prepare one "
                             f"with 'perseq data prepare --path FILE --out {ds}'")
        if not os.path.isfile(_abs(ds)):
            where = f" (looked for {_abs(ds)})" if not os.path.isabs(os.path.expanduser(ds)) else ""
            raise _unknown(ds, where)
        if dc.path and _abs(dc.path) != _abs(ds):
            raise ValueError(f"data.dataset={ds!r} is a data file, and data.path={dc.path!r} names another; "
                             "give the file once, as data.dataset")
        path = ds
    else:
        if not dc.path:
            raise ValueError("data.dataset=file needs data.path (or give the file itself: "
                             "--set data.dataset=/path/to/file)")
        path = dc.path
    path = _abs(path)
    if not os.path.isfile(path):
        raise ValueError(f"data file not found: {path}" + (" (a folder: give a data file, or a folder written "
                                                          "by 'perseq data prepare' as data.dataset)"
                                                          if os.path.isdir(path) else ""))
    times = _abs(dc.times_path) if dc.times_path else None
    if times is not None and not os.path.isfile(times):
        raise ValueError(f"timestamps file not found: {times} (data.times_path)")
    fmt = dc.format
    if fmt is None:
        kw = {"times_path": times} if times else {}
        if dc.columns:
            kw["columns"] = dc.columns
        fmt = sniff_format(path, **kw)
    elif fmt not in READERS:
        raise ValueError(f"unknown data format {fmt!r} (data.format / --format); valid formats: {sorted(READERS)}")
    columns = dc.columns
    if fmt == "table" and not columns:
        columns = guess_table_columns(path, rating=dc.min_rating is not None)
    return dataclasses.replace(dc, dataset="file", path=path, times_path=times, format=fmt, columns=columns)


def _source_files(dc) -> tuple[str, list[Path]]:
    """``(kind, files)``: what ``load_data`` reads for the resolved config ``dc``."""
    if dc.dataset == "synthetic":
        return "synthetic", []
    if dc.dataset == "file":
        return "file", [Path(dc.path)] + ([Path(dc.times_path)] if dc.times_path else [])
    if _is_registry_name(dc.dataset):
        from .registry import dataset_source

        return "registry", dataset_source(dc.dataset, rating=dc.min_rating is not None).files
    d = Path(dc.dataset)
    return "prepared", [d / f for f in PREPARED_FILES if (d / f).is_file()]


def _file_record(path: Path) -> dict:
    from .registry import sha256_file

    return {"path": str(path), "size": path.stat().st_size, "sha256": sha256_file(path)}


def data_fingerprint(dc) -> dict | None:
    """sha256, size and absolute path of every file the data is read from, or None for
    synthetic data (its generator parameters are in the config already).

    ``{"kind": "file" | "prepared" | "registry", "files": [{"path", "size", "sha256"}, ...]}``
    (plus ``"name"`` for a registry dataset): the data file and its times file, the prepared
    folder's files, or the registry file actually used (shared copy or cache).
    """
    dc = resolve_data_config(dc)
    kind, files = _source_files(dc)
    if kind == "synthetic":
        return None
    out = {"kind": kind, "files": [_file_record(f) for f in files]}
    if kind == "registry":
        out["name"] = dc.dataset
    return out


def _size(n: int) -> str:
    return f"{n:,} bytes"


def check_fingerprint(dc, saved: dict | None) -> None:
    """Raise ``ValueError`` (one line) if the data a run was trained on moved or changed.

    ``saved`` is the run's :func:`data_fingerprint`; None (run folders older than
    fingerprints) checks nothing. Files and prepared folders must still be at the recorded
    absolute paths with the recorded size and sha256. A registry dataset may be found
    elsewhere now (another machine's cache), so only its content is compared.
    """
    if not saved:
        return
    if saved.get("kind") == "registry":
        from .errors import DatasetNotFoundError

        try:
            kind, files = _source_files(resolve_data_config(dc))
            now = [_file_record(f) for f in files]
        except (DatasetNotFoundError, FileNotFoundError):
            was = saved["files"][0]
            raise ValueError(f"dataset {saved.get('name', dc.dataset)!r} that this run was trained on is no longer "
                             f"found: it was read from {was['path']} ({_size(was['size'])}, sha256 "
                             f"{was['sha256'][:16]}...); put that file back there or in the cache") from None
        for was, cur in zip(saved["files"], now):
            if was["sha256"] != cur["sha256"]:
                raise ValueError(f"dataset {saved.get('name', dc.dataset)!r} has changed since this run was trained: "
                                 f"{cur['path']} is {_size(cur['size'])} with sha256 {cur['sha256'][:16]}..., the run "
                                 f"read {was['path']} of {_size(was['size'])} with sha256 {was['sha256'][:16]}...; "
                                 "restore that file, or train a new run on this data")
        return
    for was in saved["files"]:
        p = Path(was["path"])
        if not p.is_file():
            raise ValueError(f"the data this run was trained on is gone from {p} (moved or deleted): put the file "
                             f"back there ({_size(was['size'])}, sha256 {was['sha256'][:16]}...) to evaluate or "
                             "predict with this run")
        size = p.stat().st_size
        cur = _file_record(p) if size == was["size"] else {"size": size, "sha256": None}
        if cur["sha256"] != was["sha256"]:
            now = f"{_size(size)}" + (f" with sha256 {cur['sha256'][:16]}..." if cur["sha256"] else "")
            raise ValueError(f"the data this run was trained on has changed: {p} is now {now}, the run read "
                             f"{_size(was['size'])} with sha256 {was['sha256'][:16]}...; restore the original "
                             "file, or train a new run on the new data")


def load_data(cfg, log=print):
    """-> (SequenceData, synthetic generator or None).

    ``cfg`` is a DataConfig in any of the forms :func:`resolve_data_config` accepts: a
    registry name, "synthetic", a prepared folder, or a data file. Notes about the data
    (skipped lines, guessed columns, duplicates, which file was read) go to ``log``.
    """
    from ..progress import heartbeat
    from .readers import read_any
    from .registry import read_dataset
    from .synthetic import make_synthetic

    given = cfg
    cfg = resolve_data_config(cfg)
    if cfg.dataset == "synthetic":
        return make_synthetic(**cfg.synthetic)
    if cfg.format == "table" and not given.columns:
        cols = ",".join(f"{k}={v}" for k, v in cfg.columns.items())
        log(f"note: guessed the columns {cols} of {cfg.path} from its header (--columns / data.columns overrides)")
    if cfg.on_error not in ("raise", "skip"):
        raise ValueError(f"data.on_error must be 'raise' or 'skip', not {cfg.on_error!r}")
    rating = cfg.min_rating is not None
    if cfg.dataset != "file" and not _is_registry_name(cfg.dataset):
        ignored = [f"{k}={getattr(cfg, k)}" for k in ("min_user", "min_item", "dedup", "min_rating")
                   if getattr(cfg, k) not in (0, False, None)]
        if ignored:
            log(f"note: {', '.join(ignored)} not applied: {cfg.dataset} is already prepared (filters run when "
                "preparing: perseq data prepare ... with --kcore/--min-rating/--dedup)")
        return SequenceData.load(cfg.dataset), None
    label = Path(cfg.path).name if cfg.dataset == "file" else cfg.dataset
    with heartbeat(f"loading {label}") as hb:
        hb.stage = "reading"
        if cfg.dataset == "file":
            kw = {}
            if cfg.times_path:
                kw["times_path"] = cfg.times_path
            if cfg.columns:
                kw["columns"] = cfg.columns
            raw = read_any(cfg.path, cfg.format, on_error=cfg.on_error, rating=rating, **kw)
            name = Path(cfg.path).stem
        else:
            raw = read_dataset(cfg.dataset, download=cfg.download, on_error=cfg.on_error, rating=rating)
            name = cfg.dataset
        for note in raw.notes:
            log(f"note: {note}")
        hb.stage = "preparing"
        data = prepare(raw, name=name, min_user=cfg.min_user, min_item=cfg.min_item, dedup=cfg.dedup,
                       min_rating=cfg.min_rating, log=log)
    return data, None
