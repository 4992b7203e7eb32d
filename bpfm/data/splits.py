"""Evaluation protocols as views over one shard set (filters and row masks, never copies).

Per source (DESIGN section 3):
- `paper`: the Train subset's segments 80/10/10 by a seeded hash of `segment_id` (the paper's
  code split segments at random, so subjects leak across splits: the label says so).
- `calbased` / `calfree` / `aami`: train and validation from Train (validation = 10% of its
  subjects), test = CalBased_Test / CalFree_Test / AAMI_Test.
A source without PulseDB's subsets (e.g. `challenge2015_sample`), or without the subset a
protocol tests on, is a whole dataset on its own: `paper` splits its segments 80/10/10 and every
other protocol splits its subjects 80/10/10 (subject-disjoint test).

Assignments depend only on the seed and the keys (segment ids, subject ids), never on file or
row order. Subject splits rank subjects by hash and cut exact counts, so even 26 subjects give
non-empty validation and test sets.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from functools import cached_property

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from bpfm.data.shards import ShardSet, open_shards
from bpfm.errors import BpfmError
from bpfm.io import storage

PROTOCOLS = ("paper", "calbased", "calfree", "aami")
PULSEDB_SUBSETS = ("train", "calbased_test", "calfree_test", "aami_test", "aami_cal")
FAMILY_PREFIXES = ("", "vitaldb_")  # Subset_Files/*, Supplementary_Subset_Files/VitalDB_*
TEST_SUBSET = {"calbased": "calbased_test", "calfree": "calfree_test", "aami": "aami_test"}
SEGMENT_BANDS = {"train": (0.0, 0.8), "val": (0.8, 0.9), "test": (0.9, 1.0)}
VAL_FRACTION = 0.1
TEST_FRACTION = 0.1


def unit_hash(seed: int, keys: list[str] | pa.Array | pa.ChunkedArray) -> np.ndarray:
    """A uniform number in [0, 1) per key from blake2b(seed, key): deterministic, order-free."""
    if not isinstance(keys, list):
        keys = keys.to_pylist()
    salt = f"{seed}:".encode()
    digests = (hashlib.blake2b(salt + k.encode(), digest_size=8).digest() for k in keys)
    words = np.frombuffer(b"".join(digests), dtype="<u8", count=len(keys))
    return words / np.float64(2**64)


@dataclass(frozen=True, eq=False)
class View:
    """Rows of some partitions of one source, optionally narrowed by a row rule:
    a band of `unit_hash(seed, segment_id)` or a set of subjects."""

    shards: ShardSet
    source: str
    subsets: tuple[str, ...]
    name: str
    seed: int = 42
    band: tuple[float, float] | None = None
    subjects: frozenset[str] | None = field(default=None, repr=False)

    @property
    def key_column(self) -> str | None:
        """The column the row rule reads, if any."""
        if self.band is not None:
            return "segment_id"
        return "subject" if self.subjects is not None else None

    def parts(self) -> list[dict]:
        return self.shards.parts(self.source, self.subsets)

    def row_mask(self, table: pa.Table) -> np.ndarray | None:
        """Which rows of `table` (holding `key_column`) belong to the view; None: all."""
        if self.band is not None:
            low, high = self.band
            u = unit_hash(self.seed, table["segment_id"])
            return (u >= low) & (u < high)
        if self.subjects is not None:
            member = pc.is_in(table["subject"], value_set=self._subject_values)
            return member.to_numpy(zero_copy_only=False)
        return None

    @cached_property
    def _subject_values(self) -> pa.Array:
        return pa.array(sorted(self.subjects or ()), pa.string())

    def read(self, columns: list[str]) -> pa.Table:
        """The view's rows, only `columns` (small columns: labels, ids; not the signals)."""
        wanted = list(dict.fromkeys([*columns, *filter(None, [self.key_column])]))
        with storage.storage_errors(self.shards.uri):
            table = self.shards.dataset(self.source, self.subsets).to_table(columns=wanted)
        mask = self.row_mask(table)
        table = table if mask is None else table.filter(pa.array(mask))
        return table.select(columns)

    def describe(self) -> str:
        rule = ""
        if self.band is not None:
            rule = f", segments with hash in [{self.band[0]:g}, {self.band[1]:g})"
        elif self.subjects is not None:
            rule = f", {len(self.subjects)} subjects"
        return f"{self.name}: {self.source}/{'+'.join(self.subsets)}{rule}"


@dataclass(frozen=True)
class Split:
    protocol: str
    source: str
    train: View
    val: View
    test: View
    label: str
    subject_disjoint: bool  # no test subject appears in train (by construction)


