"""Opening shards for streaming reads (local and FUSE paths, any fsspec URL) at a byte offset, with a stall timeout
on every open and read."""

from __future__ import annotations

import dataclasses
import io
import queue
import threading
from typing import BinaryIO, Callable, TypeVar

# Errors that say the shard is not there (retrying will not help).
PERMANENT_ERRORS = (FileNotFoundError, PermissionError, IsADirectoryError, NotADirectoryError)
_BUFFER_BYTES = 1 << 20        # remote reads
_LOCAL_BUFFER_BYTES = 1 << 18  # local reads: fewer bytes per read when a header scan seeks over member data
T = TypeVar("T")


class ReadStalled(TimeoutError):
    """A read that returned nothing within the stall timeout."""


@dataclasses.dataclass(frozen=True)
class ReadOptions:
    """How shard reads behave when storage is slow or flaky."""

    stall_timeout_s: float = 60.0  # a single open or read taking longer than this counts as stalled
    retries: int = 3               # re-opens of a shard after a stall or a transient error
    backoff_s: float = 1.0         # the wait before retry i is backoff_s * 2**i


def is_local(url: str) -> bool:
    return "://" not in url or url.startswith("file://")


class _StallGuard:
    """Runs calls one at a time on a daemon thread; one that does not return within `timeout_s` raises ReadStalled.

    A stalled call is abandoned, not interrupted (a read stuck in the kernel on a hung FUSE mount cannot be), and
    the guard refuses further calls; the daemon thread never keeps the process alive.
    """

    def __init__(self, timeout_s: float):
        self._timeout_s = timeout_s
        self._calls: queue.SimpleQueue = queue.SimpleQueue()
        self._results: queue.SimpleQueue = queue.SimpleQueue()
        self.stalled = False
        threading.Thread(target=self._serve, name="shard-read", daemon=True).start()

    def _serve(self) -> None:
        while (call := self._calls.get()) is not None:
            try:
                self._results.put((call(), None))
            except BaseException as e:  # handed to the caller, raised there
                self._results.put((None, e))

    def run(self, call: Callable[[], T], what: str) -> T:
        """call() on the guard's thread; raises what it raises, or ReadStalled after the timeout."""
        if self.stalled:
            raise ReadStalled(f"{what} after a stalled read")
        self._calls.put(call)
        try:
            result, error = self._results.get(timeout=self._timeout_s)
        except queue.Empty:
            self.stalled = True
            raise ReadStalled(f"{what}: no data for {self._timeout_s:g} s") from None
        if error is not None:
            raise error
        return result

    def stop(self) -> None:
        self._calls.put(None)


class _GuardedRaw(io.RawIOBase):
    """Raw reads and seeks of the open file `f`, each through the stall guard."""

    def __init__(self, f: BinaryIO, guard: _StallGuard, seekable: bool):
        self._f, self._guard, self._seekable = f, guard, seekable

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return self._seekable

    def seek(self, offset: int, whence: int = 0) -> int:
        return self._guard.run(lambda: self._f.seek(offset, whence), "seek")

    def tell(self) -> int:
        return self._f.tell()

    def readinto(self, buffer) -> int:
        data = self._guard.run(lambda: self._f.read(len(buffer)), "read")
        buffer[:len(data)] = data
        return len(data)

    def close(self) -> None:
        if not self.closed:
            if self._guard.stalled:  # closing unblocks a stalled socket read; on a hung mount close may hang too
                threading.Thread(target=self._f.close, name="shard-close", daemon=True).start()
            else:
                self._f.close()
            self._guard.stop()
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


def _try_seek(f: BinaryIO, offset: int) -> bool:
    """Seeks to `offset` if the file can (a pipe cannot); True if it did."""
    try:
        f.seek(offset)
        return True
    except (OSError, ValueError):
        return False


def _open_http(filesystem, url: str, offset: int) -> tuple[BinaryIO, int]:
    """The body streamed from `offset` by a range request (one GET), or from 0 by a server that ignores Range."""
    if not offset:
        return filesystem.open(url, "rb", block_size=0), 0
    f = filesystem.open(url, "rb", block_size=0, headers={"Range": f"bytes={offset}-"})
    response = f.r  # fsspec's HTTPStreamFile keeps the aiohttp response
    honoured = response.status == 206 and response.headers.get("Content-Range", "").startswith(f"bytes {offset}-")
    return f, offset if honoured else 0


def _open_at(url: str, offset: int) -> tuple[BinaryIO, int]:
    """The raw shard and the position it is at: `offset`, or 0 where the storage cannot start there."""
    if is_local(url):
        f = open(url.removeprefix("file://"), "rb", buffering=0)
        return f, offset if not offset or _try_seek(f, offset) else 0
    import fsspec  # imported here: fsspec is only needed for remote shards
    protocol = url.split("://", 1)[0]
    filesystem = fsspec.filesystem(protocol)
    if protocol in ("http", "https"):
        return _open_http(filesystem, url, offset)
    f = filesystem.open(url, "rb", block_size=_BUFFER_BYTES)  # reads are range requests: seeking is free
    return f, offset if not offset or _try_seek(f, offset) else 0


def _drop(reader: BinaryIO, size: int, short_message: str) -> None:
    """Reads and drops `size` bytes; EOFError(short_message) if the reader ends first."""
    while size:
        dropped = len(reader.read(min(size, _BUFFER_BYTES)))
        if not dropped:
            raise EOFError(short_message)
        size -= dropped


def open_shard(url: str, offset: int, options: ReadOptions) -> tuple[BinaryIO, bool]:
    """A buffered reader positioned at byte `offset`, and whether it seeks cheaply (local files).

    The open and every read run under the stall guard, for local and FUSE paths as for remote URLs. Local files
    and fsspec files seek to `offset`; http(s) shards use a range request. Only storage that cannot start at
    `offset` (a pipe, an HTTP server that ignores Range) has the bytes before it read and dropped.
    """
    guard = _StallGuard(options.stall_timeout_s)
    try:
        raw, position = guard.run(lambda: _open_at(url, offset), "open")
    except BaseException:
        guard.stop()
        raise
    local = is_local(url)
    reader = io.BufferedReader(_GuardedRaw(raw, guard, seekable=local and position == offset),
                               _LOCAL_BUFFER_BYTES if local else _BUFFER_BYTES)
    try:
        _drop(reader, offset - position, f"{url} is shorter than the resume offset {offset}")
    except BaseException:
        reader.close()
        raise
    return reader, local and position == offset
