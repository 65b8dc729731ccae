"""PNG figures for `lhtstream evaluate --plots` (optional `plots` extra: matplotlib).

matplotlib is imported only inside these functions, so the package works
without it; `require_matplotlib` turns its absence into a one-line error.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from lhtstream.base.errors import LhtstreamError
from lhtstream.base.stats import roc_curve

#: Most timeline figures written (anomalous videos first, then normal ones with alarms).
MAX_TIMELINES = 40


class PlotsError(LhtstreamError):
    """Plots were requested but cannot be made."""


def require_matplotlib() -> Any:
    """Import matplotlib with a headless backend, or raise a one-line `PlotsError`."""
    try:
        import matplotlib  # local import: optional dependency (the plots extra)
    except ImportError:
        raise PlotsError("--plots needs matplotlib: pip install 'lhtstream[plots]' "
                         "(or pip install matplotlib)") from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # local import: optional dependency

    return plt


def plot_roc(report: dict[str, Any], path: Path) -> Path:
    """ROC curves of the verdict score (normal vs anomalous) and of the KDE-AMD protocol."""
    plt = require_matplotlib()
    fig, ax = plt.subplots(figsize=(5, 5))
    scores = report["video_scores"]
    neg = [v["score"] for v in scores.values() if v["kind"] == "normal"]
    pos = [v["score"] for v in scores.values() if v["kind"] != "normal"]
    if neg and pos:
        fpr, tpr = roc_curve(neg, pos)
        ax.plot(fpr, tpr, label=f"verdict score, all kinds (AUC {report['auc_videos']:.3f})")
    kp = report.get("kdeamd_protocol") or {}
    for key, name, auc in (("", "KDE-AMD protocol, ours", kp.get("auc")),
                           ("_baseline", "KDE-AMD protocol, KDE-AMD as published",
                            kp.get("auc_baseline")),
                           ("_baseline_paper", "KDE-AMD protocol, KDE-AMD paper-faithful",
                            kp.get("auc_baseline_paper"))):
        clean = kp.get(f"clean_scores{key}")
        noisy = kp.get(f"noisy_scores{key}")
        if clean and noisy:
            fpr, tpr = roc_curve(list(clean.values()), list(noisy.values()))
            ax.plot(fpr, tpr, label=f"{name} (AUC {auc:.3f})")
    ax.plot([0, 1], [0, 1], color="grey", lw=0.5, ls="--")
    ax.set_xlabel("false positive rate")
    ax.set_ylabel("true positive rate")
    ax.legend(loc="lower right", fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def plot_timeline(result: Any, path: Path) -> Path:
    """One video's alarm level per frame (max smoothed score / raise threshold), raises marked."""
    plt = require_matplotlib()
    fig, ax = plt.subplots(figsize=(9, 3))
    level = np.asarray(result.level, dtype=np.float64)
    ax.plot(np.arange(len(level)), level, lw=0.6, color="black", label="alarm level")
    ax.axhline(1.0, color="red", lw=0.6, ls="--", label="raise threshold")
    if result.onset is not None:
        end = result.end if result.end is not None else len(level) - 1
        ax.axvspan(result.onset, end, color="orange", alpha=0.25, label=f"{result.kind}")
    for i, (frame, kind) in enumerate(result.raises):
        ax.axvline(frame, color="red", lw=1.0, label="alarm raised" if i == 0 else None)
        ax.annotate(kind, (frame, 1.0), fontsize=7, rotation=90, va="bottom")
    ax.set_yscale("symlog", linthresh=1.0)
    ax.set_xlabel("frame (1 ms)")
    ax.set_ylabel("score / threshold")
    ax.set_title(f"Type{result.type}/{result.name}: {result.kind}, verdict score "
                 f"{result.score:.3g}{' (anomalous)' if result.anomalous else ''}", fontsize=9)
    ax.legend(loc="upper left", fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def write_plots(report: dict[str, Any], results: Sequence[Any], folder: str | Path) -> list[Path]:
    """roc.png plus up to `MAX_TIMELINES` timeline PNGs (TypeN_NNNN_kind.png)."""
    out = Path(folder)
    out.mkdir(parents=True, exist_ok=True)
    written = [plot_roc(report, out / "roc.png")]
    chosen = [r for r in results if r.kind != "normal"]
    chosen += [r for r in results if r.kind == "normal" and r.raises]
    for r in chosen[:MAX_TIMELINES]:
        if r.level is not None:
            written.append(plot_timeline(r, out / f"Type{r.type}_{r.name}_{r.kind}.png"))
    return written
