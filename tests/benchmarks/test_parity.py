"""benchmarks/parity.py's measurements on stored scores with a known distribution (no training): a difference read
against another baseline equals the gate's own figure, the spread of the difference narrows with more positives, and
the ablation table shows the reference set's figures. Deterministic seeds; nothing here is timed."""

from __future__ import annotations

import json

import numpy as np

from benchmarks.parity import EVALUATED, main, rows_against, steadiness, table
from tasks.parity import noninferiority


def store(folder, positives: int = 3000, negatives: int = 3000) -> None:
    """labels.npz and three models' scores for every evaluated split: a strong model, a weaker one, a baseline."""
    rng = np.random.default_rng(1)
    folder.mkdir()
    labels, models = {}, {"strong": {}, "weak": {}, "baseline": {}}
    for split in EVALUATED:
        n_pos, n_neg = (positives, negatives) if split == "reference" else (200, 1800)
        y = np.array([1] * n_pos + [0] * n_neg, dtype=np.int8)
        signal = rng.normal(size=len(y)) + 3.0 * y
        labels[split] = y
        models["strong"][split] = signal + rng.normal(size=len(y)) * 0.3
        models["weak"][split] = signal + rng.normal(size=len(y)) * 1.5
        models["baseline"][split] = signal + rng.normal(size=len(y)) * 0.8
    np.savez(folder / "labels.npz", **labels)
    for name, scores in models.items():
        np.savez(folder / f"{name}.npz", **scores)


def test_rows_against_another_baseline_are_the_gates_own_figures(tmp_path):
    store(tmp_path / "s")
    rows = rows_against(tmp_path / "s", tmp_path / "s" / "baseline.npz", ["strong", "weak"], "sample")
    labels, strong, base = (np.load(tmp_path / "s" / f) for f in ("labels.npz", "strong.npz", "baseline.npz"))
    expected = noninferiority(strong["reference"], base["reference"], labels["reference"], 0.98, margin=0.03, seed=0)
    assert rows[0]["reference"]["difference"] == expected["difference"] > 0
    assert [rows[0]["reference"]["lower"], rows[0]["reference"]["upper"]] == expected["interval"]
    assert rows[1]["reference"]["difference"] < 0  # the weaker model reads worse than the baseline
    low, high = rows[0]["reference"]["spec_at_98_ci95"]
    assert low <= rows[0]["reference"]["spec_at_98"] <= high
    rendered = table(rows)
    assert "strong (against baseline)" in rendered and f"{rows[0]['reference']['spec_at_98']:.3f}" in rendered


def test_the_spread_of_the_difference_narrows_as_the_positives_grow(tmp_path):
    store(tmp_path / "s")
    out = steadiness(tmp_path / "s", "strong", "weak", positives=(100, 1000), negatives=1000, draws=60)
    assert out["full"]["matched"] > 0
    small, large = out["100 positives"]["matched"]["sd"], out["1000 positives"]["matched"]["sd"]
    assert large < small / 2  # about 1/√10 of it, give or take the 60 draws


def test_the_cli_appends_rows_to_its_results_file(tmp_path, capsys):
    store(tmp_path / "s")
    out = tmp_path / "rows.json"
    main(["--scores", str(tmp_path / "s"), "--against", str(tmp_path / "s" / "baseline.npz"), "--only", "strong",
          "--out", str(out)])
    main(["--scores", str(tmp_path / "s"), "--against", str(tmp_path / "s" / "baseline.npz"), "--only", "weak",
          "--out", str(out)])
    assert [r["variant"] for r in json.loads(out.read_text())["rows"]] == ["strong (against baseline)",
                                                                          "weak (against baseline)"]
    assert "| sample | weak (against baseline) |" in capsys.readouterr().out


def test_a_variant_of_another_shape_trains_and_scores_every_split():
    """train_and_score rebuilds the trained net from its settings' shape (a depth 0.5 net did not fit the default's
    blocks, 2026-12-07)."""
    from benchmarks.parity import train_and_score
    from tasks.train import TrainSettings

    rng = np.random.default_rng(0)
    data = {name: (rng.integers(0, 256, (48, 1, 64, 64), dtype=np.uint8), np.array([0, 1] * 24, dtype=np.int8))
            for name in ("train", *EVALUATED)}
    settings = TrainSettings(width=0.5, depth=0.5, epochs=1, batch_size=16)
    scores, train_logits, _, fitted = train_and_score(settings, data, "cpu", None)
    assert set(scores) == {"train", *EVALUATED} and all(len(s) == 48 for s in scores.values())
    assert train_logits.shape == (48,) and len(fitted["history"]) == 1
