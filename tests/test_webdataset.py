"""Reading webdataset shards: specs, exact mid-shard resume, every kind of broken shard, HTTP and stalls."""

import http.server
import io
import logging
import os
import tarfile
import threading
import time

import numpy as np
import pytest
from PIL import Image

from data_pipelines.samples import DataError
from data_pipelines.shard_io import ReadOptions
from data_pipelines.tar_members import iter_members
from data_pipelines.webdataset import FieldMap, TarShardDataset, expand_shards, read_shard

FAST_RETRY = ReadOptions(stall_timeout_s=0.5, retries=2, backoff_s=0.01)


def jpeg(seed: int, size: int = 16) -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 255, (size, size, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="JPEG")
    return buffer.getvalue()


def write_tar(path, members: list[tuple[str, bytes]]) -> str:
    with tarfile.open(path, "w") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return str(path)


def good(key: str, seed: int = 0) -> list[tuple[str, bytes]]:
    return [(f"{key}.jpg", jpeg(seed)), (f"{key}.txt", f"caption {key}".encode()),
            (f"{key}.json", b'{"label": 3}')]


def keys(records: list[dict]) -> list[str]:
    return [r["__key__"] for r in records if "__key__" in r]


def skips(records: list[dict]) -> dict[str, int]:
    counts: dict[str, int] = {}
    for record in records:
        for reason, n in record.get("__skipped__", {}).items():
            counts[reason] = counts.get(reason, 0) + n
    return counts


def test_samples_and_fields(tmp_path):
    long_key = "d" * 120  # needs a pax / GNU long-name header
    path = write_tar(tmp_path / "a.tar", good("a") + [("sub/b.png", jpeg(1)), ("sub/b.txt", b" b \n")]
                     + good(long_key))
    records = read_shard(path, FieldMap(json_fields=("label",)))
    assert keys(records) == ["a", "sub/b", long_key] and not skips(records)
    assert records[0]["caption"] == "caption a" and records[0]["label"] == 3
    assert records[1]["caption"] == "b" and records[1]["image"] == jpeg(1)
    assert all(r["__source__"] == path for r in records)


def test_member_offsets_match_tarfile(tmp_path):
    path = write_tar(tmp_path / "a.tar", good("a") + good("e" * 150) + good("c"))
    with open(path, "rb") as f:
        ours = [(m.name, m.data, m.header_offset) for m in iter_members(f)]
    with tarfile.open(path) as tar:
        theirs = [(m.name, tar.extractfile(m).read(), m.offset) for m in tar.getmembers()]
    assert ours == theirs


def test_resume_mid_shard_is_exact(tmp_path):
    path = write_tar(tmp_path / "a.tar", [m for i in range(6) for m in good(f"k{i}", i)])
    full = read_shard(path)
    for consumed in range(7):
        iterator = iter(TarShardDataset(path))
        for _ in range(consumed):
            next(iterator)
        restored = iter(TarShardDataset(path))
        restored.set_state(iterator.get_state())
        assert keys(list(restored)) == keys(full[consumed:])


def test_shard_specs(tmp_path):
    for i in range(4):
        write_tar(tmp_path / f"{i:03d}.tar", good(f"k{i}"))
    (tmp_path / "list.txt").write_text(f"# shards\n{tmp_path}/001.tar\n\n{tmp_path}/003.tar\n")
    assert expand_shards(f"{tmp_path}/{{001..002}}.tar") == [f"{tmp_path}/001.tar", f"{tmp_path}/002.tar"]
    assert expand_shards(f"{tmp_path}/*.tar,{tmp_path}/000.tar")[-1] == f"{tmp_path}/000.tar"
    assert expand_shards(str(tmp_path / "list.txt")) == [f"{tmp_path}/001.tar", f"{tmp_path}/003.tar"]
    assert expand_shards(["http://host/x.tar"]) == ["http://host/x.tar"]  # remote: checked when read
    with pytest.raises(ValueError, match="cannot read nosuchfs:// shards"):
        expand_shards("nosuchfs://bucket/{0..3}.tar")
    with pytest.raises(DataError, match="no shards match"):
        expand_shards(f"{tmp_path}/none/*.tar")
    with pytest.raises(FileNotFoundError, match="shard not found: .*004.tar"):
        expand_shards(f"{tmp_path}/{{000..004}}.tar")


