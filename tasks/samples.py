"""A deterministic generator of 64×64 chest-X-ray-like screening images, written as real shard formats.

The images are meant to be *not* trivially separable. Each is a thorax with two lung fields, a spine and heart
shadow, ribs and low-frequency texture; negatives and positives alike carry small vessel-like dots. A positive adds
one nodule-like finding: a soft blob inside a lung whose contrast is log-normal (many faint, a few obvious) and whose
size varies, so some positives are genuinely hard. Sites differ in brightness, contrast, gamma, blur and noise, and a
site can be given fainter findings, so subgroup audits and drift have something to find.

Everything is a pure function of (seed, shard name): the same call writes byte-identical shards.
"""

from __future__ import annotations

import csv
import hashlib
import io
import tarfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image
from scipy import ndimage

from models.contract import IMAGE_SIZE


@dataclass(frozen=True)
class Site:
    """Acquisition differences between sites (scanner, exposure, post-processing)."""

    name: str
    gain: float = 1.0
    bias: float = 0.0  # in grey levels
    gamma: float = 1.0
    noise: float = 5.0  # std of additive noise, grey levels
    blur: float = 0.0  # Gaussian blur sigma, pixels
    lesion_scale: float = 1.0  # < 1: fainter findings than the model was trained on


SITES: dict[str, Site] = {
    "a": Site("a", gain=1.0, bias=0.0, gamma=1.0, noise=5.0, blur=0.0),
    "b": Site("b", gain=0.85, bias=20.0, gamma=1.15, noise=7.0, blur=0.4),
    "c": Site("c", gain=1.1, bias=-12.0, gamma=0.9, noise=4.0, blur=0.0),
    # A site whose findings are much fainter: for audits that must fail. Only in the sample set's extras/.
    "faint": Site("faint", gain=1.0, bias=0.0, gamma=1.0, noise=6.0, blur=0.3, lesion_scale=0.3),
    # A site whose exposure changed (dimmer, flatter, softer): for drift. Only in extras/.
    "dim": Site("dim", gain=0.6, bias=40.0, gamma=1.0, noise=5.0, blur=0.8),
    # A newer scanner (brighter, less noise, findings show more clearly): a site the shipped threshold, chosen on the
    # training sites, serves poorly (it flags normals it need not), for site calibration. Only in extras/.
    "sharp": Site("sharp", gain=1.15, bias=-5.0, gamma=0.95, noise=2.5, blur=0.2, lesion_scale=1.3),
}
EVALUATION_PREVALENCE = 0.5
EVALUATION_PER_SITE = 14_000
"""The evaluation set (extras/evaluation.tar) is enriched with positives, as a site's evaluation set for comparing a
new screen with the one it replaces is: specificity at 98% sensitivity rests on the 2% hardest positives, so a
lake-sized test split (~360 positives) reads a paired difference to about ±0.15 (two-sided 95%), 9,300 positives to
about ±0.045, and the ~21,000 positives of 14,000 images per training site, half positive, to about ±0.026: enough
for a ScreenNet level with its baseline (as measured on the sample lake, 2026-12-01: +0.003) to be shown within the
0.03 margin, and for one 0.02 ahead to be shown with ~90% probability. Enrichment changes neither sensitivity nor
specificity (each is read within its class)."""
SITE_SHARP_PREVALENCE = 0.25
"""The sharp site's labelled subset is enriched with positives (a site collects them for calibration), so its
6,000 images hold ~1,500 positives: a site threshold needs ≥ 149 in the calibration half at 98% and δ = 0.05, and a
verification half of ~750 positives reads its sensitivity to about ±0.5%."""


def _rng(seed: int, name: str) -> np.random.Generator:
    digest = hashlib.sha256(f"{seed}:{name}".encode()).digest()
    return np.random.default_rng(int.from_bytes(digest[:8], "little"))


