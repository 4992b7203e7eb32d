"""The node-local shard cache (`bpfm.data.cache`) against the real SeaweedFS S3 server: bytes the
server sent are counted by a loopback proxy, processes are real and really killed."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
import uuid
from pathlib import Path

import numpy as np
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import pytest

from bpfm.data.cache import LEASES, CachedShardSet, NodeCache
from bpfm.data.shards import open_shards, write_shards
from bpfm.data.splits import make_split
from bpfm.errors import BpfmError
from bpfm.io import storage
from tests.services.proxy import counting_proxy_for

REPO = Path(__file__).resolve().parents[2]

# One trainer: open the cached split, read the train view through 2 DataLoader workers, print
# the rows it saw and a checksum of their signals.
READER = textwrap.dedent(
    """
    import json, sys
    import numpy as np
    from torch.utils.data import DataLoader
    from bpfm.data.loader import ShardDataset
    from bpfm.training.evaluate import open_split

    split = open_split(sys.argv[1], "mimic", "paper", cache=sys.argv[2] == "on")
    dataset = ShardDataset(split.train, batch_size=16, shuffle=False)
    rows, total = 0, 0.0
    for batch in DataLoader(dataset, batch_size=None, num_workers=2):
        rows += len(batch["x"])
        total += float(np.float64(batch["x"].double().sum()))
    print(json.dumps({"rows": rows, "sum": total, "type": type(split.train.shards).__name__}))
    """
)


@pytest.fixture(scope="module")
def s3_shards(s3_server, synthetic_subset_files) -> str:
    """The synthetic Train subset as a shard set on S3 (one generation for the module)."""
    env = os.environ.copy()
    os.environ.update(s3_server.env())
    try:
        uri = f"s3://{s3_server.bucket}/cache-{uuid.uuid4().hex[:8]}/pulsedb"
        train = [p for p in synthetic_subset_files if p.name == "Train_Subset.mat"]
        write_shards(train, uri)
        return uri
    finally:
        os.environ.clear()
        os.environ.update(env)


def _view_bytes(uri: str) -> int:
    return sum(p["bytes"] for p in open_shards(uri).parts("mimic", ["train"]))


def _start_readers(uri: str, env: dict, count: int, cache: str) -> list[subprocess.Popen]:
    return [
        subprocess.Popen([sys.executable, "-c", READER, uri, cache], env=env, cwd=REPO,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for _ in range(count)
    ]


def _results(processes: list[subprocess.Popen]) -> list[dict]:
    out = []
    for process in processes:
        stdout, stderr = process.communicate(timeout=300)
        assert process.returncode == 0, stderr[-2000:]
        out.append(json.loads(stdout.strip().splitlines()[-1]))
    return out


def test_concurrent_trainers_copy_each_part_once_and_read_what_s3_holds(
    s3_env, s3_shards, tmp_path
):
    proxy = counting_proxy_for(s3_env.endpoint)
    env = {**os.environ, "AWS_ENDPOINT_URL_S3": proxy.endpoint, "BPFM_CACHE_DIR": str(tmp_path),
           "PYTHONPATH": str(REPO)}
    view_bytes, readers = _view_bytes(s3_shards), 4
    try:
        cached = _results(_start_readers(s3_shards, env, readers, "on"))
        sent_cached = proxy.sent_to_clients
        proxy.reset()
        streamed = _results(_start_readers(s3_shards, env, readers, "off"))
        sent_streamed = proxy.sent_to_clients
    finally:
        proxy.close()
    manifest = len(json.dumps(open_shards(s3_shards).manifest))
    overhead = readers * (2 * manifest + (64 << 10))  # manifest reads, listings, HTTP headers
    # 4 processes x 3 consumers each (main + 2 workers) at once: every part crossed the wire once
    assert view_bytes <= sent_cached <= 1.05 * view_bytes + overhead
    # streaming reads the view's signals once per process (and the counter counts them)
    assert sent_streamed >= readers * 0.9 * view_bytes
    assert {r["type"] for r in cached} == {"CachedShardSet"}
    assert {r["type"] for r in streamed} == {"ShardSet"}
    assert len({(r["rows"], round(r["sum"], 3)) for r in cached + streamed}) == 1
    parts = open_shards(s3_shards).parts("mimic", ["train"])
    for part in parts:
        assert (tmp_path / part["path"]).stat().st_size == part["bytes"]
    assert not list(tmp_path.rglob("*.tmp"))
    leases = list(tmp_path.glob(f"gen-*/{LEASES}/*"))
    assert not leases, leases  # the readers exited: their leases went with them


def test_the_first_part_read_copies_its_subsets_other_parts_in_the_background(
    s3_env, synthetic_subset_files, tmp_path
):
    uri = f"s3://{s3_env.bucket}/prefetch-{uuid.uuid4().hex[:8]}/pulsedb"
    write_shards([p for p in synthetic_subset_files if p.name == "Train_Subset.mat"], uri,
                 rows_per_part=24, row_group_size=24)  # a few parts per subset
    manifest = open_shards(uri).manifest
    shards = CachedShardSet(uri, manifest, NodeCache(tmp_path, 10**9))
    parts = shards.parts("mimic", ["train"])
    others = [p for p in manifest["parts"] if (p["source"], p["subset"]) != ("mimic", "train")]
    assert len(parts) > 1 and others
    shards.part_path(parts[-1])  # the reader waits for this one only
    deadline = time.monotonic() + 120
    while not all((tmp_path / p["path"]).is_file() for p in parts):
        assert time.monotonic() < deadline, "the prefetch did not finish"
        time.sleep(0.2)
    for part in parts:
        assert (tmp_path / part["path"]).stat().st_size == part["bytes"]
    assert not any((tmp_path / p["path"]).exists() for p in others)  # not the view's: not copied


def test_the_background_copies_follow_the_reader_s_order(
    s3_env, synthetic_subset_files, tmp_path, monkeypatch
):
    monkeypatch.setattr("bpfm.data.cache.PREFETCH_THREADS", 1)  # one copy at a time: an order
    uri = f"s3://{s3_env.bucket}/order-{uuid.uuid4().hex[:8]}/pulsedb"
    write_shards([p for p in synthetic_subset_files if p.name == "Train_Subset.mat"], uri,
                 rows_per_part=24, row_group_size=24)
    shards = CachedShardSet(uri, open_shards(uri).manifest, NodeCache(tmp_path, 10**9))
    parts = shards.parts("mimic", ["train"])
    assert len(parts) >= 3
    wanted = [parts[1], *parts[:1:-1], parts[0]]  # not the manifest's order, nor its reverse
    shards.will_read([(p, g) for p in wanted for g in range(len(p["row_groups"]))])
    shards.part_path(wanted[0])
    deadline = time.monotonic() + 120
    while not all((tmp_path / p["path"]).is_file() for p in parts):
        assert time.monotonic() < deadline, "the prefetch did not finish"
        time.sleep(0.2)
    written = sorted(parts, key=lambda p: (tmp_path / p["path"]).stat().st_mtime_ns)
    assert [p["path"] for p in written] == [p["path"] for p in wanted]


def test_opening_a_cached_split_and_its_label_statistics_copies_no_part(
    s3_env, s3_shards, tmp_path
):
    from bpfm.data.loader import ShardDataset, view_target_stats

    cached = make_split(CachedShardSet(s3_shards, open_shards(s3_shards).manifest,
                                       NodeCache(tmp_path, 10**9)), "mimic", "paper")
    remote = make_split(open_shards(s3_shards), "mimic", "paper")
    stats = view_target_stats(cached.train)  # subjects and labels: column reads from S3
    assert not list(tmp_path.rglob("*.parquet"))  # no reader waits for the view before a batch
    np.testing.assert_array_equal(np.stack(stats), np.stack(view_target_stats(remote.train)))
    next(iter(ShardDataset(cached.train, batch_size=8, shuffle=True)))
    # the signals come from the copies: the first batch started them, and they complete
    deadline = time.monotonic() + 60
    while not list(tmp_path.rglob("*.parquet")):
        assert time.monotonic() < deadline, "no part was copied for the signals"
        time.sleep(0.1)

def test_a_cached_view_reads_the_same_batches_as_the_remote_one(s3_env, s3_shards, tmp_path):
    from bpfm.data.loader import ShardDataset

    cache = NodeCache(tmp_path, 10**9)
    remote = make_split(s3_shards, "mimic", "calfree").train
    local = make_split(CachedShardSet(s3_shards, open_shards(s3_shards).manifest, cache),
                       "mimic", "calfree").train
    assert isinstance(local.shards.filesystem, pafs.LocalFileSystem)
    a = list(ShardDataset(remote, batch_size=32, shuffle=True, seed=3))
    b = list(ShardDataset(local, batch_size=32, shuffle=True, seed=3))
    assert len(a) == len(b) > 0
    for x, y in zip(a, b, strict=True):
        np.testing.assert_array_equal(x["x"].numpy(), y["x"].numpy())
        np.testing.assert_array_equal(x["y"].numpy(), y["y"].numpy())


KILLED_COPIER = textwrap.dedent(
    """
    import os, signal, sys
    from bpfm.data import cache as c
    from bpfm.data.shards import open_shards

    def copy_half_then_die(copy, block):
        os.pwrite(copy._fd, copy._source.read_at(copy.size // 2, 0), 0)
        print("copying", flush=True)
        os.kill(os.getpid(), signal.SIGKILL)

    c.PartCopy._fetch = copy_half_then_die
    shards = c.CachedShardSet(sys.argv[1], open_shards(sys.argv[1]).manifest)
    shards.part_path(shards.parts("mimic", ["train"])[0])
    """
)


def test_a_killed_copier_leaves_nothing_taken_as_complete(s3_env, s3_shards, tmp_path):
    env = {**os.environ, "BPFM_CACHE_DIR": str(tmp_path), "PYTHONPATH": str(REPO)}
    process = subprocess.run([sys.executable, "-c", KILLED_COPIER, s3_shards], env=env, cwd=REPO,
                             capture_output=True, text=True, timeout=120)
    assert process.returncode == -signal.SIGKILL and "copying" in process.stdout
    part = open_shards(s3_shards).parts("mimic", ["train"])[0]
    target = tmp_path / part["path"]
    assert not target.exists() and len(list(target.parent.glob("*.tmp"))) == 1
    shards = CachedShardSet(s3_shards, open_shards(s3_shards).manifest, NodeCache(tmp_path, 10**9))
    started = time.monotonic()
    path = Path(shards.part_path(part))  # the dead copier's lock went with it
    assert time.monotonic() - started < 30
    assert path == target and target.stat().st_size == part["bytes"]
    assert not list(target.parent.glob("*.tmp"))


def test_a_part_that_differs_from_the_manifest_is_refused(s3_env, s3_shards, tmp_path):
    manifest = json.loads(json.dumps(open_shards(s3_shards).manifest))
    part = next(p for p in manifest["parts"] if p["source"] == "mimic")
    for key in ("block_bytes", "block_sha256"):  # as written before block checksums
        del part[key]
    part["sha256"] = "0" * 64  # as if the object had been replaced under the manifest
    shards = CachedShardSet(s3_shards, manifest, NodeCache(tmp_path, 10**9))
    with pytest.raises(BpfmError, match="sha256: the object differs"):
        shards.part_path(part)
    assert not (tmp_path / part["path"]).exists()
    assert not list((tmp_path / part["path"]).parent.glob("*.tmp"))


@pytest.fixture
def blocked_shards(s3_env, synthetic_subset_files, monkeypatch) -> str:
    """The Train subset on S3 as one part per partition of many row groups, 64 KB blocks."""
    monkeypatch.setattr("bpfm.data.shards.BLOCK_BYTES", 64 << 10)
    uri = f"s3://{s3_env.bucket}/blocks-{uuid.uuid4().hex[:8]}/pulsedb"
    write_shards([p for p in synthetic_subset_files if p.name == "Train_Subset.mat"], uri,
                 rows_per_part=10**6, row_group_size=24)
    return uri


def test_a_row_group_is_read_once_its_own_blocks_are_in(
    s3_env, blocked_shards, tmp_path, monkeypatch
):
    monkeypatch.setattr("bpfm.data.cache.PREFETCH_THREADS", 0)  # the reader's copies alone
    proxy = counting_proxy_for(s3_env.endpoint)
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", proxy.endpoint)
    try:
        shards = CachedShardSet(blocked_shards, open_shards(blocked_shards).manifest,
                                NodeCache(tmp_path, 10**9))
        part = shards.parts("mimic", ["train"])[0]
        groups = len(part["row_groups"])
        assert groups >= 4 and len(part["block_sha256"]) > 2 * groups
        remote = open_shards(blocked_shards).open_part(part)
        expected = [remote.read_row_group(g) for g in range(groups)]
        proxy.reset()
        reader = shards.open_part(part)
        assert reader.read_row_group(groups // 2).equals(expected[groups // 2])
        # its blocks and the footer's, not the part: a reader goes on before the copy is done
        assert proxy.sent_to_clients < 0.5 * part["bytes"]
        target = tmp_path / part["path"]
        assert not target.exists() and len(list(target.parent.glob("*.tmp"))) == 1
        for group in range(groups):
            assert reader.read_row_group(group).equals(expected[group])
        assert proxy.sent_to_clients < part["bytes"] * 1.05 + (64 << 10)  # each block once
    finally:
        proxy.close()
    assert target.stat().st_size == part["bytes"]
    assert storage.sha256_file(target) == part["sha256"]
    assert not list(target.parent.glob("*.tmp"))
    assert isinstance(shards.open_part(part), pq.ParquetFile)  # complete: the local fast path


def test_a_block_that_differs_from_its_checksum_is_never_read(
    s3_env, blocked_shards, tmp_path, monkeypatch
):
    monkeypatch.setattr("bpfm.data.cache.PREFETCH_THREADS", 0)
    manifest = json.loads(json.dumps(open_shards(blocked_shards).manifest))
    part = next(p for p in manifest["parts"] if p["subset"] == "train")
    shards = CachedShardSet(blocked_shards, manifest, NodeCache(tmp_path, 10**9))
    reader = shards.open_part(part)
    blocks = reader._copy.blocks_of(1)
    part["block_sha256"][blocks[-1]] = "0" * 64  # as if that range of the object had changed
    with pytest.raises(BpfmError, match=rf"sha256: .* \(block {blocks[-1]}, bytes \d+-\d+\)"):
        reader.read_row_group(1)
    target = tmp_path / part["path"]
    assert not target.exists() and not list(target.parent.glob("*.tmp"))
    with pytest.raises(BpfmError, match="sha256"):  # the copy is off: no other group reads
        reader.read_row_group(0)
    part["block_sha256"][blocks[-1]] = open_shards(blocked_shards).parts(
        "mimic", ["train"])[0]["block_sha256"][blocks[-1]]
    assert shards.open_part(part).read_row_group(1).num_rows > 0  # a new copy, from scratch


def test_k_readers_of_a_blocked_set_copy_each_part_once(s3_env, blocked_shards, tmp_path):
    proxy = counting_proxy_for(s3_env.endpoint)
    env = {**os.environ, "AWS_ENDPOINT_URL_S3": proxy.endpoint, "BPFM_CACHE_DIR": str(tmp_path),
           "PYTHONPATH": str(REPO)}
    try:
        cached = _results(_start_readers(blocked_shards, env, 3, "on"))
        sent = proxy.sent_to_clients
    finally:
        proxy.close()
    view_bytes = _view_bytes(blocked_shards)
    manifest = len(json.dumps(open_shards(blocked_shards).manifest))
    assert view_bytes <= sent <= 1.05 * view_bytes + 3 * (2 * manifest + (64 << 10))
    direct = {**env, "AWS_ENDPOINT_URL_S3": s3_env.endpoint}
    streamed = _results(_start_readers(blocked_shards, direct, 1, "off"))
    assert len({(r["rows"], round(r["sum"], 3)) for r in cached + streamed}) == 1
    for part in open_shards(blocked_shards).parts("mimic", ["train"]):
        assert storage.sha256_file(tmp_path / part["path"]) == part["sha256"]
    assert not list(tmp_path.rglob("*.tmp"))


# ------------------------------------------------------------- eviction (a local "remote")


def _generation(remote: Path, name: str, size: int) -> dict:
    path = f"{name}/source=mimic/subset=train/part-00000.parquet"
    (remote / path).parent.mkdir(parents=True)
    data = os.urandom(size)
    (remote / path).write_bytes(data)
    import hashlib

    return {"path": path, "bytes": size, "sha256": hashlib.sha256(data).hexdigest()}


HOLDER = textwrap.dedent(
    """
    import sys, time
    from pathlib import Path
    from bpfm.data.cache import NodeCache

    NodeCache(Path(sys.argv[1]), 10**9).lease(sys.argv[2])
    print("leased", flush=True)
    time.sleep(300)
    """
)


def test_eviction_drops_the_least_recently_used_generation_no_live_process_holds(tmp_path):
    remote, root = tmp_path / "remote", tmp_path / "cache"
    fs = pafs.LocalFileSystem()
    parts = {g: _generation(remote, g, 400_000) for g in ("gen-a", "gen-b", "gen-c", "gen-d")}
    roomy = NodeCache(root, 10**9)
    for name in ("gen-a", "gen-b", "gen-c"):
        roomy.fetch(fs, str(remote / parts[name]["path"]), parts[name], "remote")
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, str(root), "gen-a"], env=env,
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "leased"
        now = time.time()
        for name, age in (("gen-a", 1000), ("gen-b", 500), ("gen-c", 100)):  # a: least recent
            (root / name / ".used").touch()
            os.utime(root / name / ".used", (now - age, now - age))
        capped = NodeCache(root, 1_300_000)  # room for 3 parts: one generation must go
        capped.fetch(fs, str(remote / parts["gen-d"]["path"]), parts["gen-d"], "remote")
        # gen-a is the oldest but a live process holds it: gen-b goes instead
        assert sorted(p.name for p in root.glob("gen-*")) == ["gen-a", "gen-c", "gen-d"]
        tight = NodeCache(root, 900_000)
        with pytest.raises(BpfmError, match="BPFM_CACHE_MAX_GB"):
            tight.make_room(400_000, keep="gen-d")  # gen-c evicted, gen-a still held: no room
        assert sorted(p.name for p in root.glob("gen-*")) == ["gen-a", "gen-d"]
    finally:
        holder.kill()
        holder.wait()
    # the holder is dead now (SIGKILL: its lease file stayed behind, but counts for nothing)
    assert NodeCache(root, 900_000).make_room(400_000, keep="gen-d") == ["gen-a"]


def test_cache_settings_come_from_the_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("BPFM_CACHE_DIR", str(tmp_path))
    monkeypatch.setenv("BPFM_CACHE_MAX_GB", "1.5")
    assert NodeCache.from_env() == NodeCache(tmp_path, 1_500_000_000)
    monkeypatch.setenv("BPFM_CACHE_MAX_GB", "lots")
    with pytest.raises(BpfmError, match="BPFM_CACHE_MAX_GB: 'lots' is not a number"):
        NodeCache.from_env()
    monkeypatch.delenv("BPFM_CACHE_DIR")
    monkeypatch.delenv("BPFM_CACHE_MAX_GB")
    assert NodeCache.from_env().root.parts[-2:] == ("bpfm", "shards")


def test_local_sets_and_no_cache_read_directly(s3_env, s3_shards, synthetic_shards):
    assert type(open_shards(synthetic_shards, cache=True)).__name__ == "ShardSet"
    assert type(open_shards(s3_shards, cache=False)).__name__ == "ShardSet"


@pytest.mark.parametrize("flag", ["", "--no-cache"])
def test_bpfm_train_on_s3_fills_the_node_cache_unless_told_not_to(
    s3_env, s3_shards, tmp_path, monkeypatch, flag
):
    from bpfm.cli import main

    cache = tmp_path / "cache"
    monkeypatch.setenv("BPFM_CACHE_DIR", str(cache))
    args = ["train", "--data", s3_shards, "--source", "mimic", "--size", "small", "--epochs", "1",
            "--batch-size", "8", "--max-steps-per-epoch", "1", "--out", str(tmp_path / "run"),
            *filter(None, [flag])]
    assert main(args) == 0
    config = json.loads((tmp_path / "run" / "config.json").read_text())
    assert config["cache"] is (flag == "")
    cached = sorted(p.relative_to(cache).as_posix() for p in cache.rglob("*.parquet"))
    wanted = sorted(p["path"] for p in open_shards(s3_shards).parts("mimic", ["train"]))
    assert cached == (wanted if flag == "" else [])


def test_profile_data_cache_must_be_a_flag(tmp_path):
    import yaml

    from bpfm.profiles import PROFILE_DIR, load_profile

    raw = yaml.safe_load((PROFILE_DIR / "tiny.yaml").read_text())
    assert load_profile(str(PROFILE_DIR / "tiny.yaml")).data.cache is True
    raw["data"]["cache"] = False
    (tmp_path / "off.yaml").write_text(yaml.safe_dump(raw))
    assert load_profile(str(tmp_path / "off.yaml")).data.cache is False
    raw["data"]["cache"] = "sometimes"
    (tmp_path / "bad.yaml").write_text(yaml.safe_dump(raw))
    with pytest.raises(BpfmError, match="data.cache: must be true or false"):
        load_profile(str(tmp_path / "bad.yaml"))
