"""PulseDB -> Parquet shards: schema, round trip, manifest, idempotence, generations, crashes."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np
import pyarrow.parquet as pq
import pytest

from bpfm.data.shards import (
    MANIFEST,
    SCHEMA,
    SCHEMA_V1,
    ShardOptions,
    inspect_shards,
    open_shards,
    signal_array,
    write_shards,
)
from bpfm.errors import BpfmError, DataError
from tests.data.conftest import read_mat


def _rows_by_id(uri: str) -> dict[str, dict]:
    """segment_id -> row, signals decoded to float32 arrays (any schema version)."""
    shards = open_shards(uri)
    waves = [c for c in ("ecg_ppg", "ecg", "ppg", "abp") if c in shards.options.schema.names]
    columns = ["segment_id", "subject", "sbp", "dbp", "source"]
    table = shards.dataset().to_table(columns=waves + columns)
    rows = table.select(columns).to_pylist()
    signals = {name: signal_array(table[name]) for name in waves}
    if "ecg_ppg" in signals:
        signals["ecg"], signals["ppg"] = signals["ecg_ppg"][:, 0], signals.pop("ecg_ppg")[:, 1]
    for i, row in enumerate(rows):
        row.update({name: values[i] for name, values in signals.items()})
    return {row["segment_id"]: row for row in rows}


def test_synthetic_round_trip_equals_the_mat_files(synthetic_subset_files, synthetic_shards):
    assert open_shards(synthetic_shards).manifest["schema_version"] == 2
    shards = open_shards(synthetic_shards)
    got = _rows_by_id(synthetic_shards)
    expected = {}
    for path in synthetic_subset_files:
        expected.update(read_mat(path))
    assert sorted(got) == sorted(expected)  # same segments, ids unique
    for segment_id, want in expected.items():
        row = got[segment_id]
        assert (row["subject"], row["source"]) == (want["subject"], want["source"])
        for name in ("ecg", "ppg", "abp"):
            np.testing.assert_array_equal(row[name], want[name].astype(np.float32))
        assert row["sbp"] == np.float32(want["sbp"]) and row["dbp"] == np.float32(want["dbp"])
    counts = {
        f"{s}/{sub}": n for s, by in shards.manifest["partitions"].items() for sub, n in by.items()
    }
    assert sum(counts.values()) == len(expected) == shards.manifest["rows"]
    assert {"mimic/train", "vitaldb/train", "mimic/calfree_test"} <= set(counts)


def test_each_part_records_the_sha256_of_every_block(
    synthetic_shards, train_subset_file, monkeypatch, tmp_path
):
    import hashlib

    monkeypatch.setattr("bpfm.data.shards.BLOCK_BYTES", 100_000)  # several blocks a part
    out = tmp_path / "blocks"
    write_shards([train_subset_file], str(out))
    for shards in (open_shards(synthetic_shards), open_shards(str(out))):
        for part in shards.manifest["parts"]:
            data = Path(shards.part_path(part)).read_bytes()
            size = part["block_bytes"]
            assert part["block_sha256"] == [
                hashlib.sha256(data[at : at + size]).hexdigest() for at in range(0, len(data), size)
            ]
            assert hashlib.sha256(data).hexdigest() == part["sha256"]
    assert any(len(p["block_sha256"]) > 2 for p in open_shards(str(out)).manifest["parts"])


def test_parts_follow_schema_v2_raw_signals_zstd_rest_and_hive_layout(synthetic_shards):
    shards = open_shards(synthetic_shards)
    for part in shards.manifest["parts"]:
        assert f"/source={part['source']}/subset={part['subset']}/part-" in part["path"]
        meta = pq.ParquetFile(shards.part_path(part)).metadata
        assert meta.schema.to_arrow_schema().equals(SCHEMA)
        codecs = {meta.row_group(0).column(i).path_in_schema: meta.row_group(0).column(i)
                  .compression for i in range(meta.num_columns)}
        assert codecs["ecg_ppg"] == codecs["abp"] == "UNCOMPRESSED"
        assert codecs["sbp"] == codecs["subject"] == "ZSTD"
        assert [meta.row_group(i).num_rows for i in range(meta.num_row_groups)] == part[
            "row_groups"
        ]


def test_manifest_records_sources_parts_and_checksums(synthetic_subset_files, synthetic_shards):
    import hashlib

    manifest = open_shards(synthetic_shards).manifest
    assert manifest["schema_version"] == 2 and manifest["options"]["signals"] == "packed"
    by_name = {s["name"]: s for s in manifest["sources"]}
    for path in synthetic_subset_files:
        entry = by_name[path.name]
        assert entry["size"] == path.stat().st_size
        assert entry["sha256"] == hashlib.sha256(path.read_bytes()).hexdigest()
    for part in manifest["parts"]:
        data = Path(synthetic_shards, part["path"]).read_bytes()
        assert hashlib.sha256(data).hexdigest() == part["sha256"]
        assert len(data) == part["bytes"]


def test_challenge2015_shards_689_windows_26_subjects_with_the_files_labels(
    challenge2015_file, tmp_path
):
    manifest = write_shards([challenge2015_file], str(tmp_path / "c"))
    assert manifest["rows"] == 689
    assert manifest["partitions"] == {"other": {"challenge2015_sample": 689}}
    got = _rows_by_id(str(tmp_path / "c"))
    expected = read_mat(challenge2015_file)
    assert len({row["subject"] for row in got.values()}) == 26
    assert sorted(got) == sorted(expected)
    for segment_id, want in expected.items():
        assert got[segment_id]["sbp"] == np.float32(want["sbp"])
        assert got[segment_id]["dbp"] == np.float32(want["dbp"])
    info = inspect_shards(str(tmp_path / "c"))
    assert info["partitions"]["other/challenge2015_sample"]["subjects"] == 26


def test_rerun_is_a_no_op(train_subset_file, tmp_path):
    out = str(tmp_path / "s")
    first = write_shards([train_subset_file], out)
    part = Path(out, first["parts"][0]["path"])
    stamp = part.stat().st_mtime_ns
    again = write_shards([train_subset_file], out)
    assert again["up_to_date"] is True and first["up_to_date"] is False
    assert again["generation"] == first["generation"] and again["created"] == first["created"]
    assert part.stat().st_mtime_ns == stamp


def test_changed_source_publishes_a_new_generation_never_a_mix(train_subset_file, tmp_path):
    source = tmp_path / "in" / "Train_Subset.mat"
    source.parent.mkdir()
    shutil.copyfile(train_subset_file, source)
    out = str(tmp_path / "s")
    old = write_shards([source], out)
    with h5py.File(source, "r+") as f:
        f["Subset/SBP"][0, 0] = 199.0
    new = write_shards([source], out)
    assert new["generation"] != old["generation"]
    # the previous generation stays readable for runs that pinned it (bpfm data gc drops it)
    assert sorted(os.listdir(out)) == sorted([MANIFEST, new["generation"], old["generation"]])
    assert new["previous"] == [old["generation"]]
    shards = open_shards(out)
    files = {str(p.relative_to(out)) for p in Path(out, new["generation"]).rglob("*.parquet")}
    assert files == {p["path"] for p in shards.manifest["parts"]}
    sbp = shards.dataset().to_table(columns=["sbp"])["sbp"].to_numpy()
    assert len(sbp) == old["rows"] and 199.0 in sbp


def test_a_folder_without_manifest_is_refused(tmp_path):
    (tmp_path / "x").mkdir()
    with pytest.raises(BpfmError, match="no _manifest.json"):
        open_shards(str(tmp_path / "x"))


def test_drop_invalid_counts_dropped_rows_in_the_manifest(editable_subset, tmp_path):
    with h5py.File(editable_subset, "r+") as f:
        f["Subset/SBP"][0, 1] = np.nan
        f["Subset/SBP"][0, 2] = np.nan
        f["Subset/DBP"][0, 3] = f["Subset/SBP"][0, 3] + 1
    n = len(read_mat(editable_subset))
    with pytest.raises(DataError, match="Subset/SBP"):
        write_shards([editable_subset], str(tmp_path / "strict"))
    assert not (tmp_path / "strict" / MANIFEST).exists()
    manifest = write_shards([editable_subset], str(tmp_path / "s"), drop_invalid=True)
    assert manifest["dropped"] == {"nonfinite_sbp": 2, "sbp_not_above_dbp": 1}
    assert manifest["rows"] == n - 3
    assert manifest["sources"][0]["dropped"] == manifest["dropped"]


def test_no_abp_drops_the_abp_column(editable_subset, tmp_path):
    manifest = write_shards([editable_subset], str(tmp_path / "s"), include_abp=False)
    assert "abp" not in manifest["schema"]
    part = Path(tmp_path, "s", manifest["parts"][0]["path"])
    assert "abp" not in pq.ParquetFile(part).schema_arrow.names
    table = open_shards(str(tmp_path / "s")).dataset().to_table(columns=["ecg_ppg", "sbp"])
    assert table.num_rows == manifest["rows"] > 0


def test_failure_in_a_worker_process_names_the_file_and_publishes_nothing(
    synthetic_subset_files, editable_subset, tmp_path
):
    with h5py.File(editable_subset, "r+") as f:
        f["Subset/Signals"][5, 0, 2] = np.inf
    good = next(p for p in synthetic_subset_files if p.name == "CalFree_Test_Subset.mat")
    out = tmp_path / "s"
    with pytest.raises(DataError) as caught:
        write_shards([good, editable_subset], str(out), workers=2)
    assert caught.value.file == str(editable_subset) and "Signals" in caught.value.field
    assert not (out / MANIFEST).exists()
    assert not list(out.rglob("*.parquet"))


_KILL_AFTER_FIRST_PART = """
import os, signal, sys
from bpfm.data import shards
close = shards._PartitionWriter._close_part
def close_then_die(self):
    close(self)
    if any("sha256" in part for part in self.parts):
        os.kill(os.getpid(), signal.SIGKILL)
