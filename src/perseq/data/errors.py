"""Errors raised while reading or preparing data."""
from __future__ import annotations


class DataFormatError(ValueError):
    """A data file is malformed. The message names the file and, where known, the line."""

    def __init__(self, path, line: int | None, message: str):
        self.path, self.line = str(path), line
        where = f"{self.path}:{line}" if line is not None else self.path
        super().__init__(f"{where}: {message}")


class DatasetNotFoundError(FileNotFoundError):
    """A registered dataset is not in the cache and cannot be downloaded."""
