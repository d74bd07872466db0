"""webdataset tar shards: shard-list expansion and a grain dataset streaming one shard's samples.

A shard's members are grouped into samples by key (`{key}.jpg`, `{key}.txt`, `{key}.json` as img2dataset
writes them) and mapped to raw samples (see samples.py). The iterator's state is the byte offset of the next
sample's first header (with the largest key before it, for duplicate detection), so a restored iterator seeks
there, without reading the bytes before it, and yields exactly what an uninterrupted one would.
Broken samples and shards become skip records `{"__skipped__": {reason: 1}, "__where__": key or byte offset}`
instead of exceptions; a
shard's first record carries SHARD_START, so downstream can count the shards read.
"""

from __future__ import annotations

import dataclasses
import glob
import json
import logging
import os
import re
import time
from typing import Any, Iterator, Sequence

import grain

from data_pipelines.samples import DataError, SampleError
from data_pipelines.shard_io import PERMANENT_ERRORS, ReadOptions, check_remote_support, is_local, open_shard
from data_pipelines.tar_members import TarDamaged, iter_members

IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp")
LIST_FILE_SUFFIXES = (".txt", ".list")
_BRACE = re.compile(r"\{(\d+)\.\.(\d+)\}")
_LOGGED_PER_REASON = 5
_SHARD_ENDED = -1  # resume offset of a record after which the shard is finished (a shard-level skip)
SHARD_START = "__shard_start__"  # set on a shard's first record, so shards read can be counted
_logged: dict[str, int] = {}


def log_skip(reason: str, source: str, key: str, detail: Any = "") -> None:
    """Logs the first few skips of each reason in this process, naming the shard and key."""
    count = _logged.get(reason, 0)
    if count < _LOGGED_PER_REASON:
        _logged[reason] = count + 1
        logging.warning("skipped (%s) %s key=%s %s", reason, source, key or "-", detail)


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


def _read_list_file(path: str) -> list[str]:
    with open(path) as f:
        return [line.strip() for line in f if line.strip() and not line.lstrip().startswith("#")]


def expand_shards(spec: str | Sequence[str]) -> list[str]:
    """Shard paths or URLs from brace ranges, comma lists, globs, a list, or a text file of URLs (.txt/.list).

    Local shards must exist; remote ones (gs://, s3://, http(s)://) are checked when read.
    """
    items = spec.split(",") if isinstance(spec, str) else list(spec)
    shards = []
    for item in (item.strip() for item in items):
        if item.endswith(LIST_FILE_SUFFIXES) and is_local(item):
            if not os.path.isfile(item):
                raise FileNotFoundError(f"shard list file not found: {item}")
            listed = _read_list_file(item)
            shards.extend(expand_shards(listed) if listed else [])
            continue
        for path in expand_braces(item):
            shards.extend(sorted(glob.glob(path)) if is_local(path) and glob.has_magic(path) else [path])
    if not shards:
        raise DataError(f"no shards match {spec!r}")
    for path in shards:
        if is_local(path) and not os.path.isfile(path.removeprefix("file://")):
            raise FileNotFoundError(f"shard not found: {path}")
    check_remote_support(shards)
    return shards


@dataclasses.dataclass(frozen=True)
class FieldMap:
    """Which tar members make the raw sample's fields."""

    image_extensions: tuple[str, ...] = IMAGE_EXTENSIONS  # the first one present is the image
    caption_extension: str = "txt"
    require_caption: bool = True                         # False: image-only samples are kept too
    json_fields: tuple[str, ...] = ()                    # keys of {key}.json copied into the sample
    require_image: bool = True                           # False: text-only samples (no image member) are kept


def split_member_name(name: str) -> tuple[str, str]:
    """'dir/000012.jpg' -> ('dir/000012', 'jpg'): the key is everything before the basename's first dot."""
    directory, base = os.path.split(name)
    stem, _, extension = base.partition(".")
    return os.path.join(directory, stem), extension.lower()


def to_raw_sample(members: dict[str, bytes], key: str, source: str, fields: FieldMap) -> dict:
    """Raw sample from one key's members; raises SampleError(no_image | no_caption)."""
    sample: dict[str, Any] = {"__key__": key, "__source__": source}
    image = next((members[ext] for ext in fields.image_extensions if ext in members), None)
    if image is not None:
        sample["image"] = image
    elif fields.require_image:
        raise SampleError("no_image", f"members {sorted(members)}")
    caption = members.get(fields.caption_extension, b"").decode("utf-8", "replace").strip()
    if caption:
        sample["caption"] = caption
    elif fields.require_caption:
        raise SampleError("no_caption")
    if fields.json_fields and "json" in members:
        try:
            meta = json.loads(members["json"])
        except ValueError:
            meta = {}
        sample.update({name: meta[name] for name in fields.json_fields if name in meta})
    return sample


