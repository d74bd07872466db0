"""The one filesystem layer for workdirs: local paths, gs:// and s3:// (through etils.epath, as orbax uses).

Every file under a workdir (config.json, metrics.jsonl, TensorBoard events, eval_results.json, checkpoints) is
reached through `resolve(workdir) / name`. gs:// needs `gcsfs` (and orbax needs google-cloud-storage), s3://
needs `s3fs`; object stores cannot append, so files that grow are rewritten whole (`WholeFileWriter`).
"""

from __future__ import annotations

import io
import os

from etils import epath
from tensorboardX import record_writer

REMOTE_SCHEMES = ("gs://", "s3://")


def resolve(workdir: str | os.PathLike) -> epath.Path:
    """The workdir as an epath.Path: a remote URL as given, a local path made absolute (orbax needs that)."""
    path = os.fspath(workdir)
    if path.startswith("file://"):
        path = path[len("file://"):]
    if "://" in path and not path.startswith(REMOTE_SCHEMES):
        raise ValueError(f"workdir {path!r}: unsupported URL scheme (use a local path, gs:// or s3://)")
    return epath.Path(path) if "://" in path else epath.Path(os.path.abspath(path))


def is_remote(path: epath.Path) -> bool:
    return os.fspath(path).startswith(REMOTE_SCHEMES)


class WholeFileWriter:
    """A text or binary file on an object store: keeps the bytes and rewrites the object at every flush."""

    def __init__(self, path: epath.Path, initial: bytes = b""):
        self._path, self._buffer = epath.Path(path), io.BytesIO()
        self._buffer.write(initial)

    def write(self, data: str | bytes) -> None:
        self._buffer.write(data.encode() if isinstance(data, str) else data)

    def flush(self) -> None:
        self._path.write_bytes(self._buffer.getvalue())

    def close(self) -> None:
        self.flush()


def open_rewritten(path: epath.Path, initial: str = ""):
    """A file to write `initial` and then appended lines to, flushed after each write: a local file, or a
    `WholeFileWriter` on an object store."""
    if is_remote(path):
        return WholeFileWriter(path, initial.encode())
    handle = open(path, "w")  # noqa: SIM115 (the caller closes it)
    handle.write(initial)
    return handle


class _EpathRecordWriterFactory:
    """Lets tensorboardX write event files to gs:// and s3:// through epath (its own writers need extra
    cloud client packages and bypass the workdir layer)."""

    def open(self, path: str) -> WholeFileWriter:
        return WholeFileWriter(epath.Path(path))

    def directory_check(self, path: str) -> None:
        epath.Path(path).mkdir(parents=True, exist_ok=True)


for _scheme in REMOTE_SCHEMES:
    record_writer.register_writer_factory(_scheme.rstrip(":/"), _EpathRecordWriterFactory())
