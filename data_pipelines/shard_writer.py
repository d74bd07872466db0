"""Writing webdataset tar shards as img2dataset does: {key}.{jpg|png|webp}, {key}.txt, {key}.json per sample."""

from __future__ import annotations

import contextlib
import io
import json
import os
import tarfile
import time
from typing import Iterable, NamedTuple


class ShardSample(NamedTuple):
    """One sample: the image member is {key}.{extension}; a sample without a caption gets no .txt member."""
    key: str
    image: bytes
    extension: str
    caption: str | None
    meta: dict


def add_member(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode = len(data), int(time.time()), 0o644
    tar.addfile(info, io.BytesIO(data))


def write_shard(path: str, samples: Iterable[ShardSample]) -> int:
    """Writes samples to one tar atomically (via {path}.partial, removed if writing fails); returns the count."""
    partial, count = f"{path}.partial", 0
    try:
        with tarfile.open(partial, "w") as tar:
            for sample in samples:
                add_member(tar, f"{sample.key}.{sample.extension}", sample.image)
                meta = {"key": sample.key}
                if sample.caption is not None:
                    add_member(tar, f"{sample.key}.txt", sample.caption.encode())
                    meta["caption"] = sample.caption
                add_member(tar, f"{sample.key}.json", json.dumps({**meta, **sample.meta}).encode())
                count += 1
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.remove(partial)
        raise
    os.replace(partial, path)
    return count


def write_sizes(directory: str, sizes: dict[str, int]) -> None:
    with open(os.path.join(directory, "sizes.json"), "w") as f:
        json.dump(dict(sorted(sizes.items())), f, indent=1)
