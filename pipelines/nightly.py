"""The nightly regression run as a job: `python pipelines/nightly.py` (cron, CI), or on a cluster
`ray job submit --working-dir . -- python pipelines/nightly.py` (cluster/kuberay/
nightly-cronjob.yaml). Exits 1 on a regression. Same flags as `bpfm nightly`."""

from __future__ import annotations

import sys
from pathlib import Path

# A job's working dir is an unpacked copy of the repository: make its bpfm importable even where
# the cluster's Python has no bpfm installed.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bpfm.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(["nightly", *sys.argv[1:]]))
