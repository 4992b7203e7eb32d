"""One benchmark, two source trees, in one run: before/after numbers of a change on a shared,
noisy machine, where only numbers measured side by side mean anything.

    python benchmarks/revisions.py --base ff2bdb8 --rounds 3 --grep 'segments/s' -- \
        benchmarks/data_throughput.py --segments 8192

`--base REV` is extracted with `git archive` into a temporary folder; the working tree is the
other side. Rounds alternate base, head, base, head, ... so that drifting load hits both alike.
Each side runs its own copy of the benchmark script with its own `bpfm` first on PYTHONPATH
(an editable install of another checkout is switched off, see `_no_editable_finder`). Prints the
lines matching `--grep` from every run, labelled; not a test."""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

# setuptools' editable install maps `bpfm.*` to its checkout even when another tree comes first
# on sys.path; a module that exists only there would silently load from the wrong tree.
_NO_EDITABLE = (
    "import sys\n"
    "sys.meta_path = [f for f in sys.meta_path if 'editable' not in type(f).__module__\n"
    "                 and 'editable' not in getattr(f, '__module__', '')]\n"
)


def _no_editable_finder(folder: Path) -> Path:
    (folder / "sitecustomize.py").write_text(_NO_EDITABLE)
    return folder


def extract(rev: str, into: Path) -> Path:
    into.mkdir(parents=True)
    archive = subprocess.run(["git", "archive", rev], cwd=REPO, check=True, capture_output=True)
    subprocess.run(["tar", "-x", "-C", str(into)], input=archive.stdout, check=True)
    return into


def run(tree: Path, site: Path, command: list[str]) -> str:
    env = {**os.environ, "PYTHONPATH": f"{tree}{os.pathsep}{site}"}
    done = subprocess.run([sys.executable, *command], cwd=tree, env=env, text=True,
                          capture_output=True, check=False)
    if done.returncode:
        return f"exit {done.returncode}: {done.stderr.strip().splitlines()[-1:]}"
    return done.stdout


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--base", required=True, help="git revision of the 'before' side")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--grep", default=".", help="regex of the output lines to show")
    parser.add_argument("command", nargs=argparse.REMAINDER, help="-- script.py [args]")
    args = parser.parse_args()
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    if not command:
        parser.error("give the benchmark after --, e.g. -- benchmarks/data_throughput.py")
    pattern = re.compile(args.grep)
    with tempfile.TemporaryDirectory(prefix="bpfm-revisions-") as tmp:
        base = extract(args.base, Path(tmp) / "base")
        site = _no_editable_finder(Path(tmp))
        sides = {f"base {args.base}": base, "head (working tree)": REPO}
        for round_ in range(1, args.rounds + 1):
            for label, tree in sides.items():
                output = run(tree, site, command)
                for line in output.splitlines():
                    if pattern.search(line):
                        print(f"round {round_} {label:>22}: {line}", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
