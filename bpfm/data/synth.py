"""Write a synthetic PulseDB release in the exact MATLAB v7.3 layout, with signals that encode BP.

Layout under out_dir (as the real release):
  Segment_Files/PulseDB_{MIMIC,Vital}/pXXXXXX.mat   one `Subj_Wins` struct array per subject
  Info_Files/<Name>_Info.mat                         struct array Subj_Name, Subj_SegIDX
  Subset_Files/<Name>_Subset.mat                     built from the two above by generate_subsets
for Name in Train, CalBased_Test, CalFree_Test, AAMI_Test, AAMI_Cal.

Subject structure as PulseDB's: Train and CalBased_Test share subjects (different segments),
CalFree_Test subjects are unseen, AAMI_Test and AAMI_Cal share subjects disjoint from the rest,
and AAMI subjects have wider BP so AAMI_Test (their extreme segments) spans a wide range.
MIMIC-like subjects (digit 0) have no Height/Weight/BMI; VitalDB-like ones (digit 1) do. Each
subject's Subj_Wins also holds a few IncludeFlag == 0 segments that no Info file references.
Deterministic per seed: every subject draws from its own generator, whatever the sizes.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import ExitStack
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np

from bpfm.data.matfile import RefWriter, create_matfile, set_struct, write_refs
from bpfm.data.subsets import SubsetWriter, generate_subsets
from bpfm.data.synth_signals import Rendered, SegmentParams, render_segments
from bpfm.errors import BpfmError

log = logging.getLogger(__name__)

SUBSET_NAMES = ("Train", "CalBased_Test", "CalFree_Test", "AAMI_Test", "AAMI_Cal")
SOURCES = {
    # digit, folder, SBP mean/sd, DBP mean/sd, age mean/sd, largest subject number, body sizes
    "mimic": ("0", "PulseDB_MIMIC", (123.0, 18.0), (62.0, 10.0), (64.0, 15.0), 99999, False),
    "vitaldb": ("1", "PulseDB_Vital", (116.0, 15.0), (63.0, 9.0), (58.0, 14.0), 6388, True),
}


@dataclass
class SynthConfig:
    """Sizes are per source: `subjects` MIMIC-like plus `subjects` VitalDB-like subjects, each
    with `segments_per_subject` usable segments (Train gets ~0.6 * 0.75 of all of them)."""

    subjects: int = 24
    segments_per_subject: int = 12
    seed: int = 0
    sources: tuple[str, ...] = ("mimic", "vitaldb")
    calfree_fraction: float = 0.2
    aami_fraction: float = 0.2
    calbased_fraction: float = 0.25
    aami_test_fraction: float = 0.25
    excluded_fraction: float = 0.1
    compression: str | None = None
    segment_files: bool = True

    def validate(self) -> None:
        if self.subjects < 3:
            raise BpfmError(f"synth: subjects must be >= 3 per source, got {self.subjects}")
        if self.segments_per_subject < 2:
            raise BpfmError(
                f"synth: segments_per_subject must be >= 2, got {self.segments_per_subject}"
            )
        unknown = set(self.sources) - set(SOURCES)
        if unknown or not self.sources:
            raise BpfmError(f"synth: sources must be among {sorted(SOURCES)}, got {self.sources}")


@dataclass
class SynthResult:
    subset_files: list[Path] = field(default_factory=list)
    segment_files: list[Path] = field(default_factory=list)
    info_files: list[Path] = field(default_factory=list)
    segments: dict[str, int] = field(default_factory=dict)  # subset name -> segments


@dataclass
class SynthSubject:
    """One synthetic subject; `iter_subjects` fills in what it renders (the ground truth)."""

    name: str  # pXXXXXX + source digit
    group: str  # "train" (Train + CalBased_Test), "calfree" or "aami"
    traits: dict  # scalar physiology for SegmentParams and demographics
    source: str
    source_index: int
    k: int  # index within its source: with source_index and seed, its generator
    rendered: Rendered | None = None  # all Subj_Wins segments, in order
    include: np.ndarray | None = None  # IncludeFlag per Subj_Wins segment
    parts: dict[str, np.ndarray] = field(default_factory=dict)  # subset -> raw indices


def _subjects(config: SynthConfig, source_index: int, source: str) -> list[SynthSubject]:
    digit, _, sbp_ms, dbp_ms, age_ms, id_max, _ = SOURCES[source]
    n = config.subjects
    rng = np.random.default_rng([config.seed, source_index, 0])
    ids = rng.choice(id_max, size=n, replace=False) + 1
    n_aami = max(1, round(config.aami_fraction * n))
    n_calfree = max(1, round(config.calfree_fraction * n))
    groups = ["aami"] * n_aami + ["calfree"] * n_calfree + ["train"] * (n - n_aami - n_calfree)
    groups = list(rng.permutation(groups))
    aami = np.array([g == "aami" for g in groups])
    age = np.clip(rng.normal(*age_ms, n), 18, 90).round()
    male = rng.random(n) < 0.55
    height = np.where(male, rng.normal(172, 7, n), rng.normal(159, 6, n))
    bmi = np.clip(rng.normal(24, 4, n), 16, 45)
    weight = bmi * (height / 100) ** 2
    sbp0 = np.where(
        aami, rng.normal(135, 26, n), rng.normal(sbp_ms[0], sbp_ms[1], n) + 0.3 * (age - age_ms[0])
    )
    sbp0 = np.clip(sbp0, 85, 200)
    dbp0 = dbp_ms[0] + 0.4 * (sbp0 - sbp_ms[0]) + rng.normal(0, dbp_ms[1] * 0.6, n)
    dbp0 = np.clip(dbp0, 40, np.minimum(110, sbp0 - 25))
    traits = {
        "sbp0": sbp0,
        "dbp0": dbp0,
        "bp_sd": np.where(aami, rng.uniform(10, 16, n), rng.uniform(5, 11, n)),
        "hr0": np.clip(rng.normal(78, 10, n), 50, 115),
        "pwv0": 5.5 * (1 + 0.006 * (age - 50)) * rng.lognormal(0, 0.05, n),
        "path_abp": 0.36 * height / 100 * rng.lognormal(0, 0.03, n),
        "path_ppg": 0.5 * height / 100 * rng.lognormal(0, 0.03, n),
        "pep0": rng.normal(0.09, 0.01, n),
        "ppg_rise0": np.clip(rng.normal(0.17, 0.02, n), 0.11, 0.25),
        "notch0": rng.uniform(0.05, 0.18, n),
        "ppg_gain": rng.lognormal(0, 0.3, n),
        "resp_hz": rng.uniform(0.2, 0.35, n),
        "resp_mmhg": rng.uniform(1, 5, n),
        "ecg_noise": rng.uniform(0.01, 0.06, n),
        "ppg_noise": rng.uniform(0.005, 0.03, n),
        "wander": rng.uniform(0.05, 0.4, n),
        "age": age,
        "gender": np.where(male, "M", "F"),
        "height": height.round(1),
        "weight": weight.round(1),
        "bmi": bmi.round(2),
    }
    return [
        SynthSubject(
            name=f"p{ids[i]:06d}{digit}",
            group=groups[i],
            source=source,
            traits={key: value[i] for key, value in traits.items()},
            source_index=source_index,
            k=i,
        )
        for i in range(n)
    ]


def _segment_params(subject: SynthSubject, n: int, rng: np.random.Generator) -> SegmentParams:
    """BP drifts across a subject's consecutive segments (AR(1)); HR follows BP."""
    tr = subject.traits
    rho = 0.85
    dev = np.empty(n)
    dev[0] = rng.normal(0, tr["bp_sd"])
    for j in range(1, n):
        dev[j] = rho * dev[j - 1] + np.sqrt(1 - rho**2) * rng.normal(0, tr["bp_sd"])
    sbp = np.clip(tr["sbp0"] + dev, 70, 230)
    dbp = np.clip(tr["dbp0"] + 0.55 * dev + rng.normal(0, 2.5, n), 35, 140)
    dbp = np.minimum(dbp, sbp - 18)
    hr = np.clip(tr["hr0"] + 0.15 * dev + rng.normal(0, 2.5, n), 45, 140)
    const = {
        key: np.full(n, float(tr[key]))
        for key in (
            "pwv0",
            "path_abp",
            "path_ppg",
            "pep0",
            "ppg_rise0",
            "notch0",
            "ppg_gain",
            "resp_hz",
            "resp_mmhg",
            "ecg_noise",
            "ppg_noise",
            "wander",
        )
    }
    return SegmentParams(sbp=sbp, dbp=dbp, hr=hr, **const)


