"""The leaderboard job: `python pipelines/leaderboard.py --experiment NAME --out DIR`, also as
`ray job submit --working-dir . -- python pipelines/leaderboard.py ...`. Same flags as
`bpfm leaderboard`."""

from __future__ import annotations

import sys

from bpfm.cli import main

if __name__ == "__main__":
    sys.exit(main(["leaderboard", *sys.argv[1:]]))
