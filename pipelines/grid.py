"""The study as one job: `python pipelines/grid.py --profile demo` on this machine (local Ray), or
`ray job submit --working-dir . -- python pipelines/grid.py --profile paper` on a cluster (the
job's RAY_ADDRESS makes it join the cluster). Same flags as `bpfm grid`."""

from __future__ import annotations

import sys
from pathlib import Path

# A job's working dir is an unpacked copy of the repository: make its bpfm importable even
# where the cluster's Python has no bpfm installed.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bpfm.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(["grid", *sys.argv[1:]]))
