"""The recipe search as a job: `python pipelines/search.py --profile demo --trials 20`, or on a
cluster `ray job submit --working-dir . -- python pipelines/search.py --profile paper ...`.
Same flags as `bpfm search`."""

from __future__ import annotations

import sys
from pathlib import Path

# A job's working dir is an unpacked copy of the repository: make its bpfm importable even where
# the cluster's Python has no bpfm installed.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bpfm.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(["search", *sys.argv[1:]]))
