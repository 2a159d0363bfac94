"""Stated-confidence calibration of a set of scored answers: accuracy, ECE, Brier, AUROC (overall and per item
family) and the reliability diagram (matplotlib, Agg backend).

An item is {'family': str, 'correct': bool, 'confidence': float in [0, 1] or None (nothing parseable)}. ECE,
Brier and AUROC are taken over the items with a confidence (`evals.scoring`'s convention); `stated` says what
share that is, so a model that stops stating a confidence cannot look calibrated unnoticed.
"""
from __future__ import annotations

import collections
from typing import Sequence

from kanana_jax.evals.calibration import auroc, brier_score, expected_calibration_error, reliability_bins


def summarize(confidences: Sequence[float | None], correct: Sequence[bool], n_bins: int = 10) -> dict:
    """n, accuracy (all items), stated (share with a confidence), mean_confidence, overconfidence (mean confidence
    minus accuracy, both over the stated items), ece, brier, auroc (None where undefined)."""
    if len(confidences) != len(correct):
        raise ValueError(f"got {len(confidences)} confidences for {len(correct)} verdicts; pass one per item")
    stated = [(float(q), bool(ok)) for q, ok in zip(confidences, correct) if q is not None]
    q, y = [s[0] for s in stated], [s[1] for s in stated]
    out = {"n": len(correct), "accuracy": sum(map(bool, correct)) / max(len(correct), 1),
           "stated": len(stated) / max(len(correct), 1), "n_with_confidence": len(stated),
           "mean_confidence": None, "overconfidence": None, "ece": None, "brier": None, "auroc": None}
    if stated:
        out.update(mean_confidence=sum(q) / len(q), overconfidence=(sum(q) - sum(y)) / len(q),
                   ece=expected_calibration_error(q, y, n_bins), brier=brier_score(q, y), auroc=auroc(q, y))
    return out


def report(items: Sequence[dict], n_bins: int = 10) -> dict:
    """{'overall': summarize(all), 'families': {family: summarize}, 'bins': the overall reliability bins}."""
    by_family = collections.defaultdict(list)
    for it in items:
        by_family[str(it["family"])].append(it)

    def of(group):
        return summarize([it["confidence"] for it in group], [it["correct"] for it in group], n_bins)

    stated = [it for it in items if it["confidence"] is not None]
    bins = reliability_bins([it["confidence"] for it in stated], [it["correct"] for it in stated], n_bins)
    return {"overall": of(items), "families": {f: of(g) for f, g in sorted(by_family.items())},
            "bins": [{"lo": b.lo, "hi": b.hi, "count": b.count, "mean_confidence": b.mean_confidence,
                      "accuracy": b.accuracy} for b in bins]}


def plot_reliability(reports: dict[str, dict], path: str, title: str = "") -> None:
    """A reliability diagram: accuracy vs mean stated confidence per bin for each labelled report (bins with
    items only, marker area ~ item count), the diagonal of perfect calibration, ECE in the legend; saved to PNG."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(4.8, 4.4))
    ax.plot([0, 1], [0, 1], color="0.6", linestyle=":", label="perfect calibration")
    for label, rep in reports.items():
        bins = [b for b in rep["bins"] if b["count"]]
        total = max(sum(b["count"] for b in bins), 1)
        ece = rep["overall"]["ece"]
        line, = ax.plot([b["mean_confidence"] for b in bins], [b["accuracy"] for b in bins], "-",
                        label=f"{label}: ECE {ece:.3f}, acc {rep['overall']['accuracy']:.3f}" if ece is not None
                        else f"{label}: no stated confidence")
        ax.scatter([b["mean_confidence"] for b in bins], [b["accuracy"] for b in bins],
                   s=[20 + 400 * b["count"] / total for b in bins], color=line.get_color(), alpha=0.6)
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    ax.set_xlabel("stated confidence (bin mean)")
    ax.set_ylabel("accuracy in bin")
    ax.set_title(title or "reliability diagram", fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="upper left")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