def _subjects_of(shards: ShardSet, source: str, subsets: tuple[str, ...]) -> list[str]:
    with storage.storage_errors(shards.uri):
        table = shards.dataset(source, subsets).to_table(columns=["subject"])
    return sorted(pc.unique(table["subject"]).to_pylist())


def rank_subjects(seed: int, subjects: list[str]) -> list[str]:
    """Subjects in seeded-hash order: cutting this list gives a deterministic random split."""
    order = np.argsort(unit_hash(seed, subjects), kind="stable")
    return [subjects[i] for i in order]


def _count(n: int, fraction: float) -> int:
    """Subjects for a held-out share: at least one whenever a training subject remains."""
    return min(max(1, round(fraction * n)), n - 1) if n >= 2 else 0


def _family(subsets: list[str]) -> str | None:
    for prefix in FAMILY_PREFIXES:
        if f"{prefix}train" in subsets:
            return prefix
    return None


def _segment_split(shards, source, subsets, seed, protocol, what: str) -> Split:
    views = {
        name: View(shards, source, subsets, name, seed, band=band)
        for name, band in SEGMENT_BANDS.items()
    }
    label = f"{protocol}: {what} segments 80/10/10 by seeded hash, subjects leak across splits"
    return Split(protocol, source, label=label, subject_disjoint=False, **views)


def _subject_split(shards, source, subsets, seed, protocol, what: str) -> Split:
    ranked = rank_subjects(seed, _subjects_of(shards, source, subsets))
    n_test = _count(len(ranked), TEST_FRACTION)
    n_val = min(_count(len(ranked), VAL_FRACTION), len(ranked) - n_test - 1)
    test, val = ranked[:n_test], ranked[n_test : n_test + n_val]
    train = ranked[n_test + n_val :]
    views = {
        name: View(shards, source, subsets, name, seed, subjects=frozenset(group))
        for name, group in (("train", train), ("val", val), ("test", test))
    }
    label = (
        f"{protocol}: {what} split by subject 80/10/10 "
        f"({len(train)}/{len(val)}/{len(test)} subjects, subject-disjoint test)"
    )
    return Split(protocol, source, label=label, subject_disjoint=True, **views)


def _pulsedb_split(shards, source, prefix, seed, protocol) -> Split:
    train_subsets = (f"{prefix}train",)
    ranked = rank_subjects(seed, _subjects_of(shards, source, train_subsets))
    n_val = _count(len(ranked), VAL_FRACTION)
    val, train = frozenset(ranked[:n_val]), frozenset(ranked[n_val:])
    test_subset = f"{prefix}{TEST_SUBSET[protocol]}"
    test = View(shards, source, (test_subset,), "test", seed)
    seen = protocol == "calbased"
    label = (
        f"{protocol}: train/val from {prefix}train (val = {len(val)} of {len(ranked)} "
        f"subjects), test {test_subset}"
        + (
            " (same subjects as train: calibration-based, subjects leak by design)"
            if seen
            else " (subjects unseen in training)"
        )
    )
    if protocol == "aami":
        label += "; AAMI criteria need >= 85 test subjects"
    return Split(
        protocol,
        source,
        train=View(shards, source, train_subsets, "train", seed, subjects=train),
        val=View(shards, source, train_subsets, "val", seed, subjects=val),
        test=test,
        label=label,
        subject_disjoint=not seen,
    )


def make_split(shards: ShardSet | str, source: str, protocol: str, seed: int = 42) -> Split:
    """The train/val/test views of `protocol` for one source of a shard set."""
    shards = open_shards(shards)
    if protocol not in PROTOCOLS:
        raise BpfmError(f"protocol '{protocol}' unknown (choose one of {', '.join(PROTOCOLS)})")
    subsets = shards.subsets(source)
    if not subsets:
        raise BpfmError(
            f"{shards.uri}: source '{source}' has no shards "
            f"(sources present: {', '.join(shards.sources()) or 'none'})"
        )
    prefix = _family(subsets)
    if prefix is not None and (
        protocol == "paper" or f"{prefix}{TEST_SUBSET[protocol]}" in subsets
    ):
        if protocol == "paper":
            return _segment_split(
                shards, source, (f"{prefix}train",), seed, protocol, f"{prefix}train"
            )
        return _pulsedb_split(shards, source, prefix, seed, protocol)
    # The whole dataset on its own: the Train subset when the test subset is absent, else every
    # (non-PulseDB) subset of this source.
    whole = (f"{prefix}train",) if prefix is not None else tuple(subsets)
    what = "+".join(whole) + " (whole dataset"
    what += f"; {prefix}{TEST_SUBSET[protocol]} absent)" if prefix is not None else ")"
    if protocol == "paper":
        return _segment_split(shards, source, whole, seed, protocol, what)
    return _subject_split(shards, source, whole, seed, protocol, what)
