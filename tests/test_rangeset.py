"""RangeSet against a reference set of integers, with tiny blocks so that splits,
merges and edits across block edges all happen; and its size at a million ranges."""

from __future__ import annotations

import random
from array import array

import pytest

import loader.core._rangeset as rangeset
from loader.core._rangeset import RangeSet


class Reference:
    """The obvious set of integers, for a few hundred at most."""

    def __init__(self) -> None:
        self.members: set[int] = set()

    def add(self, lo: int, hi: int) -> None:
        self.members.update(range(lo, hi))

    def remove(self, lo: int, hi: int) -> None:
        self.members.difference_update(range(lo, hi))

    def intervals(self) -> list[tuple[int, int]]:
        out: list[list[int]] = []
        for x in sorted(self.members):
            if out and out[-1][1] == x:
                out[-1][1] = x + 1
            else:
                out.append([x, x + 1])
        return [(a, b) for a, b in out]


@pytest.mark.parametrize("block", [1, 2, 4, 1024])
def test_rangeset_matches_a_reference_through_random_edits(monkeypatch, block):
    monkeypatch.setattr(rangeset, "_BLOCK", block)
    rng = random.Random(block)
    for trial in range(60):
        init: list[tuple[int, int]] = []
        x = 0
        for _ in range(rng.randrange(0, 40)):
            x += rng.randrange(1, 6)
            y = x + rng.randrange(1, 5)
            init.append((x, y))
            x = y
        if trial % 3 == 0:
            rng.shuffle(init)  # unsorted input goes through add()
        s, ref = RangeSet(init), Reference()
        for a, b in init:
            ref.add(a, b)
        for _ in range(150):
            lo = rng.randrange(0, 250)
            hi = lo + rng.randrange(0, 30)
            if rng.random() < 0.5:
                s.add(lo, hi)
                ref.add(lo, hi)
            else:
                s.remove(lo, hi)
                ref.remove(lo, hi)
            want = ref.intervals()
            assert list(s) == want
            assert s.total == len(ref.members) and len(s) == len(want)
            q = rng.randrange(0, 260)
            q2 = q + rng.randrange(0, 40)
            assert s.overlap_bytes(q, q2) == sum(1 for v in ref.members if q <= v < q2)
            budget, count = rng.randrange(1, 60), rng.randrange(1, 12)
            taken = s.take(q, q2, budget, count)
            los, his = s.take_arrays(q, q2, budget, count)
            assert [[a, b] for a, b in zip(los, his)] == taken, (q, q2, budget, count)
            assert list(s.overlapping(q, q2)) == [(max(a, q), min(b, q2)) for a, b in want if a < q2 and b > q]
            assert s.contains(q) == (q in ref.members)
            holding = [(a, b) for a, b in want if a <= q < b]
            assert s.interval_at(q) == (holding[0] if holding else None)
            after = [(max(a, q), b) for a, b in want if b > q]
            assert s.first_at_or_after(q) == (after[0] if after else None)
            assert s.first() == (want[0][0] if want else None)


def test_a_million_ranges_cost_16_bytes_each_and_edits_stay_local():
    n = 1 << 20
    los = array("Q", range(0, 8 * n, 8))
    his = array("Q", range(4, 8 * n, 8))
    s = RangeSet.from_arrays(los, his)
    assert len(s) == n and s.total == 4 * n
    assert s.memory_bytes() < 17 * n  # 16 bytes per range in the arrays, a little per block
    # removing from the front (the sweep's pattern) touches one block, not the whole set
    for k in range(1000):
        s.remove(8 * k, 8 * k + 4)
    assert len(s) == n - 1000 and s.first() == 8000
    assert len(s._los[0]) < 2 * rangeset._BLOCK  # edited in place, never rebuilt whole


@pytest.mark.parametrize("block", [1, 3, 1024])
def test_bulk_insert_into_a_gap_merges_with_touching_neighbours(monkeypatch, block):
    monkeypatch.setattr(rangeset, "_BLOCK", block)
    rng = random.Random(block)
    for _ in range(200):
        s, ref = RangeSet(), Reference()
        for lo, hi in ((0, 10), (100, 110), (200, 210)):
            s.add(lo, hi)
            ref.add(lo, hi)
        gap_lo, gap_hi = rng.choice([(10, 100), (110, 200), (210, 300)])
        points = sorted(rng.sample(range(gap_lo, gap_hi + 1), rng.randrange(2, 12, 2)))
        pieces = [(a, b) for a, b in zip(points[::2], points[1::2]) if a < b]
        pieces = [p for k, p in enumerate(pieces) if k == 0 or p[0] > pieces[k - 1][1]]
        s.insert_sorted(array("Q", [a for a, _ in pieces]), array("Q", [b for _, b in pieces]))
        for a, b in pieces:
            ref.add(a, b)
        assert list(s) == ref.intervals() and s.total == len(ref.members)
    s = RangeSet([(0, 10), (20, 30)])
    with pytest.raises(ValueError):
        s.insert_sorted(array("Q", [5, 12]), array("Q", [8, 14]))  # not within one gap


@pytest.mark.parametrize("block", [1, 3, 1024])
def test_take_lists_the_parts_from_lo_within_a_budget_and_a_count(monkeypatch, block):
    monkeypatch.setattr(rangeset, "_BLOCK", block)
    s = RangeSet([(0, 10), (20, 30), (40, 50), (60, 70)])
    assert s.take(5, 100, 1000, 100) == [[5, 10], [20, 30], [40, 50], [60, 70]]
    assert s.take(5, 45, 1000, 100) == [[5, 10], [20, 30], [40, 45]]
    assert s.take(25, 100, 12, 100) == [[25, 30], [40, 47]]  # the last cut to the budget
    assert s.take(0, 100, 1000, 2) == [[0, 10], [20, 30]]
    assert s.take(70, 100, 1000, 5) == [] and len(s) == 4  # (nothing changed)


@pytest.mark.parametrize("block", [1, 2, 1024])
def test_take_arrays_is_take_as_two_columns(monkeypatch, block):
    monkeypatch.setattr(rangeset, "_BLOCK", block)
    s = RangeSet([(0, 10), (20, 30), (40, 50), (60, 70)])
    for args in ((5, 100, 1000, 100), (5, 45, 1000, 100), (25, 100, 12, 100), (0, 100, 1000, 2), (70, 100, 1000, 5),
                 (0, 70, 40, 100), (21, 22, 1000, 100)):
        los, his = s.take_arrays(*args)
        assert los.typecode == his.typecode == "Q"
        assert [[a, b] for a, b in zip(los, his)] == s.take(*args), args