def test_broken_samples_are_skipped_by_reason(tmp_path, caplog):
    members = (good("ok1") + [("nocap.jpg", jpeg(2))] + [("empty.jpg", jpeg(3)), ("empty.txt", b"  ")]
               + [("noimg.txt", b"text only")]
               + good("twice") + good("twice")[:1]  # a member repeated within its key: the key is ambiguous
               + good("once") + good("ok2") + good("once"))  # a key again, after other samples
    path = write_tar(tmp_path / "a.tar", members)
    with caplog.at_level(logging.WARNING):
        records = read_shard(path)
    assert keys(records) == ["ok1", "once", "ok2"]
    assert skips(records) == {"no_caption": 2, "no_image": 1, "duplicate_key": 2}
    assert any("no_image" in m and "a.tar" in m and "key=noimg" in m for m in caplog.messages)
    # Duplicate detection survives a resume: state saved after "ok2", restored in a fresh iterator.
    iterator = iter(TarShardDataset(path))
    while next(iterator).get("__key__") != "ok2":
        pass
    restored = iter(TarShardDataset(path))
    restored.set_state(iterator.get_state())
    assert skips(list(restored)) == {"duplicate_key": 1}


def test_truncated_garbage_and_vanished_shards(tmp_path):
    path = write_tar(tmp_path / "a.tar", [m for i in range(4) for m in good(f"k{i}", i)])
    with tarfile.open(path) as tar:
        cut = tar.getmember("k2.jpg").offset_data + 10  # inside the third sample's image
    (tmp_path / "cut.tar").write_bytes(open(path, "rb").read()[:cut])
    records = read_shard(str(tmp_path / "cut.tar"))
    assert keys(records) == ["k0", "k1"] and skips(records) == {"truncated_tar": 1}
    (tmp_path / "garbage.tar").write_bytes(os.urandom(3000))
    assert skips(read_shard(str(tmp_path / "garbage.tar"))) == {"unreadable_shard": 1}
    vanished = TarShardDataset(str(tmp_path / "gone.tar"))  # listed, then deleted before it is read
    [record] = list(vanished)
    assert record["__skipped__"] == {"unreadable_shard": 1} and "No such file" in record["__where__"]


class ShardServer:
    """http.server on 127.0.0.1 serving a folder; paths in `stall` hang mid-body, `drop` cut the body short."""

    def __init__(self, root):
        self.stall: dict[str, int] = {}  # path -> how many more requests stall
        self.drop: set[str] = set()
        self.requests: list[str] = []
        server = self

        class Handler(http.server.SimpleHTTPRequestHandler):
            def __init__(self, *args, **kwargs):
                super().__init__(*args, directory=str(root), **kwargs)

            def log_message(self, *args):
                pass

            def do_GET(self):
                server.requests.append(self.path)
                name = self.path.lstrip("/")
                if server.stall.get(name, 0) or name in server.drop:
                    body = (root / name).read_bytes()
                    self.send_response(200)
                    self.send_header("Content-Length", str(len(body)))
                    self.end_headers()
                    self.wfile.write(body[:len(body) // 2])
                    self.wfile.flush()
                    if name in server.drop:
                        self.close_connection = True
                        return
                    server.stall[name] -= 1
                    time.sleep(3)  # longer than the stall timeout
                    return
                super().do_GET()

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def close(self):
        self.httpd.shutdown()


@pytest.fixture
def served(tmp_path):
    for i in range(3):
        write_tar(tmp_path / f"{i}.tar", [m for j in range(8) for m in good(f"s{i}k{j}", j)])
    server = ShardServer(tmp_path)
    yield tmp_path, server
    server.close()


def test_http_streaming_and_resume(served):
    root, server = served
    url = f"{server.url}/1.tar"
    assert keys(read_shard(url)) == keys(read_shard(str(root / "1.tar")))
    iterator = iter(TarShardDataset(url))
    for _ in range(3):
        next(iterator)
    restored = iter(TarShardDataset(url))
    restored.set_state(iterator.get_state())
    assert keys(list(restored)) == [f"s1k{j}" for j in range(3, 8)]
    assert skips(read_shard(f"{server.url}/missing.tar", options=FAST_RETRY)) == {"unreadable_shard": 1}


def test_stalled_read_is_retried_then_skipped(served):
    root, server = served
    server.stall["0.tar"] = 1  # stalls once, then serves: every sample arrives, after one retry
    assert keys(read_shard(f"{server.url}/0.tar", options=FAST_RETRY)) == [f"s0k{j}" for j in range(8)]
    assert server.requests.count("/0.tar") == 2
    server.stall["2.tar"] = 10  # stalls on every try: the samples before the stall, then a skip
    records = read_shard(f"{server.url}/2.tar", options=FAST_RETRY)
    assert skips(records) == {"stalled_shard": 1} and 0 < len(keys(records)) < 8
    assert server.requests.count("/2.tar") == 1 + FAST_RETRY.retries
    server.drop.add("1.tar")  # the connection closes mid-body on every try
    records = read_shard(f"{server.url}/1.tar", options=FAST_RETRY)
    assert skips(records) == {"unreadable_shard": 1} and len(keys(records)) < 8
