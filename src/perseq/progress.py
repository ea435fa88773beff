"""Progress for long loops: a tqdm bar on a terminal, plain timed lines everywhere else.

tqdm draws nothing useful into a log file (nohup, CI, ``> log``): it either stays silent or
writes carriage-return updates that end up as one endless line. A 14-minute epoch then
printed nothing at all. Without a terminal, :func:`progress` prints one ordinary line at
most every ``PERSEQ_PROGRESS_SECONDS`` seconds (default 30): items done, rate and ETA.
"""
from __future__ import annotations

import os
import sys
import time
from typing import Iterable, Iterator


def _every() -> float:
    return float(os.environ.get("PERSEQ_PROGRESS_SECONDS", "30"))


def _fmt_secs(s: float) -> str:
    s = int(round(s))
    return f"{s // 3600}h{s % 3600 // 60:02d}m" if s >= 3600 else f"{s // 60}m{s % 60:02d}s" if s >= 60 else f"{s}s"


class _Lines:
    """The no-terminal display: ``desc: 120/470 batches, 5.2/s, ETA 1m07s, loss=...``."""

    def __init__(self, iterable: Iterable, desc: str, total: int | None, unit: str, every: float, stream):
        self.iterable, self.desc, self.unit, self.every, self.stream = iterable, desc, unit, every, stream
        self.total = total if total is not None else (len(iterable) if hasattr(iterable, "__len__") else None)
        self.postfix = ""

    def set_postfix(self, refresh: bool = False, **kw) -> None:
        self.postfix = ", ".join(f"{k}={v}" for k, v in kw.items())

    def __iter__(self) -> Iterator:
        t0 = last = time.perf_counter()
        done = 0
        for x in self.iterable:
            yield x
            done += 1
            now = time.perf_counter()
            if now - last >= self.every:
                last = now
                rate = done / max(now - t0, 1e-9)
                of = f"/{self.total}" if self.total is not None else ""
                eta = f", ETA {_fmt_secs((self.total - done) / rate)}" if self.total is not None and rate > 0 else ""
                post = f", {self.postfix}" if self.postfix else ""
                print(f"{self.desc}: {done}{of} {self.unit}, {rate:.2f}/s{eta}{post}", file=self.stream, flush=True)

    def close(self) -> None:
        pass


def progress(iterable: Iterable, desc: str, *, total: int | None = None, unit: str = "batches",
             enabled: bool | None = None, stream=None):
    """Wrap ``iterable`` for display. ``enabled``: None shows progress (a bar on a terminal,
    timed lines otherwise), False shows nothing. The object has tqdm's ``set_postfix``."""
    stream = stream if stream is not None else sys.stderr
    if enabled is False:
        return _Lines(iterable, desc, total, unit, float("inf"), stream)
    if hasattr(stream, "isatty") and stream.isatty():
        from tqdm.auto import tqdm

        return tqdm(iterable, desc=desc, total=total, unit=f" {unit}", leave=False, file=stream)
    return _Lines(iterable, desc, total, unit, _every(), stream)


class heartbeat:
    """``with heartbeat("preparing ml-20m") as hb: ...``: a line every
    ``PERSEQ_PROGRESS_SECONDS`` seconds while a block with nothing to count runs (reading a
    big file, k-core filtering). ``hb.stage = "k-core"`` names the current step."""

    def __init__(self, desc: str, stream=None, every: float | None = None):
        self.desc, self.stage = desc, ""
        self.stream = stream if stream is not None else sys.stderr
        self.every = max(0.01, _every() if every is None else every)
        self._stop = None

    def _run(self) -> None:
        t0 = time.perf_counter()
        while not self._stop.wait(self.every):
            stage = f" ({self.stage})" if self.stage else ""
            print(f"{self.desc}{stage}: still working, {_fmt_secs(time.perf_counter() - t0)} so far",
                  file=self.stream, flush=True)

    def __enter__(self):
        import threading

        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
