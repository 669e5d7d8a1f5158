"""The registry: manifests are signed and verified, files match their hashes, names stay inside the lake, and a
version whose gate failed is never screened with unless the caller says so."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import pytest

from models import signing
from models.registry import MANIFEST_FORMAT, GateFailed, ManifestTooNew, ModelIntegrityError, ModelNotFound, Registry
from screenline.files import UnsafePath
from tasks.lake import Lake

SHIPPING = {"engine": "onnxruntime", "candidate": "fp32", "precision": "fp32", "file": "model-fp32.onnx",
            "threshold": 0.25}


def make_version(reg: Registry, version: str = "sn-test", passed_gate: bool | None = True, **extra) -> dict:
    folder = reg.folder(version)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "model-fp32.onnx").write_bytes(b"graph bytes")
    manifest = {"shipping": dict(SHIPPING), "knees": {"host": {"batch": 16}}, **extra}
    if passed_gate is not None:
        manifest["passed_gate"] = passed_gate
    return reg.register(version, manifest)


@pytest.fixture
def registry(tmp_path) -> Registry:
    reg = Registry(Lake(tmp_path / "lake"))
    make_version(reg)
    return reg


def edit(reg: Registry, version: str, change) -> None:
    """Change a manifest on disk the way someone with write access to the lake could."""
    path = reg.folder(version) / "manifest.json"
    manifest = json.loads(path.read_text())
    change(manifest)
    path.write_text(json.dumps(manifest))


@pytest.fixture
def other_key(tmp_path, monkeypatch):
    """Sign with a second key that the session does not trust, then return to the session's keys."""
    trusted = os.environ["SCREENLINE_KEYS"]

    def use(sign_with_other: bool) -> None:
        monkeypatch.setenv("SCREENLINE_KEYS", str(tmp_path / "other-keys") if sign_with_other else trusted)
    return use


def test_manifest_round_trips_with_file_hashes_seal_and_signature(registry):
    manifest = registry.manifest("sn-test")
    assert manifest.version == "sn-test"
    assert manifest.shipping.threshold == 0.25 and manifest.knees == {"host": {"batch": 16}}
    assert set(manifest.files) == {"model-fp32.onnx"} and len(manifest.files["model-fp32.onnx"]) == 64
    stored = json.loads((registry.folder("sn-test") / "manifest.json").read_text())
    assert manifest.to_dict() == stored  # the schema reads back exactly what was written
    assert manifest.seal == signing.seal(stored) and manifest.signature["key_id"]
    assert registry.versions() == ["sn-test"]


def test_a_manifest_that_records_no_shipped_engine_is_refused_by_its_schema(registry):
    with pytest.raises(ValueError, match="cannot register sn-empty: the manifest of sn-empty records no `shipping`"):
        registry.register("sn-empty", {"knees": {}})
    edit(registry, "sn-test", lambda m: m["shipping"].pop("file"))
    registry.sign("sn-test")  # signed, so only the schema can refuse it
    with pytest.raises(ModelIntegrityError, match="the manifest of sn-test's shipping lacks file; refusing it"):
        registry.manifest("sn-test")


def test_a_tampered_file_is_refused_with_a_clear_error(registry):
    assert registry.verified_file("sn-test", "model-fp32.onnx").exists()
    (registry.folder("sn-test") / "model-fp32.onnx").write_bytes(b"graph bytes, changed")
    with pytest.raises(ModelIntegrityError, match="does not match its manifest"):
        registry.load_engine("sn-test")


def test_a_swapped_graph_whose_hash_was_updated_in_the_manifest_is_refused(registry):
    """The manifest no longer vouches for itself: the seal covers the hashes, and only a trusted key signs seals."""
    import hashlib

    swapped = b"another graph"
    (registry.folder("sn-test") / "model-fp32.onnx").write_bytes(swapped)
    edit(registry, "sn-test", lambda m: m["files"].update({"model-fp32.onnx": hashlib.sha256(swapped).hexdigest()}))
    with pytest.raises(ModelIntegrityError, match="changed after it was signed.*screenline sign sn-test"):
        registry.verified_file("sn-test", "model-fp32.onnx")


def test_a_resealed_manifest_without_a_trusted_signature_is_refused(registry):
    def raise_threshold_and_reseal(manifest: dict) -> None:
        manifest["shipping"]["threshold"] = 0.9
        manifest["seal"] = signing.seal(manifest)

    edit(registry, "sn-test", raise_threshold_and_reseal)
    with pytest.raises(ModelIntegrityError, match="signature does not verify"):
        registry.pick("sn-test")
    edit(registry, "sn-test", lambda m: m.pop("signature"))
    with pytest.raises(ModelIntegrityError, match="it is not signed"):
        registry.pick("sn-test")


