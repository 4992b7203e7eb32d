"""The study as one job: the grid's cells and trials (`grid`), the Ray-free work of its stages
(`stages`), the bridge to Ray Tune (`ray_grid`, `ray_search`: the only modules of bpfm that
import ray), backbones, launch identity, cost plan, dry run, preflight checks, progress and the
nightly run."""
