"""Fuzzing the PulseDB reader: every seeded mutation of a small real MAT-file ends either in one
line naming the file (exit 2, nothing published) or in a published set whose every row passes
the reader's validation; never a traceback. The conversion runs in-process (`write_shards`, the
code `bpfm data shard` runs), and a few mutations also through real `bpfm` processes."""

from __future__ import annotations

import collections
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow.compute as pc
import pytest

from bpfm.data.pulsedb import BP_RANGE
from bpfm.data.shards import MANIFEST, open_shards, signal_array, write_shards
from bpfm.data.verify import verify_shards
from bpfm.errors import BpfmError
from tests.faults.mutations import mutations

SEED = 15
TOTAL = 240


def _check_published(out: Path, rows_before: int) -> str:
    """Every row of the published set passes the reader's validation; returns a summary."""
    shards = open_shards(str(out))
    assert verify_shards(shards, deep=True)["ok"]
    table = shards.dataset().to_table()
    assert 0 < table.num_rows == shards.manifest["rows"] <= rows_before
    x = signal_array(table["ecg_ppg"])
    assert np.isfinite(x).all()
    sbp, dbp = table["sbp"].to_numpy(), table["dbp"].to_numpy()
    low, high = BP_RANGE
    assert np.isfinite(sbp).all() and np.isfinite(dbp).all()
    assert ((sbp >= low) & (sbp <= high) & (dbp >= low) & (dbp <= high) & (sbp > dbp)).all()
    assert pc.min(pc.utf8_length(table["subject"])).as_py() > 0
    return f"published {table.num_rows} rows"


def _outcome(path: Path, out: Path, rows_before: int) -> tuple[int, str]:
    try:
        write_shards([path], str(out))
    except BpfmError as err:
        message = str(err)
        assert "\n" not in message, message
        assert message.startswith(f"{path.resolve()}: "), message
        assert not (out / MANIFEST).exists(), "a manifest for a failed conversion"
        assert not list(out.rglob("*.parquet")) if out.exists() else True
        return 2, message.removeprefix(f"{path.resolve()}: ")
    return 0, _check_published(out, rows_before)


def test_every_seeded_mutation_ends_in_one_line_or_a_valid_set(fuzz_base, tmp_path):
    rows_before = write_shards([fuzz_base], str(tmp_path / "base"))["rows"]
    cases = mutations(fuzz_base, seed=SEED, total=TOTAL)
    assert len(cases) >= 200
    families = collections.Counter(c.family for c in cases)
    assert min(families[f] for f in ("flip", "truncate", "swap", "redirect")) >= 10, families
    table, tracebacks = [], []
    for i, case in enumerate(cases):
        folder = tmp_path / f"m{i:03d}"
        folder.mkdir()
        path = folder / fuzz_base.name
        shutil.copyfile(fuzz_base, path)
        case.apply(path)
        try:
            rc, message = _outcome(path, folder / "out", rows_before)
        except AssertionError:
            raise
        except Exception as err:  # a traceback a user would have seen
            tracebacks.append(f"{case.name}: {type(err).__name__}: {err}")
            continue
        table.append({"family": case.family, "mutation": case.name, "rc": rc, "result": message})
        shutil.rmtree(folder)
    report = os.environ.get("BPFM_FUZZ_REPORT")
    if report:  # the table of outcomes, for the closing note
        Path(report).write_text(json.dumps(table, indent=1))
    assert not tracebacks, "\n".join(tracebacks)
    outcomes = collections.Counter((row["family"], row["rc"]) for row in table)
    assert outcomes[("swap", 2)] and outcomes[("truncate", 2)] and outcomes[("flip", 2)]


def _bpfm(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2])}
    return subprocess.run([sys.executable, "-m", "bpfm.cli", *args], capture_output=True,
                          text=True, env=env, timeout=120)


@pytest.mark.parametrize("family", ["flip", "truncate", "swap", "redirect"])
def test_a_real_bpfm_process_prints_one_line_for_a_mutated_file(fuzz_base, tmp_path, family):
    """One failing mutation per family through `bpfm data shard`: exit 2, one stderr line
    naming the file, no traceback, nothing published."""
    for i, case in enumerate(c for c in mutations(fuzz_base, seed=SEED, total=TOTAL)
                             if c.family == family):
        path = tmp_path / f"{i}" / fuzz_base.name
        path.parent.mkdir()
        shutil.copyfile(fuzz_base, path)
        case.apply(path)
        try:
            write_shards([path], str(tmp_path / f"{i}" / "probe"))
        except BpfmError:
            break  # the first mutation of this family that the reader refuses
    else:
        pytest.fail(f"no {family} mutation was refused")
    out = tmp_path / "out"
    done = _bpfm("data", "shard", str(path), "--out", str(out))
    errors = [line for line in done.stderr.splitlines() if line.startswith("bpfm: error:")]
    assert done.returncode == 2, done.stderr
    assert "Traceback" not in done.stderr
    assert len(errors) == 1, done.stderr
    assert errors[0].startswith(f"bpfm: error: {path.resolve()}: "), done.stderr
    assert not (out / MANIFEST).exists()