shards._PartitionWriter._close_part = close_then_die
shards.write_shards(sys.argv[2:], sys.argv[1], workers=1)
"""


def test_a_conversion_killed_midway_leaves_nothing_visible_and_a_rerun_completes(
    synthetic_subset_files, challenge2015_file, tmp_path
):
    out = tmp_path / "s"
    files = [str(p) for p in synthetic_subset_files[:2]]
    old = write_shards(files, str(out))
    killed = subprocess.run(
        [sys.executable, "-c", _KILL_AFTER_FIRST_PART, str(out), *files, str(challenge2015_file)],
        capture_output=True,
    )
    assert killed.returncode == -9
    written = [p for p in out.rglob("*.parquet") if old["generation"] not in str(p)]
    assert written, "the kill came after the first part was written"
    assert json.loads((out / MANIFEST).read_text())["generation"] == old["generation"]
    assert open_shards(str(out)).manifest["rows"] == old["rows"]  # the old set, untouched
    new = write_shards([*files, challenge2015_file], str(out))
    assert new["rows"] == old["rows"] + 689
    # the killed run's folder is gone, the previous generation is kept
    assert {p.name for p in out.iterdir()} == {MANIFEST, new["generation"], old["generation"]}


@pytest.mark.parametrize("signals", ["list", "bytes"])
def test_schema_v1_shards_still_write_and_read(editable_subset, tmp_path, signals):
    """DESIGN's v1 ("list": fixed_size_list<float32>, zstd) and the v1 "bytes" variant."""
    out = str(tmp_path / signals)
    manifest = write_shards([editable_subset], out, signals=signals)
    assert manifest["schema_version"] == 1
    meta = pq.ParquetFile(Path(out, manifest["parts"][0]["path"])).metadata
    if signals == "list":
        assert meta.schema.to_arrow_schema().equals(SCHEMA_V1)
        assert meta.row_group(0).column(2).compression == "ZSTD"
    got, expected = _rows_by_id(out), read_mat(editable_subset)
    assert sorted(got) == sorted(expected)
    for segment_id, want in expected.items():
        for name in ("ecg", "ppg", "abp"):
            np.testing.assert_array_equal(got[segment_id][name], want[name].astype(np.float32))