def test_a_manifest_from_before_signing_is_refused_until_signed(registry):
    edit(registry, "sn-test", lambda m: (m.pop("seal"), m.pop("signature")))
    with pytest.raises(ModelIntegrityError, match="is not signed .*registered before screenline signed"):
        registry.manifest("sn-test")
    registry.sign("sn-test")
    assert registry.pick("sn-test").gate == "passed"


def test_a_manifest_signed_by_a_key_that_is_not_trusted_is_refused(registry, other_key):
    other_key(True)
    registry.sign("sn-test")  # a valid signature, by a key this host never trusted
    other_key(False)
    with pytest.raises(ModelIntegrityError, match="not among the trusted keys"):
        registry.manifest("sn-test")


def test_a_copied_or_renamed_version_folder_is_refused(registry):
    """A gate-failed version copied under another name must not pass as a version of its own."""
    import shutil

    shutil.copytree(registry.folder("sn-test"), registry.folder("sn-copy"))
    with pytest.raises(ModelIntegrityError, match="manifest of 'sn-test', not 'sn-copy'"):
        registry.manifest("sn-copy")


@pytest.mark.parametrize("name", ["/etc/passwd", "../../outside.onnx", "sub/model.onnx", ".hidden.onnx"])
def test_file_names_that_leave_the_model_folder_are_refused_even_when_signed(registry, name):
    outside = registry.lake.root.parent / "outside.onnx"
    outside.write_bytes(b"graph bytes")
    edit(registry, "sn-test", lambda m: (m["shipping"].update(file=name),
                                         m["files"].update({name: m["files"]["model-fp32.onnx"]})))
    with pytest.raises(UnsafePath, match="not a plain name"):
        registry.sign("sn-test")
    with pytest.raises(ModelIntegrityError):  # unsigned as edited: refused before any path is built
        registry.load_engine("sn-test")


def test_a_model_file_that_is_a_symlink_out_of_the_lake_is_refused(registry, tmp_path):
    target = tmp_path / "elsewhere.onnx"
    target.write_bytes(b"graph bytes")  # same bytes, same hash: only the path gives it away
    link = registry.folder("sn-test") / "model-fp32.onnx"
    link.unlink()
    link.symlink_to(target)
    with pytest.raises(UnsafePath, match="outside"):
        registry.verified_file("sn-test", "model-fp32.onnx")


def test_a_version_folder_that_is_a_symlink_out_of_the_lake_is_refused(registry, tmp_path):
    elsewhere = tmp_path / "elsewhere"
    registry.folder("sn-test").rename(elsewhere)
    (registry.root / "sn-test").symlink_to(elsewhere)
    assert registry.versions() == []
    with pytest.raises(UnsafePath, match="outside"):
        registry.manifest("sn-test")


@pytest.mark.parametrize("pointer", [
    {"version": "../../outside/ver"},
    {"version": "sn-test"},  # unsigned
    {"version": "sn-test", "promoted_at": "2026-01-01T00:00:00+00:00",
     "signature": {"key_id": "0000000000000000", "value": "AAAA"}},
])
def test_a_promoted_pointer_that_is_not_a_trusted_promotion_is_refused(registry, pointer):
    (registry.root / "PROMOTED").write_text(json.dumps(pointer))
    with pytest.raises(ModelIntegrityError, match="not a promotion this host trusts"):
        registry.promoted()
    with pytest.raises(ModelIntegrityError):
        registry.pick()


def test_a_promotion_signed_for_one_version_does_not_promote_another(registry):
    make_version(registry, "sn-other")
    registry.promote("sn-test")
    pointer = json.loads((registry.root / "PROMOTED").read_text())
    (registry.root / "PROMOTED").write_text(json.dumps({**pointer, "version": "sn-other"}))
    with pytest.raises(ModelIntegrityError, match="signature does not verify"):
        registry.promoted()


@pytest.mark.parametrize("version", ["../x", "/abs", "a/b", "..", ".hidden", ""])
def test_version_names_that_are_not_plain_names_are_refused(registry, version):
    with pytest.raises(UnsafePath, match="not a plain name"):
        registry.pick(version or "/")
    with pytest.raises(UnsafePath):
        registry.lake.predictions_file(version or "/", "0123456789abcdef")


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


def test_a_version_whose_gate_failed_is_refused_unless_overridden_knowingly(registry):
    make_version(registry, "sn-failed", passed_gate=False,
                 promotion="NOT promoted: test sensitivity 0.9500 (95/100) at the frozen threshold is below the target")
    with pytest.raises(GateFailed, match=r"did not pass its held-out sensitivity gate \(NOT promoted: test "
                                         r"sensitivity 0.9500.*--allow-failed-gate"):
        registry.pick("sn-failed")
    with pytest.raises(GateFailed):
        registry.load_engine("sn-failed")
    pick = registry.pick("sn-failed", allow_failed_gate=True)
    assert pick.gate.startswith("overridden: did not pass") and pick.threshold == 0.25
    with pytest.raises(GateFailed, match="cannot be promoted"):
        registry.promote("sn-failed")