def _smooth_noise(rng: np.random.Generator, n: int, cells: int) -> np.ndarray:
    """Unit-variance noise smooth at the scale of IMAGE_SIZE / cells pixels (separable Gaussian upsampling)."""
    coarse = rng.standard_normal((n, cells, cells)).astype(np.float32)
    pos = (np.arange(IMAGE_SIZE, dtype=np.float32) + 0.5) / IMAGE_SIZE * cells - 0.5
    weights = np.exp(-0.5 * ((pos[:, None] - np.arange(cells, dtype=np.float32)[None]) / 0.6) ** 2)
    weights /= np.sqrt((weights**2).sum(axis=1, keepdims=True))
    return np.einsum("ij,njk,lk->nil", weights, coarse, weights, optimize=True)


def _soft(d: np.ndarray, width: float) -> np.ndarray:
    """1 inside (d < 1), 0 outside, with a soft edge."""
    return 1.0 / (1.0 + np.exp(np.minimum((d - 1.0) / width, 50.0)))


def _blob(yy: np.ndarray, xx: np.ndarray, cy: np.ndarray, cx: np.ndarray, sigma: np.ndarray) -> np.ndarray:
    return np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / (2 * sigma**2))


def generate(
    n: int, prevalence: float = 0.1, seed: int = 0, site: Site | str = "a", name: str = "shard"
) -> tuple[np.ndarray, np.ndarray]:
    """`n` images (uint8, n×64×64) and labels (uint8, 1 positive) for one site; deterministic in (seed, name)."""
    site = SITES[site] if isinstance(site, str) else site
    rng = _rng(seed, f"{site.name}/{name}")
    labels = (rng.random(n) < prevalence).astype(np.uint8)
    coords = (np.arange(IMAGE_SIZE, dtype=np.float32) + 0.5) / IMAGE_SIZE * 2 - 1
    yy, xx = np.meshgrid(coords, coords, indexing="ij")
    yy, xx = yy[None], xx[None]

    def u(lo: float, hi: float) -> np.ndarray:
        return rng.uniform(lo, hi, (n, 1, 1)).astype(np.float32)

    # Thorax, lungs, mediastinum, heart.
    body = _soft(np.sqrt((xx / u(0.85, 0.98)) ** 2 + ((yy - u(-0.05, 0.05)) / u(0.95, 1.1)) ** 2), 0.05)
    img = 0.12 + body * u(0.5, 0.62)
    lungs = np.zeros_like(img)
    centres = []
    for side in (-1, 1):
        cx, cy, rx, ry = side * u(0.36, 0.46), u(-0.15, 0.0), u(0.26, 0.34), u(0.5, 0.62)
        centres.append((cx, cy, rx, ry))
        lungs = np.maximum(lungs, _soft(np.sqrt(((xx - cx) / rx) ** 2 + ((yy - cy) / ry) ** 2), 0.08))
    img = img - lungs * u(0.25, 0.33)
    img = img + 0.12 * _soft(np.abs(xx) / u(0.09, 0.13), 0.1) * body
    heart = _soft(np.sqrt(((xx - u(0.08, 0.18)) / u(0.24, 0.32)) ** 2 + ((yy - u(0.3, 0.42)) / u(0.2, 0.26)) ** 2), 0.1)
    img = img + 0.1 * heart * lungs

    # Ribs: thin curved bright bands across the lungs.
    ribs = 0.5 + 0.5 * np.sin(2 * np.pi * (yy * u(3.8, 4.8) + u(0.6, 1.0) * xx**2 + u(0, 1)))
    img = img + u(0.04, 0.08) * ribs**6 * lungs

    # Texture at two scales, and vessel-like dots in every image (so a dot alone does not mean positive).
    img = img + 0.035 * _smooth_noise(rng, n, 8) + 0.02 * _smooth_noise(rng, n, 16) * lungs
    for _ in range(4):
        side = rng.integers(0, 2, n)
        cx, cy, rx, ry = (np.where(side[:, None, None] == 0, a, b) for a, b in zip(*centres))
        r, t = np.sqrt(u(0, 1)) * 0.8, u(0, 2 * np.pi)
        amp = u(0.02, 0.06) * (u(0, 1) < 0.6)
        img = img + amp * _blob(yy, xx, cy + r * ry * np.sin(t), cx + r * rx * np.cos(t), u(0.02, 0.035))

    # The finding: a soft nodule inside a lung, log-normal contrast, varying size.
    side = rng.integers(0, 2, n)
    cx, cy, rx, ry = (np.where(side[:, None, None] == 0, a, b) for a, b in zip(*centres))
    r, t = np.sqrt(u(0, 1)) * 0.75, u(0, 2 * np.pi)
    # Log-normal contrast with a floor at half the median: faint findings exist, invisible ones do not (a finding no
    # reader could see would only teach the threshold to flag everything).
    contrast = 0.24 * np.maximum(np.exp(rng.normal(0.0, 0.4, (n, 1, 1))), 0.5).astype(np.float32) * site.lesion_scale
    sigma = u(1.8, 3.6) * 2 / IMAGE_SIZE
    finding = contrast * _blob(yy, xx, cy + r * ry * np.sin(t), cx + r * rx * np.cos(t), sigma)
    img = img + finding * labels[:, None, None]

    # Site: exposure and post-processing, then sensor noise.
    img = np.clip(img, 0, 1) ** site.gamma
    if site.blur > 0:
        img = ndimage.gaussian_filter(img, (0, site.blur, site.blur))
    img = img * (255 * site.gain) + site.bias + site.noise * rng.standard_normal(img.shape, dtype=np.float32)
    return np.clip(np.rint(img), 0, 255).astype(np.uint8), labels


