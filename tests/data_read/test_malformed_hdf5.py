"""Issue 15 item 6: malformed HDF5 structure of any kind ends in one line
`<file>: <field>: <problem>` (exit 2 from `bpfm data shard`), never a traceback, and nothing is
published. Every case is an h5py-built corrupt copy of a real (synthetic or ICU) file."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np
import pytest

from bpfm.data.matfile import set_matlab_class
from bpfm.data.shards import MANIFEST, write_shards
from bpfm.errors import DataError


def _edit(path: Path, change) -> None:
    with h5py.File(path, "r+") as f:
        change(f)


def _to_group(name):
    def change(f):
        del f[name]
        f.create_group(name)

    return change


def _element(f, dtype_data, matlab_class=None, **kwargs):
    ds = f.create_dataset(f"#refs#/zz{len(f['#refs#'])}", data=dtype_data, **kwargs)
    if matlab_class:
        set_matlab_class(ds, matlab_class)
    return ds


def _redirect(field, target, row=0):
    def change(f):
        refs = f[field][()]
        index = slice(None) if row == "all" else row  # "all": every element
        refs.flat[index] = target(f).ref if target is not None else h5py.Reference()
        f[field][...] = refs

    return change


def _link(name, link):
    def change(f):
        del f[name]
        f[name] = link

    return change


def _every_subject_doubles(f):
    element = _element(f, np.array([[112.0], [48.0], [49.0]]), "double")
    refs = f["Subset/Subject"][()]
    refs[...] = element.ref
    f["Subset/Subject"][...] = refs


SUBSET_CASES = {
    "signals_group": (_to_group("Subset/Signals"), "Subset/Signals", "is a group, expected an"),
    "sbp_group": (_to_group("Subset/SBP"), "Subset/SBP", "is a group, expected an array"),
    "subject_group": (_to_group("Subset/Subject"), "Subset/Subject", "is a group"),
    "subset_is_array": (lambda f: (f.__delitem__("Subset"), f.create_dataset("Subset", data=[1.0])),
                        "Subset", "is an array, expected a struct"),
    "subject_element_group": (_redirect("Subset/Subject", lambda f: f["Subset"]),
                              "Subset/Subject", "row 0: references a group, expected an array"),
    "gender_element_group": (_redirect("Subset/Gender", lambda f: f["/"], row=3),
                             "Subset/Gender", "row 3: references a group"),
    "subject_element_double": (_redirect("Subset/Subject", lambda f: f["Subset/SBP"]),
                               "Subset/Subject", "row 0: MATLAB class double, expected char"),
    "subject_every_element_double": (_every_subject_doubles, "Subset/Subject",
                                     "row 0: MATLAB class double, expected char"),
    "subject_fixed_string": (_redirect("Subset/Subject", lambda f: _element(f, np.bytes_("p01"))),
                             "Subset/Subject", "HDF5 string data, expected char"),
    "subject_vlen_string": (_redirect("Subset/Subject", lambda f: _element(
                                f, "p0001230", dtype=h5py.string_dtype())),
                            "Subset/Subject", "HDF5 string data, expected char"),
    "gender_char_class_float_data": (_redirect("Subset/Gender", lambda f: _element(
                                         f, np.array([[77.0]]), "char")),
                                     "Subset/Gender", "HDF5 float data, expected char codes"),
    "subject_compound": (_redirect("Subset/Subject", lambda f: _element(
                             f, np.zeros(2, dtype=[("a", "<i4")]))),
                         "Subset/Subject", "HDF5 compound data"),
    "subject_null_reference": (_redirect("Subset/Subject", None), "Subset/Subject",
                               "row 0: null object reference"),
    "sbp_dangling_soft_link": (_link("Subset/SBP", h5py.SoftLink("/nowhere")), "Subset/SBP",
                               "link does not resolve"),
    "signals_dangling_soft_link": (_link("Subset/Signals", h5py.SoftLink("/gone")),
                                   "Subset/Signals", "link does not resolve"),
    "dbp_external_link_missing_file": (_link("Subset/DBP", h5py.ExternalLink("/no.h5", "/x")),
                                       "Subset/DBP", "link does not resolve"),
}


@pytest.mark.parametrize("case", sorted(SUBSET_CASES))
def test_malformed_subset_structure_is_one_line_and_publishes_nothing(subset_copy, tmp_path, case):
    change, field, problem = SUBSET_CASES[case]
    _edit(subset_copy, change)
    out = tmp_path / "out"
    with pytest.raises(DataError) as caught:
        write_shards([subset_copy], str(out))
    message = str(caught.value)
    assert "\n" not in message
    assert message.startswith(f"{subset_copy.resolve()}: {field}: "), message
    assert problem in message, message
    assert not (out / MANIFEST).exists() and not list(tmp_path.rglob("*.parquet"))


def test_a_subject_cell_of_doubles_in_the_real_sample_is_refused(challenge2015_file, tmp_path):
    """Before, every row got the same garbage id decoded from the doubles' bytes."""
    path = tmp_path / "Challenge2015_Sample_Subset.mat"
    shutil.copyfile(challenge2015_file, path)
    _edit(path, _every_subject_doubles)
    with pytest.raises(DataError, match="Subset/Subject: row 0: MATLAB class double, expected"):
        write_shards([path], str(tmp_path / "out"))
    assert not (tmp_path / "out" / MANIFEST).exists()


