"""Writing and checking the files of a trace directory: shards, the manifest, atomically.

Shape legend: N tokens (rows of a shard), K top-k slots, E experts.

Every file is written under a temporary name in the same directory, flushed to disk, then renamed,
so a reader or a resumed run never sees a half-written shard or manifest under its final name.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from moelab.errors import TraceError
from moelab.trace.schema import MANIFEST_NAME, Manifest, ShardInfo

_TMP_MARK = ".tmp-"
PARQUET_OPTIONS = dict(compression="zstd", write_page_checksum=True, write_statistics=False)


def _tmp_path(final: Path) -> Path:
    return final.with_name(f".{final.name}{_TMP_MARK}{os.getpid()}")


def atomic_write_bytes(final: Path, data: bytes) -> None:
    """Write ``data`` to ``final`` via a temporary file and a rename."""
    tmp = _tmp_path(final)
    with open(tmp, "wb") as fh:
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, final)


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def write_manifest(directory: Path, manifest: Manifest) -> None:
    atomic_write_bytes(directory / MANIFEST_NAME, manifest.to_json().encode())


def read_manifest(directory: Path) -> Manifest:
    path = Path(directory) / MANIFEST_NAME
    if not path.is_file():
        raise TraceError(f"{directory}: no {MANIFEST_NAME}; not a moelab trace directory")
    return Manifest.from_json(path.read_text(encoding="utf-8"), str(path))


def write_shard(directory: Path, file: str, table: pa.Table, first_row: int, first_seq: int,
                num_seqs: int) -> ShardInfo:
    """Write one shard (one row group) atomically and describe it for the manifest."""
    final = Path(directory) / file
    tmp = _tmp_path(final)
    pq.write_table(table, tmp, row_group_size=max(table.num_rows, 1), **PARQUET_OPTIONS)
    with open(tmp, "rb+") as fh:
        os.fsync(fh.fileno())
    os.replace(tmp, final)
    return ShardInfo(file=file, first_row=first_row, rows=table.num_rows, first_seq=first_seq,
                     num_seqs=num_seqs, bytes=final.stat().st_size, sha256=sha256_file(final))


def check_shard(directory: Path, shard: ShardInfo, *, full: bool) -> None:
    """Raise :class:`TraceError` naming the file if a shard is missing, truncated or corrupt.

    The quick check compares the size with the manifest and reads the Parquet footer; ``full``
    also compares the sha256 of the whole file.
    """
    path = Path(directory) / shard.file
    if not path.is_file():
        raise TraceError(f"shard {path} is missing")
    size = path.stat().st_size
    if size != shard.bytes:
        raise TraceError(f"shard {path} is truncated or altered: {size} bytes, manifest says {shard.bytes}")
    try:
        rows = pq.ParquetFile(path).metadata.num_rows
    except (OSError, pa.ArrowException) as err:
        raise TraceError(f"shard {path} is not a readable Parquet file ({err})") from None
    if rows != shard.rows:
        raise TraceError(f"shard {path} holds {rows} rows, manifest says {shard.rows}")
    if full and sha256_file(path) != shard.sha256:
        raise TraceError(f"shard {path} is corrupt: its sha256 differs from the manifest")


def read_shard_columns(directory: Path, shard: ShardInfo, columns: list[str]) -> pa.Table:
    """Read some columns of one shard, verifying page checksums; errors name the file."""
    path = Path(directory) / shard.file
    try:
        return pq.read_table(path, columns=columns, memory_map=True, page_checksum_verification=True)
    except (OSError, pa.ArrowException) as err:
        raise TraceError(f"shard {path} cannot be read ({err})") from None


def remove_trace_files(directory: Path) -> None:
    """Delete this format's files (manifest, shards, temporaries) from ``directory``, nothing else."""
    for path in Path(directory).iterdir():
        name = path.name
        ours = name == MANIFEST_NAME or (name.startswith("shard-") and name.endswith(".parquet"))
        if ours or (name.startswith(".") and _TMP_MARK in name):
            path.unlink()


def chunk_to_numpy(arr: pa.Array, width: int | None) -> np.ndarray:
    """One Arrow chunk as numpy without a copy: a fixed-size list becomes ``[rows, width]``."""
    if width is not None:
        arr = arr.flatten()  # honours the chunk's offset, shares the buffer
    out = arr.to_numpy(zero_copy_only=True)
    return out.reshape(-1, width) if width is not None else out
