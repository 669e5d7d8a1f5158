"""Training without Prefect: a checkpoint that reloads safely, and distillation from a bare baseline checkpoint."""

from __future__ import annotations

import json

import numpy as np
import torch

from helpers import images
from models.nets import Baseline
from tasks.dataset import load_split, make_split
from tasks.ingest import IngestOptions, ingest_shard
from tasks.lake import Lake
from tasks.samples import write_tar
from tasks.shards import fingerprint
from tasks.train import TrainSettings, load_checkpoint, predict, train_model


def tiny_split(tmp_path):
    write_tar(tmp_path / "s.tar", *images(300, "train-tiny", prevalence=0.5))
    lake = Lake(tmp_path / "lake")
    lake.ensure_channels(1)
    ingest_shard(fingerprint(tmp_path / "s.tar"), lake, IngestOptions())
    return make_split(lake)


def test_distilling_from_a_bare_baseline_checkpoint(tmp_path):
    split = tiny_split(tmp_path)
    teacher = tmp_path / "teacher" / "baseline.pt"  # a plain state_dict, as the seed would hand it over
    teacher.parent.mkdir()
    torch.save(Baseline().state_dict(), teacher)
    settings = TrainSettings(epochs=1, batch_size=64, width=0.5, teacher=str(teacher))
    checkpoint = train_model(split, settings, tmp_path / "out", log=lambda _: None)
    meta = json.loads((checkpoint.parent / "model.json").read_text())
    assert meta["settings"]["teacher"] == str(teacher) and len(meta["history"]) == 1
    model = load_checkpoint(checkpoint)  # weights_only=True inside
    x, _ = load_split(split, "val")
    scores = predict(model, x)
    assert scores.shape == (len(x),) and np.all((scores >= 0) & (scores <= 1))


def test_cross_fitting_folds_cover_train_and_val_once_and_never_touch_test(tmp_path):
    import pyarrow.parquet as pq

    from tasks.dataset import fold_split

    split = tiny_split(tmp_path)
    base = pq.read_table(split.path).to_pydict()
    in_train_val = {i for i, s in zip(base["image_id"], base["split"]) if s != "test"}
    seen = []
    for k in range(3):
        fold = fold_split(split, k, 3)
        table = pq.read_table(fold.path).to_pydict()
        assert table["image_id"] == base["image_id"] and table["label"] == base["label"]
        assert [s == "test" for s in table["split"]] == [s == "test" for s in base["split"]]  # test stays test
        seen += [i for i, s in zip(table["image_id"], table["split"]) if s == "val"]
        assert fold.counts["val"]["images"] + fold.counts["train"]["images"] == len(in_train_val)
        assert fold_split(split, k, 3).sha256 == fold.sha256  # the same fold every time
    assert sorted(seen) == sorted(in_train_val)  # every train+val image scored out of fold exactly once


def test_augmentations_keep_the_contract_and_replay_under_their_seed():
    from tasks.samples import generate
    from tasks.train import AUGMENTS, _augment

    x, _ = generate(64, 1.0, 3, "a", "augment")  # every image a positive
    batch = torch.from_numpy(x[:, None])
    for how in AUGMENTS:
        a = _augment(batch, torch.Generator().manual_seed(5), how)
        b = _augment(batch, torch.Generator().manual_seed(5), how)
        assert a.dtype == torch.uint8 and a.shape == batch.shape  # the input contract, unchanged
        assert torch.equal(a, b)  # a training run replays bit for bit from its seed
        changed = (a != batch).flatten(1).any(1).float().mean().item()
        assert changed == 0.0 if how == "none" else changed > 0.9


def test_the_weight_average_lets_early_weights_fade_at_once_and_copies_integer_buffers():
    from tasks.train import _ema_with_warmup

    update = _ema_with_warmup(0.999)
    averaged, counter = [torch.zeros(3)], torch.tensor(0)
    for n in range(3):  # three updates towards weights of all ones
        update(averaged + [counter], [torch.ones(3), torch.tensor(n + 1)], torch.tensor(n))
    # decays 0.1, 2/11, 3/12: after three updates the zeros weigh 0.1 · 2/11 · 3/12 (≈ 0.5%), not 0.999³ (≈ 99.7%)
    assert torch.allclose(averaged[0], torch.full((3,), 1 - 0.1 * 2 / 11 * 3 / 12))
    assert counter.item() == 3  # BatchNorm's batch counter is copied, never interpolated
