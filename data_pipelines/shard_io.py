"""Opening shards for streaming reads (local paths or any fsspec URL) with a stall timeout on every read."""

from __future__ import annotations

import concurrent.futures
import dataclasses
import io
from typing import BinaryIO

# Errors that say the shard is not there (retrying will not help).
PERMANENT_ERRORS = (FileNotFoundError, PermissionError, IsADirectoryError, NotADirectoryError)
_BUFFER_BYTES = 1 << 20


class ReadStalled(TimeoutError):
    """A read that returned nothing within the stall timeout."""


@dataclasses.dataclass(frozen=True)
class ReadOptions:
    """How shard reads behave when storage is slow or flaky."""

    stall_timeout_s: float = 60.0  # a single read taking longer than this counts as stalled
    retries: int = 3               # re-opens of a shard after a stall or a transient error
    backoff_s: float = 1.0         # the wait before retry i is backoff_s * 2**i


def is_local(url: str) -> bool:
    return "://" not in url or url.startswith("file://")


class _GuardedRaw(io.RawIOBase):
    """Raw reads of `f` done on a helper thread, so a read that hangs raises ReadStalled instead."""

    def __init__(self, f: BinaryIO, timeout_s: float):
        self._f, self._timeout_s = f, timeout_s
        self._pool = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="shard-read")

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        future = self._pool.submit(self._f.read, len(buffer))
        try:
            data = future.result(timeout=self._timeout_s)
        except concurrent.futures.TimeoutError:
            raise ReadStalled(f"no data for {self._timeout_s:g} s") from None
        buffer[:len(data)] = data
        return len(data)

    def close(self) -> None:
        if not self.closed:
            try:
                self._f.close()  # unblocks a stalled socket read on the helper thread
            finally:
                self._pool.shutdown(wait=False, cancel_futures=True)
        super().close()


def check_remote_support(urls: list[str]) -> None:
    """Fails once, up front, if a URL's protocol has no fsspec implementation installed (e.g. gs:// without
    gcsfs), instead of skipping every shard."""
    protocols = {url.split("://", 1)[0] for url in urls if not is_local(url)}
    if protocols:
        import fsspec
    for protocol in sorted(protocols):
        try:
            fsspec.get_filesystem_class(protocol)
        except (ImportError, ValueError) as e:
            raise ValueError(f"cannot read {protocol}:// shards: {e} (pip install 'vlm_jax[cloud]' for gs:// "
                             "and s3://)") from None


def _open_raw(url: str) -> BinaryIO:
    if is_local(url):
        return open(url.removeprefix("file://"), "rb")
    import fsspec  # imported here: fsspec is only needed for remote shards
    protocol = url.split("://", 1)[0]
    filesystem = fsspec.filesystem(protocol)
    # HTTP servers often ignore range requests: stream the body instead (block_size=0).
    block_size = 0 if protocol in ("http", "https") else _BUFFER_BYTES
    return filesystem.open(url, "rb", block_size=block_size)


def _try_seek(f: BinaryIO, offset: int) -> bool:
    """Seeks to `offset` if the file can (streamed HTTP bodies claim to but cannot); True if it did."""
    try:
        f.seek(offset)
        return True
    except (OSError, ValueError):
        return False


def open_shard(url: str, offset: int, options: ReadOptions) -> tuple[BinaryIO, bool]:
    """A buffered, stall-guarded reader positioned at byte `offset`, and whether it can seek.

    Local files read directly (no thread hop); remote ones go through fsspec.
    """
    raw = _open_raw(url)
    seekable = _try_seek(raw, offset)
    if is_local(url):
        reader: BinaryIO = raw
    else:
        reader = io.BufferedReader(_GuardedRaw(raw, options.stall_timeout_s), _BUFFER_BYTES)
    if offset and not seekable:
        remaining = offset
        while remaining:
            skipped = len(reader.read(min(remaining, _BUFFER_BYTES)))
            if not skipped:
                raise EOFError(f"{url} is shorter than the resume offset {offset}")
            remaining -= skipped
    return reader, seekable and is_local(url)