def test_an_unknown_schema_version_is_refused(editable_subset, tmp_path):
    out = tmp_path / "s"
    write_shards([editable_subset], str(out))
    manifest = json.loads((out / MANIFEST).read_text())
    (out / MANIFEST).write_text(json.dumps({**manifest, "schema_version": 3}))
    with pytest.raises(BpfmError, match="schema_version 3 is not supported"):
        open_shards(str(out))


def test_the_default_options_record_what_they_always_did_so_conversion_keys_stay():
    """The manifest's `options` and so every conversion key: byte for byte as before the part
    and row-group sizes became options."""
    zstd, raw = "zstd", "none"
    before = {
        "include_abp": True,
        "drop_invalid": False,
        "signals": "packed",
        "row_group_size": 4096,
        "rows_per_part": 16384,
        "compression": {"segment_id": zstd, "subject": zstd, "ecg_ppg": raw, "abp": raw,
                        "sbp": zstd, "dbp": zstd, "age": zstd, "height": zstd, "weight": zstd,
                        "bmi": zstd, "gender": zstd},
    }
    assert json.dumps(ShardOptions().as_dict()) == json.dumps(before)
    assert ShardOptions.from_dict(before) == ShardOptions()
    recorded = ShardOptions(rows_per_part=6, row_group_size=3)
    assert ShardOptions.from_dict(recorded.as_dict()) == recorded
    older = {k: v for k, v in before.items() if k not in ("rows_per_part", "row_group_size")}
    assert ShardOptions.from_dict(older) == ShardOptions()  # not recorded: the defaults


