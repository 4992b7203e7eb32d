"""Bland-Altman, scatter and error-histogram plots of one model's test predictions (PNG, Agg)."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # headless: clusters and CI have no display

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

from bpfm.metrics import TARGETS  # noqa: E402

LABELS = {target: target.upper() for target in TARGETS}
DPI = 100


def _two_panels(title: str):
    figure, axes = plt.subplots(1, 2, figsize=(10, 4.2), dpi=DPI)
    # Fixed margins: tight_layout measures every tick label and costs more than the drawing.
    figure.subplots_adjust(left=0.08, right=0.98, bottom=0.13, top=0.86, wspace=0.25)
    figure.suptitle(title, fontsize=10)
    return figure, axes


def _save(figure, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, format="png")
    plt.close(figure)
    return path


def bland_altman(predictions: pd.DataFrame, path: Path, title: str) -> Path:
    """Difference (reference - estimate) against the mean of both, with bias and 95% limits."""
    figure, axes = _two_panels(f"Bland-Altman: {title}")
    for ax, (key, label) in zip(axes, LABELS.items(), strict=True):
        reference, estimate = predictions[key].to_numpy(), predictions[f"{key}_hat"].to_numpy()
        mean, diff = (reference + estimate) / 2, reference - estimate
        bias = float(diff.mean())
        spread = 1.96 * float(diff.std(ddof=1)) if diff.size > 1 else 0.0
        ax.scatter(mean, diff, s=4, alpha=0.4)
        ax.axhline(bias, color="k", label=f"bias {bias:.2f}")
        for limit in (bias - spread, bias + spread):
            ax.axhline(limit, color="r", linestyle="--")
        ax.set_title(f"{label}: limits of agreement {bias - spread:.1f} to {bias + spread:.1f}")
        ax.set_xlabel(f"mean of reference and estimate {label} (mmHg)")
        ax.set_ylabel("reference - estimate (mmHg)")
        ax.legend(loc="upper right", fontsize=8)
    return _save(figure, path)


def scatter(predictions: pd.DataFrame, path: Path, title: str) -> Path:
    """Estimate against reference, with the identity line."""
    figure, axes = _two_panels(f"Estimate vs reference: {title}")
    for ax, (key, label) in zip(axes, LABELS.items(), strict=True):
        reference, estimate = predictions[key].to_numpy(), predictions[f"{key}_hat"].to_numpy()
        low = float(min(reference.min(), estimate.min()))
        high = float(max(reference.max(), estimate.max()))
        ax.scatter(reference, estimate, s=4, alpha=0.4)
        ax.plot([low, high], [low, high], color="k", linewidth=1)
        ax.set_xlabel(f"reference {label} (mmHg)")
        ax.set_ylabel(f"estimated {label} (mmHg)")
        ax.set_title(label)
    return _save(figure, path)


def error_histogram(predictions: pd.DataFrame, path: Path, title: str) -> Path:
    """Histogram of reference - estimate, with the BHS bands (+-5/10/15 mmHg) marked."""
    figure, axes = _two_panels(f"Error histogram: {title}")
    for ax, (key, label) in zip(axes, LABELS.items(), strict=True):
        err = predictions[key].to_numpy() - predictions[f"{key}_hat"].to_numpy()
        ax.hist(err, bins=min(60, max(10, int(np.sqrt(err.size)))), color="tab:blue", alpha=0.8)
        for band in (5, 10, 15):
            for sign in (-1, 1):
                ax.axvline(sign * band, color="grey", linestyle=":", linewidth=1)
        ax.set_xlabel(f"{label} error, reference - estimate (mmHg)")
        ax.set_ylabel("segments")
        ax.set_title(label)
    return _save(figure, path)


PLOTS = {"bland_altman": bland_altman, "scatter": scatter, "error_histogram": error_histogram}


def plot_all(predictions: pd.DataFrame, folder: Path, stem: str, title: str) -> dict[str, Path]:
    """Every plot of one model, named `<stem>-<plot>.png` in `folder`."""
    return {
        name: draw(predictions, folder / f"{stem}-{name}.png", title)
        for name, draw in PLOTS.items()
    }
