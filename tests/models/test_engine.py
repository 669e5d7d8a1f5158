"""The knee: which batch screen runs at, chosen from a sweep (the sweep's speeds are the benchmark's business; here
they are given, so the choice itself is tested without timing anything)."""

from __future__ import annotations

import numpy as np
import pytest

from models import engine as engines
from models.engine import find_knee, scores


def sweep_of(speeds: dict[int, float]):
    """A stand-in for one timed window: images/s read from `speeds` by batch (so the test times nothing)."""
    def window(_engine, x, _seconds):
        return speeds[len(x)]
    return window


class Scorer:
    """An engine that returns the mean pixel, so scores can be checked exactly."""

    def infer(self, pixels: np.ndarray) -> np.ndarray:
        return pixels.reshape(len(pixels), -1).mean(axis=1).astype(np.float32)


def test_the_knee_is_the_smallest_batch_within_5_percent_of_the_peak(monkeypatch):
    monkeypatch.setattr(engines, "_window", sweep_of({1: 100, 2: 180, 4: 300, 8: 390, 16: 400, 32: 398}))
    knee = find_knee(Scorer(), np.zeros((4, 1, 64, 64), np.uint8), max_batch=32)
    assert (knee.batch, knee.images_per_s) == (8, 390)  # 390 ≥ 0.95 × 400; 300 is not
    assert knee.batch1_latency_ms == pytest.approx(10.0) and [p.batch for p in knee.sweep] == [1, 2, 4, 8, 16, 32]


def test_a_peak_at_the_top_of_the_sweep_extends_it_until_throughput_stops_growing(monkeypatch):
    speeds = {1: 10, 2: 20, 4: 40, 8: 80, 16: 160, 32: 200, 64: 150, 128: 1e9}
    monkeypatch.setattr(engines, "_window", sweep_of(speeds))
    knee = find_knee(Scorer(), np.zeros((4, 1, 64, 64), np.uint8), max_batch=8)
    assert [p.batch for p in knee.sweep] == [1, 2, 4, 8, 16, 32, 64] and knee.batch == 32  # stopped after 64 fell


def test_an_engine_with_its_own_largest_batch_is_never_swept_past_it(monkeypatch):
    monkeypatch.setattr(engines, "_window", sweep_of({b: float(b) for b in (1, 2, 4, 8, 16, 32, 64)}))
    capped = Scorer()
    capped.max_batch = 16  # a TensorRT plan's profile
    knee = find_knee(capped, np.zeros((4, 1, 64, 64), np.uint8), max_batch=64)
    assert [p.batch for p in knee.sweep] == [1, 2, 4, 8, 16] and knee.batch == 16


def rounds_of(speeds: dict[int, float], factor):
    """Windows of a sweep in rounds over `speeds`' batches: the images/s of window `i` of batch b is
    speeds[b] × factor(round, b), the round counted from the calls (every batch once a round)."""
    calls = {b: 0 for b in speeds}

    def window(_engine, x, _seconds):
        batch = len(x)
        calls[batch] += 1
        return speeds[batch] * factor(calls[batch] - 1, batch)
    return window


PLATEAU = {1: 100, 2: 180, 4: 300, 8: 390, 16: 400}  # knee 8: 390 ≥ 0.95 × 400 = 380; 300 is not


def test_a_host_that_slows_down_between_rounds_moves_no_knee_and_adds_no_spread(monkeypatch):
    """A neighbour that halves the speed every other round slows every point alike: each window is compared with its
    own round's fastest, so the shares, the knee and the stopping rule see no noise at all."""
    monkeypatch.setattr(engines, "_window", rounds_of(PLATEAU, lambda r, _b: 0.5 if r % 2 else 1.0))
    knee = find_knee(Scorer(), np.zeros((4, 1, 64, 64), np.uint8), max_batch=16, limit=16)
    assert knee.batch == 8 and knee.images_per_s == 390  # the median of 390, 195, 390
    assert {(p.spread, p.windows) for p in knee.sweep} == {(0.0, engines.STABLE_WINDOWS)}


def test_one_burst_at_one_point_moves_no_knee_and_the_sweep_runs_until_it_has_passed(monkeypatch):
    """Batch 16 reads 2.5× its speed in the second round only (a burst): the other points' shares of that round
    drop, the rounds go on until the last three agree again, and the median share keeps the knee where it is."""
    monkeypatch.setattr(engines, "_window", rounds_of(PLATEAU, lambda r, b: 2.5 if (r, b) == (1, 16) else 1.0))
    knee = find_knee(Scorer(), np.zeros((4, 1, 64, 64), np.uint8), max_batch=16, limit=16)
    assert knee.batch == 8
    assert {p.windows for p in knee.sweep} == {5}  # rounds 3, 4 still hold the burst's round in their last three
    assert max(p.spread for p in knee.sweep) == 0.0


def test_a_sweep_that_never_settles_stops_at_its_budget_and_says_how_noisy_it_was(monkeypatch):
    monkeypatch.setattr(engines, "_window", rounds_of(PLATEAU, lambda r, b: 0.5 if (b == 4 and r % 2) else 1.0))
    knee = find_knee(Scorer(), np.zeros((4, 1, 64, 64), np.uint8), max_batch=16, limit=16)
    point = {p.batch: p for p in knee.sweep}[4]
    assert point.windows == engines.MAX_WINDOWS and point.spread == pytest.approx((0.75 - 0.375) / 0.375)
    assert knee.batch == 8


class Clock:
    """perf_counter for `_window`, advanced only by the engine's calls: windows without timing anything."""

    def __init__(self, call_seconds: list[float]):
        self.now, self.calls = 0.0, iter(call_seconds)

    def perf_counter(self) -> float:
        return self.now

    def infer(self, pixels: np.ndarray) -> np.ndarray:
        self.now += next(self.calls)
        return np.zeros(len(pixels), np.float32)


def test_a_window_is_the_throughput_sustained_over_its_calls_not_its_fastest_call(monkeypatch):
    clock = Clock([0.0625, 0.125, 0.0625])  # batch 8: 128 and 64 images/s calls
    monkeypatch.setattr(engines, "time", clock)
    assert engines._window(clock, np.zeros((8, 1, 64, 64), np.uint8), 0.1) == pytest.approx(16 / 0.1875)
    clock = Clock([1 / 64] * 9)  # exact in binary: the window ends on its eighth call
    monkeypatch.setattr(engines, "time", clock)
    assert engines._window(clock, np.zeros((8, 1, 64, 64), np.uint8), 0.125) == 512.0


def test_scores_batch_any_number_of_images_in_order():
    pixels = np.arange(7 * 64 * 64, dtype=np.uint32).astype(np.uint8).reshape(7, 1, 64, 64)
    expected = pixels.reshape(7, -1).mean(axis=1)
    assert np.allclose(scores(Scorer(), pixels, batch=3), expected)
    assert scores(Scorer(), pixels[:0]).shape == (0,)