def _write_subj_wins(path: Path, subject: SynthSubject, rendered, include: np.ndarray) -> None:
    """One subject's segment file. Per-subject constants (SubjectID, CaseID, demographics) point
    to one shared dataset each, which MATLAB reads like distinct ones and writes much faster."""
    tr = subject.traits
    body = SOURCES[subject.source][6]
    fields = [
        "SubjectID",
        "CaseID",
        "SegmentID",
        "IncludeFlag",
        "ECG_F",
        "PPG_F",
        "ABP_Raw",
        "SegSBP",
        "SegDBP",
        "Age",
        "Gender",
    ] + (["Height", "Weight", "BMI"] if body else [])
    n = len(include)
    with create_matfile(path) as f:
        refs = RefWriter(f)
        shared = {
            "SubjectID": refs.char(subject.name[:7]),
            "CaseID": refs.double(1.0),
            "Age": refs.double(tr["age"]),
            "Gender": refs.char(str(tr["gender"])),
        }
        if body:
            shared.update(
                Height=refs.double(tr["height"]),
                Weight=refs.double(tr["weight"]),
                BMI=refs.double(tr["bmi"]),
            )
        columns = {name: [shared[name]] * n for name in shared}
        columns["SegmentID"] = [refs.double(j + 1.0) for j in range(n)]
        columns["IncludeFlag"] = [refs.double(float(flag)) for flag in include]
        for name, data in (
            ("ECG_F", rendered.ecg_f),
            ("PPG_F", rendered.ppg_f),
            ("ABP_Raw", rendered.abp_raw),
        ):
            columns[name] = [refs.double(row) for row in data]
        columns["SegSBP"] = [refs.double(v) for v in rendered.sbp]
        columns["SegDBP"] = [refs.double(v) for v in rendered.dbp]
        group = f.create_group("Subj_Wins")
        set_struct(group, fields)
        for name in fields:
            write_refs(group, name, columns[name], matlab_class=None)


