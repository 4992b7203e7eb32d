"""Issue 15 items 4 and 5: a shard set is checked against its manifest (`bpfm data verify`,
cheaply before training), `bpfm data shard` repairs what fails instead of calling it up to
date, and a corrupt or incomplete `_manifest.json` is one line naming the file, which
`bpfm data shard` then replaces."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from bpfm.cli import main
from bpfm.data.shards import MANIFEST, open_shards, write_shards
from bpfm.data.verify import verify_shards
from bpfm.errors import BpfmError


@pytest.fixture
def shard_set(tmp_path, synthetic_subset_files) -> tuple[list[Path], Path]:
    """Three synthetic Subset files sharded into a private set."""
    files = [p for p in synthetic_subset_files if p.name.startswith(("Train", "CalFree", "AAMI_T"))]
    out = tmp_path / "s"
    write_shards(files, str(out))
    return files, out


def _part(out: Path, subset: str) -> tuple[dict, Path]:
    part = next(p for p in json.loads((out / MANIFEST).read_text())["parts"]
                if p["subset"] == subset)
    return part, out / part["path"]


def _flip_signal_bytes(path: Path) -> None:
    """Bytes changed in place, size unchanged: inside the first row group's signal data."""
    meta = pq.ParquetFile(path).metadata
    column = meta.row_group(0).column(2)  # ecg_ppg
    offset = column.data_page_offset + column.total_compressed_size // 2
    with open(path, "r+b") as handle:
        handle.seek(offset)
        data = handle.read(16)
        handle.seek(offset)
        handle.write(bytes(b ^ 0xFF for b in data))


def _last_error(capsys) -> str:
    lines = capsys.readouterr().err.strip().splitlines()
    assert lines and lines[-1].startswith("bpfm: error: "), lines
    return lines[-1]


def _train_args(out: Path, run: Path) -> list[str]:
    return ["train", "--data", str(out), "--epochs", "1", "--freeze", "frozen", "--batch-size",
            "4", "--max-steps-per-epoch", "1", "--device", "cpu", "--out", str(run)]


def test_changed_bytes_fail_deep_verification_and_data_shard_repairs_that_file_only(
    shard_set, capsys
):
    files, out = shard_set
    before = open_shards(str(out)).dataset().to_table().sort_by("segment_id")
    part, damaged = _part(out, "calfree_test")
    _, intact = _part(out, "train")
    stamp = intact.stat().st_mtime_ns
    _flip_signal_bytes(damaged)
    assert main(["data", "verify", str(out)]) == 0  # sizes and footers still match
    capsys.readouterr()
    assert main(["data", "verify", str(out), "--deep", "--json"]) == 2
    captured = capsys.readouterr()
    report = json.loads(captured.out.strip().splitlines()[-1])
    assert not report["ok"] and [p["path"] for p in report["problems"]] == [part["path"]]
    error = captured.err.strip().splitlines()[-1]
    assert error == (f"bpfm: error: {out}: {part['path']}: sha256 differs from the manifest's: "
                     "its bytes changed; the set fails verification (`bpfm data shard` with the "
                     "same inputs repairs it)")
    repaired = write_shards(files, str(out))  # before: "already up to date"
    assert repaired["up_to_date"] is False and repaired["repaired"] == ["CalFree_Test_Subset.mat"]
    assert verify_shards(open_shards(str(out)), deep=True)["ok"]
    assert not damaged.exists() and intact.stat().st_mtime_ns == stamp  # only that file redone
    after = open_shards(str(out)).dataset().to_table().sort_by("segment_id")
    assert after.equals(before)
    assert write_shards(files, str(out))["up_to_date"] is True


def test_a_truncated_part_fails_the_cheap_check_and_training_refuses_to_start(
    shard_set, tmp_path, capsys
):
    files, out = shard_set
    part, path = _part(out, "train")
    os.truncate(path, path.stat().st_size - 100)
    assert main(["data", "verify", str(out)]) == 2
    error = _last_error(capsys)
    size = part["bytes"]
    assert f"{part['path']}: {size - 100} bytes, the manifest says {size}" in error
    assert main(_train_args(out, tmp_path / "run")) == 2
    assert "fails verification" in _last_error(capsys)
    assert not (tmp_path / "run" / "checkpoints").exists()
    write_shards(files, str(out))
    assert verify_shards(open_shards(str(out)), deep=True)["ok"]


@pytest.mark.parametrize("edit, problem", [
    (lambda m: m["parts"][0].update(rows=m["parts"][0]["rows"] + 5), "rows in its footer"),
    (lambda m: m.update(rows=m["rows"] + 1), "_manifest.json: rows: "),
    (lambda m: m["partitions"]["mimic"].update(train=1), "partitions: row counts differ"),
])
def test_a_manifest_whose_counts_were_edited_fails_and_data_shard_republishes(
    shard_set, capsys, edit, problem
):
    files, out = shard_set
    manifest = json.loads((out / MANIFEST).read_text())
    edit(manifest)
    (out / MANIFEST).write_text(json.dumps(manifest))
    assert main(["data", "verify", str(out)]) == 2
    assert problem in _last_error(capsys)
    assert write_shards(files, str(out))["up_to_date"] is False
    assert verify_shards(open_shards(str(out)))["ok"]