@pytest.mark.parametrize("name", ["rows_per_part", "row_group_size"])
@pytest.mark.parametrize("value", [0, -1, 2.5, True, "8"])
def test_a_part_or_row_group_size_that_is_not_a_positive_integer_is_refused(name, value):
    with pytest.raises(BpfmError, match=f"^{name}: expected a positive integer"):
        ShardOptions(**{name: value})


def test_a_set_written_with_rows_per_part_records_it_and_cuts_its_parts_at_it(
    synthetic_pulsedb, train_subset_file, tmp_path
):
    """Parts of N rows (whole row groups), the last of each input's partition holding the rest;
    two Subj_Wins inputs share one partition, their parts numbered apart at N rows a part."""
    n, group = 6, 3
    wins = sorted((synthetic_pulsedb / "Segment_Files" / "PulseDB_MIMIC").glob("*.mat"))[:2]
    out = str(tmp_path / "s")
    manifest = write_shards([train_subset_file, *wins], out, rows_per_part=n,
                            row_group_size=group)
    assert manifest["options"]["rows_per_part"] == n
    assert manifest["options"]["row_group_size"] == group
    assert open_shards(out).options == ShardOptions(rows_per_part=n, row_group_size=group)

    def cut(rows: int, size: int) -> list[int]:
        return [size] * (rows // size) + ([rows % size] if rows % size else [])

    by_partition: dict[tuple[str, str], list[dict]] = {}
    for part in manifest["parts"]:
        by_partition.setdefault((part["source"], part["subset"]), []).append(part)
        assert part["row_groups"] == cut(part["rows"], group)
        meta = pq.ParquetFile(Path(out, part["path"])).metadata
        assert [meta.row_group(i).num_rows for i in range(meta.num_row_groups)] == part[
            "row_groups"
        ]
    train = [by_partition[(s, "train")] for s in ("mimic", "vitaldb")]
    for parts in train:  # one input each
        assert [p["rows"] for p in parts] == cut(sum(p["rows"] for p in parts), n)
    segments = sorted(by_partition[("mimic", "segments")], key=lambda p: p["path"])
    inputs = [s for s in manifest["sources"] if s["kind"] == "subj_wins"]
    assert len(inputs) == 2 and all(s["rows"] > n for s in inputs)
    assert [p["rows"] for p in segments] == [k for s in inputs for k in cut(s["rows"], n)]
    numbers = [int(Path(p["path"]).stem.removeprefix("part-")) for p in segments]
    owned = -(-inputs[0]["segments"] // n)
    assert numbers == [*range(len(cut(inputs[0]["rows"], n))),
                       *range(owned, owned + len(cut(inputs[1]["rows"], n)))]
    again = write_shards([train_subset_file, *wins], out, rows_per_part=n, row_group_size=group)
    assert again["up_to_date"] is True  # the same sizes: the same key, verified intact
