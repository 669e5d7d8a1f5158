"""The knee: which batch screen runs at, chosen from a sweep (the sweep's speeds are the benchmark's business; here
they are given, so the choice itself is tested without timing anything)."""

from __future__ import annotations

import numpy as np
import pytest

from models import engine as engines
from models.engine import KneePoint, find_knee, scores


def sweep_of(speeds: dict[int, float]):
    """A stand-in for one timed sweep point: images/s read from `speeds` (so the test times nothing)."""
    def throughput(_engine, _pixels, batch, _seconds):
        return KneePoint(batch, speeds[batch], 1000 * batch / speeds[batch])
    return throughput


class Scorer:
    """An engine that returns the mean pixel, so scores can be checked exactly."""

    def infer(self, pixels: np.ndarray) -> np.ndarray:
        return pixels.reshape(len(pixels), -1).mean(axis=1).astype(np.float32)


def test_the_knee_is_the_smallest_batch_within_5_percent_of_the_peak(monkeypatch):
    monkeypatch.setattr(engines, "_throughput", sweep_of({1: 100, 2: 180, 4: 300, 8: 390, 16: 400, 32: 398}))
    knee = find_knee(Scorer(), np.zeros((4, 1, 64, 64), np.uint8), max_batch=32)
    assert (knee.batch, knee.images_per_s) == (8, 390)  # 390 ≥ 0.95 × 400; 300 is not
    assert knee.batch1_latency_ms == pytest.approx(10.0) and [p.batch for p in knee.sweep] == [1, 2, 4, 8, 16, 32]


def test_a_peak_at_the_top_of_the_sweep_extends_it_until_throughput_stops_growing(monkeypatch):
    speeds = {1: 10, 2: 20, 4: 40, 8: 80, 16: 160, 32: 200, 64: 150, 128: 1e9}
    monkeypatch.setattr(engines, "_throughput", sweep_of(speeds))
    knee = find_knee(Scorer(), np.zeros((4, 1, 64, 64), np.uint8), max_batch=8)
    assert [p.batch for p in knee.sweep] == [1, 2, 4, 8, 16, 32, 64] and knee.batch == 32  # stopped after 64 fell


def test_an_engine_with_its_own_largest_batch_is_never_swept_past_it(monkeypatch):
    monkeypatch.setattr(engines, "_throughput", sweep_of({b: float(b) for b in (1, 2, 4, 8, 16, 32, 64)}))
    capped = Scorer()
    capped.max_batch = 16  # a TensorRT plan's profile
    knee = find_knee(capped, np.zeros((4, 1, 64, 64), np.uint8), max_batch=64)
    assert [p.batch for p in knee.sweep] == [1, 2, 4, 8, 16] and knee.batch == 16


def test_a_point_within_its_measured_noise_of_the_peak_is_the_knee(monkeypatch):
    """On a plateau a noisy high reading at a big batch does not drag the knee up: spreads are part of the rule."""
    points = {1: (100, 0.0), 2: (180, 0.0), 4: (300, 0.0), 8: (350, 0.2), 16: (400, 0.1)}

    def throughput(_engine, _pixels, batch, _seconds):
        ips, spread = points[batch]
        return KneePoint(batch, ips, 1000 * batch / ips, spread, 3)

    monkeypatch.setattr(engines, "_throughput", throughput)
    knee = find_knee(Scorer(), np.zeros((4, 1, 64, 64), np.uint8), max_batch=16, limit=16)
    assert knee.batch == 8  # 350 × 1.1 = 385 ≥ 0.95 × 400 × 0.95 = 361; 300 is not, spread 0
    points[8] = (350, 0.0)  # the same figure measured cleanly is below 361: then 16 is the knee
    assert find_knee(Scorer(), np.zeros((4, 1, 64, 64), np.uint8), max_batch=16, limit=16).batch == 16


class Clock:
    """perf_counter for `_throughput`, advanced only by the engine's calls: windows without timing anything."""

    def __init__(self, call_seconds: list[float]):
        self.now, self.calls = 0.0, iter(call_seconds)

    def perf_counter(self) -> float:
        return self.now

    def infer(self, pixels: np.ndarray) -> np.ndarray:
        self.now += next(self.calls)
        return np.zeros(len(pixels), np.float32)


def test_a_sweep_point_is_measured_until_its_last_three_windows_agree(monkeypatch):
    # seconds=0.375: windows of 0.125 s, here two calls each (durations exact in binary, so no window is a call
    # longer by rounding); batch 8 at 0.0625 s a call is 128 images/s
    fast, slow, steady = 0.0625, 0.125, 0.064453125  # 128, 64 and 124.1 images/s
    windows = [fast, slow, fast, steady, fast]  # noise, then three windows within 5% of their median
    clock = Clock([fast] + [d for w in windows for d in (w, w)])
    monkeypatch.setattr(engines, "time", clock)
    point = engines._throughput(clock, np.zeros((8, 1, 64, 64), np.uint8), 8, 0.375)
    assert point.windows == 5 and point.images_per_s == 128.0
    assert point.spread == pytest.approx((128 - 8 / steady) / 128)


def test_a_point_that_never_settles_stops_at_its_budget_and_says_how_noisy_it_was(monkeypatch):
    clock = Clock([0.0625] + [0.0625, 0.0625, 0.125, 0.125] * engines.MAX_WINDOWS)
    monkeypatch.setattr(engines, "time", clock)
    point = engines._throughput(clock, np.zeros((8, 1, 64, 64), np.uint8), 8, 0.375)
    assert point.windows == engines.MAX_WINDOWS and point.spread == 1.0  # its last three: 64, 128, 64 images/s


def test_scores_batch_any_number_of_images_in_order():
    pixels = np.arange(7 * 64 * 64, dtype=np.uint32).astype(np.uint8).reshape(7, 1, 64, 64)
    expected = pixels.reshape(7, -1).mean(axis=1)
    assert np.allclose(scores(Scorer(), pixels, batch=3), expected)
    assert scores(Scorer(), pixels[:0]).shape == (0,)
