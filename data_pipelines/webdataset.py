"""Reading webdataset tar shards: shard-list expansion and grouping tar members into samples by key."""

from __future__ import annotations

import glob
import io
import logging
import os
import re
import tarfile
from collections import Counter
from typing import Sequence

IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp")
_BRACE = re.compile(r"\{(\d+)\.\.(\d+)\}")


def expand_braces(pattern: str) -> list[str]:
    """'data/{00000..00002}.tar' -> ['data/00000.tar', 'data/00001.tar', 'data/00002.tar']."""
    match = _BRACE.search(pattern)
    if not match:
        return [pattern]
    first, last = match.groups()
    width = len(first)
    head, tail = pattern[:match.start()], pattern[match.end():]
    return [path for i in range(int(first), int(last) + 1)
            for path in expand_braces(f"{head}{i:0{width}d}{tail}")]


def expand_shards(spec: str | Sequence[str]) -> list[str]:
    """Shard paths from brace ranges, comma lists, globs or a list; fails on an empty or missing set."""
    items = spec.split(",") if isinstance(spec, str) else list(spec)
    shards = []
    for item in items:
        for path in expand_braces(item.strip()):
            shards.extend(sorted(glob.glob(path)) if glob.has_magic(path) else [path])
    if not shards:
        raise ValueError(f"no shards match {spec!r}")
    for path in shards:
        if "://" not in path and not os.path.isfile(path):
            raise FileNotFoundError(f"shard not found: {path}")
    return shards


def split_member_name(name: str) -> tuple[str, str]:
    """'dir/000012.jpg' -> ('dir/000012', 'jpg'): the key is everything before the basename's first dot."""
    directory, base = os.path.split(name)
    stem, _, extension = base.partition(".")
    return os.path.join(directory, stem), extension.lower()


def read_tar_samples(path: str, skipped: Counter | None = None) -> list[dict]:
    """All complete samples of one shard: {'__key__', '__shard__', <extension>: bytes, ...}.

    Samples without an image or a caption are skipped and counted in `skipped`; a truncated or corrupt
    tar keeps the samples read before the damage.
    """
    skipped = Counter() if skipped is None else skipped
    samples: dict[str, dict] = {}
    try:
        with open(path, "rb") as f, tarfile.open(fileobj=io.BufferedReader(f), mode="r|*") as tar:
            for member in tar:
                if not member.isfile():
                    continue
                key, extension = split_member_name(member.name)
                sample = samples.setdefault(key, {"__key__": key, "__shard__": path})
                sample[extension] = tar.extractfile(member).read()
    except (tarfile.TarError, OSError, EOFError) as e:
        skipped["unreadable_shard_tail"] += 1
        logging.warning("shard %s is damaged after %d samples: %s", path, len(samples), e)
    complete = []
    for sample in samples.values():
        if not any(ext in sample for ext in IMAGE_EXTENSIONS):
            skipped["no_image"] += 1
        elif not sample.get("txt", b"").strip():
            skipped["no_caption"] += 1
        else:
            complete.append(sample)
    return complete
