"""Accuracy per source and paired bootstrap intervals for `elrea compare`."""

from __future__ import annotations

import math

import numpy as np


def accuracy(records, correct: list[int]) -> dict:
    """Per-source and mean-over-sources accuracy of 0/1 results in record order (records without
    a source count as one source, "all")."""
    per: dict[str, list[int]] = {}
    for r, c in zip(records, correct):
        per.setdefault("all" if r.source is None else str(r.source), []).append(int(c))
    per_source = {s: float(np.mean(v)) for s, v in sorted(per.items())}
    return {"per_source": per_source, "mean": float(np.mean(list(per_source.values()))),
            "correct": [int(c) for c in correct]}


def paired_difference(records, a: list[int], b: list[int], draws: int = 10_000, seed: int = 0) -> dict:
    """Mean accuracy (over sources) of `a` minus `b`, in points, with a 95% paired bootstrap
    interval: both answered the same prompts, so prompts are resampled together, within each
    source, and the interval reflects which prompts happened to be drawn."""
    rng = np.random.default_rng(seed)
    diff = np.asarray(a, float) - np.asarray(b, float)
    sources = np.array(["all" if r.source is None else str(r.source) for r in records])
    groups = [diff[sources == s] for s in sorted(set(sources))]
    boot = np.mean([g[rng.integers(0, len(g), (draws, len(g)))].mean(1) for g in groups], axis=0)
    lo, hi = np.percentile(boot, [2.5, 97.5])
    return {"points": 100 * float(np.mean([g.mean() for g in groups])), "ci95": [100 * float(lo), 100 * float(hi)]}


def validation_rank(trial: dict) -> tuple:
    """The key by which `elrea compare` picks among validation trials ({"validation": mean
    accuracy, "top_k": k, 0 for all experts}; use with max): accuracy, rounded so that trials with
    equally many answers right tie however their mean over sources was summed (0.35000000000000003
    against 0.3499999999999999 must not decide); on a tie the cheaper ensemble, top-1, then top-2,
    ..., then all experts; on a tie of both, max keeps the first trial: the earlier candidate, the
    lower temperature, the earlier router."""
    return round(trial["validation"], 9), -(trial["top_k"] or math.inf)