def _png(image: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="PNG")
    return buf.getvalue()


def write_png_folder(folder: Path, images: np.ndarray, labels: np.ndarray | None, prefix: str = "img") -> list[str]:
    """A folder of PNGs, with labels.csv when labels are given. Returns the file names."""
    folder.mkdir(parents=True, exist_ok=True)
    names = [f"{prefix}-{i:06d}.png" for i in range(len(images))]
    for name, image in zip(names, images):
        (folder / name).write_bytes(_png(image))
    if labels is not None:
        with open(folder / "labels.csv", "w", newline="") as fh:
            writer = csv.writer(fh)
            writer.writerow(["filename", "label"])
            writer.writerows(zip(names, labels.tolist()))
    return names


def write_npz(path: Path, splits: dict[str, tuple[np.ndarray, np.ndarray]]) -> None:
    """A MedMNIST-layout .npz: `<split>_images` (N×64×64 uint8) and `<split>_labels` (N×1 uint8)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    arrays = {}
    for split, (images, labels) in splits.items():
        arrays[f"{split}_images"] = images
        arrays[f"{split}_labels"] = labels.reshape(-1, 1).astype(np.uint8)
    np.savez_compressed(path, **arrays)


def _add_member(archive: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode = len(data), 0, 0o644
    archive.addfile(info, io.BytesIO(data))


def write_tar(path: Path, images: np.ndarray, labels: np.ndarray | None, prefix: str = "sample") -> None:
    """A WebDataset-style tar: `<key>.png` and, when labelled, `<key>.cls`."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(path, "w", format=tarfile.USTAR_FORMAT) as archive:
        for i, image in enumerate(images):
            key = f"{prefix}-{i:06d}"
            _add_member(archive, f"{key}.png", _png(image))
            if labels is not None:
                _add_member(archive, f"{key}.cls", str(int(labels[i])).encode())


def _add_defects(folder: Path, seed: int) -> int:
    """A few bad entries in a PNG shard, to show the reject path: each becomes a reject row with a reason."""
    good = sorted(folder.glob("*.png"))[:2]
    (folder / "defect-truncated.png").write_bytes(good[0].read_bytes()[:120])
    (folder / "defect-not-an-image.png").write_bytes(b"this is not a PNG\n")
    (folder / "defect-duplicate.png").write_bytes(good[1].read_bytes())
    big = generate(1, seed=seed, name="defect")[0][0]
    Image.fromarray(np.kron(big, np.ones((2, 2), np.uint8))).save(folder / "defect-128px.png")
    (folder / "notes.txt").write_text("scanner notes that are not an image\n")
    with open(folder / "labels.csv", "a", newline="") as fh:
        csv.writer(fh).writerows(
            [["defect-truncated.png", 1], ["defect-duplicate.png", 0], ["defect-128px.png", 0],
             ["defect-not-an-image.png", 0], ["defect-missing.png", 1]]
        )
    return 6


