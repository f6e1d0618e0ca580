"""A patch-feature store on disk: (N, D) rows appended in chunks, finalised atomically, read back in chunks.

The file is a valid safetensors file with one tensor, `features` (N, D) float16 or float32, so
`safetensors.torch.load_file(path)["features"]` reads it whole (the retrain flow's feature cache format).
Its JSON header is written with a fixed reserved size first and rewritten with the final shape on
`close()`; the rows go to `<path>.<pid>.tmp` and replace `path` only when complete (nothing half-written).

    with FeatureWriter(path, dim=128, dtype="float16") as writer:
        for rows in chunks:              # (n, D) tensors or arrays
            writer.append(rows)
        writer.metadata["grid"] = "32,32"
    store = FeatureStore(path)           # store.shape, store.iter_chunks(), store.gather(indices)

Reading never memory-maps the file (a mapped page read back counts towards the process's resident set):
chunks are read with plain file reads, so the peak RSS of a streamed fit does not grow with N * D.
"""

from __future__ import annotations

import json
import logging
import os
import struct
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch

logger = logging.getLogger(__name__)

FORMAT = "defectops.feature-store/1"
TENSOR = "features"
HEADER_BYTES = 4096  # reserved JSON header (multiple of 8, so rows start 8-byte aligned)
DEFAULT_CHUNK_ROWS = 16384
_DTYPES = {"float16": ("F16", np.float16), "float32": ("F32", np.float32)}
_BY_CODE = {code: name for name, (code, _) in _DTYPES.items()}


class FeatureStoreError(ValueError):
    """A feature store file that cannot be used; the message names the file and the reason."""


def _header(n: int, dim: int, dtype: str, metadata: dict[str, str]) -> bytes:
    code, np_dtype = _DTYPES[dtype]
    nbytes = n * dim * np.dtype(np_dtype).itemsize
    meta = {"format": FORMAT, **{str(k): str(v) for k, v in metadata.items()}}
    body = json.dumps({"__metadata__": meta,
                       TENSOR: {"dtype": code, "shape": [n, dim], "data_offsets": [0, nbytes]}}).encode()
    if len(body) > HEADER_BYTES:
        raise ValueError(f"feature store metadata too large ({len(body)} > {HEADER_BYTES} bytes)")
    return struct.pack("<Q", HEADER_BYTES) + body + b" " * (HEADER_BYTES - len(body))


class FeatureWriter:
    """Append (n, D) rows to a new store at `path`; `close()` finalises it (context manager: closes on
    success, removes the temp file on an exception). `metadata` (str -> str) is written into the header."""

    def __init__(self, path: str | Path, dim: int, dtype: str = "float16",
                 metadata: dict[str, str] | None = None) -> None:
        if dtype not in _DTYPES:
            raise ValueError(f"feature store dtype must be one of {sorted(_DTYPES)}, got {dtype!r}")
        self.path, self.dim, self.dtype = Path(path), int(dim), dtype
        self.metadata: dict[str, str] = dict(metadata or {})
        self.rows = 0
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._tmp = self.path.with_name(f".{self.path.name}.{os.getpid()}.tmp")
        self._fh = open(self._tmp, "wb")  # noqa: SIM115 - closed in close()/abort()
        self._fh.write(_header(0, self.dim, dtype, {}))

    def append(self, rows: torch.Tensor | np.ndarray) -> None:
        """rows (n, D) -> appended in the store's dtype (float32 rows are rounded to float16 if so)."""
        arr = rows.detach().cpu().numpy() if isinstance(rows, torch.Tensor) else np.asarray(rows)
        if arr.ndim != 2 or arr.shape[1] != self.dim:
            raise ValueError(f"{self.path}: rows must be (n, {self.dim}), got {arr.shape}")
        self._fh.write(np.ascontiguousarray(arr, dtype=_DTYPES[self.dtype][1]).tobytes())
        self.rows += arr.shape[0]

    def close(self) -> FeatureStore:
        """Write the final header, fsync and move the file into place. -> the readable store."""
        self._fh.seek(0)
        self._fh.write(_header(self.rows, self.dim, self.dtype, self.metadata))
        self._fh.flush()
        os.fsync(self._fh.fileno())
        self._fh.close()
        os.replace(self._tmp, self.path)
        logger.debug("feature store %s: %d x %d %s", self.path, self.rows, self.dim, self.dtype)
        return FeatureStore(self.path)

    def abort(self) -> None:
        self._fh.close()
        self._tmp.unlink(missing_ok=True)

    def __enter__(self) -> FeatureWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()