MANIFEST_DAMAGE = {
    "invalid_json": (lambda text: text[: len(text) // 2], "not valid JSON"),
    "empty": (lambda text: "", "not valid JSON"),
    "not_an_object": (lambda text: "[1, 2]", "not a JSON object"),
    "missing_parts": (lambda text: json.dumps({k: v for k, v in json.loads(text).items()
                                               if k != "parts"}), "parts: missing key"),
    "rows_a_string": (lambda text: json.dumps({**json.loads(text), "rows": "many"}),
                      "rows: expected an integer"),
    "part_without_path": (lambda text: json.dumps({**json.loads(text), "parts": [
                              {k: v for k, v in p.items() if k != "path"}
                              for p in json.loads(text)["parts"]]}),
                          "parts[0].path: missing key"),
    "rows_per_part_zero": (lambda text: json.dumps({**json.loads(text), "options": {
                               **json.loads(text)["options"], "rows_per_part": 0}}),
                           "options.rows_per_part: expected a positive integer, got 0"),
    "a_block_checksum_short": (lambda text: json.dumps({**json.loads(text), "parts": [
                                   {**p, "block_sha256": p["block_sha256"][:-1] or ["x", "y"]}
                                   for p in json.loads(text)["parts"]]}),
                               "parts[0].block_sha256: "),
}


@pytest.mark.parametrize("case", sorted(MANIFEST_DAMAGE))
def test_a_corrupt_manifest_is_one_line_everywhere_and_data_shard_republishes(
    shard_set, tmp_path, capsys, case
):
    files, out = shard_set
    damage, problem = MANIFEST_DAMAGE[case]
    good = json.loads((out / MANIFEST).read_text())
    (out / MANIFEST).write_text(damage((out / MANIFEST).read_text()))
    expected = f"bpfm: error: {out / MANIFEST}: {problem}"
    for args in (["data", "inspect", str(out)], ["data", "verify", str(out)],
                 _train_args(out, tmp_path / "run")):
        assert main(args) == 2, args
        assert _last_error(capsys).startswith(expected), args
    with pytest.raises(BpfmError, match=re.escape(problem)):
        open_shards(str(out))
    republished = write_shards(files, str(out))  # before: a JSONDecodeError / KeyError traceback
    assert republished["generation"] == good["generation"] and republished["up_to_date"] is False
    assert open_shards(str(out)).manifest["parts"] == good["parts"]  # its intact parts reused


def test_a_corrupt_manifest_without_a_generation_copy_is_converted_again(shard_set):
    """A set published before generation folders kept their manifest."""
    files, out = shard_set
    generation = json.loads((out / MANIFEST).read_text())["generation"]
    (out / generation / MANIFEST).unlink()
    (out / MANIFEST).write_text("{")
    manifest = write_shards(files, str(out))
    assert manifest["generation"] == generation and verify_shards(open_shards(str(out)))["ok"]


def test_bpfm_data_inspect_of_a_truncated_manifest_prints_one_line(shard_set):
    _, out = shard_set
    (out / MANIFEST).write_text((out / MANIFEST).read_text()[:-40])
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2])}
    done = subprocess.run([sys.executable, "-m", "bpfm.cli", "data", "inspect", str(out)],
                          capture_output=True, text=True, env=env, timeout=120)
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert done.stderr.strip().splitlines() == [
        f"bpfm: error: {out / MANIFEST}: not valid JSON "
        + done.stderr.split("not valid JSON ", 1)[1].strip()
    ]


def test_on_s3_a_replaced_part_fails_deep_verification_and_is_repaired(
    s3_env, synthetic_subset_files
):
    files = [p for p in synthetic_subset_files if p.name.startswith(("CalFree", "AAMI_T"))]
    uri = f"s3://{s3_env.bucket}/integrity/set"
    manifest = write_shards(files, uri)
    part = manifest["parts"][0]
    key = f"integrity/set/{part['path']}"
    client = s3_env.client()
    data = bytearray(client.get_object(Bucket=s3_env.bucket, Key=key)["Body"].read())
    data[len(data) // 2] ^= 0xFF  # same size: only the sha256 tells
    client.put_object(Bucket=s3_env.bucket, Key=key, Body=bytes(data))
    assert verify_shards(open_shards(uri))["ok"]
    report = verify_shards(open_shards(uri), deep=True)
    assert [p["path"] for p in report["problems"]] == [part["path"]]
    repaired = write_shards(files, uri)
    assert repaired["up_to_date"] is False and len(repaired["repaired"]) == 1
    assert verify_shards(open_shards(uri), deep=True)["ok"]
    listing = client.list_objects_v2(Bucket=s3_env.bucket, Prefix="integrity/set/")
    keys = {o["Key"] for o in listing["Contents"]}
    assert key not in keys  # the damaged object was deleted after the new manifest


def test_repair_counts_a_source_s_parts_at_the_rows_per_part_its_manifest_records():
    """Two Subj_Wins inputs of one subset, 4 segments each, in a set cut at 2 rows per part:
    parts 0-1 are the first input's and 2-3 the second's. Counted at the default
    rows_per_part each input would own one part, parts 1 and 3 would fit none, and a repair
    would convert every input again although none failed."""
    from bpfm.data import repair

    sources = [{"subset": "train", "sha256": digest, "segments": 4, "first_part": first}
               for digest, first in (("a" * 64, 0), ("b" * 64, 2))]
    parts = [{"path": f"gen-x/source=mimic/subset=train/part-{i:05d}.parquet",
              "subset": "train", "rows": 2} for i in range(4)]
    options = {"include_abp": True, "drop_invalid": False, "rows_per_part": 2}
    manifest = {"options": options, "parts": parts,
                "sources": [{"subset": "train", "sha256": s["sha256"], "rows": 4, "dropped": {}}
                            for s in sources]}
    assert repair.parts_by_source(manifest, sources) == [parts[:2], parts[2:]]
    bad, kept = repair.plan(manifest, sources, {"problems": []})
    assert bad == [] and [kept[i]["parts"] for i in (0, 1)] == [parts[:2], parts[2:]]
    del options["rows_per_part"]  # not recorded: the default, at which these parts fit no input
    assert repair.parts_by_source(manifest, sources) is None
