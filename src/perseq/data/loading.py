"""From a DataConfig to prepared sequences: the one place that knows every data source."""
from __future__ import annotations

from pathlib import Path

from .sequences import SequenceData, prepare


def load_data(cfg, log=print):
    """-> (SequenceData, synthetic generator or None).

    ``cfg.dataset`` is "synthetic", "file" (read ``cfg.path`` with ``cfg.format``), a folder
    written by ``perseq data prepare``, or a registry name (shared copy, cache, download).
    """
    from .readers import read_any
    from .registry import read_dataset
    from .synthetic import make_synthetic

    if cfg.dataset == "synthetic":
        return make_synthetic(**cfg.synthetic)
    p = Path(cfg.dataset)
    if (p / "sequences.npz").exists():
        return SequenceData.load(p), None
    if cfg.dataset == "file":
        if not cfg.path:
            raise ValueError("data.dataset=file needs data.path")
        kw = {}
        if cfg.times_path:
            kw["times_path"] = cfg.times_path
        if cfg.columns:
            kw["columns"] = cfg.columns
        raw = read_any(cfg.path, cfg.format, **kw)
        name = Path(cfg.path).stem
    else:
        raw = read_dataset(cfg.dataset, download=cfg.download)
        name = cfg.dataset
    if raw.skipped:
        log(f"note: {raw.skipped} malformed line(s) skipped while reading {raw.source}")
    for note in raw.notes:
        log(f"note: {note}")
    data = prepare(raw, name=name, min_user=cfg.min_user, min_item=cfg.min_item, dedup=cfg.dedup)
    return data, None
