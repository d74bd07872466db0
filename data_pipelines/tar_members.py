"""A streaming tar reader that reports byte offsets, so a reader can resume at any member header.

Python's `tarfile` in stream mode cannot start at an offset nor skip data by seeking; webdataset shards need
both (exact mid-shard resume, cheap header scans). Handles ustar, GNU long names and pax path/size records,
which covers the tars written by GNU tar, Python's tarfile and img2dataset. Sizes are bounded
(MAX_EXTENDED_HEADER_BYTES, MAX_MEMBER_BYTES) and malformed headers raise TarDamaged, so a damaged or hostile
archive can neither loop nor exhaust memory.
"""

from __future__ import annotations

import dataclasses
from typing import BinaryIO, Iterator

BLOCK = 512
_REGULAR_TYPES = (b"0", b"\0", b"7")
MAX_EXTENDED_HEADER_BYTES = 1 << 20  # a GNU long name or pax header (paths, sizes) is never near this
MAX_MEMBER_BYTES = 1 << 30           # a member read into memory (an image, a caption) is never near this


class TarDamaged(ValueError):
    """The archive ends inside a member or holds a header that is not a tar header.

    `member` names the member whose data was cut short (None when a header was damaged), `header_offset`
    where its header starts.
    """

    def __init__(self, message: str, member: str | None = None, header_offset: int = 0):
        super().__init__(message)
        self.member, self.header_offset = member, header_offset


@dataclasses.dataclass
class Member:
    name: str
    data: bytes | None  # None when the reader was asked to skip data
    header_offset: int  # where this member's first header (incl. long-name/pax headers) starts
    end_offset: int     # where the next header starts


def _read_exactly(f: BinaryIO, size: int) -> bytes:
    chunks, remaining = [], size
    while remaining:
        chunk = f.read(remaining)
        if not chunk:
            break
        chunks.append(chunk)
        remaining -= len(chunk)
    return b"".join(chunks)


def _skip(f: BinaryIO, size: int, seekable: bool) -> None:
    if seekable:
        f.seek(size, 1)
    elif len(_read_exactly(f, size)) != size:
        raise TarDamaged("archive ends inside a member")


def _parse_number(field: bytes, offset: int) -> int:
    if field and field[0] & 0x80:  # GNU base-256 for sizes of 8 GiB and more
        return int.from_bytes(field[1:], "big")
    text = field.split(b"\0", 1)[0].strip()
    try:
        return int(text, 8) if text else 0
    except ValueError:
        raise TarDamaged(f"bad size field in the tar header at byte {offset}") from None


def _check_header(header: bytes, offset: int) -> None:
    stored = header[148:156].split(b"\0", 1)[0].strip()
    try:
        expected = int(stored, 8)
    except ValueError:
        raise TarDamaged(f"no tar header at byte {offset}") from None
    actual = sum(header[:148]) + 8 * 32 + sum(header[156:])
    if actual != expected:
        raise TarDamaged(f"bad tar header checksum at byte {offset}")


def _pax_records(data: bytes, offset: int) -> dict[str, str]:
    """Records '<length> <key>=<value>\\n' of the pax header at byte `offset`; TarDamaged if malformed."""
    records, position = {}, 0
    while position < len(data) and data[position:position + 1] != b"\0":
        length_text, space, _ = data[position:position + 20].partition(b" ")
        length = int(length_text) if space and length_text.isdigit() else 0
        end = position + length
        if length <= len(length_text) + 1 or end > len(data) or data[end - 1:end] != b"\n":
            raise TarDamaged(f"malformed pax record in the header at byte {offset}")
        key, _, value = data[position + len(length_text) + 1:end - 1].partition(b"=")
        records[key.decode("utf-8", "replace")] = value.decode("utf-8", "replace")
        position = end
    return records


def _pax_size(records: dict[str, str], offset: int) -> int:
    text = records["size"]
    if not (text.isascii() and text.isdigit()):
        raise TarDamaged(f"bad pax size {text[:20]!r} in the header at byte {offset}")
    return int(text)


def iter_members(f: BinaryIO, start_offset: int = 0, *, read_data: bool = True,
                 seekable: bool = False) -> Iterator[Member]:
    """Regular-file members from `f`, which is positioned at `start_offset` (a header boundary).

    With `read_data=False` the data is skipped (seeked over when `seekable`), for fast header scans.
    Raises TarDamaged if the archive is cut inside a header or member, a header is malformed, or a size exceeds
    MAX_EXTENDED_HEADER_BYTES (extended headers) or MAX_MEMBER_BYTES (members).
    """
    offset = start_offset
    long_name: str | None = None
    pax: dict[str, str] = {}
    member_start = offset
    while True:
        header = _read_exactly(f, BLOCK)
        if not header or header == b"\0" * BLOCK:
            if long_name is not None or pax:
                raise TarDamaged("archive ends after an extended header")
            return
        if len(header) < BLOCK:
            raise TarDamaged(f"archive ends inside the header at byte {offset}")
        _check_header(header, offset)
        header_offset = offset
        size = _parse_number(header[124:136], header_offset)
        kind = header[156:157]
        padded = -(-size // BLOCK) * BLOCK
        offset += BLOCK
        if kind in (b"L", b"x", b"g"):
            if size > MAX_EXTENDED_HEADER_BYTES:
                raise TarDamaged(f"extended header of {size} bytes at byte {header_offset} (limit "
                                 f"{MAX_EXTENDED_HEADER_BYTES})")
            data = _read_exactly(f, padded)
            if len(data) < padded:
                raise TarDamaged("archive ends inside an extended header")
            offset += padded
            if kind == b"L":
                long_name = data[:size].split(b"\0", 1)[0].decode("utf-8", "replace")
            elif kind == b"x":
                pax = _pax_records(data[:size], header_offset)
            continue
        if "size" in pax:
            size = _pax_size(pax, header_offset)
            padded = -(-size // BLOCK) * BLOCK
        name = pax.get("path") or long_name
        if name is None:
            name = header[:100].split(b"\0", 1)[0].decode("utf-8", "replace")
            prefix = header[345:500].split(b"\0", 1)[0] if header[257:262] == b"ustar" else b""
            if prefix:
                name = f"{prefix.decode('utf-8', 'replace')}/{name}"
        if size > MAX_MEMBER_BYTES and kind in _REGULAR_TYPES:
            raise TarDamaged(f"member {name} of {size} bytes at byte {header_offset} (limit {MAX_MEMBER_BYTES})")
        data = None
        if kind in _REGULAR_TYPES and read_data:
            block = _read_exactly(f, padded)
            if len(block) < size:
                raise TarDamaged(f"archive ends inside member {name}", name, member_start)
            data = block[:size]
        else:
            _skip(f, padded, seekable)
        offset += padded
        if kind in _REGULAR_TYPES:
            yield Member(name, data, member_start, offset)
        long_name, pax, member_start = None, {}, offset