class FeatureStore:
    """A finalised store: `shape` (N, D), `dtype`, `metadata`; rows read in chunks, never all at once
    unless asked (`read`)."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        try:
            with open(self.path, "rb") as fh:
                (header_len,) = struct.unpack("<Q", fh.read(8))
                if header_len > 1 << 20:
                    raise FeatureStoreError(f"{self.path}: not a feature store (header length {header_len})")
                header = json.loads(fh.read(header_len))
            size = self.path.stat().st_size
        except FileNotFoundError:
            raise FeatureStoreError(f"{self.path}: no such feature store") from None
        except (OSError, struct.error, json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise FeatureStoreError(f"{self.path}: unreadable feature store header ({exc})") from None
        self.metadata: dict[str, str] = header.get("__metadata__") or {}
        entry = header.get(TENSOR)
        if self.metadata.get("format") != FORMAT or not isinstance(entry, dict) or entry.get("dtype") not in _BY_CODE:
            raise FeatureStoreError(f"{self.path}: not a {FORMAT} file (format {self.metadata.get('format')!r})")
        n, dim = (int(v) for v in entry["shape"])
        self.dtype = _BY_CODE[entry["dtype"]]
        self._np_dtype = np.dtype(_DTYPES[self.dtype][1])
        self.shape = (n, dim)
        self._offset = 8 + header_len
        expected = self._offset + n * dim * self._np_dtype.itemsize
        if size != expected:
            raise FeatureStoreError(f"{self.path}: truncated or padded: {size} bytes, header says {expected}")

    def __len__(self) -> int:
        return self.shape[0]

    @property
    def nbytes(self) -> int:
        return self.shape[0] * self.shape[1] * self._np_dtype.itemsize

    def _read_rows(self, fh, start: int, stop: int) -> np.ndarray:
        dim = self.shape[1]
        fh.seek(self._offset + start * dim * self._np_dtype.itemsize)
        arr = np.fromfile(fh, dtype=self._np_dtype, count=(stop - start) * dim)
        return arr.reshape(stop - start, dim)

    def iter_chunks(self, rows: int = DEFAULT_CHUNK_ROWS) -> Iterator[tuple[int, np.ndarray]]:
        """(start, rows (n, D) in the store dtype) for consecutive chunks of at most `rows` rows."""
        with open(self.path, "rb") as fh:
            for start in range(0, self.shape[0], rows):
                yield start, self._read_rows(fh, start, min(start + rows, self.shape[0]))

    def gather(self, indices: torch.Tensor | np.ndarray, rows: int = DEFAULT_CHUNK_ROWS) -> np.ndarray:
        """Rows at `indices` (M,), in that order -> (M, D) in the store dtype; reads only the chunks
        that hold one of them."""
        idx = np.asarray(indices, dtype=np.int64).reshape(-1)
        if idx.size and (idx.min() < 0 or idx.max() >= self.shape[0]):
            raise IndexError(f"{self.path}: index out of range for {self.shape[0]} rows")
        out = np.empty((idx.size, self.shape[1]), dtype=self._np_dtype)
        order = np.argsort(idx, kind="stable")
        sorted_idx = idx[order]
        with open(self.path, "rb") as fh:
            lo = 0
            while lo < sorted_idx.size:
                start = int(sorted_idx[lo]) // rows * rows
                stop = min(start + rows, self.shape[0])
                hi = int(np.searchsorted(sorted_idx, stop, side="left"))
                chunk = self._read_rows(fh, start, stop)
                out[order[lo:hi]] = chunk[sorted_idx[lo:hi] - start]
                lo = hi
        return out

    def read(self) -> np.ndarray:
        """Every row (N, D) in the store dtype (for small stores and tests)."""
        with open(self.path, "rb") as fh:
            return self._read_rows(fh, 0, self.shape[0])


def merge_stores(parts: list[FeatureStore], path: str | Path, metadata: dict[str, str] | None = None,
                 rows: int = DEFAULT_CHUNK_ROWS) -> FeatureStore:
    """Concatenate stores (same D and dtype) in the given order into a new store at `path`."""
    if not parts:
        raise ValueError("merge_stores needs at least one store")
    dim, dtype = parts[0].shape[1], parts[0].dtype
    for part in parts:
        if part.shape[1] != dim or part.dtype != dtype:
            raise FeatureStoreError(f"{part.path}: {part.shape[1]} x {part.dtype} rows, expected {dim} x {dtype}")
    with FeatureWriter(path, dim, dtype, metadata) as writer:
        for part in parts:
            for _, chunk in part.iter_chunks(rows):
                writer.append(chunk)
    return FeatureStore(path)
