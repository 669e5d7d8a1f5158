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


def test_scores_batch_any_number_of_images_in_order():
    pixels = np.arange(7 * 64 * 64, dtype=np.uint32).astype(np.uint8).reshape(7, 1, 64, 64)
    expected = pixels.reshape(7, -1).mean(axis=1)
    assert np.allclose(scores(Scorer(), pixels, batch=3), expected)
    assert scores(Scorer(), pixels[:0]).shape == (0,)
