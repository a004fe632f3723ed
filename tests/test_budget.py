"""The allocation of mixed widths (passes/budget.py): properties of the convex hull and of the
choice under a budget, against brute force on small instances."""
import itertools

import pytest
from discq.passes.budget import allocate, bits, hull, total
from hypothesis import given, settings
from hypothesis import strategies as st

# a unit's candidates: index -> (size in bits, predicted error)
option = st.tuples(st.floats(1.0, 100.0), st.floats(0.0, 50.0))
unit = st.dictionaries(st.integers(0, 3), option, min_size=1, max_size=4)


@given(unit)
def test_hull_saves_less_per_bit_at_each_step(options):
    h = hull(options)
    assert set(h) <= set(options)
    best = min(options.values(), key=lambda se: (se[1], se[0]))
    assert options[h[-1]][1] == best[1]  # the least error is always reachable
    assert options[h[0]][0] == min(s for s, _ in options.values())  # and the smallest size
    sizes, errors = zip(*(options[c] for c in h))
    assert all(a < b for a, b in zip(sizes, sizes[1:]))
    assert all(a > b for a, b in zip(errors, errors[1:]))
    rates = [(errors[i] - errors[i + 1]) / (sizes[i + 1] - sizes[i]) for i in range(len(h) - 1)]
    assert all(a > b - 1e-9 for a, b in zip(rates, rates[1:]))


def _brute(units, budget):
    feasible = [ch for ch in itertools.product(*(sorted(u) for u in units))
                if total(units, list(ch))[0] <= budget * (1 + 1e-12)]
    return min(total(units, list(ch))[1] for ch in feasible)


@settings(max_examples=200, deadline=None)
@given(st.lists(unit, min_size=1, max_size=5), st.floats(0.0, 1.0))
def test_choice_fits_and_is_near_the_optimum(units, t):
    smallest = sum(min(s for s, _ in u.values()) for u in units)
    largest = sum(max(s for s, _ in u.values()) for u in units)
    budget = smallest + t * (largest - smallest)
    choice = allocate(units, budget)
    size, err = total(units, choice)
    assert size <= budget * (1 + 1e-9)
    assert all(c in u for c, u in zip(choice, units))
    # the Lagrangian greedy is optimal up to one unit's move along its hull
    gap = max(max(e for _, e in u.values()) - min(e for _, e in u.values()) for u in units)
    assert err <= _brute(units, budget) + gap + 1e-9
    common = set.intersection(*(set(u) for u in units))
    for c in common:  # never worse than one candidate for every unit, where that fits
        s, e = total(units, [c] * len(units))
        if s <= budget:
            assert err <= e + 1e-9


@given(st.lists(unit, min_size=1, max_size=6))
def test_a_budget_for_everything_gets_the_least_error(units):
    choice = allocate(units, sum(max(s for s, _ in u.values()) for u in units))
    for c, u in zip(choice, units):
        assert u[c][1] == min(e for _, e in u.values())


def test_too_small_a_budget_is_refused():
    with pytest.raises(ValueError, match="smaller than the smallest"):
        allocate([{0: (10.0, 1.0), 1: (20.0, 0.0)}], 5.0)


@pytest.mark.parametrize("value", [0.5, 40, "2.5", True, None])
def test_bits_names_what_it_takes(value):
    with pytest.raises(ValueError, match=r"discq.bits\(2.5\)"):
        bits(value)