def test_a_version_that_records_no_gate_verdict_is_not_taken_as_passed(registry):
    make_version(registry, "sn-unknown", passed_gate=None)
    with pytest.raises(GateFailed, match="records no held-out gate verdict"):
        registry.pick("sn-unknown")
    assert registry.pick("sn-unknown", allow_failed_gate=True).gate == "overridden: records no held-out gate verdict"


@pytest.mark.parametrize("threshold", [float("nan"), 1.5, -0.1, "0.3", None])
def test_a_threshold_that_is_not_a_probability_is_refused(registry, threshold):
    make_version(registry, "sn-bad")
    edit(registry, "sn-bad", lambda m: m["shipping"].update(threshold=threshold))
    registry.sign("sn-bad")  # even a signed manifest cannot decide with it
    with pytest.raises(ModelIntegrityError, match="is not a probability"):
        registry.pick("sn-bad", allow_failed_gate=True)


def test_manifests_carry_their_format_older_ones_load_and_a_newer_one_is_refused(registry):
    assert registry.manifest("sn-test").format == MANIFEST_FORMAT
    old = {"fp32": {"val_auc": 0.9, "threshold": 0.25}}  # format 1 also copied figures into metrics and thresholds
    edit(registry, "sn-test", lambda m: (m.pop("format"), m.update(metrics=old, thresholds={"fp32": 0.25})))
    registry.sign("sn-test")
    manifest = registry.manifest("sn-test")
    assert manifest.format == 1 and manifest.extra == {"metrics": old, "thresholds": {"fp32": 0.25}}
    assert registry.pick("sn-test").threshold == 0.25
    assert manifest.to_dict() == {**registry.read_manifest("sn-test"), "format": 1}  # kept as written, format named
    edit(registry, "sn-test", lambda m: m.update(format=MANIFEST_FORMAT + 1))
    registry.sign("sn-test")  # signed and sealed, so only its format can refuse it
    with pytest.raises(ManifestTooNew, match=f"reads formats up to {MANIFEST_FORMAT}: upgrade screenline"):
        registry.manifest("sn-test")


def test_signing_a_reviewed_hand_change_makes_the_manifest_trusted_again(registry):
    edit(registry, "sn-test", lambda m: m["shipping"].update(threshold=0.4))
    with pytest.raises(ModelIntegrityError):
        registry.manifest("sn-test")
    previous, manifest = registry.sign("sn-test")
    assert previous != manifest["seal"] and registry.pick("sn-test").threshold == 0.4


def test_host_facts_recorded_after_signing_keep_it_trusted_and_sealed_ones_cannot_be_recorded(registry):
    registry.record("sn-test", "knees", "another host", {"batch": 32})
    assert registry.manifest("sn-test").knees["another host"] == {"batch": 32}
    with pytest.raises(ValueError, match="sealed"):
        registry.record("sn-test", "shipping", "threshold", 0.9)
    assert not math.isnan(registry.pick("sn-test").threshold)


def test_keys_live_outside_the_lake_and_the_private_key_is_private(registry):
    keys = Path(os.environ["SCREENLINE_KEYS"])
    assert not keys.is_relative_to(registry.lake.root)
    assert (keys / "signing.key").stat().st_mode & 0o077 == 0
    key_id = registry.manifest("sn-test").signature["key_id"]
    assert (keys / "trusted" / f"{key_id}.pub").is_file()


def test_the_cli_shows_trust_signs_a_reviewed_change_and_promotes_only_a_passed_gate(registry):
    import subprocess
    import sys

    from session_env import ENV

    make_version(registry, "sn-failed", passed_gate=False)
    edit(registry, "sn-test", lambda m: m["shipping"].update(threshold=0.3))

    def cli(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "screenline.cli", *args, "--lake", str(registry.lake.root)],
                              env=ENV, capture_output=True, text=True, timeout=120)

    listed = cli("models")
    assert listed.returncode == 0, listed.stderr
    rows = {line.split()[0]: line.split() for line in listed.stdout.splitlines()[1:]}
    assert rows["sn-test"][6:8] == ["passed", "UNTRUSTED"] and rows["sn-failed"][6:8] == ["FAILED", "signed"]
    assert "untrusted: sn-test: the manifest of sn-test changed after it was signed" in listed.stderr
    signed = cli("sign", "sn-test")
    assert signed.returncode == 0 and "signed sn-test" in signed.stdout
    assert cli("models").stdout.count("UNTRUSTED") == 0
    refused = cli("promote", "sn-failed")
    assert refused.returncode == 2 and "did not pass its held-out gate" in refused.stderr
    promoted = cli("promote", "sn-test")
    assert promoted.returncode == 0 and registry.promoted() == "sn-test"
