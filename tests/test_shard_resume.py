"""Resuming an http:// shard: a range request starts at the saved offset; the bytes before it are not served.

Also a benchmark of the resume time (one JSON line):
    .venv/bin/python tests/test_shard_resume.py [--samples 1000] [--image-px 160]
"""

import argparse
import http.server
import io
import json
import re
import shutil
import sys
import tarfile
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # the benchmark runs as a script

from data_pipelines.webdataset import TarShardDataset, read_shard  # noqa: E402


def jpeg(seed: int, size: int) -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 255, (size, size, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="JPEG")
    return buffer.getvalue()


def write_shard(path: Path, keys: list[str], image_px: int = 16) -> Path:
    """A webdataset tar: {key}.jpg and {key}.txt per key, in the order given."""
    with tarfile.open(path, "w") as tar:
        for seed, key in enumerate(keys):
            for name, data in ((f"{key}.jpg", jpeg(seed, image_px)), (f"{key}.txt", f"caption {key}".encode())):
                info = tarfile.TarInfo(name)
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    return path


class RangeServer:
    """http.server on 127.0.0.1 serving a folder; honours 'Range: bytes=N-' unless told to ignore it (as
    SimpleHTTPRequestHandler does), and counts the body bytes it sends."""

    def __init__(self, root: Path, honour_range: bool = True):
        self.bytes_sent = 0
        server = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_HEAD(self):
                self.respond(send_body=False)

            def do_GET(self):
                self.respond(send_body=True)

            def respond(self, send_body: bool):
                path = root / self.path.lstrip("/")
                if not path.is_file():
                    self.send_error(404)
                    return
                size = path.stat().st_size
                wanted = re.fullmatch(r"bytes=(\d+)-", self.headers.get("Range", ""))
                start = int(wanted[1]) if wanted and honour_range else 0
                if wanted and honour_range:
                    self.send_response(206)
                    self.send_header("Content-Range", f"bytes {start}-{size - 1}/{size}")
                else:
                    self.send_response(200)
                self.send_header("Content-Length", str(size - start))
                self.end_headers()
                if send_body:
                    server.bytes_sent += size - start  # counted first: the client may finish before the copy does
                    with open(path, "rb") as f:
                        f.seek(start)
                        shutil.copyfileobj(f, self.wfile)

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


def keys(records: list[dict]) -> list[str]:
    return [record.get("__key__", str(record.get("__skipped__"))) for record in records]


def restored_after(url: str, consumed: int) -> tuple[TarShardDataset, dict]:
    """A fresh iterator restored from the state of one that yielded `consumed` records, and that state."""
    iterator = iter(TarShardDataset(url))
    for _ in range(consumed):
        next(iterator)
    state = iterator.get_state()
    restored = iter(TarShardDataset(url))
    restored.set_state(state)
    return restored, state


@pytest.fixture
def shard(tmp_path):
    return write_shard(tmp_path / "0.tar", [f"k{i:03d}" for i in range(8)])


@pytest.mark.parametrize("honour_range", [True, False])
def test_restored_http_iterator_is_exact_and_skips_the_prefix(shard, honour_range):
    server = RangeServer(shard.parent, honour_range)
    try:
        url, size = f"{server.url}/{shard.name}", shard.stat().st_size
        full = read_shard(url)
        assert keys(full) == keys(read_shard(str(shard))) == [f"k{i:03d}" for i in range(8)]
        for consumed in (1, 5, 8):
            restored, state = restored_after(url, consumed)
            server.bytes_sent = 0
            assert keys(list(restored)) == keys(full[consumed:])
            # Range honoured: only the bytes from the offset; ignored: the body once, never a second prefix scan.
            assert server.bytes_sent == (size - state["offset"] if honour_range else size)
            assert 0 < state["offset"] < size
    finally:
        server.close()


def test_keys_out_of_order_still_catch_duplicates_after_resume(tmp_path):
    """Unsorted keys make a restored iterator read the keys before its offset back: duplicates stay exact."""
    shard = write_shard(tmp_path / "0.tar", ["k5", "k1", "k3", "k1", "k4", "k9"])
    server = RangeServer(tmp_path)
    try:
        url = f"{server.url}/0.tar"
        full = read_shard(url)
        assert keys(full) == ["k5", "k1", "k3", "{'duplicate_key': 1}", "k4", "k9"]
        for consumed in range(7):
            restored, _ = restored_after(url, consumed)
            assert keys(list(restored)) == keys(full[consumed:])
        restored, state = restored_after(url, 3)
        server.bytes_sent = 0
        list(restored)
        assert server.bytes_sent > shard.stat().st_size - state["offset"]  # the header scan read the prefix
        older = iter(TarShardDataset(url))
        older.set_state({"offset": state["offset"], "done": 0})  # a state saved before "max_key" was kept
        assert keys(list(older)) == keys(full[3:])
        assert older.get_state()["max_key"] == "k9"
    finally:
        server.close()


def benchmark(samples: int, image_px: int, root: Path) -> dict:
    """Seconds from restoring an iterator 90% into an http:// shard to its first sample, and bytes served."""
    shard = write_shard(root / "bench.tar", [f"{i:09d}" for i in range(samples)], image_px)
    server = RangeServer(root)
    try:
        url = f"{server.url}/bench.tar"
        restored, state = restored_after(url, samples * 9 // 10)
        server.bytes_sent = 0
        start = time.perf_counter()
        next(restored)
        seconds = time.perf_counter() - start
        return {"shard_mb": round(shard.stat().st_size / 1e6, 1), "offset_mb": round(state["offset"] / 1e6, 1),
                "resume_to_first_sample_s": round(seconds, 3), "mb_served": round(server.bytes_sent / 1e6, 1)}
    finally:
        server.close()


if __name__ == "__main__":
    import tempfile

    parser = argparse.ArgumentParser(description="resume time of an http:// shard 90% in")
    parser.add_argument("--samples", type=int, default=1000)
    parser.add_argument("--image-px", type=int, default=160)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as folder:
        print(json.dumps(benchmark(args.samples, args.image_px, Path(folder))))