class TarShardIterator(grain.DatasetIterator):
    """Samples of one shard, resumable at sample granularity; shard faults end the shard as a skip record."""

    def __init__(self, url: str, fields: FieldMap, options: ReadOptions):
        super().__init__()
        self._url, self._fields, self._options = url, fields, options
        self._offset = 0          # byte offset of the next sample's first header (the resume point)
        self._done = False
        self._keys: set[str] = set()  # keys of the samples before self._offset, except those before _unread_offset
        self._max_key: str | None = ""  # the largest key before self._offset (None: unknown)
        self._unread_offset = 0       # after a restore: the keys before this offset are not in self._keys yet
        self._records: Iterator[tuple[dict, int]] | None = None

    def __next__(self) -> dict:
        if self._done:
            raise StopIteration
        if self._records is None:
            self._records = self._read_with_retries()
        first = self._offset == 0
        try:
            record, offset = next(self._records)
        except StopIteration:
            self._done = True
            raise
        if offset == _SHARD_ENDED:
            self._done = True
        else:
            self._offset = offset
        if first:
            record[SHARD_START] = True
        return record

    def get_state(self) -> dict:
        return {"offset": self._offset, "done": int(self._done), "max_key": self._max_key}

    def set_state(self, state: dict) -> None:
        self._offset, self._done = state["offset"], bool(state["done"])
        self._max_key = state.get("max_key") if self._offset else ""  # absent in states saved before it was kept
        self._keys, self._unread_offset, self._records = set(), self._offset, None

    def _read_with_retries(self) -> Iterator[tuple[dict, int]]:
        """(record, resume offset after it, or _SHARD_ENDED); re-opens at the last resume point after stalls or faults."""
        failures = 0
        while True:
            try:
                for record, offset in self._read_from(self._offset):
                    failures = 0
                    yield record, offset
                return
            except TarDamaged as e:  # damage before any sample: not a tar at all
                yield self._shard_skip("truncated_tar" if self._offset else "unreadable_shard", e), _SHARD_ENDED
                return
            except PERMANENT_ERRORS as e:
                yield self._shard_skip("unreadable_shard", e), _SHARD_ENDED
                return
            except Exception as e:  # stalls (ReadStalled), dropped connections, transient storage errors
                if failures >= self._options.retries:
                    reason = "stalled_shard" if isinstance(e, TimeoutError) else "unreadable_shard"
                    yield self._shard_skip(reason, e), _SHARD_ENDED
                    return
                time.sleep(self._options.backoff_s * 2 ** failures)
                failures += 1
                logging.info("retry %d of %s at byte %d after %r", failures, self._url, self._offset, e)

    def _shard_skip(self, reason: str, error: Exception) -> dict:
        log_skip(reason, self._url, "", f"at byte {self._offset}: {error!r}")
        return {"__skipped__": {reason: 1}, "__source__": self._url, "__where__": f"byte {self._offset}: {error}"}

    def _seen(self, key: str) -> bool:
        """Whether a sample before this one had `key`, so duplicate detection survives a resume.

        The keys before a restored offset are read back (a header scan from byte 0) only when `key` could be one
        of them: never while keys increase through the shard, as shard writers store them.
        """
        if key in self._keys:
            return True
        if not self._unread_offset or (self._max_key is not None and key > self._max_key):
            return False
        self._keys |= self._keys_before(self._unread_offset)
        self._unread_offset = 0
        self._max_key = max(self._keys, default="")
        return key in self._keys

    def _keys_before(self, offset: int) -> set[str]:
        """Keys of the samples before `offset` (a header scan)."""
        reader, seekable = open_shard(self._url, 0, self._options)
        with reader:
            keys = set()
            for member in iter_members(reader, 0, read_data=False, seekable=seekable):
                if member.header_offset >= offset:
                    break
                keys.add(split_member_name(member.name)[0])
            return keys

    def _read_from(self, offset: int) -> Iterator[tuple[dict, int]]:
        reader, _ = open_shard(self._url, offset, self._options)
        key, members, duplicate = None, {}, False
        with reader:
            try:
                for member in iter_members(reader, offset):
                    member_key, extension = split_member_name(member.name)
                    if member_key != key:
                        if key is not None:
                            yield self._finish(key, members, duplicate), member.header_offset
                        key, members = member_key, {}
                        duplicate = self._seen(key)
                    duplicate = duplicate or extension in members
                    members[extension] = member.data
                    end = member.end_offset
            except TarDamaged as e:
                # The cut member belongs to the next sample: the one assembled so far is complete.
                if key is not None and e.member is not None and split_member_name(e.member)[0] != key:
                    yield self._finish(key, members, duplicate), e.header_offset
                raise
            if key is not None:
                yield self._finish(key, members, duplicate), end

    def _finish(self, key: str, members: dict[str, bytes], duplicate: bool) -> dict:
        self._keys.add(key)
        if self._max_key is not None:
            self._max_key = max(self._max_key, key)
        try:
            if duplicate:
                raise SampleError("duplicate_key")
            return to_raw_sample(members, key, self._url, self._fields)
        except SampleError as e:
            log_skip(e.reason, self._url, key)
            return {"__skipped__": {e.reason: 1}, "__source__": self._url, "__where__": f"key {key}"}


class TarShardDataset(grain.IterDataset):
    """One webdataset shard as a grain IterDataset of raw samples and skip records."""

    def __init__(self, url: str, fields: FieldMap = FieldMap(), options: ReadOptions = ReadOptions()):
        super().__init__()
        self._url, self._fields, self._options = url, fields, options

    def __iter__(self) -> TarShardIterator:
        return TarShardIterator(self._url, self._fields, self._options)

    def __str__(self) -> str:
        return f"TarShardDataset({self._url})"


def read_shard(url: str, fields: FieldMap = FieldMap(), options: ReadOptions = ReadOptions()) -> list[dict]:
    """Every record of one shard in order (raw samples and skip records): for tools and tests."""
    return list(TarShardDataset(url, fields, options))
