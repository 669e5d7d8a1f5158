"""The sample generator: deterministic, the prevalence asked for, sites that differ, real shard formats."""

from __future__ import annotations

import numpy as np

from tasks.samples import generate, make_samples
from tasks.shards import Entry, find_shards, fingerprint, read_entries


def test_generation_is_deterministic_and_respects_prevalence():
    a_imgs, a_labels = generate(2000, prevalence=0.1, seed=3, site="a", name="x")
    b_imgs, b_labels = generate(2000, prevalence=0.1, seed=3, site="a", name="x")
    assert np.array_equal(a_imgs, b_imgs) and np.array_equal(a_labels, b_labels)
    assert 0.08 < a_labels.mean() < 0.12
    assert a_imgs.shape == (2000, 64, 64) and a_imgs.dtype == np.uint8
    assert not np.array_equal(generate(10, seed=4, name="x")[0], a_imgs[:10])


def test_sites_differ_in_brightness():
    means = {site: generate(300, site=site, name="m")[0].mean() for site in ("a", "b", "c")}
    assert max(means.values()) - min(means.values()) > 5


def test_positives_carry_a_finding_that_is_sometimes_faint():
    imgs, labels = generate(400, prevalence=0.5, seed=1, site="a", name="f")
    clean, _ = generate(400, prevalence=0.0, seed=1, site="a", name="f")
    diff = (imgs.astype(int) - clean.astype(int))[labels == 1]
    peak = np.abs(diff).max(axis=(1, 2))
    assert (peak > 50).mean() > 0.3  # many obvious findings
    assert (peak < 38).mean() > 0.05  # and some faint ones, near the ribs and vessels in contrast


def test_sample_set_is_readable_in_every_format(tmp_path):
    made = make_samples(tmp_path / "s", n=90, defects=True)
    shards = find_shards([str(tmp_path / "s" / "train")])
    assert [p.name for p in shards] == ["site-a", "site-b.npz", "site-c.tar"]
    counts = {p.name: sum(isinstance(e, Entry) for e in read_entries(fingerprint(p))) for p in shards}
    assert counts["site-b.npz"] == counts["site-c.tar"] == 30
    assert counts["site-a"] == 30 + 4  # truncated, not-an-image, duplicate, 128px are entries; two more are refusals
    # train, holdout, inbox, extras (faint, dim, sharp, evaluation: 14,000 per site at 24,000, so 52 at 90)
    assert made.images == 90 + 3 * 30 + 30 + 30 + 10 + 30 + 3 * 52 and made.defects == 6
    assert [p.name for p in made.extras] == ["site-faint.tar", "night-dim", "site-sharp.tar", "evaluation.tar"]
    evaluation = [e for e in read_entries(fingerprint(made.extras[3])) if isinstance(e, Entry)]
    assert len(evaluation) == 3 * 52 and 0.3 < np.mean([int(str(e.label).strip()) for e in evaluation]) < 0.7  # enriched with positives
    assert [p.name for p in made.holdout] == ["site-a.tar", "site-b.tar", "site-c.tar"]
