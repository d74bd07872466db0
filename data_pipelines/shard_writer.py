"""Writing webdataset tar shards as img2dataset does: {key}.jpg, {key}.txt, {key}.json per sample."""

from __future__ import annotations

import io
import json
import os
import tarfile
import time


def add_member(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode = len(data), int(time.time()), 0o644
    tar.addfile(info, io.BytesIO(data))


def write_shard(path: str, samples: list[tuple[str, bytes, str, dict]]) -> int:
    """Writes (key, jpeg bytes, caption, metadata) samples to one tar atomically; returns the count."""
    partial = f"{path}.partial"
    with tarfile.open(partial, "w") as tar:
        for key, jpeg, caption, meta in samples:
            add_member(tar, f"{key}.jpg", jpeg)
            add_member(tar, f"{key}.txt", caption.encode())
            add_member(tar, f"{key}.json", json.dumps({"key": key, "caption": caption, **meta}).encode())
    os.replace(partial, path)
    return len(samples)


def write_sizes(directory: str, sizes: dict[str, int]) -> None:
    with open(os.path.join(directory, "sizes.json"), "w") as f:
        json.dump(dict(sorted(sizes.items())), f, indent=1)