@dataclass
class SampleSet:
    """Where a generated sample set was written, and what it holds."""

    root: Path
    train: list[Path]
    holdout: list[Path]
    inbox: list[Path]
    extras: list[Path]
    images: int
    positives: int
    defects: int


def make_samples(
    out: Path, n: int = 24000, prevalence: float = 0.1, seed: int = 0, defects: bool = True
) -> SampleSet:
    """The default sample set: labelled training shards from three sites in three formats, a labelled hold-out
    subset per site for audits, and an unlabelled inbox shard (the nightly case).

        train/site-a/ (PNG + labels.csv)   train/site-b.npz (MedMNIST)   train/site-c.tar (WebDataset)
        holdout/site-{a,b,c}.tar           inbox/night-001/ (PNG, no labels)
        extras/site-faint.tar (labelled, findings much fainter: an audit subset that fails)
        extras/night-dim/ (PNG, no labels, a dimmer exposure: a batch whose scores drift)
        extras/site-sharp.tar (labelled, 6,000 images of a newer scanner, 25% positive: site calibration)
        extras/evaluation.tar (labelled, 14,000 images per training site, half positive: an evaluation set that
            joins optimize's held-out test split, `--test-subset`, for the side-by-side with a baseline)
    """
    out = Path(out)
    per_site, n_holdout, n_inbox = n // 3, max(n // 24, 30), max(n // 12, 30)
    total = positives = 0

    def gen(count: int, site: str, name: str) -> tuple[np.ndarray, np.ndarray]:
        nonlocal total, positives
        images, labels = generate(count, prevalence, seed, site, name)
        total, positives = total + count, positives + int(labels.sum())
        return images, labels

    train = [out / "train" / "site-a", out / "train" / "site-b.npz", out / "train" / "site-c.tar"]
    write_png_folder(train[0], *gen(per_site, "a", "train"))
    images, labels = gen(per_site, "b", "train")
    cut = np.cumsum([int(per_site * 0.7), int(per_site * 0.1)])
    write_npz(train[1], {"train": (images[: cut[0]], labels[: cut[0]]),
                         "val": (images[cut[0]: cut[1]], labels[cut[0]: cut[1]]),
                         "test": (images[cut[1]:], labels[cut[1]:])})
    write_tar(train[2], *gen(per_site, "c", "train"))
    n_defects = _add_defects(train[0], seed) if defects else 0

    holdout = []
    for site in ("a", "b", "c"):
        holdout.append(out / "holdout" / f"site-{site}.tar")
        write_tar(holdout[-1], *gen(n_holdout, site, "holdout"), prefix=f"holdout-{site}")

    inbox_images = []
    for site in ("a", "b", "c"):
        inbox_images.append(gen(n_inbox // 3, site, "inbox")[0])
    inbox = [out / "inbox" / "night-001"]
    write_png_folder(inbox[0], np.concatenate(inbox_images), None, prefix="scan")

    extras = [out / "extras" / "site-faint.tar", out / "extras" / "night-dim", out / "extras" / "site-sharp.tar"]
    write_tar(extras[0], *gen(n_holdout, "faint", "holdout"), prefix="holdout-faint")
    write_png_folder(extras[1], gen(n_inbox // 3, "dim", "inbox")[0], None, prefix="scan-dim")
    sharp_images, sharp_labels = generate(max(n // 4, 30), SITE_SHARP_PREVALENCE, seed, "sharp", "site")
    total, positives = total + len(sharp_labels), positives + int(sharp_labels.sum())
    write_tar(extras[2], sharp_images, sharp_labels, prefix="site-sharp")
    extras.append(out / "extras" / "evaluation.tar")
    per_site = max(n * EVALUATION_PER_SITE // 24_000, 30)  # 14,000 at the default n
    parts = [generate(per_site, EVALUATION_PREVALENCE, seed, site, "evaluation") for site in ("a", "b", "c")]
    total, positives = total + sum(len(y) for _, y in parts), positives + sum(int(y.sum()) for _, y in parts)
    write_tar(extras[3], np.concatenate([x for x, _ in parts]), np.concatenate([y for _, y in parts]),
              prefix="evaluation")
    return SampleSet(out, train, holdout, inbox, extras, total, positives, n_defects)