def _write_info(path: Path, rows: list[tuple[str, int]]) -> None:
    """Info file: struct array (one element per segment) of Subj_Name and 1-based Subj_SegIDX."""
    with create_matfile(path) as f:
        refs = RefWriter(f)
        name_refs = {name: refs.char(name) for name in dict.fromkeys(name for name, _ in rows)}
        group = f.create_group(path.stem)
        set_struct(group, ["Subj_Name", "Subj_SegIDX"])
        write_refs(group, "Subj_Name", [name_refs[name] for name, _ in rows], matlab_class=None)
        write_refs(
            group, "Subj_SegIDX", [refs.double(float(k)) for _, k in rows], matlab_class=None
        )


def _sizes(group: str, n: int, config: SynthConfig) -> dict[str, int]:
    """How many of a subject's n usable segments each subset gets."""
    if group == "calfree":
        return {"CalFree_Test": n}
    if group == "train":
        n_cal = min(n - 1, max(1, round(config.calbased_fraction * n)))
        return {"Train": n - n_cal, "CalBased_Test": n_cal}
    n_test = min(n - 1, max(1, round(config.aami_test_fraction * n)))
    return {"AAMI_Test": n_test, "AAMI_Cal": n - n_test}


def _assign(
    subject: SynthSubject,
    usable: np.ndarray,
    sbp: np.ndarray,
    config: SynthConfig,
    rng: np.random.Generator,
) -> dict[str, np.ndarray]:
    """Raw Subj_Wins indices (0-based, ascending) of this subject's segments per subset."""
    n = len(usable)
    sizes = _sizes(subject.group, n, config)
    if subject.group == "calfree":
        return {"CalFree_Test": usable}
    if subject.group == "train":
        cal = np.sort(rng.choice(n, sizes["CalBased_Test"], replace=False))
        return {"Train": np.delete(usable, cal), "CalBased_Test": usable[cal]}
    # AAMI_Test takes segments spread over the subject's BP range, extremes included.
    order = np.argsort(sbp[usable])
    test = np.sort(order[np.round(np.linspace(0, n - 1, sizes["AAMI_Test"])).astype(int)])
    return {"AAMI_Test": usable[test], "AAMI_Cal": np.delete(usable, test)}


def _append_direct(writer: SubsetWriter, subject: SynthSubject, rendered, rows: np.ndarray) -> None:
    tr = subject.traits
    n = len(rows)
    signals = np.stack([rendered.ecg_f[rows], rendered.ppg_f[rows], rendered.abp_raw[rows]], axis=1)
    values = {
        "SBP": rendered.sbp[rows],
        "DBP": rendered.dbp[rows],
        "Age": np.full(n, float(tr["age"])),
    }
    if SOURCES[subject.source][6]:
        values.update(
            {name: np.full(n, float(tr[name.lower()])) for name in ("Height", "Weight", "BMI")}
        )
    writer.append(subject.name, signals, values, [str(tr["gender"])] * n)


