"""Who vouches for a model: Ed25519 signatures over a manifest's seal, checked against keys kept outside the lake.

A manifest's *seal* is the sha256 of its canonical JSON without the fields that screening hosts add later
(`UNSEALED`: the knee measured on each host, the TensorRT plans built on each GPU, and the seal and signature
themselves). So the seal covers the version's name, the sha256 of every file, the thresholds, the gates and their
verdicts. `optimize` signs the seal with this host's signing key; every load recomputes the seal and checks the
signature against the trusted public keys. Whoever can write the lake can edit a manifest but cannot sign it: a
swapped graph whose hash was updated in the manifest no longer matches the seal, and a recomputed seal carries no
valid signature.

The keys live in $SCREENLINE_KEYS (default ~/.config/screenline/keys), never in the lake:

    signing.key         this host's private key (Ed25519, PEM, mode 0600), made the first time a model is signed
    trusted/<id>.pub    the public keys whose signatures are accepted; a new signing key adds its own here

A host that only screens needs trusted/ alone: copy the .pub of the host that runs `optimize` into it.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

KEYS_ENV = "SCREENLINE_KEYS"
SIGNING_KEY = "signing.key"
TRUSTED = "trusted"

UNSEALED = ("knees", "plans", "seal", "signature")
"""Manifest fields outside the seal: facts of a host (knee, TensorRT plans) and the seal and signature."""

MANIFEST_PURPOSE = "screenline-manifest"
PROMOTED_PURPOSE = "screenline-promoted"
"""What a signature vouches for is part of the signed text, so a manifest signature cannot pass as a promotion."""


class Untrusted(RuntimeError):
    """A seal or signature that does not verify, or a key that is not trusted."""


def keys_dir() -> Path:
    """$SCREENLINE_KEYS, else ~/.config/screenline/keys (under $XDG_CONFIG_HOME when set)."""
    if os.environ.get(KEYS_ENV):
        return Path(os.environ[KEYS_ENV]).expanduser()
    config = Path(os.environ.get("XDG_CONFIG_HOME") or Path.home() / ".config")
    return config / "screenline" / "keys"


def canonical(value: Any) -> bytes:
    """One byte string per JSON value: sorted keys, no whitespace, ASCII."""
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=True).encode()


def seal(manifest: dict[str, Any]) -> str:
    """sha256 of the manifest's canonical JSON without the UNSEALED fields."""
    return hashlib.sha256(canonical({k: v for k, v in manifest.items() if k not in UNSEALED})).hexdigest()


def _key_id(public_raw: bytes) -> str:
    return hashlib.sha256(public_raw).hexdigest()[:16]


def _public_raw(key: Any) -> bytes:
    from cryptography.hazmat.primitives import serialization

    return key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


def signing_key() -> Any:
    """This host's Ed25519 private key, made on first use (and its public key trusted here)."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    folder = keys_dir()
    path = folder / SIGNING_KEY
    if not path.exists():
        (folder / TRUSTED).mkdir(parents=True, exist_ok=True, mode=0o700)
        key = Ed25519PrivateKey.generate()
        pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                serialization.NoEncryption())
        try:  # O_EXCL: two processes signing at once for the first time end up with one key
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        except FileExistsError:
            pass
        else:
            with os.fdopen(fd, "wb") as fh:
                fh.write(pem)
            public = key.public_key()
            (folder / TRUSTED / f"{_key_id(_public_raw(public))}.pub").write_bytes(public.public_bytes(
                serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo))
    key = serialization.load_pem_private_key(path.read_bytes(), password=None)
    if not isinstance(key, Ed25519PrivateKey):
        raise Untrusted(f"{path} is not an Ed25519 private key")
    return key


def sign(purpose: str, payload: str) -> dict[str, str]:
    """A signature of `purpose:payload` with this host's key: {key_id, value, signed_at}."""
    key = signing_key()
    value = key.sign(f"{purpose}:{payload}".encode())
    return {"key_id": _key_id(_public_raw(key.public_key())), "value": base64.b64encode(value).decode(),
            "signed_at": datetime.now(timezone.utc).isoformat(timespec="seconds")}


def _trusted_key(key_id: str) -> Any:
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

    folder = keys_dir() / TRUSTED
    if not isinstance(key_id, str) or not key_id.isalnum():
        raise Untrusted(f"signature names no valid key id ({key_id!r})")
    path = folder / f"{key_id}.pub"
    if not path.is_file():
        raise Untrusted(f"signed by key {key_id}, which is not among the trusted keys in {folder} (copy the signing "
                        f"host's {key_id}.pub there if you trust it)")
    key = serialization.load_pem_public_key(path.read_bytes())
    if not isinstance(key, Ed25519PublicKey) or _key_id(_public_raw(key)) != key_id:
        raise Untrusted(f"{path} is not the Ed25519 public key {key_id}")
    return key


def verify(purpose: str, payload: str, signature: Any) -> str:
    """The id of the trusted key that signed `purpose:payload`; Untrusted saying why otherwise."""
    from cryptography.exceptions import InvalidSignature

    if not isinstance(signature, dict) or "value" not in signature:
        raise Untrusted("it is not signed")
    key = _trusted_key(signature.get("key_id"))
    try:
        key.verify(base64.b64decode(signature["value"], validate=True), f"{purpose}:{payload}".encode())
    except (InvalidSignature, ValueError):
        raise Untrusted(f"its signature does not verify with trusted key {signature['key_id']}") from None
    return signature["key_id"]
