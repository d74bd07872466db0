"""Damaged tar headers end a shard as a counted skip (never a loop); local reads that stall are retried, then skipped."""

import io
import os
import tarfile
import threading
import time

import pytest

from data_pipelines import tar_members
from data_pipelines.shard_io import ReadOptions
from data_pipelines.tar_members import TarDamaged, iter_members
from data_pipelines.webdataset import read_shard

FAST_RETRY = ReadOptions(stall_timeout_s=0.5, retries=2, backoff_s=0.01)


def block(name: str, data: bytes, kind: bytes = tarfile.REGTYPE) -> bytes:
    """One tar member as bytes: its ustar header, then its data padded to whole blocks."""
    info = tarfile.TarInfo(name)
    info.size, info.type = len(data), kind
    return info.tobuf(format=tarfile.USTAR_FORMAT) + data + b"\0" * (-len(data) % tarfile.BLOCKSIZE)


def sample(key: str) -> bytes:
    return block(f"{key}.jpg", b"\xff\xd8 image " + key.encode()) + block(f"{key}.txt", f"caption {key}".encode())


def read_within(seconds: float, path) -> list[dict]:
    """read_shard(path) on a daemon thread; its records, or a failed test if it has not returned in `seconds`."""
    result = []
    thread = threading.Thread(target=lambda: result.append(read_shard(str(path), options=FAST_RETRY)), daemon=True)
    thread.start()
    thread.join(seconds)
    assert result, f"reading {path} still running after {seconds} s"
    return result[0]


def keys(records: list[dict]) -> list[str]:
    return [r["__key__"] for r in records if "__key__" in r]


def skips(records: list[dict]) -> dict[str, int]:
    return {reason: n for r in records for reason, n in r.get("__skipped__", {}).items()}


@pytest.mark.parametrize("pax", [b"0 path=x\n", b"8 path=x\n", b"12 path=x\n", b"x1 path=x\n", b"12 size=12x\n"])
def test_malformed_pax_header_is_a_counted_skip(tmp_path, pax):
    """Record lengths of 0 (looped forever before), too short, running past the header, not a number; a size that is
    not a number."""
    path = tmp_path / "bad.tar"
    path.write_bytes(sample("k0") + sample("k1") + block("pax", pax, tarfile.XHDTYPE) + sample("k2") + b"\0" * 1024)
    records = read_within(10, path)
    # k1 may own the damaged header (its key is unknown): like any sample cut short, it is dropped with the rest.
    assert keys(records) == ["k0"] and skips(records) == {"truncated_tar": 1}
    assert "malformed pax record" in records[-1]["__where__"] or "bad pax size" in records[-1]["__where__"]


def test_header_and_member_sizes_are_bounded(monkeypatch):
    monkeypatch.setattr(tar_members, "MAX_MEMBER_BYTES", 100)
    monkeypatch.setattr(tar_members, "MAX_EXTENDED_HEADER_BYTES", 64)
    with pytest.raises(TarDamaged, match=r"member k1.jpg of 200 bytes at byte 1024 \(limit 100\)"):
        list(iter_members(io.BytesIO(block("k0.jpg", b"a" * 100) + block("k1.jpg", b"b" * 200))))
    with pytest.raises(TarDamaged, match=r"extended header of 65 bytes at byte 0 \(limit 64\)"):
        list(iter_members(io.BytesIO(block("long", b"n" * 65, tarfile.GNUTYPE_LONGNAME) + block("k.jpg", b"x"))))


class StallingPipe:
    """A named pipe at `path` whose writer sends `data[:half]` and then nothing until released (as a hung FUSE
    mount would); with `heal=True` the path is then replaced by a regular file holding all of `data`."""

    def __init__(self, path, data: bytes, heal: bool, max_stall_s: float = 5.0):
        self.path, self.released = str(path), threading.Event()
        os.mkfifo(self.path)

        def write():
            with open(self.path, "wb") as pipe:  # returns once the reader has opened the pipe
                pipe.write(data[:len(data) // 2])
                pipe.flush()
                if heal:
                    healed = f"{self.path}.healed"
                    with open(healed, "wb") as f:
                        f.write(data)
                    os.replace(healed, self.path)
                self.released.wait(max_stall_s)  # bounded, so a reader without a stall guard ends too

        threading.Thread(target=write, daemon=True).start()

    def release(self):
        self.released.set()


def test_local_read_that_stalls_is_retried_on_a_reopened_file(tmp_path):
    data = b"".join(sample(f"k{i}") for i in range(40)) + b"\0" * 1024
    pipe = StallingPipe(tmp_path / "a.tar", data, heal=True)
    start = time.perf_counter()
    records = read_within(10, pipe.path)
    pipe.release()
    assert keys(records) == [f"k{i}" for i in range(40)] and not skips(records)
    assert FAST_RETRY.stall_timeout_s <= time.perf_counter() - start < 4


def test_local_read_that_stalls_every_time_is_skipped(tmp_path):
    data = b"".join(sample(f"k{i}") for i in range(40)) + b"\0" * 1024
    pipe = StallingPipe(tmp_path / "a.tar", data, heal=False)
    start = time.perf_counter()
    records = read_within(10, pipe.path)
    pipe.release()
    assert skips(records) == {"stalled_shard": 1} and 0 < len(keys(records)) < 40
    assert "no data for 0.5 s" in records[-1]["__where__"]
    assert time.perf_counter() - start < 4  # (1 + retries) stalls of 0.5 s, not the writer's 5 s


def test_local_open_that_hangs_is_skipped(tmp_path):
    path = str(tmp_path / "nobody_writes.tar")
    os.mkfifo(path)  # opening a pipe for reading waits for a writer: none comes
    try:
        records = read_within(10, path)
        assert skips(records) == {"stalled_shard": 1} and "open: no data for 0.5 s" in records[-1]["__where__"]
    finally:  # a writer that comes and goes lets the abandoned opens return
        os.close(os.open(path, os.O_WRONLY | os.O_NONBLOCK))
