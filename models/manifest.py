"""A model version's manifest: the one definition of what it records. models/registry.py reads and writes it.

`manifest.json` in `lake/models/<version>/` is this dataclass as JSON (format MANIFEST_FORMAT). optimize builds one
(tasks/optimize.register_version), the registry stamps the version, format, time and file hashes, seals and signs it;
every reader gets a `Manifest` back from `Registry.manifest`, verified, and reads its fields by name.

Each fact is stored once: a candidate's validation figures and threshold in `candidates`, what ships in `shipping`
(and `fallback`), the held-out verdict in `passed_gate` / `promotion` / `test`, the knee per host in `knees`.
What is sealed and what hosts may add later (`knees`, `plans`) is models/signing.py's UNSEALED.

Formats: 1 (no `format` field) also copied each candidate's figures into `metrics` and `thresholds`; 2 stores them
once. An older manifest loads (fields it lacks take their defaults; fields this format does not name are kept in
`extra`, as written, so its seal still holds); a newer one is refused (ManifestTooNew) rather than half-read.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Any

from models.contract import TARGET_SENSITIVITY

MANIFEST_FORMAT = 2


class ManifestTooNew(RuntimeError):
    """A manifest written by a newer screenline, in a layout this one does not know."""


class ManifestInvalid(ValueError):
    """A manifest that lacks what every version records (what ships, at which threshold)."""


@dataclass
class Shipped:
    """An engine a version ships: its graph, precision and threshold, with how the threshold was chosen. A TensorRT
    version's CPU `fallback` also carries its own held-out gate (`test`, `passed_gate`, `verdict`); `shipping`'s is
    the manifest's."""

    engine: str
    candidate: str
    precision: str
    file: str
    threshold: float
    calibration: dict[str, Any] = field(default_factory=dict)  # rule, delta, positives, rank, guarantee, statement
    why: str = ""
    test: dict[str, Any] | None = None
    passed_gate: bool | None = None
    verdict: str | None = None

    @classmethod
    def from_dict(cls, record: dict[str, Any], where: str) -> "Shipped":
        missing = [name for name in ("candidate", "precision", "file", "threshold") if name not in record]
        if missing:
            raise ManifestInvalid(f"{where} lacks {', '.join(missing)}")
        known = {f.name for f in fields(cls)}
        return cls(**{"engine": "onnxruntime", **{k: v for k, v in record.items() if k in known}})

    def to_dict(self) -> dict[str, Any]:
        out = {f.name: getattr(self, f.name) for f in fields(self)}
        return {k: v for k, v in out.items() if v is not None or k not in ("test", "passed_gate", "verdict")}