def test_corrupted_metadata_of_the_real_sample_is_one_line(challenge2015_file, tmp_path):
    """Bytes flipped inside the object header of Subset/SBP (HDF5 checks it on open)."""
    path = tmp_path / "Challenge2015_Sample_Subset.mat"
    shutil.copyfile(challenge2015_file, path)
    with h5py.File(path, "r") as f:
        header = h5py.h5o.get_info(f["Subset/SBP"].id).addr + 512  # after the MATLAB header
    data = bytearray(path.read_bytes())
    for offset in range(header + 8, header + 40):
        data[offset] ^= 0x5A
    path.write_bytes(bytes(data))
    with pytest.raises(DataError) as caught:
        write_shards([path], str(tmp_path / "out"))
    assert str(caught.value).startswith(f"{path}: "), caught.value
    assert "\n" not in str(caught.value)


SUBJ_WINS_CASES = {
    "field_group": (_to_group("Subj_Wins/SegSBP"), "Subj_Wins/SegSBP", "is a group"),
    "subject_id_doubles": (lambda f: _redirect("Subj_Wins/SubjectID", lambda g: g[
                               g["Subj_Wins/SegSBP"][0, 0]], row=1)(f),
                           "Subj_Wins/SubjectID", "row 1: MATLAB class double, expected char"),
    "waveform_element_group": (_redirect("Subj_Wins/ECG_F", lambda f: f["Subj_Wins"], row=2),
                               "Subj_Wins/ECG_F", "row 2: references a group"),
    "waveform_element_char": (_redirect("Subj_Wins/PPG_F", lambda f: f[
                                  f["Subj_Wins/Gender"][0, 0]], row="all"),
                              "Subj_Wins/PPG_F", "MATLAB class char, expected a number"),
    "dangling_link": (_link("Subj_Wins/ABP_Raw", h5py.SoftLink("/x")), "Subj_Wins/ABP_Raw",
                      "link does not resolve"),
}


@pytest.mark.parametrize("case", sorted(SUBJ_WINS_CASES))
def test_malformed_subj_wins_structure_is_one_line(subj_wins_copy, tmp_path, case):
    change, field, problem = SUBJ_WINS_CASES[case]
    _edit(subj_wins_copy, change)
    with pytest.raises(DataError) as caught:
        write_shards([subj_wins_copy], str(tmp_path / "out"))
    assert str(caught.value).startswith(f"{subj_wins_copy.resolve()}: {field}: "), caught.value
    assert problem in str(caught.value)
    assert not (tmp_path / "out" / MANIFEST).exists()


def _bpfm(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2])}
    return subprocess.run([sys.executable, "-m", "bpfm.cli", *args], capture_output=True,
                          text=True, env=env, timeout=120)


def test_bpfm_data_shard_exits_2_with_one_line_for_malformed_files(subset_copy, tmp_path):
    """A folder named like a Subset file, a group for Signals, a subject cell of doubles and
    a dangling link, in real `bpfm` processes: exit 2, one line, no traceback."""
    folder = tmp_path / "release"
    (folder / "Broken_Subset.mat").mkdir(parents=True)
    cases = [(folder, f"{(folder / 'Broken_Subset.mat').resolve()}: input: is a folder")]
    for name in ("signals_group", "subject_every_element_double", "sbp_dangling_soft_link"):
        change, field, problem = SUBSET_CASES[name]
        path = tmp_path / name / subset_copy.name
        path.parent.mkdir()
        shutil.copyfile(subset_copy, path)
        _edit(path, change)
        cases.append((path, f"{path.resolve()}: {field}: {problem}"))
    for path, expected in cases:
        done = _bpfm("data", "shard", str(path), "--out", str(tmp_path / "out"))
        assert done.returncode == 2, done.stderr
        assert "Traceback" not in done.stderr
        lines = [line for line in done.stderr.splitlines() if line.startswith("bpfm:")]
        assert lines == [f"bpfm: error: {expected}"] or (
            len(lines) == 1 and lines[0].startswith(f"bpfm: error: {expected}")
        ), done.stderr
        assert not (tmp_path / "out" / MANIFEST).exists()
