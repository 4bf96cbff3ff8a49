"""Patch signatures with OpenSSF model signing: sigstore bundles made with an elliptic-curve key (offline).

The server verifies patch bytes against the PEM public keys of DMP_PATCH_PUBLIC_KEYS; the trainer signs the files
it writes. A bundle made by the stock CLI (`model_signing sign key --private_key k.pem --signature p.sig
p.safetensors`) verifies as is, whatever the file was called when it was signed.
"""
from __future__ import annotations

import hashlib
import json
import tempfile
from collections.abc import Sequence
from pathlib import Path

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from app.core.errors import PatchError

MAX_SIGNATURE_BYTES = 64 * 1024  # a key-signed bundle is about 1.4 KB


class UnsignedPatch(PatchError):
    error_type = "unsigned_patch"


class BadSignature(PatchError):
    error_type = "bad_signature"


def key_id(public_pem: bytes) -> str:
    """The key's id as model signing writes it in a bundle's hint: sha256 of its SubjectPublicKeyInfo PEM."""
    key = serialization.load_pem_public_key(public_pem)
    spki = key.public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    return hashlib.sha256(spki).hexdigest()


def bundle_hint(bundle: bytes) -> str | None:
    """The signer's key id a bundle names, or None when it names none (or is not a bundle at all)."""
    try:
        hint = json.loads(bundle)["verificationMaterial"]["publicKey"]["hint"]
    except (ValueError, TypeError, KeyError, RecursionError):
        return None
    return hint if isinstance(hint, str) else None


class PatchVerifier:
    """Checks that patch bytes carry a valid model-signing bundle by one of the trusted public keys."""

    def __init__(self, key_paths: Sequence[str | Path]):
        self.keys: dict[str, Path] = {}
        for path in key_paths:
            try:
                pem = Path(path).read_bytes()
                if not isinstance(serialization.load_pem_public_key(pem), ec.EllipticCurvePublicKey):
                    raise ValueError("model signing keys are elliptic-curve keys (e.g. P-256)")
                self.keys[key_id(pem)] = Path(path)
            except (OSError, ValueError, TypeError) as e:
                raise ValueError(f"{path} is not a readable PEM public key ({e})") from None

    def verify(self, data: bytes, bundle: bytes | None) -> str:
        """The signer's key id; raises UnsignedPatch (no bundle) or BadSignature (anything else wrong)."""
        from model_signing import verifying

        if not bundle:
            raise UnsignedPatch("this server accepts only signed patches (DMP_PATCH_PUBLIC_KEYS): send the "
                                "model-signing bundle base64-encoded in X-DMP-Signature")
        if len(bundle) > MAX_SIGNATURE_BYTES:
            raise BadSignature(f"signature bundle is over {MAX_SIGNATURE_BYTES} bytes")
        hint = bundle_hint(bundle)
        if hint is not None and hint not in self.keys:
            raise BadSignature(f"signed by key {hint[:16]}…, which is not one of DMP_PATCH_PUBLIC_KEYS")
        candidates = [hint] if hint is not None else list(self.keys)
        why = "no key to try"
        with tempfile.TemporaryDirectory(prefix="dmp-verify-") as tmp:
            patch, signature = Path(tmp) / "patch.safetensors", Path(tmp) / "patch.safetensors.sig"
            patch.write_bytes(data)
            signature.write_bytes(bundle)
            for kid in candidates:
                # a fresh Config per check: it caches the hashing settings of the first model it verified
                config = verifying.Config().use_elliptic_key_verifier(public_key=self.keys[kid])
                try:
                    config.verify(patch, signature)
                    return kid
                except Exception as e:  # noqa: BLE001  the bundle is untrusted: whatever fails to parse or match
                    why = f"{e.__class__.__name__}: {str(e)[:120]}"
        raise BadSignature(f"the signature does not verify for these bytes with any key of DMP_PATCH_PUBLIC_KEYS "
                           f"({why})")


def check_private_key(path: Path) -> None:
    """Fail before any work when the signing key is not an unencrypted EC private key model signing can use."""
    try:
        key = serialization.load_pem_private_key(Path(path).read_bytes(), password=None)
    except (OSError, ValueError, TypeError) as e:
        raise ValueError(f"--sign-key {path}: not a readable unencrypted PEM private key ({e})") from None
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise ValueError(f"--sign-key {path}: model signing needs an elliptic-curve key (e.g. P-256), not "
                         f"{key.__class__.__name__}")


def sign_file(path: Path, private_key: Path) -> Path:
    """Write `<path>.sig` beside a patch file, the bundle `model_signing verify key` checks."""
    from model_signing import signing

    signature = Path(f"{path}.sig")
    signing.Config().use_elliptic_key_signer(private_key=private_key).sign(Path(path), signature)
    return signature
