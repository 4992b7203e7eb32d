"""Zero-copy page reads (bpfm.data.pages) against pyarrow's own decoding, and the fallbacks."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from bpfm.data.pages import map_raw_column
from bpfm.data.shards import open_shards

WIDTH = 40  # bytes per value: ten float32


def _write(path, nullable=False, nulls=False, **options) -> np.ndarray:
    values = np.random.default_rng(0).standard_normal((300, WIDTH // 4), dtype=np.float32)
    array = pa.FixedSizeBinaryArray.from_buffers(
        pa.binary(WIDTH), len(values), [None, pa.py_buffer(values.tobytes())]
    )
    if nulls:
        array = pa.array([None, *array.to_pylist()[1:]], pa.binary(WIDTH))
    schema = pa.schema([pa.field("id", pa.int64()), pa.field("x", pa.binary(WIDTH), nullable)])
    table = pa.table([pa.array(np.arange(len(values))), array], schema=schema)
    options = {"compression": {"id": "zstd", "x": "none"}, "use_dictionary": False, **options}
    pq.write_table(table, path, row_group_size=128, **options)
    return values


def _read(path) -> list:
    meta = pq.ParquetFile(path).metadata
    return [map_raw_column(str(path), meta.row_group(g).column(1), WIDTH)
            for g in range(meta.num_row_groups)]


@pytest.mark.parametrize(
    "options",
    [
        {},
        {"data_page_size": 400, "write_batch_size": 10},
        {"data_page_version": "2.0", "data_page_size": 1000, "write_batch_size": 10},
    ],
    ids=["one page per group", "many pages", "data page v2"],
)
def test_pages_hold_the_values_pyarrow_decodes(tmp_path, options):
    values = _write(tmp_path / "f.parquet", **options)
    groups = _read(tmp_path / "f.parquet")
    assert all(pages is not None for pages in groups)
    rows = np.concatenate([page.values for pages in groups for page in pages])
    np.testing.assert_array_equal(rows.view("<f4"), values)
    if "data_page_size" in options:
        assert len(groups[0]) > 1
    for pages in groups:
        assert [p.first_row for p in pages] == list(np.cumsum([0] + [len(p.values) for p in
                                                                    pages[:-1]]))


@pytest.mark.parametrize(
    "options",
    [
        {"compression": "zstd"},
        {"use_dictionary": True},
        {"nullable": True, "nulls": True},
        {"nullable": True, "data_page_version": "2.0"},
    ],
    ids=["compressed", "dictionary", "nulls", "levels"],
)
def test_other_layouts_fall_back_to_pyarrow(tmp_path, options):
    _write(tmp_path / "f.parquet", **options)
    assert _read(tmp_path / "f.parquet") == [None, None, None]


def test_shard_parts_read_raw_in_one_page_per_group_equal_to_pyarrow(synthetic_shards):
    shards = open_shards(synthetic_shards)
    part = shards.manifest["parts"][0]
    path = shards.part_path(part)
    handle = pq.ParquetFile(path)
    column = handle.schema_arrow.get_field_index("ecg_ppg")
    for group in range(handle.num_row_groups):
        pages = map_raw_column(path, handle.metadata.row_group(group).column(column), 10000)
        assert len(pages) == 1  # one page per row group: the loader gathers from whole groups
        decoded = handle.read_row_group(group, columns=["ecg_ppg"])["ecg_ppg"].to_pylist()
        assert b"".join(page.values.tobytes() for page in pages) == b"".join(decoded)
