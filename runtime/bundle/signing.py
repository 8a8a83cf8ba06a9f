"""Optional Ed25519 signing of the manifest digest, with the `cryptography` package imported only here,
so a runtime that is given no key stays numpy + onnxruntime. Keys: PEM files, PEM text or bytes, raw 32 bytes
(in Python only; a file must be PEM) or cryptography key objects (`openssl genpkey -algorithm ed25519 -out key.pem`).
"""
from __future__ import annotations

import base64
import hashlib
from pathlib import Path
from typing import Any

from ..devices.errors import ProjectableEdgeError

ALGORITHM = "ed25519"


def _crypto():
    try:
        from cryptography.exceptions import InvalidSignature
        from cryptography.hazmat.primitives import serialization
        from cryptography.hazmat.primitives.asymmetric import ed25519
    except ImportError:
        raise ProjectableEdgeError("Ed25519 signatures need the 'cryptography' package: pip install cryptography "
                                   "(needed only to sign or to check signatures)") from None
    return ed25519, serialization, InvalidSignature


def _load_key(key: Any, private: bool):
    """An Ed25519 key object from a key object, a PEM file path, PEM bytes or 32 raw bytes."""
    ed25519, serialization, _ = _crypto()
    cls = ed25519.Ed25519PrivateKey if private else ed25519.Ed25519PublicKey
    if not private and isinstance(key, ed25519.Ed25519PrivateKey):
        key = key.public_key()
    if isinstance(key, cls):
        return key
    what = "signing key" if private else "public key"
    if private:
        hint, kind = "create one with `openssl genpkey -algorithm ed25519 -out key.pem`", "unencrypted Ed25519 private key"
    else:
        hint, kind = "export it with `openssl pkey -in key.pem -pubout -out key.pub.pem`", "Ed25519 public key"
    if isinstance(key, str) and key.lstrip().startswith("-----BEGIN"):  # PEM text, e.g. from the environment
        key = key.encode()
    elif isinstance(key, str) and not key.strip():  # Path("") would be the current folder
        raise ProjectableEdgeError(f"the {what} path is empty; pass a PEM file")
    if isinstance(key, (str, Path)):
        try:
            data = Path(key).expanduser().read_bytes()
        except OSError as e:
            raise ProjectableEdgeError(f"cannot read the {what} '{Path(key).expanduser()}' ({e.strerror or e}); "
                                       "pass a PEM file") from None
    elif isinstance(key, (bytes, bytearray)):
        data = bytes(key)
    else:
        raise ProjectableEdgeError(f"{what} must be a PEM file path or PEM text, raw 32 bytes or an {kind}, "
                                   f"got {type(key).__name__}")
    try:
        if len(data) == 32 and not isinstance(key, (str, Path)):  # in a file, any 32 bytes would be a key
            return cls.from_private_bytes(data) if private else cls.from_public_bytes(data)
        k = (serialization.load_pem_private_key(data, password=None) if private
             else serialization.load_pem_public_key(data))
    except (ValueError, TypeError) as e:
        name = key if isinstance(key, (str, Path)) else ""
        raise ProjectableEdgeError(f"{what} {name} is not an {kind} in PEM ({e}); {hint}") from None
    if not isinstance(k, cls):
        raise ProjectableEdgeError(f"{what} is a {type(k).__name__}, not Ed25519; {hint}")
    return k


def load_private_key(key: Any):
    return _load_key(key, private=True)


def key_id(pub) -> str:
    """A short fingerprint of a public key: sha256 of its 32 raw bytes, first 16 hex digits."""
    _, serialization, _ = _crypto()
    return hashlib.sha256(pub.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)).hexdigest()[:16]


def sign_digest(key: Any, digest_hex: str) -> dict[str, str]:
    """The manifest's `integrity.signature`: Ed25519 over the 32 bytes of the sha256 digest."""
    k = load_private_key(key)
    sig = k.sign(bytes.fromhex(digest_hex))
    return {"algorithm": ALGORITHM, "key_id": key_id(k.public_key()), "value": base64.b64encode(sig).decode("ascii")}


def verify_signature(public_key: Any, digest_hex: str, signature: Any, what: str) -> None:
    """Raise unless `signature` is a valid Ed25519 signature of the digest by public_key."""
    _, _, invalid = _crypto()
    pub = _load_key(public_key, private=False)
    if not signature:
        raise ProjectableEdgeError(f"{what} is not signed, but a public key was given; regenerate the bundle "
                                   "with `projectable-edge generate --sign-key KEY.pem`")
    if not isinstance(signature, dict) or signature.get("algorithm") != ALGORITHM \
            or not isinstance(signature.get("value"), str):
        raise ProjectableEdgeError(f"{what}: integrity.signature must be {{algorithm: 'ed25519', value: base64}}")
    try:
        pub.verify(base64.b64decode(signature["value"], validate=True), bytes.fromhex(digest_hex))
    except (invalid, ValueError):
        raise ProjectableEdgeError(
            f"{what} signature does not verify with the given public key (key id {key_id(pub)}; signed by "
            f"{signature.get('key_id', '?')}): the bundle was signed with another key or altered — do not use "
            "it; get the bundle from its publisher again") from None