def iter_subjects(config: SynthConfig) -> Iterator[SynthSubject]:
    """Every subject of the release with its rendered segments, sorted by name (the order
    generate_subsets gives a Subset file). Deterministic: this is what the files hold."""
    config.validate()
    subjects = [s for i, source in enumerate(config.sources) for s in _subjects(config, i, source)]
    n_usable = config.segments_per_subject
    n_total = n_usable + round(config.excluded_fraction * n_usable)
    for subject in sorted(subjects, key=lambda s: s.name):
        rng = np.random.default_rng([config.seed, subject.source_index, 1, subject.k])
        rendered = render_segments(_segment_params(subject, n_total, rng), rng)
        include = np.ones(n_total, dtype=bool)
        include[rng.choice(n_total, n_total - n_usable, replace=False)] = False
        parts = _assign(subject, np.flatnonzero(include), rendered.sbp, config, rng)
        # A new object: the list above must not keep every subject's signals alive.
        yield replace(subject, rendered=rendered, include=include, parts=parts)


def _subset_sizes(config: SynthConfig) -> dict[str, int]:
    """Segments per Subset file, known before any rendering (the direct writers need them)."""
    groups = [
        s.group for i, source in enumerate(config.sources) for s in _subjects(config, i, source)
    ]
    return {
        name: sum(_sizes(group, config.segments_per_subject, config).get(name, 0)
                  for group in groups)
        for name in SUBSET_NAMES
    }


def _write_subjects(
    out_dir: Path, subset_dir: Path, config: SynthConfig, result: SynthResult
) -> dict[str, list[tuple[str, int]]]:
    """Render every subject into its Subj_Wins file (segment_files) or straight into the Subset
    files; returns the Info rows (subject, 1-based segment) per subset of the first way."""
    n_subjects = config.subjects * len(config.sources)
    info_rows: dict[str, list[tuple[str, int]]] = {name: [] for name in SUBSET_NAMES}
    with ExitStack() as stack:
        writers = (
            {}
            if config.segment_files
            else {
                name: SubsetWriter(
                    stack.enter_context(create_matfile(subset_dir / f"{name}_Subset.mat")),
                    result.segments[name],
                    config.compression,
                )
                for name in SUBSET_NAMES
            }
        )
        for i, subject in enumerate(iter_subjects(config)):
            if config.segment_files:
                folder = out_dir / "Segment_Files" / SOURCES[subject.source][1]
                folder.mkdir(parents=True, exist_ok=True)
                path = folder / f"{subject.name[:7]}.mat"
                _write_subj_wins(path, subject, subject.rendered, subject.include)
                result.segment_files.append(path)
                for name, rows in subject.parts.items():
                    info_rows[name] += [(subject.name, int(r) + 1) for r in rows]
            else:
                for name, rows in subject.parts.items():
                    _append_direct(writers[name], subject, subject.rendered, rows)
            if (i + 1) % max(1, n_subjects // 10) == 0:
                log.info("synth: %d/%d subjects rendered", i + 1, n_subjects)
    return info_rows


def _write_info_and_subsets(
    out_dir: Path,
    subset_dir: Path,
    info_rows: dict[str, list[tuple[str, int]]],
    config: SynthConfig,
    result: SynthResult,
) -> None:
    """The Info files, and from them and the Subj_Wins files the Subset files (generate_subsets,
    the path a real PulseDB download takes)."""
    info_dir = out_dir / "Info_Files"
    info_dir.mkdir(parents=True, exist_ok=True)
    for name in SUBSET_NAMES:
        info = info_dir / f"{name}_Info.mat"
        _write_info(info, info_rows[name])
        result.info_files.append(info)
        result.subset_files.append(
            generate_subsets(
                out_dir / "Segment_Files",
                info,
                subset_dir / f"{name}_Subset.mat",
                compression=config.compression,
            )
        )


def write_synthetic_pulsedb(out_dir: str | Path, config: SynthConfig | None = None) -> SynthResult:
    """Write Subj_Wins, Info and (via generate_subsets) Subset files under `out_dir`.

    With `config.segment_files=False` only the Subset files are written, straight from the
    rendered signals (same content as the generate_subsets path; for large benchmark sets)."""
    config = config or SynthConfig()
    config.validate()
    out_dir = Path(out_dir)
    result = SynthResult()
    result.segments.update(_subset_sizes(config))
    subset_dir = out_dir / "Subset_Files"
    subset_dir.mkdir(parents=True, exist_ok=True)
    info_rows = _write_subjects(out_dir, subset_dir, config, result)
    if config.segment_files:
        _write_info_and_subsets(out_dir, subset_dir, info_rows, config, result)
    else:
        result.subset_files = [subset_dir / f"{name}_Subset.mat" for name in SUBSET_NAMES]
    return result
