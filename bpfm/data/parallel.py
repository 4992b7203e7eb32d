"""Converting several input files in parallel processes (`write_shards(workers=N)`).

A worker's error reaches the caller as itself (DataError pickles, see `bpfm.errors`), and one
shared event makes the other conversions stop at their next chunk when one fails or the parent
is asked to stop (`bpfm.io.interrupts`)."""

from __future__ import annotations

import logging
import multiprocessing
import signal
from collections.abc import Callable
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait

from bpfm.io import interrupts

_ABORT = None  # the shared cancel event, set in each worker by `_init_worker`


def _init_worker(abort, level: int) -> None:
    global _ABORT
    _ABORT = abort
    # Ctrl-C reaches the whole process group: the parent alone decides, through `abort`
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    logging.basicConfig(
        level=level, format="%(asctime)s %(name)s[%(process)d]: %(message)s", datefmt="%H:%M:%S"
    )


def _convert_task(convert: Callable[..., dict], path: str, out_uri: str, options: dict) -> dict:
    return convert(path, out_uri, should_stop=_ABORT.is_set, **options)


def run_conversions(
    convert: Callable[..., dict], sources: list[dict], out_uri: str, options: dict, workers: int
) -> list[dict]:
    """`convert(path, out_uri, first_part=..., should_stop=..., **options)` for every source
    (`describe_sources` entries), in up to `workers` processes; results in source order. The
    first failure cancels the rest and is raised here."""
    if workers <= 1 or len(sources) == 1:
        return [
            convert(s["path"], out_uri, first_part=s["first_part"],
                    should_stop=interrupts.requested, **options)
            for s in sources
        ]
    context = multiprocessing.get_context("spawn")  # the caller may hold threads (torch, Ray)
    abort = context.Event()
    level = logging.getLogger().getEffectiveLevel()
    with ProcessPoolExecutor(
        min(workers, len(sources)),
        mp_context=context,
        initializer=_init_worker,
        initargs=(abort, level),
    ) as pool:
        futures = [
            pool.submit(
                _convert_task,
                convert,
                s["path"],
                out_uri,
                {**options, "first_part": s["first_part"]},
            )
            for s in sources
        ]
        try:
            pending = set(futures)
            while pending:
                finished, pending = wait(pending, timeout=0.2, return_when=FIRST_COMPLETED)
                interrupts.check()  # SIGINT / SIGTERM to this process stop every worker
                for future in finished:
                    future.result()  # raises the worker's error
        except BaseException:
            abort.set()  # running conversions stop at their next chunk
            pool.shutdown(wait=True, cancel_futures=True)
            raise
    return [future.result() for future in futures]
