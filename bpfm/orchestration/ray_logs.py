"""Ray Tune's own advice that does not apply to bpfm: an interrupted Tune run logs "Resume
experiment with: Tuner.restore(path=..., trainable=...)", but bpfm restores its Tune experiment
itself when the same command runs again (a hand-made Tuner.restore would lack bpfm's trainable,
MLflow runs and stages 2-3). The hint is replaced by that one line."""

from __future__ import annotations

import logging

TUNE_LOGGER = "ray.tune.tune"
RAY_HINT = ("\nResume experiment with:", "\nResume training with:")
RERUN = ("\nbpfm: to resume, run the same bpfm command again (it restores this Tune experiment "
         "itself; ignore Ray's Tuner.restore hint)")


class RerunHint(logging.Filter):
    """Rewrites Tune's restore hint into bpfm's: rerun the command."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        for hint in RAY_HINT:
            if hint in message:
                record.msg, record.args = message.split(hint)[0] + RERUN, ()
        return True


def install() -> None:
    """Once per process (the driver: where Tune logs it)."""
    logger = logging.getLogger(TUNE_LOGGER)
    if not any(isinstance(f, RerunHint) for f in logger.filters):
        logger.addFilter(RerunHint())
