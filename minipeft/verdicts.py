"""Verdicts chosen by numbers: the comparisons the lessons print, each defined once.

A lesson may print "held", "comparable" or "forgets less" only as the output of a condition on
the numbers it measured, with a margin larger than the noise it measured. The noise here is the
spread of a measurement over seeds: two runs that differ only in their seed (data order, adapter
init) are the same experiment, so a difference smaller than their spread says nothing.

    spread(values)                 -> (mean, sample standard deviation); sd is 0 for one value
    differs(a, b, floor)           -> "less" | "more" | "within noise": mean(a) vs mean(b), called
                                      only when the gap exceeds max(floor, sd(a) + sd(b))
    compare_quality(peft, full)    -> the project's ONE definition of "comparable to full FT"

"Comparable to full fine-tuning" (SEED-NOTES row 13; lessons 05 and 11 both use it): on held-out
examples of the new task, the method's answer-token accuracy (the share of answer tokens
predicted right, a finer signal than exact match over a whole answer), mean over seeds, falls
short of full fine-tuning's by at most ``COMPARABLE_TOLERANCE`` (5 points). With the seeds'
spread ``noise = sd(peft) + sd(full)``:

    shortfall + noise <= tolerance   -> "comparable"       (within tolerance even at the noise's
                                                            unlucky end; being ahead counts too)
    shortfall - noise >  tolerance   -> "not comparable"   (short beyond tolerance at its lucky end)
    otherwise                        -> "undecided"        (the noise straddles the tolerance)

One seed measures no noise, so it can never decide: the verdict is then "undecided".
"""

from __future__ import annotations

import math
import statistics

from minipeft.checks import check_float

COMPARABLE_TOLERANCE = 0.05      # answer-token accuracy (a fraction): 5 points


def spread(values) -> tuple[float, float]:
    """(mean, sample standard deviation) of ``values``; the sd of a single value is 0.0."""
    v = [float(x) for x in values]
    if not v:
        raise ValueError("values must hold at least one number, got none")
    return statistics.mean(v), (statistics.stdev(v) if len(v) > 1 else 0.0)


def differs(a, b, floor: float = 0.0) -> str:
    """Is mean(a) clearly below or above mean(b)? "less", "more" or "within noise".

    Clearly: by more than ``max(floor, sd(a) + sd(b))``, the seeds' spread of both sides (or a
    fixed floor, for measurements whose noise one spread under-states).
    """
    check_float("floor", floor, low=0.0)
    (ma, sa), (mb, sb) = spread(a), spread(b)
    margin = max(floor, sa + sb)
    if ma < mb - margin:
        return "less"
    if ma > mb + margin:
        return "more"
    return "within noise"


def compare_quality(peft, full, tolerance: float = COMPARABLE_TOLERANCE) -> dict:
    """Is a PEFT method's quality comparable to full fine-tuning's? (See the module docstring.)

    ``peft`` and ``full``: per-seed held-out answer-token accuracies in [0, 1]. Returns the
    verdict with every number it was chosen from: means, sds, shortfall (full - peft), noise
    (sd + sd) and the tolerance.
    """
    check_float("tolerance", tolerance, low=0.0)
    (mp, sp), (mf, sf) = spread(peft), spread(full)
    for name, vals in (("peft", peft), ("full", full)):
        if not all(0.0 <= float(x) <= 1.0 for x in vals):
            raise ValueError(f"{name} must hold accuracies in [0, 1], got {list(vals)}")
    shortfall, noise = mf - mp, sp + sf
    if min(len(list(peft)), len(list(full))) < 2:
        verdict, why = "undecided", "one seed measures no noise"
    elif shortfall + noise <= tolerance:
        verdict, why = "comparable", "short by less than the tolerance, noise included"
    elif shortfall - noise > tolerance:
        verdict, why = "not comparable", "short by more than the tolerance, noise included"
    else:
        verdict, why = "undecided", "the seeds' spread straddles the tolerance"
    return {"verdict": verdict, "why": why, "peft_mean": mp, "peft_sd": sp, "full_mean": mf,
            "full_sd": sf, "shortfall": shortfall, "noise": noise, "tolerance": tolerance,
            "seeds": (len(list(peft)), len(list(full)))}


def describe_quality(name: str, c: dict) -> str:
    """One sentence from ``compare_quality``'s numbers, e.g. for a lesson's verdict line."""
    return (f"{name}: answer-token accuracy {c['peft_mean']:.1%} ± {c['peft_sd']:.1%} vs full "
            f"fine-tuning {c['full_mean']:.1%} ± {c['full_sd']:.1%} (seeds {c['seeds'][0]}/"
            f"{c['seeds'][1]}): short by {c['shortfall']:+.1%}, noise {c['noise']:.1%}, "
            f"tolerance {c['tolerance']:.0%} -> {c['verdict']} ({c['why']})")


def interpolate_at(xs, ys, level: float) -> float | None:
    """y where the path (xs[i], ys[i]) first crosses x = ``level``, linearly between the two
    evaluations around the crossing; None if the path never reaches it. ``xs`` need not be
    monotonic (a run's quality can dip): the first upward crossing counts."""
    pts = [(float(x), float(y)) for x, y in zip(xs, ys, strict=True)
           if x is not None and y is not None and not (math.isnan(x) or math.isnan(y))]
    for (x0, y0), (x1, y1) in zip(pts, pts[1:]):
        if x0 >= level:
            return y0
        if x1 >= level:
            return y0 + (y1 - y0) * (level - x0) / (x1 - x0)
    if pts and pts[-1][0] >= level:
        return pts[-1][1]
    return None
