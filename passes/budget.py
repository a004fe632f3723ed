"""A size budget and the choice of one candidate per weight matrix under it.

`bits(2.5)` is a budget of 2.5 bits per quantized weight on average (codes, scales, zero points
and side tensors counted, as `bits_per_weight` counts them). `allocate` picks, for each unit (a
weight matrix, or an expert stack, which keeps one format), the candidate that minimizes the
sum of the units' predicted errors with the sum of their sizes within the budget: a
multiple-choice knapsack, solved as the Lagrangian relaxation is: every unit starts at its
smallest candidate, then upgrades along its lower convex hull of (size, error) are taken in
order of error saved per bit, skipping those that no longer fit (a unit whose upgrade was
skipped takes no later one). The result is the best of that and every uniform assignment
within the budget.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class Bits:
    """At most `per_weight` bits per quantized weight on average. `calibration`: token batches
    for the layers' sensitivities when no candidate carries calibration data; `seed`: the
    draws of the sensitivity pass."""

    per_weight: float
    calibration: Any = field(default=None, repr=False, compare=False)
    seed: int = 0

    def __post_init__(self):
        if isinstance(self.per_weight, bool) or not isinstance(self.per_weight, (int, float)) \
                or not 1.0 <= self.per_weight <= 32.0:
            raise ValueError(f"bits per weight must be a number in [1, 32], e.g. "
                             f"discq.bits(2.5), got {self.per_weight!r}")


def bits(per_weight: float, *, calibration=None, seed: int = 0) -> Bits:
    """A size budget for `quantize_(model, budget=bits(2.5), candidates=[...])`."""
    return Bits(per_weight, calibration, seed)


Options = dict[int, tuple[float, float]]  # candidate index -> (size in bits, predicted error)


def hull(options: Options) -> list[int]:
    """The candidates on the lower convex hull of (size, error), smallest first: each one
    saves error at a lower rate per bit than the one before (others are never worth taking)."""
    pts = sorted(options, key=lambda c: (options[c][0], options[c][1]))
    out: list[int] = []
    for c in pts:
        s, e = options[c]
        if out and e >= options[out[-1]][1]:
            continue  # no smaller error for more bits
        while len(out) >= 2 and _rate(options, out[-2], out[-1]) <= _rate(options, out[-1], c):
            out.pop()  # the middle point lies on or above the segment: skip it
        out.append(c)
    return out


def _rate(options: Options, a: int, b: int) -> float:
    """Error saved per bit going from candidate a to the larger b."""
    return (options[a][1] - options[b][1]) / max(options[b][0] - options[a][0], 1e-12)


def allocate(units: list[Options], budget_bits: float) -> list[int]:
    """One candidate per unit, minimizing the summed error with summed size <= budget_bits."""
    if any(not u for u in units):
        raise ValueError("every unit needs at least one candidate")
    hulls = [hull(u) for u in units]
    if sum(units[i][h[0]][0] for i, h in enumerate(hulls)) > budget_bits * (1 + 1e-12):
        raise ValueError("the budget is smaller than the smallest candidates")
    choice = [h[0] for h in hulls]
    used = sum(units[i][c][0] for i, c in enumerate(choice))
    steps = [(_rate(units[i], h[j], h[j + 1]), i, j) for i, h in enumerate(hulls)
             for j in range(len(h) - 1)]
    blocked: set[int] = set()
    for _, i, j in sorted(steps, key=lambda s: (-s[0], s[1], s[2])):
        if i in blocked:
            continue
        extra = units[i][hulls[i][j + 1]][0] - units[i][hulls[i][j]][0]
        if used + extra > budget_bits * (1 + 1e-12):
            blocked.add(i)
            continue
        choice[i], used = hulls[i][j + 1], used + extra
    return min([choice, *_uniform(units, budget_bits)], key=lambda ch: total(units, ch)[1])


def _uniform(units: list[Options], budget_bits: float) -> list[list[int]]:
    """Every assignment of one candidate to all units that fits (a candidate every unit has)."""
    common = set.intersection(*(set(u) for u in units))
    out = [[c] * len(units) for c in sorted(common)]
    return [ch for ch in out if total(units, ch)[0] <= budget_bits * (1 + 1e-12)]


def total(units: list[Options], choice: list[int]) -> tuple[float, float]:
    """(summed size, summed error) of an assignment."""
    return (sum(units[i][c][0] for i, c in enumerate(choice)),
            sum(units[i][c][1] for i, c in enumerate(choice)))
