"""The model registry: `lake/models/<version>/` with its files and `manifest.json`, and the promoted pointer.

The manifest is the one place for a version's facts: architecture, data split hashes, training settings, metrics
per precision, the calibrated threshold per engine/precision, the knee per host, the sha256 of every file, and
whether it is promoted and why. Loading a model verifies its file against the manifest's hash first.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from tasks.lake import Lake, atomic_write_bytes

MANIFEST = "manifest.json"
PROMOTED = "PROMOTED"


class ModelNotFound(LookupError):
    """No such model version, or none promoted yet."""


class ModelIntegrityError(RuntimeError):
    """A model file does not match its manifest hash: it was changed after registration."""


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def host_fingerprint(engine: str, precision: str) -> str:
    """Where a knee was measured: CPU model, cores available, engine and precision (and the GPU for TensorRT)."""
    cpu = platform.processor() or "unknown cpu"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover
        cores = os.cpu_count() or 1
    if engine == "tensorrt":
        from models.tensorrt import Device

        gpu = Device.current()
        return f"{cpu} | {cores} cores | {gpu.name} sm{gpu.compute_capability} | {engine} | {precision}"
    return f"{cpu} | {cores} cores | {engine} | {precision}"


@dataclass
class Registry:
    """The models of one lake."""

    lake: Lake

    @property
    def root(self) -> Path:
        return self.lake.models

    def folder(self, version: str) -> Path:
        return self.root / version

    def versions(self) -> list[str]:
        if not self.root.exists():
            return []
        return sorted(p.name for p in self.root.iterdir() if (p / MANIFEST).is_file())

    def manifest(self, version: str) -> dict[str, Any]:
        path = self.folder(version) / MANIFEST
        if not path.is_file():
            raise ModelNotFound(
                f"no model version {version!r} in {self.root}; `screenline models` lists them, "
                f"`screenline optimize` makes one"
            )
        return json.loads(path.read_text())

    def write_manifest(self, version: str, manifest: dict[str, Any]) -> None:
        atomic_write_bytes(self.folder(version) / MANIFEST, json.dumps(manifest, indent=2, sort_keys=True).encode())

    def register(self, version: str, manifest: dict[str, Any]) -> dict[str, Any]:
        """Record the sha256 of every file in the version's folder and write the manifest."""
        folder = self.folder(version)
        manifest = dict(manifest)
        manifest["version"] = version
        manifest.setdefault("registered_at", datetime.now(timezone.utc).isoformat(timespec="seconds"))
        manifest["files"] = {
            p.name: sha256_file(p) for p in sorted(folder.iterdir())
            if p.is_file() and p.name != MANIFEST and not p.name.startswith(".")
        }
        self.write_manifest(version, manifest)
        return manifest

    def promote(self, version: str) -> None:
        """Make `version` the one screening uses."""
        self.manifest(version)
        atomic_write_bytes(self.root / PROMOTED, json.dumps({"version": version}).encode())

    def promoted(self) -> str:
        """The promoted version; ModelNotFound when none is."""
        path = self.root / PROMOTED
        if not path.is_file():
            raise ModelNotFound(f"no promoted model in {self.root}: run `screenline optimize` to make one")
        return json.loads(path.read_text())["version"]

    def verified_file(self, version: str, name: str) -> Path:
        """The path of a model file after checking it against the manifest's sha256."""
        manifest = self.manifest(version)
        path = self.folder(version) / name
        expected = manifest.get("files", {}).get(name)
        if expected is None:
            raise ModelIntegrityError(f"{name} is not listed in the manifest of {version}; refusing to load it")
        if not path.is_file():
            raise ModelNotFound(f"{path} is missing; re-run `screenline optimize` to rebuild {version}")
        actual = sha256_file(path)
        if actual != expected:
            raise ModelIntegrityError(
                f"{path} does not match its manifest (sha256 {actual[:12]}…, expected {expected[:12]}…): the file "
                f"changed after registration; refusing to load it. Re-run `screenline optimize` to rebuild it."
            )
        return path

    def pick(self, version: str | None = None, engine: str = "auto") -> dict[str, Any]:
        """The shipped candidate to run here: `shipping`, or the version's ONNX Runtime `fallback` (registered by
        an optimize that shipped TensorRT) where this host cannot run TensorRT or onnxruntime is asked for.

        Each has its own threshold, calibrated on that engine's scores, and its own held-out gate."""
        from models.engine import resolve_engine

        version = version or self.promoted()
        manifest = self.manifest(version)
        picks = [manifest["shipping"], *([manifest["fallback"]] if manifest.get("fallback") else [])]
        runnable = ["tensorrt", "onnxruntime"] if resolve_engine(engine) == "tensorrt" else ["onnxruntime"]
        wanted = runnable if engine == "auto" else [engine]
        for name in wanted:
            for pick in picks:
                if pick["engine"] != name:
                    continue
                if not pick.get("passed_gate", True):
                    raise ModelNotFound(f"{version}'s {name} engine did not pass its held-out sensitivity gate "
                                        f"({pick.get('verdict', '')}); screen with the other engine")
                return {**pick, "version": version}
        if wanted == ["tensorrt"]:
            raise ModelNotFound(f"{version} has no TensorRT threshold (it was optimized without a GPU): run "
                                f"`screenline optimize --engine tensorrt` on a GPU host, or screen with onnxruntime")
        raise ModelNotFound(f"{version} ships {manifest['shipping']['engine']} only, which this host cannot run: "
                            f"run `screenline optimize --engine onnxruntime` to register a CPU engine")

    def load_engine(self, version: str | None = None, threads: int | None = None, engine: str = "auto"):
        """The engine to screen `version` with (default: the promoted one) on this host, its file verified first."""
        from models.engine import OrtEngine

        pick = self.pick(version, engine)
        version = pick["version"]
        if pick["engine"] == "tensorrt":
            manifest = self.manifest(version)
            knee = manifest.get("knees", {}).get(host_fingerprint("tensorrt", pick["precision"]), {}).get("batch")
            return self.tensorrt_engine(version, pick["file"], pick["precision"], knee)
        if pick["engine"] != "onnxruntime":
            raise ModelNotFound(f"{version} ships engine {pick['engine']!r}, which this build cannot load")
        return OrtEngine(self.verified_file(version, pick["file"]), pick["precision"], threads)

    def tensorrt_engine(self, version: str, file: str, precision: str, knee: int | None = None):
        """A TensorRT engine for one of the version's graphs: its plan for this GPU, TensorRT, graph, profile
        (opt = `knee`) and precision, built once into `plans/` and recorded with its sha256 in the manifest; a
        recorded plan is checked against that hash before TensorRT deserializes it."""
        from models import tensorrt

        tensorrt.require()
        onnx_path = self.verified_file(version, file)
        manifest = self.manifest(version)
        channels = int(manifest["architecture"]["channels"])
        max_batch = int(manifest.get("gates", {}).get("max_batch", 512))
        key = tensorrt.plan_key(manifest["files"][file], tensorrt.profile_for(knee, max_batch), precision)
        path = self.folder(version) / "plans" / key.filename()
        recorded = manifest.get("plans", {}).get(key.filename())
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
            with self.lake.lock():
                manifest = self.manifest(version)
                manifest.setdefault("plans", {})[key.filename()] = {"sha256": hashlib.sha256(plan).hexdigest(),
                                                                    "key": key.as_dict()}
                self.write_manifest(version, manifest)
        return tensorrt.TensorRTEngine(plan, precision, channels, max_batch)
