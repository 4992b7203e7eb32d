"""Zero-copy reads of a raw signal column straight from a memory-mapped local Parquet file.

Schema v2 stores `ecg_ppg` as a required fixed_size_binary column, uncompressed, PLAIN encoded:
each data page is a small Thrift header followed by the values back to back. Parsing those
headers gives every page's rows as a byte view of the mapped file, so the loader's gathers
read the page cache directly; pyarrow's reader would first copy every value into a fresh Arrow
buffer, which costs as much memory traffic as the gather itself. Anything else (another codec or
encoding, a dictionary page, nulls, a page that does not add up) makes `map_raw_column` return
None and the caller decodes with pyarrow as usual.
"""

from __future__ import annotations

import mmap
from dataclasses import dataclass

import numpy as np
import pyarrow.parquet as pq

DATA_PAGE, DATA_PAGE_V2 = 0, 3  # parquet.thrift PageType
PLAIN = 0  # parquet.thrift Encoding


class _Unsupported(Exception):
    """A page this module does not read zero-copy (the caller falls back to pyarrow)."""


# Thrift compact protocol, only as far as page headers need (thrift/doc/specs/thrift-compact-
# protocol.md): structs of fields whose header byte holds an id delta and a type.


def _varint(buf: memoryview, pos: int) -> tuple[int, int]:
    result = shift = 0
    while True:
        byte = buf[pos]
        pos += 1
        result |= (byte & 0x7F) << shift
        if byte < 0x80:
            return result, pos
        shift += 7


def _zigzag(n: int) -> int:
    return (n >> 1) ^ -(n & 1)


def _value(buf: memoryview, pos: int, kind: int):
    """(value, next position) of one value of compact type `kind`; binaries, doubles and
    collections are skipped (None): page headers need only integers and structs."""
    if kind in (1, 2):  # bool fields carry their value in the type
        return kind == 1, pos
    if kind == 3:
        return buf[pos], pos + 1
    if kind in (4, 5, 6):
        n, pos = _varint(buf, pos)
        return _zigzag(n), pos
    if kind == 7:
        return None, pos + 8
    if kind == 8:
        n, pos = _varint(buf, pos)
        return None, pos + n
    if kind in (9, 10):  # list, set
        head = buf[pos]
        size, element = head >> 4, head & 0x0F
        pos += 1
        if size == 15:
            size, pos = _varint(buf, pos)
        return None, _skip(buf, pos, [element] * size)
    if kind == 11:  # map
        size, pos = _varint(buf, pos)
        if size == 0:
            return None, pos
        types = buf[pos]
        return None, _skip(buf, pos + 1, [types >> 4, types & 0x0F] * size)
    if kind == 12:
        return _struct(buf, pos)
    raise _Unsupported(f"thrift type {kind}")


def _skip(buf: memoryview, pos: int, kinds: list[int]) -> int:
    for kind in kinds:
        pos = pos + 1 if kind in (1, 2) else _value(buf, pos, kind)[1]  # bools: a byte each
    return pos


def _struct(buf: memoryview, pos: int) -> tuple[dict[int, object], int]:
    fields: dict[int, object] = {}
    last = 0
    while True:
        head = buf[pos]
        pos += 1
        if head == 0:
            return fields, pos
        kind, delta = head & 0x0F, head >> 4
        if delta:
            last += delta
        else:
            n, pos = _varint(buf, pos)
            last = _zigzag(n)
        fields[last], pos = _value(buf, pos, kind)


@dataclass(frozen=True)
class RawPage:
    first_row: int  # within the row group
    values: np.ndarray  # uint8 [rows, width], a view of the mapped file (unaligned: raw bytes)


def _page(buf: memoryview, pos: int, width: int) -> tuple[int, int, int]:
    """(rows, offset of the first value, offset of the next page) of the page at `pos`."""
    header, start = _struct(buf, pos)
    size = header.get(3)
    if header.get(1) == DATA_PAGE and isinstance(header.get(5), dict):
        rows, encoding = header[5].get(1), header[5].get(2)
    elif header.get(1) == DATA_PAGE_V2 and isinstance(header.get(8), dict):
        v2 = header[8]
        if v2.get(2) or v2.get(5) or v2.get(6):  # nulls, or level bytes before the values
            raise _Unsupported("data page v2 with levels")
        rows, encoding = v2.get(1), v2.get(4)
    else:
        raise _Unsupported(f"page type {header.get(1)}")
    if encoding != PLAIN or size != header.get(2) or rows is None or size != rows * width:
        raise _Unsupported("not a plain, uncompressed page of whole values")
    return rows, start, start + size


def map_raw_column(path: str, column: pq.ColumnChunkMetaData, width: int) -> list[RawPage] | None:
    """The pages of one column chunk (`width` bytes per value) as byte views of the file,
    or None when the chunk is not a required, uncompressed, PLAIN fixed-size binary column."""
    if (
        column.physical_type != "FIXED_LEN_BYTE_ARRAY"
        or column.compression != "UNCOMPRESSED"
        or column.has_dictionary_page
        or "PLAIN" not in column.encodings
    ):
        return None
    start, length = column.data_page_offset, column.total_compressed_size
    aligned = start - start % mmap.ALLOCATIONGRANULARITY
    try:
        with open(path, "rb") as file:  # the mapping outlives the descriptor
            mapped = mmap.mmap(
                file.fileno(), length + start - aligned, offset=aligned, access=mmap.ACCESS_READ
            )
    except (OSError, ValueError):  # a filesystem without mmap: pyarrow reads it instead
        return None
    buf = memoryview(mapped)
    pages, row, pos, end = [], 0, start - aligned, length + start - aligned
    try:
        while pos < end:
            rows, first, pos = _page(buf, pos, width)
            values = np.frombuffer(mapped, np.uint8, rows * width, first).reshape(rows, width)
            pages.append(RawPage(row, values))
            row += rows
    except (_Unsupported, IndexError):
        return None
    finally:
        buf.release()
    return pages if row == column.num_values and pos == end else None
