"""Per-subject calibration and in-domain pretraining on the real challenge2015 sample.

For each backbone init (xavier, SimMIM on the train view's ECG+PPG windows from scratch, and
continuing a synthetic-EEG SimMIM backbone), trains small / unfrozen on a subject-disjoint
protocol (`calfree`: 20 / 3 / 3 subjects of challenge2015), then for each K prints MAE, MASE and
`cal_mase` of every calibration method against `none` and the trivial calibrated predictor, all
on the same test windows (each test subject's windows after its first K).

    python benchmarks/calibration.py [--epochs 30] [--report-epochs 10] [--ks 3,5,10]
        [--inits xavier,pretrained_ecgppg,pretrained_eeg_then_ecgppg] [--work /tmp/bpfm-calib]

Everything is resumable: pretrained backbones and trained model dirs under --work are reused, so
a rerun only evaluates (and trains what is missing); `--measure-only` trains nothing (a run
stopped early is measured from its latest checkpoint). `--json` writes every number.

Measured 2026-12-02 on the shared 2-core CPU (numbers, not times, are what it prints), run as
`--epochs 10 --report-epochs "" --pretrain-steps 100 --eeg-steps 40`, then again with
`--epochs 30` (the 10-epoch runs resume to 30, equal to uninterrupted 30-epoch runs). Test = 3
unseen subjects; MAE SBP/DBP mmHg (cal_mase SBP/DBP) at 30 epochs, K = 5, on the same 66 windows:
  xavier:            none 29.69/10.74 (3.05/2.09)  offset 13.50/7.94  affine 10.82/5.13
                     (1.11/1.00)  head 11.73/4.30 (1.21/0.83)
  pretrained_ecgppg: none 29.81/9.72 (3.06/1.89)   offset 11.77/7.99  affine 11.87/4.81
                     (1.22/0.93)  head 11.73/4.90 (1.21/0.95)
  eeg_then_ecgppg:   none 28.89/9.75 (2.97/1.89)   offset 10.72/6.24  affine 10.61/4.68
                     (1.09/0.91)  head 11.72/5.08 (1.20/0.99)
  trivial calibrated predictor: 9.74/5.15.
Calibration removes most of the subject-level error (none -> offset: every init and K), but on 3
test subjects only DBP gets cal_mase < 1 (head, affine); SBP stays above the trivial predictor.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
from pathlib import Path

from bpfm.data.shards import MANIFEST, write_shards
from bpfm.training.calibration import METHODS, encode_split, evaluate_calibration
from bpfm.training.config import TrainConfig
from bpfm.training.evaluate import open_split
from bpfm.training.loop import fit
from bpfm.training.model_dir import load_trained
from bpfm.training.pretrain import PretrainConfig, pretrain

REPO = Path(__file__).resolve().parents[1]
SAMPLE = Path(os.environ.get("BPFM_CHALLENGE2015", REPO.parent / "shared" / "data" /
              "challenge2015" / "Challenge2015_Sample_Subset.mat"))
log = logging.getLogger("calibration-bench")


def ensure_shards(work: Path) -> str:
    out = work / "shards"
    if not (out / MANIFEST).is_file():
        write_shards([SAMPLE], str(out))
    return str(out)


def ensure_backbone(init: str, args, data: str, work: Path) -> str | None:
    """The checkpoint of a named backbone, pretrained on first use."""
    if init == "xavier":
        return None
    common = {"size": "small", "batch_size": 32, "seed": 42, "device": "cpu", "log_every": 25}
    eeg = work / "backbones" / "eeg.ckpt"
    if init in ("pretrained", "pretrained_eeg_then_ecgppg") and not eeg.is_file():
        pretrain(PretrainConfig(out=str(eeg), steps=args.eeg_steps, synthetic_windows=256,
                                **common))
    if init == "pretrained":
        return str(eeg)
    out = work / "backbones" / f"{init}-{args.source}-{args.protocol}.ckpt"
    if not out.is_file():
        pretrain(PretrainConfig(
            out=str(out), steps=args.pretrain_steps, data=data, source=args.source,
            protocol=args.protocol,
            init_checkpoint=str(eeg) if init == "pretrained_eeg_then_ecgppg" else None, **common,
        ))
    return str(out)


def train(init: str, checkpoint: str | None, args, data: str, work: Path) -> Path:
    config = TrainConfig(
        data=data, source=args.source, protocol=args.protocol, size="small", freeze="unfrozen",
        init=init, checkpoint=checkpoint, epochs=args.epochs, batch_size=32, lr=1e-4,
        eval_batch_size=256, device="cpu", report_epochs=tuple(args.report_epochs),
        out=str(work / "runs" / init),
    )
    fit(config)
    return Path(config.out)


def from_checkpoint(out: Path, data: str):
    """(model, config, meta, epoch) from a run's latest epoch checkpoint: a run stopped before
    its final epoch (a loaded machine) is still measured, at the epoch it reached."""
    import numpy as np

    from bpfm.data.loader import view_target_stats
    from bpfm.training.loop import _target_meta, build_model
    from bpfm.training.state import latest_checkpoint, load_train_state

    config = TrainConfig.from_dict(json.loads((out / "config.json").read_text()))
    state = load_train_state(latest_checkpoint(out))
    model = build_model(TrainConfig.from_dict({**config.to_dict(), "init": "xavier",
                                               "checkpoint": None}))
    model.load_state_dict(state["model"])
    split = open_split(data, config.source, config.protocol, config.split_seed)
    mean, std = (np.asarray(v, np.float64) for v in view_target_stats(split.train))
    return model.eval(), config, _target_meta(config, mean, std), state["epoch"]


def measure(model_dir: Path, args, data: str, loaded=None) -> dict:
    model, config, meta = loaded or load_trained(model_dir)
    split = open_split(data, config.source, config.protocol, config.split_seed)
    encoded = encode_split(model, meta, split)  # the model runs once for every K
    return {k: evaluate_calibration(model, meta, split, METHODS[1:], k, encoded=encoded)
            for k in args.ks}


def print_table(rows: list[dict]) -> None:
    header = (f"{'init':28s} {'ep':>3s} {'K':>3s} {'method':8s} {'n':>4s} "
              f"{'MAE sbp/dbp':>13s} {'MASE sbp/dbp':>13s} {'cal_mase sbp/dbp':>17s}")
    print(header)
    print("-" * len(header))
    for r in rows:
        m = r["metrics"]
        print(f"{r['init']:28s} {r['epochs']:>3d} {r['k']:>3d} {r['method']:8s} {m['n']:>4d} "
              f"{m['sbp_mae']:6.2f}/{m['dbp_mae']:<6.2f} "
              f"{m['sbp_mase']:6.3f}/{m['dbp_mase']:<6.3f} "
              f"{m['sbp_cal_mase']:8.3f}/{m['dbp_cal_mase']:<8.3f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--work", default="/tmp/bpfm-calib")
    parser.add_argument("--source", default="other")
    parser.add_argument("--protocol", default="calfree")
    parser.add_argument("--epochs", type=int, default=30)
    parser.add_argument("--report-epochs", type=lambda s: [int(v) for v in s.split(",") if v],
                        default=[10])
    parser.add_argument("--ks", type=lambda s: [int(v) for v in s.split(",")], default=[3, 5, 10])
    parser.add_argument("--inits", default="xavier,pretrained_ecgppg,pretrained_eeg_then_ecgppg")
    parser.add_argument("--pretrain-steps", type=int, default=300)
    parser.add_argument("--eeg-steps", type=int, default=150)
    parser.add_argument("--json", help="write every number here")
    parser.add_argument("--measure-only", action="store_true",
                        help="train nothing: measure the model dirs under --work")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    work = Path(args.work)
    data = ensure_shards(work)
    inits = [i for i in args.inits.split(",") if i]
    if args.measure_only:
        out_dirs = {i: work / "runs" / i for i in inits}
    else:
        out_dirs = {i: train(i, ensure_backbone(i, args, data, work), args, data, work)
                    for i in inits}
    rows = []
    for init, out in out_dirs.items():
        measured = []
        for epochs in sorted({*args.report_epochs, args.epochs}):
            model_dir = out if epochs == args.epochs else out / f"epoch-{epochs}"
            if not (model_dir / "metrics.json").is_file() or (
                json.loads((model_dir / "metrics.json").read_text())["epoch"] != epochs
            ):
                continue  # measure-only: not trained that far (yet)
            measured.append((epochs, model_dir, None))
        if not measured and args.measure_only and (out / "checkpoints").is_dir():
            model, config, meta, epoch = from_checkpoint(out, data)
            measured.append((epoch, out, (model, config, meta)))
        for epochs, model_dir, loaded in measured:
            for k, result in measure(model_dir, args, data, loaded).items():
                for method, metrics in result["metrics"].items():
                    rows.append({"init": init, "epochs": epochs, "k": k, "method": method,
                                 "metrics": metrics, "chosen": {
                                     key: result.get(key) for key in ("affine_strength",
                                                                      "head_steps")}})
    print(f"\n{args.source} / {args.protocol}: small, unfrozen; each K: the test subjects' "
          "windows after their first K (same windows for every method)")
    print_table(rows)
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1, default=float))


if __name__ == "__main__":
    main()
