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


def linear(call_ms: float, image_ms: float, top: int = 4096) -> dict[int, float]:
    """images/s of a call of b images that takes call_ms + image_ms × b: a curve that bends and flattens."""
    return {b: 1000 * b / (call_ms + image_ms * b) for b in range(1, top + 1)}


def test_the_knee_is_where_a_calls_fixed_cost_falls_to_5_percent_of_its_time(monkeypatch):
    """0.3 ms a call and 0.08 ms an image (about the shipped INT8 graph here): 95% of the limit at 19 × 0.3 / 0.08 =
    71.25 images, rounded up to the grid (80), which is not a sweep point, so it is measured on its own."""
    speeds = linear(0.3, 0.08)
    monkeypatch.setattr(engines, "_window", sweep_of(speeds))
    knee = find_knee(Scorer(), np.zeros((4, 1, 64, 64), np.uint8), max_batch=512, limit=512)
    assert (knee.batch, knee.images_per_s) == (80, pytest.approx(speeds[80]))
    assert [p.batch for p in knee.sweep] == [1, 2, 4, 8, 16, 32, 64, 80, 128, 256, 512]
    assert (knee.call_ms, knee.image_ms) == (pytest.approx(0.3), pytest.approx(0.08))
    assert knee.batch1_latency_ms == pytest.approx(0.38)
    assert knee.as_dict()["fit"] == {"call_ms": 0.3, "image_ms": 0.08}


def test_a_knee_below_the_grid_step_is_a_power_of_two_and_one_on_the_sweep_is_not_measured_twice(monkeypatch):
    monkeypatch.setattr(engines, "_window", sweep_of(linear(0.4, 1.0)))  # 19 × 0.4 = 7.6 → 8
    knee = find_knee(Scorer(), np.zeros((4, 1, 64, 64), np.uint8), max_batch=16, limit=16)
    assert knee.batch == 8 and [p.batch for p in knee.sweep] == [1, 2, 4, 8, 16]


def test_a_curve_that_falls_past_its_peak_is_fitted_up_to_the_end_of_its_plateau(monkeypatch):
    """Throughput that collapses at large batches (out of cache) is not a fixed cost: fitted with them the knee read
    64; fitted to the plateau's end (128, the largest batch within 5% of the fastest) it stays at 80."""
    speeds = linear(0.3, 0.08) | {256: linear(0.3, 0.08)[256] / 3, 512: linear(0.3, 0.08)[512] / 5}
    monkeypatch.setattr(engines, "_window", sweep_of(speeds))
    knee = find_knee(Scorer(), np.zeros((4, 1, 64, 64), np.uint8), max_batch=512, limit=512)
    assert knee.batch == 80


def test_a_knee_never_passes_the_plateaus_end(monkeypatch):
    monkeypatch.setattr(engines, "_window", sweep_of(linear(4.0, 0.01)))  # 19 × 4 / 0.01 = 7,600 images
    knee = find_knee(Scorer(), np.zeros((4, 1, 64, 64), np.uint8), max_batch=256, limit=256)
    assert knee.batch == 256


def test_on_a_noisy_plateau_the_knee_moves_by_less_than_a_doubling_where_the_first_point_within_5_percent_does_not(
        monkeypatch):
    """Every window ±12% at random (this host's sweeps read spreads of 0.1–0.3): ten sweeps of the same curve. The
    first point within 5% of the peak lands anywhere on the flat part; the fit of every point does not."""
    speeds = linear(0.3, 0.08)
    knees, first_within = [], []
    for seed in range(10):
        rng = np.random.default_rng(seed)
        monkeypatch.setattr(engines, "_window", lambda _e, x, _s: speeds[len(x)] * rng.uniform(0.88, 1.12))
        knee = find_knee(Scorer(), np.zeros((4, 1, 64, 64), np.uint8), max_batch=512, limit=512)
        knees.append(knee.batch)
        on_sweep = [p for p in knee.sweep if p.batch & (p.batch - 1) == 0]
        peak = max(p.images_per_s for p in on_sweep)
        first_within.append(next(p.batch for p in on_sweep if p.images_per_s >= 0.95 * peak))
    assert max(knees) / min(knees) < 2 and set(knees) <= {64, 80, 96}
    assert max(first_within) / min(first_within) >= 4  # what the rule before the fit stored


def test_an_engine_that_compiles_a_batch_of_its_own_is_measured_so_at_every_point_and_at_the_knee(monkeypatch):
    """OpenVINO's `at_batch`: each point (and a knee between points) runs on the engine compiled for its batch."""
    speeds = linear(0.3, 0.08)
    asked, measured_on = [], set()

    class Compiling(Scorer):
        def __init__(self, batch=None):
            self.batch = batch

        def at_batch(self, batch):
            asked.append(batch)
            return Compiling(batch)

    def window(engine, x, _seconds):
        assert engine.batch == len(x)
        measured_on.add(engine.batch)
        return speeds[len(x)]
    monkeypatch.setattr(engines, "_window", window)
    knee = find_knee(Compiling(), np.zeros((4, 1, 64, 64), np.uint8), max_batch=512, limit=512)
    assert knee.batch == 80 and asked == [1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 80] and 80 in measured_on


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


PLATEAU = {b: v for b, v in linear(0.4, 1.0, 16).items() if b & (b - 1) == 0}  # knee 8: 19 × 0.4 = 7.6


def test_a_host_that_slows_down_between_rounds_moves_no_knee_and_adds_no_spread(monkeypatch):
    """A neighbour that halves the speed every other round slows every point alike: each window is compared with its
    own round's fastest, so the shares, the knee and the stopping rule see no noise at all."""
    monkeypatch.setattr(engines, "_window", rounds_of(PLATEAU, lambda r, _b: 0.5 if r % 2 else 1.0))
    knee = find_knee(Scorer(), np.zeros((4, 1, 64, 64), np.uint8), max_batch=16, limit=16)
    assert knee.batch == 8 and knee.images_per_s == pytest.approx(PLATEAU[8])  # the median of x, x/2, x
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
    assert point.windows == engines.MAX_WINDOWS and point.spread == pytest.approx(1.0)  # shares s/2, s, s/2
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
