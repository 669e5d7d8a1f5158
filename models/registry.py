"""The model registry: `lake/models/<version>/` with its files and `manifest.json`, and the promoted pointer.

The manifest (models/manifest.py: the one definition of its fields) is the one place for a version's facts:
architecture, data split hashes, training settings, each candidate's figures and threshold, what ships and at
which threshold, the gate verdicts, the knee per host, the sha256 of every file, and whether it is promoted and why.
The registry is where manifests are written (`register`, `update_sealed`, `record`, `sign`) and read (`manifest`,
verified, as a `Manifest`; `read_manifest`, as written, for listing and diagnosis only).

What is trusted (see models/signing.py): a manifest is used only if its seal matches its content and carries a
signature by a trusted key, and `models/PROMOTED` only if it is signed too. A model file is loaded only after its
sha256 matches the (verified) manifest. Version names, and the file names a manifest lists, are plain names whose
paths stay inside the lake. A version whose held-out gate failed, or that records no verdict, is never screened
with unless the caller says so knowingly (`allow_failed_gate`).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, ContextManager, Mapping, Protocol

from models import signing
from models.engine import MAX_BATCH, cpu_info
from models.manifest import MANIFEST_FORMAT, Manifest, ManifestInvalid, ManifestTooNew, Shipped
from screenline.files import SAFE_NAME, atomic_write_bytes, safe_name, sha256_file

MANIFEST = "manifest.json"
PROMOTED = "PROMOTED"


class ModelNotFound(LookupError):
    """No such model version, or none promoted yet."""


class ModelIntegrityError(RuntimeError):
    """A model file does not match its manifest hash, or a manifest or the promoted pointer is not vouched for by a
    trusted signature: it was changed after registration."""


class GateFailed(RuntimeError):
    """A version (or one of its engines) did not pass its held-out gate, or records no verdict."""


@dataclass(frozen=True)
class Pick:
    """The shipped engine a host screens with: the version, the engine's record, the threshold that decides here
    (a site operating point, else the shipped one) and what screening records about its gate."""

    version: str
    shipped: Shipped
    threshold: float
    operating_point: str = "shipped"  # or "site:<subset>"
    gate: str = "passed"  # or "overridden: <why>"

def valid_threshold(value: Any) -> bool:
    """A decision threshold is a finite probability."""
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) \
        and 0.0 <= value <= 1.0


def host_fingerprint(engine: str, precision: str) -> str:
    """Where a knee was measured: CPU model, cores available, engine and precision (and the GPU for TensorRT)."""
    cpu, _ = cpu_info()
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover
        cores = os.cpu_count() or 1
    if engine == "tensorrt":
        from models.tensorrt import Device

        gpu = Device.current()
        return f"{cpu} | {cores} cores | {gpu.name} sm{gpu.compute_capability} | {engine} | {precision}"
    return f"{cpu} | {cores} cores | {engine} | {precision}"


class LakeFolders(Protocol):
    """What the registry needs of a lake (tasks.lake.Lake is one; models/ never imports tasks/)."""

    @property
    def models(self) -> Path: ...

    def inside(self, *parts: str) -> Path: ...

    def lock(self) -> ContextManager[None]: ...


@dataclass
class Registry:
    """The models of one lake."""

    lake: LakeFolders

    @property
    def root(self) -> Path:
        return self.lake.models

    def folder(self, version: str) -> Path:
        return self.lake.inside("models", safe_name(version, "model version"))

    def versions(self) -> list[str]:
        """Registered versions: folders with a plain name and a manifest."""
        if not self.root.exists():
            return []
        return sorted(p.name for p in self.root.iterdir()
                      if SAFE_NAME.fullmatch(p.name) and not p.is_symlink() and (p / MANIFEST).is_file())

    def read_manifest(self, version: str) -> dict[str, Any]:
        """The manifest as written, NOT verified: for listing and diagnosis only; decisions use `manifest`."""
        path = self.folder(version) / MANIFEST
        if not path.is_file():
            raise ModelNotFound(
                f"no model version {version!r} in {self.root}; `screenline models` lists them, "
                f"`screenline optimize` makes one"
            )
        try:
            manifest = json.loads(path.read_text())
        except ValueError as exc:
            raise ModelIntegrityError(f"{path} is not valid JSON ({exc}); refusing it") from None
        if not isinstance(manifest, dict):
            raise ModelIntegrityError(f"{path} is not a manifest (a JSON object); refusing it")
        return manifest

    def _verified(self, version: str) -> dict[str, Any]:
        """The stored manifest after checking that it names this version, that its seal matches its content and
        that a trusted key signed that seal; ModelIntegrityError saying which check failed otherwise."""
        manifest = self.read_manifest(version)
        if manifest.get("version") != version:
            raise ModelIntegrityError(
                f"{self.folder(version)}/{MANIFEST} is the manifest of {manifest.get('version')!r}, not {version!r}: "
                f"a copied or renamed model folder is not a registered version; refusing it")
        actual = signing.seal(manifest)
        if "seal" not in manifest:
            raise ModelIntegrityError(
                f"the manifest of {version} is not signed (registered before screenline signed its manifests, or "
                f"written by hand); refusing it. Review it, then `screenline sign {version}` on the host that holds "
                f"the signing key.")
        if manifest.get("seal") != actual:
            raise ModelIntegrityError(
                f"the manifest of {version} changed after it was signed (its content hashes to {actual[:12]}…, the "
                f"signed seal is {str(manifest.get('seal'))[:12]}…): a file hash, threshold or verdict was edited. "
                f"Refusing it. If you made the change and stand by it, `screenline sign {version}` on the host that "
                f"holds the signing key; otherwise restore the manifest or re-run `screenline optimize`.")
        try:
            signing.verify(signing.MANIFEST_PURPOSE, f"{version}:{actual}", manifest.get("signature"))
        except signing.Untrusted as exc:
            raise ModelIntegrityError(
                f"the manifest of {version} is not vouched for: {exc}. Refusing it; `screenline sign {version}` on "
                f"the host that holds the signing key after reviewing it, or re-run `screenline optimize`.") from None
        return manifest

    def manifest(self, version: str) -> Manifest:
        """The manifest of `version`, verified (see `_verified`) and read by its schema (models/manifest.py):
        ManifestTooNew for a newer format, ModelIntegrityError for one that lacks what ships."""
        try:
            return Manifest.from_dict(self._verified(version))
        except ManifestInvalid as exc:
            raise ModelIntegrityError(f"{exc}; refusing it") from None

    def _write(self, version: str, manifest: dict[str, Any]) -> None:
        atomic_write_bytes(self.folder(version) / MANIFEST, json.dumps(manifest, indent=2, sort_keys=True).encode())

    def _seal_and_sign(self, version: str, manifest: dict[str, Any]) -> dict[str, Any]:
        manifest["seal"] = signing.seal(manifest)
        manifest["signature"] = signing.sign(signing.MANIFEST_PURPOSE, f"{version}:{manifest['seal']}")
        self._write(version, manifest)
        return manifest

    def register(self, version: str, manifest: Manifest | Mapping[str, Any]) -> Manifest:
        """Record the sha256 of every file in the version's folder, stamp the version, format and time, seal and
        sign the manifest, and write it."""
        if not isinstance(manifest, Manifest):
            try:
                manifest = Manifest.from_dict({**manifest, "version": version})
            except ManifestInvalid as exc:
                raise ValueError(f"cannot register {version}: {exc}") from None
        folder = self.folder(version)
        manifest.version, manifest.format = version, MANIFEST_FORMAT
        manifest.registered_at = manifest.registered_at or datetime.now(timezone.utc).isoformat(timespec="seconds")
        manifest.files = {
            p.name: sha256_file(p) for p in sorted(folder.iterdir())
            if p.is_file() and not p.is_symlink() and p.name != MANIFEST and not p.name.startswith(".")
        }
        manifest.seal = manifest.signature = None
        stored = self._seal_and_sign(version, manifest.to_dict())
        return Manifest.from_dict(stored)

    def sign(self, version: str) -> tuple[str | None, dict[str, Any]]:
        """Re-seal and sign `version`'s manifest as it is now, with this host's key: for a change made by hand that
        its author stands by. Returns the previous seal and the manifest."""
        manifest = self.read_manifest(version)
        if manifest.get("version") != version:
            raise ModelIntegrityError(f"{self.folder(version)}/{MANIFEST} names version {manifest.get('version')!r}; "
                                      f"refusing to sign it as {version!r}")
        for name in manifest.get("files", {}):
            safe_name(name, f"file listed by the manifest of {version}")
        previous = manifest.get("seal")
        with self.lake.lock():
            return previous, self._seal_and_sign(version, manifest)

    def update_sealed(self, version: str, change: Callable[[Manifest], None]) -> Manifest:
        """Apply `change(manifest)` to a verified manifest and sign it again with this host's key, under the lake's
        lock: for screenline's own sealed updates (a site operating point), never for a change nobody reviewed."""
        with self.lake.lock():
            manifest = self.manifest(version)
            change(manifest)
            manifest.seal = manifest.signature = None
            return Manifest.from_dict(self._seal_and_sign(version, manifest.to_dict()))

    def record(self, version: str, field: str, key: str, value: Any) -> None:
        """Set manifest[field][key] for a host-specific, unsealed field (a knee, a TensorRT plan), under the lake's
        lock, keeping the signature valid."""
        if field not in signing.UNSEALED:
            raise ValueError(f"{field!r} is sealed: only {', '.join(signing.UNSEALED)} may change after signing")
        with self.lake.lock():
            manifest = self._verified(version)  # as stored: a host fact never rewrites what is sealed
            manifest.setdefault(field, {})[key] = value
            self._write(version, manifest)

    def promote(self, version: str) -> None:
        """Make `version` the one screening uses: a verified version that passed its held-out gate."""
        manifest = self.manifest(version)
        if manifest.passed_gate is not True:
            raise GateFailed(f"{version} did not pass its held-out gate ({manifest.promotion or 'no verdict'}); "
                             f"it cannot be promoted")
        promoted_at = datetime.now(timezone.utc).isoformat(timespec="seconds")
        pointer = {"version": version, "promoted_at": promoted_at,
                   "signature": signing.sign(signing.PROMOTED_PURPOSE, f"{version}:{promoted_at}")}
        atomic_write_bytes(self.root / PROMOTED, json.dumps(pointer).encode())

    def promoted(self) -> str:
        """The promoted version, after checking the pointer's signature; ModelNotFound when none is."""
        path = self.root / PROMOTED
        if not path.is_file():
            raise ModelNotFound(f"no promoted model in {self.root}: run `screenline optimize` to make one")
        try:
            pointer = json.loads(path.read_text())
            version = safe_name(pointer["version"], f"promoted model version in {path}")
            signing.verify(signing.PROMOTED_PURPOSE, f"{version}:{pointer.get('promoted_at')}",
                           pointer.get("signature"))
        except (ValueError, KeyError, TypeError, signing.Untrusted) as exc:
            raise ModelIntegrityError(
                f"{path} is not a promotion this host trusts ({exc}); refusing it. `screenline promote VERSION` "
                f"on the host that holds the signing key sets it again.") from None
        return version

    def verified_file(self, version: str, name: str) -> Path:
        """The path of a model file after checking it against the (verified) manifest's sha256."""
        manifest = self.manifest(version)
        expected = manifest.files.get(name)
        if expected is None:
            raise ModelIntegrityError(f"{name} is not listed in the manifest of {version}; refusing to load it")
        path = self.lake.inside("models", version, safe_name(name, f"file named by the manifest of {version}"))
        if path.is_symlink() or not path.is_file():
            raise ModelNotFound(f"{path} is missing; re-run `screenline optimize` to rebuild {version}")
        actual = sha256_file(path)
        if actual != expected:
            raise ModelIntegrityError(
                f"{path} does not match its manifest (sha256 {actual[:12]}…, expected {expected[:12]}…): the file "
                f"changed after registration; refusing to load it. Re-run `screenline optimize` to rebuild it."
            )
        return path

    def pick(self, version: str | None = None, engine: str = "auto", allow_failed_gate: bool = False) -> Pick:
        """The shipped engine to run here: `shipping`, or the version's ONNX Runtime `fallback` (registered by an
        optimize that shipped TensorRT or OpenVINO) where this host cannot run that engine or onnxruntime is asked
        for (models/engine.runnable_engines: TensorRT, then OpenVINO, then ONNX Runtime).

        Each has its own threshold, calibrated on that engine's scores, and its own held-out gate: shipping's
        verdict is the manifest's `passed_gate`, the fallback's its own. An engine whose gate failed or is not
        recorded raises GateFailed, unless `allow_failed_gate`; the pick's `gate` is what screening records."""
        from models.engine import runnable_engines

        version = safe_name(version, "model version") if version else self.promoted()
        manifest = self.manifest(version)
        wanted = list(runnable_engines(engine))
        for name in wanted:
            for shipped in manifest.picks:
                if shipped.engine != name:
                    continue
                threshold, point = manifest.decided_at(shipped)
                passed, verdict = ((manifest.passed_gate, manifest.promotion) if shipped is manifest.shipping
                                   else (shipped.passed_gate, shipped.verdict))
                return Pick(version, shipped, threshold, point,
                            self._gate(version, shipped.engine, threshold, passed, verdict, allow_failed_gate))
        if wanted == ["tensorrt"]:
            raise ModelNotFound(f"{version} has no TensorRT threshold (it was optimized without a GPU): run "
                                f"`screenline optimize --engine tensorrt` on a GPU host, or screen with onnxruntime")
        if wanted == ["openvino"]:
            raise ModelNotFound(f"{version} has no OpenVINO threshold (OpenVINO did not compete when it was "
                                f"optimized): run `screenline optimize` on a host with OpenVINO, or screen with "
                                f"onnxruntime")
        raise ModelNotFound(f"{version} ships {manifest.shipping.engine} only, which this host cannot run: "
                            f"run `screenline optimize --engine onnxruntime` to register a CPU engine")

    @staticmethod
    def _gate(version: str, engine: str, threshold: Any, passed: bool | None, verdict: str | None,
              allow_failed_gate: bool) -> str:
        """"passed", or what screening records when a failed (or unrecorded) gate is knowingly overridden."""
        if not valid_threshold(threshold):
            raise ModelIntegrityError(f"{version}'s {engine} threshold {threshold!r} is not a probability in [0, 1]; "
                                      f"refusing to decide with it")
        if passed is True:
            return "passed"
        why = (f"did not pass its held-out sensitivity gate ({verdict or 'no reason recorded'})"
               if passed is False else "records no held-out gate verdict")
        if not allow_failed_gate:
            raise GateFailed(
                f"{version}'s {engine} engine {why}: its decisions are not known to keep the sensitivity "
                f"target, so screen refuses it. Screen with the promoted model, or re-run `screenline optimize`; to "
                f"score with it anyway, knowing this, pass --allow-failed-gate (its predictions record the override).")
        return f"overridden: {why}"

    def load_engine(self, version: str | None = None, threads: int | None = None, engine: str = "auto",
                    allow_failed_gate: bool = False, batch: int | None = None):
        """The engine to screen `version` with (default: the promoted one) on this host, its file verified first."""
        pick = self.pick(version, engine, allow_failed_gate)
        return self.load_shipped(pick.version, pick.shipped, threads, batch=batch)

    def load_shipped(self, version: str, shipped: Shipped, threads: int | None = None, callers: int = 1,
                     batch: int | None = None):
        """The engine for one of a version's shipped engines, its file verified against the manifest first; `threads`
        a call, `callers` calling at once, `batch` the images a call that OpenVINO compiles for (models/engine.py),
        and keeps compiled in this host's engine cache (`engine_cache`: imported by later loads, not compiled)."""
        from models.engine import OpenVinoEngine, OrtEngine, engine_cache

        if shipped.engine == "openvino":
            path = self.verified_file(version, shipped.file)
            return OpenVinoEngine(path, shipped.precision, threads, callers, batch, engine_cache(),
                                  self.manifest(version).files[shipped.file])
        if shipped.engine == "tensorrt":
            knee = self.manifest(version).knees.get(host_fingerprint("tensorrt", shipped.precision), {}).get("batch")
            return self.tensorrt_engine(version, shipped.file, shipped.precision, knee)
        if shipped.engine != "onnxruntime":
            raise ModelNotFound(f"{version} ships engine {shipped.engine!r}, which this build cannot load")
        return OrtEngine(self.verified_file(version, shipped.file), shipped.precision, threads, callers)

    def tensorrt_engine(self, version: str, file: str, precision: str, knee: int | None = None):
        """A TensorRT engine for one of the version's graphs: its plan for this GPU, TensorRT, graph, profile
        (opt = `knee`) and precision, built once into `plans/` and recorded with its sha256 in the manifest; a
        recorded plan is checked against that hash before TensorRT deserializes it."""
        from models import tensorrt

        tensorrt.require()
        onnx_path = self.verified_file(version, file)
        manifest = self.manifest(version)
        channels = int(manifest.architecture["channels"])
        max_batch = int(manifest.gates.get("max_batch", MAX_BATCH))
        key = tensorrt.plan_key(manifest.files[file], tensorrt.profile_for(knee, max_batch), precision)
        path = self.lake.inside("models", version, "plans", key.filename())
        recorded = manifest.plans.get(key.filename())
        if recorded and path.is_file():
            plan = path.read_bytes()
            actual = hashlib.sha256(plan).hexdigest()
            if actual != recorded["sha256"]:
                raise ModelIntegrityError(f"{path} does not match the sha256 recorded in the manifest of {version}; "
                                          f"refusing to load it. Delete it and it is rebuilt from the verified ONNX.")
        else:
            plan = tensorrt.build_plan(onnx_path, key.profile, channels,
                                       tensorrt.timing_cache_path(self.root / "tensorrt", key))
            atomic_write_bytes(path, plan)
            self.record(version, "plans", key.filename(), {"sha256": hashlib.sha256(plan).hexdigest(),
                                                          "key": key.as_dict()})
        return tensorrt.TensorRTEngine(plan, precision, channels, max_batch)
