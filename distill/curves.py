"""Learning curves of a training run: loss terms, validation metrics and learning rate as one PNG.

Input is the `metrics.csv` that Lightning's `CSVLogger` writes in `<run>/logs/` (pytorch-lightning 2.6.6 layout: a
header with every metric name ever logged, `epoch` and `step` columns, and one sparse row per logging call, so a
row holds only the metrics logged together: `train/*` every `log_every_n_steps`, `val/*` after each validation,
`lr-<Optimizer>[/pg<N>]` from `LearningRateMonitor`). The PNG (`curves.png` beside the CSV by default) is drawn
with matplotlib's object API (no pyplot: no global backend state, safe without a display) and written atomically.
"""

from __future__ import annotations

import csv
import logging
import math
from pathlib import Path

from matplotlib.figure import Figure

from mcd_common import UsageError
from mcd_common.files import atomic_path

_logger = logging.getLogger(__name__)

__all__ = ["PANELS", "panel_of", "plot_learning_curves", "read_metrics"]

PANELS = ("loss", "validation", "learning rate")
"""The panels, top to bottom."""

Series = dict[str, list[tuple[int, float]]]
"""Metric name -> (step, value) points sorted by step."""


def panel_of(name: str) -> str | None:
    """The panel a metric goes to: `train/*loss` -> loss, `val/*` -> validation, `lr-*` -> learning rate."""
    if name.startswith("train/") and name.endswith("loss"):
        return "loss"
    if name.startswith("val/"):
        return "validation"
    if name.startswith("lr-"):
        return "learning rate"
    return None


def read_metrics(path: str | Path) -> Series:
    """Every numeric metric of a Lightning `metrics.csv`, as (step, value) points sorted by step.

    A step logged twice (a run resumed from an earlier checkpoint appends the steps again) keeps the last value.

    Raises:
        UsageError: The file does not exist or has no `step` column.
    """
    path = Path(path)
    if not path.is_file():
        raise UsageError(f"{path}: no such metrics file (Lightning's CSVLogger writes <run>/logs/metrics.csv)")
    by_name: dict[str, dict[int, float]] = {}
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        if "step" not in (reader.fieldnames or []):
            raise UsageError(f"{path}: not a Lightning metrics.csv (no 'step' column)")
        for row in reader:
            if not row.get("step"):
                continue
            step = int(float(row["step"]))
            for name, value in row.items():
                if name in ("step", "epoch") or value in (None, ""):
                    continue
                try:
                    number = float(value)
                except ValueError:
                    continue
                if math.isfinite(number):
                    by_name.setdefault(name, {})[step] = number
    return {name: sorted(points.items()) for name, points in sorted(by_name.items())}


def plot_learning_curves(
    metrics_csv: str | Path, out: str | Path | None = None, title: str | None = None
) -> Path | None:
    """Draw the loss, validation and learning-rate curves of a run into a PNG.

    Args:
        metrics_csv: The run's `logs/metrics.csv`.
        out: PNG path (default: `curves.png` beside the CSV).
        title: Figure title (default: the run directory's name).

    Returns:
        The PNG path, or None when the CSV holds no loss, validation or learning-rate values (nothing written).
    """
    metrics_csv = Path(metrics_csv)
    series = read_metrics(metrics_csv)
    panels: dict[str, list[str]] = {p: [] for p in PANELS}
    for name in series:
        panel = panel_of(name)
        if panel is not None:
            panels[panel].append(name)
    shown = [p for p in PANELS if panels[p]]
    if not shown:
        _logger.warning("%s has no loss, validation or learning-rate values: no curves drawn", metrics_csv)
        return None
    fig = Figure(figsize=(7, 2.6 * len(shown)), dpi=110, layout="constrained")
    axes = fig.subplots(len(shown), 1, sharex=True, squeeze=False)[:, 0]
    for ax, panel in zip(axes, shown, strict=True):
        for name in panels[panel]:
            steps, values = zip(*series[name], strict=True)
            # NOTE: validation runs a few times per run: markers keep single points visible.
            ax.plot(steps, values, marker="o" if len(steps) < 30 else None, markersize=3, label=name, linewidth=1.2)
        ax.set_ylabel(panel)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, loc="best", ncol=2 if len(panels[panel]) > 4 else 1)
    axes[-1].set_xlabel("optimizer step")
    run_dir = metrics_csv.parent.parent if metrics_csv.parent.name == "logs" else metrics_csv.parent
    fig.suptitle(title or run_dir.name, fontsize=10)
    out = metrics_csv.with_name("curves.png") if out is None else Path(out)
    with atomic_path(out, keep_suffix=True) as tmp:
        fig.savefig(tmp, format="png")
    return out