@dataclass
class Manifest:
    """What a registered version records, field by field (see the module docstring for who writes what)."""

    shipping: Shipped
    passed_gate: bool | None = None  # the held-out gate's verdict; None: none recorded (screen refuses it)
    promotion: str = ""  # the verdict in words: why it was promoted, or which gate refused it
    promoted: bool = False
    test: dict[str, Any] = field(default_factory=dict)  # the shipped engine on the held-out test split
    fallback: Shipped | None = None  # the CPU engine beside a TensorRT one
    gates: dict[str, Any] = field(default_factory=dict)  # tasks.optimize.GateSettings as a dict
    candidates: list[dict[str, Any]] = field(default_factory=list)  # every engine/precision built and measured
    architecture: dict[str, Any] = field(default_factory=dict)  # what rebuilds the net
    data: dict[str, Any] = field(default_factory=dict)  # the split: hashes, counts, held-out parts
    training: dict[str, Any] = field(default_factory=dict)  # settings, history, best validation AUC
    export: dict[str, Any] = field(default_factory=dict)  # parity with torch, opset, BatchNorm folded
    reference: dict[str, Any] = field(default_factory=dict)  # audit's drift reference (validation scores)
    baseline: dict[str, Any] = field(default_factory=dict)  # the side-by-side, or why there is none
    created_at: str = ""
    # stamped by the registry when it registers the version
    version: str = ""
    format: int = MANIFEST_FORMAT
    registered_at: str = ""
    files: dict[str, str] = field(default_factory=dict)  # file name → sha256
    # sealed later by screenline itself (calibrate --apply / --reset), signed again
    site_operating_points: dict[str, dict[str, Any]] = field(default_factory=dict)  # "<engine>/<file>" → point
    operating_point_history: list[dict[str, Any]] = field(default_factory=list)
    # unsealed host facts (models/signing.UNSEALED)
    knees: dict[str, dict[str, Any]] = field(default_factory=dict)  # host fingerprint → knee
    plans: dict[str, dict[str, Any]] = field(default_factory=dict)  # TensorRT plan file → sha256, key
    seal: str | None = None
    signature: dict[str, Any] | None = None
    extra: dict[str, Any] = field(default_factory=dict)  # fields of another format, kept as they were written

    @property
    def target_sensitivity(self) -> float:
        """The sensitivity its gates held it to."""
        return float(self.gates.get("target_sensitivity", TARGET_SENSITIVITY))

    @property
    def test_subsets(self) -> tuple[str, ...]:
        """Labelled subsets that were in its held-out test split (optimize --test-subset)."""
        return tuple(self.data.get("test_subsets", ()))

    @property
    def picks(self) -> list[Shipped]:
        """The engines it ships: `shipping`, then the `fallback` if any."""
        return [self.shipping, *([self.fallback] if self.fallback else [])]

    def candidate(self, name: str) -> dict[str, Any]:
        """A candidate's record by name (KeyError naming it when there is none)."""
        for c in self.candidates:
            if c["name"] == name:
                return c
        raise KeyError(f"{self.version} records no candidate {name!r}")

    def decided_at(self, pick: Shipped) -> tuple[float, str]:
        """The threshold a shipped engine decides at, and the operating point's name: the site point recorded for
        its engine and graph (`screenline calibrate --apply`), else its own ("shipped")."""
        site = self.site_operating_points.get(point_key(pick.engine, pick.file))
        return (site["threshold"], site["name"]) if site else (pick.threshold, "shipped")

    def site_point(self, pick: Shipped) -> dict[str, Any] | None:
        """The site operating point recorded for a shipped engine's graph, if any."""
        return self.site_operating_points.get(point_key(pick.engine, pick.file))

    @classmethod
    def from_dict(cls, record: dict[str, Any]) -> "Manifest":
        """A manifest as stored, of this format or an older one."""
        version = record.get("version", "?")
        fmt = record.get("format", 1)
        if not isinstance(fmt, int) or isinstance(fmt, bool) or fmt > MANIFEST_FORMAT:
            raise ManifestTooNew(f"the manifest of {version} has format {fmt!r}; this screenline reads formats up to "
                                 f"{MANIFEST_FORMAT}: upgrade screenline to use it")
        if not isinstance(record.get("shipping"), dict):
            raise ManifestInvalid(f"the manifest of {version} records no `shipping` engine")
        known = {f.name for f in fields(cls)} - {"extra"}
        values = {k: v for k, v in record.items() if k in known}
        values["shipping"] = Shipped.from_dict(record["shipping"], f"the manifest of {version}'s shipping")
        if record.get("fallback"):
            values["fallback"] = Shipped.from_dict(record["fallback"], f"the manifest of {version}'s fallback")
        values["format"] = fmt
        return cls(**values, extra={k: v for k, v in record.items() if k not in known})

    def to_dict(self) -> dict[str, Any]:
        """What manifest.json holds: every field by name (the shipped engines as plain records), the seal and
        signature only once set, and the older format's fields as they were."""
        out: dict[str, Any] = {}
        for f in fields(self):
            if f.name == "extra":
                continue
            value = getattr(self, f.name)
            if f.name in ("seal", "signature") and value is None:
                continue
            out[f.name] = value.to_dict() if isinstance(value, Shipped) else value
        return {**self.extra, **out}


def point_key(engine: str, file: str) -> str:
    """Where a site operating point is recorded: per engine and graph."""
    return f"{engine}/{file}"
