"""The registry: manifests round-trip, files are verified against their hashes, promotion is explicit."""

from __future__ import annotations

import json

import pytest

from models.registry import ModelIntegrityError, ModelNotFound, Registry
from tasks.lake import Lake


@pytest.fixture
def registry(tmp_path) -> Registry:
    reg = Registry(Lake(tmp_path / "lake"))
    folder = reg.folder("sn-test")
    folder.mkdir(parents=True)
    (folder / "model-fp32.onnx").write_bytes(b"graph bytes")
    reg.register("sn-test", {"shipping": {"engine": "onnxruntime", "precision": "fp32", "file": "model-fp32.onnx",
                                          "threshold": 0.25}, "knees": {"host": {"batch": 16}}})
    return reg


def test_manifest_round_trips_with_file_hashes(registry):
    manifest = registry.manifest("sn-test")
    assert manifest["version"] == "sn-test"
    assert manifest["shipping"]["threshold"] == 0.25 and manifest["knees"] == {"host": {"batch": 16}}
    assert set(manifest["files"]) == {"model-fp32.onnx"} and len(manifest["files"]["model-fp32.onnx"]) == 64
    assert json.loads((registry.folder("sn-test") / "manifest.json").read_text()) == manifest
    assert registry.versions() == ["sn-test"]


def test_a_tampered_file_is_refused_with_a_clear_error(registry):
    assert registry.verified_file("sn-test", "model-fp32.onnx").exists()
    (registry.folder("sn-test") / "model-fp32.onnx").write_bytes(b"graph bytes, changed")
    with pytest.raises(ModelIntegrityError, match="does not match its manifest"):
        registry.load_engine("sn-test")


def test_unlisted_files_and_missing_versions_are_refused(registry):
    (registry.folder("sn-test") / "extra.onnx").write_bytes(b"x")
    with pytest.raises(ModelIntegrityError, match="not listed"):
        registry.verified_file("sn-test", "extra.onnx")
    with pytest.raises(ModelNotFound, match="screenline optimize"):
        registry.promoted()
    with pytest.raises(ModelNotFound, match="no model version"):
        registry.manifest("sn-nope")
    registry.promote("sn-test")
    assert registry.promoted() == "sn-test"
