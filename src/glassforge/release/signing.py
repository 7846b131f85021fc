"""OpenSSF Model Signing over a release folder, made and checked by the `model-signing` library.

`glassforge release RUN --sign-key KEY` and `glassforge sign RELEASE --key
KEY` write `model.sig` into the release: a Sigstore bundle (v0.3 JSON) whose
DSSE envelope holds an in-toto statement listing the sha256 of every file of
the release but `model.sig` itself (predicate
`https://model_signing/signature/v1.0`), signed with an ECDSA key (P-256,
P-384 or P-521: model-signing's key mode takes no other) offline, with no
transparency log. `attestation.json`, `manifest.json` and `croissant.json` are
files of the release like any other, so the one signature covers the
training statement, every file hash and the data description. The signer's
public key ships beside it as `signing_key.pub` (covered too), which lets
anyone check that the signature is whole; trusting the signer means checking
with a key obtained elsewhere (`glassforge verify --public-key`).

Anyone can check the signature without glassforge:

    model_signing verify key RELEASE --signature RELEASE/model.sig --public_key key.pub

and `glassforge verify` checks it through the same library. Make a key with

    openssl genpkey -algorithm EC -pkeyopt ec_paramgen_curve:P-256 -out key.pem
    openssl pkey -in key.pem -pubout -out key.pub

Key files are checked here first, so a key of the wrong kind or format is a
one-line error naming the file, never the library's traceback.
"""

from __future__ import annotations

import base64
import hashlib
import json
import tempfile
from pathlib import Path

from glassforge.core.errors import UserError
from glassforge.core.files import atomic_write_bytes
from glassforge.core.hashing import sha256_file
from glassforge.core.runfolder import Release

Claim = tuple[str, bool, str]
CURVES = {"secp256r1": "P-256", "secp384r1": "P-384", "secp521r1": "P-521"}
MAKE_KEY = "make one: openssl genpkey -algorithm EC -pkeyopt ec_paramgen_curve:P-256 -out key.pem"
PREDICATE_TYPE = "https://model_signing/signature/v1.0"


def _kind(key) -> str:
    from cryptography.hazmat.primitives.asymmetric import ec

    if isinstance(key, (ec.EllipticCurvePrivateKey, ec.EllipticCurvePublicKey)):
        return f"an ECDSA key on curve {key.curve.name}"
    return f"an {type(key).__name__.removeprefix('_').replace('PrivateKey', '').replace('PublicKey', '')} key"


def _check_curve(key, option: str, path: Path):
    from cryptography.hazmat.primitives.asymmetric import ec

    if not isinstance(key, (ec.EllipticCurvePrivateKey, ec.EllipticCurvePublicKey)) or key.curve.name not in CURVES:
        raise UserError(f"{option} {path}: {_kind(key)}; OpenSSF Model Signing's key mode takes ECDSA P-256, P-384 "
                        f"or P-521 keys ({MAKE_KEY})")
    return key


def _load_key(path: Path, option: str, private: bool):
    """The ECDSA key (private or public) in a PEM file; a UserError naming the option and file for anything else."""
    from cryptography.exceptions import UnsupportedAlgorithm
    from cryptography.hazmat.primitives import serialization

    path = Path(path)
    if not path.is_file():
        raise UserError(f"{option} {path}: no such file")
    data = path.read_bytes()
    if private and b"-----BEGIN PUBLIC KEY-----" in data:
        raise UserError(f"{option} {path}: a public key; signing takes the private key (its public half goes "
                        f"to --public-key)")
    if not private and b"PRIVATE KEY-----" in data:
        raise UserError(f"{option} {path}: a private key; give its public half "
                        f"(openssl pkey -in {path} -pubout -out key.pub)")
    try:
        key = serialization.load_pem_private_key(data, password=None) if private else \
            serialization.load_pem_public_key(data)
    except TypeError:  # only a private key has a password
        raise UserError(f"{option} {path}: an encrypted private key; give an unencrypted one "
                        f"(openssl pkey -in {path} -out plain.pem)") from None
    except (ValueError, UnsupportedAlgorithm):
        raise UserError(f"{option} {path}: not a PEM {'private' if private else 'public'} key ("
                        + (MAKE_KEY if private else "make one from the private key: openssl pkey -in key.pem -pubout "
                                                    "-out key.pub") + ")") from None
    return _check_curve(key, option, path)


def load_private_key(path: Path, option: str = "--key"):
    return _load_key(path, option, private=True)


def load_public_key(path: Path, option: str = "--public-key"):
    return _load_key(path, option, private=False)


def public_pem(key) -> bytes:
    from cryptography.hazmat.primitives import serialization

    return key.public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)


def key_id(public_key) -> str:
    """sha256 of the key's PEM SubjectPublicKeyInfo: the hint model-signing records in the bundle."""
    return hashlib.sha256(public_pem(public_key)).hexdigest()


def _hashing_config(rel: Release):
    from model_signing import hashing

    return hashing.Config().set_ignored_paths(paths=[rel.signature.name])


def sign_release(release: Path, key_path: Path, option: str = "--key") -> dict:
    """Write model.sig (and signing_key.pub) into a release with model-signing; what was signed, for the CLI."""
    from model_signing import signing

    rel = Release(release)
    key = load_private_key(Path(key_path), option)  # before anything is written
    old_key = rel.signing_key.read_bytes() if rel.signing_key.is_file() else None
    atomic_write_bytes(rel.signing_key, public_pem(key.public_key()))  # signed over, with every other file
    try:
        with tempfile.TemporaryDirectory() as tmp:
            out = Path(tmp) / rel.signature.name
            signing.Config().use_elliptic_key_signer(private_key=Path(key_path)).set_hashing_config(
                _hashing_config(rel)).sign(rel.root, out)
            atomic_write_bytes(rel.signature, out.read_bytes())
    except BaseException:
        if old_key is None:
            rel.signing_key.unlink(missing_ok=True)
        else:
            atomic_write_bytes(rel.signing_key, old_key)
        raise
    resources = signed_resources(rel.signature)
    return {"signature": str(rel.signature), "public_key": str(rel.signing_key),
            "key_id": key_id(key.public_key()), "curve": CURVES[key.curve.name], "files": len(resources)}


def signed_statement(signature: Path) -> dict:
    """The in-toto statement inside a model-signing bundle (read as JSON; trust it only once verified)."""
    bundle = json.loads(Path(signature).read_text(encoding="utf-8"))
    return json.loads(base64.b64decode(bundle["dsseEnvelope"]["payload"]))


def signed_resources(signature: Path) -> dict[str, str]:
    """File name -> sha256 of every file the signature lists."""
    stmt = signed_statement(signature)
    return {r["name"]: r["digest"] for r in (stmt.get("predicate") or {}).get("resources", [])}


def _what_changed(rel: Release) -> str:
    """After model-signing found the files differ from an authentic signature: which ones, from its statement."""
    stmt = signed_statement(rel.signature)
    signed = {r["name"]: r["digest"] for r in stmt["predicate"]["resources"]}
    ignored = set(stmt["predicate"]["serialization"].get("ignore_paths") or [])
    present = {p.relative_to(rel.root).as_posix() for p in rel.root.rglob("*") if p.is_file()}
    present = {p for p in present if not any(p == i or p.startswith(i.rstrip("/") + "/") for i in ignored)}
    parts = []
    changed = sorted(n for n in signed.keys() & present if sha256_file(rel.root / n) != signed[n])
    for label, names in (("changed", changed), ("added", sorted(present - signed.keys())),
                         ("missing", sorted(signed.keys() - present))):
        if names:
            parts.append(f"{label}: " + ", ".join(names[:5]) + (f" (+{len(names) - 5} more)" if len(names) > 5 else ""))
    return "; ".join(parts) or "the files differ from the signed digests"


def check_signature(release: Path, public_key: Path | None) -> list[Claim]:
    """The model-signing signature of a release, checked by model-signing; [] for an unsigned release unless
    a --public-key asks for a signature."""
    from cryptography.exceptions import InvalidSignature
    from model_signing import verifying

    rel = Release(release)
    if not rel.signature.is_file():
        if public_key is not None:
            return [("signature", False, f"--public-key given but the release is not signed (no {rel.signature.name})")]
        return []
    if public_key is not None:
        key_path, key = Path(public_key), load_public_key(Path(public_key))  # a bad --public-key: exit 2
        source = f"--public-key {public_key}"
    elif rel.signing_key.is_file():
        try:
            key_path, key = rel.signing_key, load_public_key(rel.signing_key, "the release's")
        except UserError as e:
            return [("signature", False, str(e))]
        source = f"the key shipped in {rel.signing_key.name} (pass --public-key to check it is one you trust)"
    else:
        return [("signature", False, f"signed, but no {rel.signing_key.name} to check it with: pass --public-key")]
    try:
        verifying.Config().use_elliptic_key_verifier(public_key=key_path).verify(rel.root, rel.signature)
        resources = signed_resources(rel.signature)
    except InvalidSignature:
        return [("signature", False, f"{rel.signature.name}: the signature does not verify with {source}")]
    except ValueError as e:
        msg = str(e)
        if msg.startswith("Signature mismatch"):
            return [("signature", False, f"the release changed since it was signed ({_what_changed(rel)})")]
        if msg.startswith("Key mismatch"):
            return [("signature", False, f"{rel.signature.name} was signed with another key than {source}")]
        return [("signature", False, f"{rel.signature.name}: not a model-signing signature ({msg.splitlines()[0]})")]
    except Exception as e:  # noqa: BLE001 - a damaged bundle fails in the JSON, base64 or protobuf reader
        return [("signature", False, f"{rel.signature.name}: not a model-signing signature "
                                     f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})")]
    must = [rel.attestation.name, rel.manifest.name, rel.weights.name]
    missing = [name for name in must if name not in resources]
    if missing:
        return [("signature", False, f"verifies, but does not cover {', '.join(missing)}")]
    return [("signature", True, f"OpenSSF Model Signing (model-signing), ECDSA {CURVES[key.curve.name]} key "
                                f"{key_id(key)[:16]}..., over {len(resources)} files with {', '.join(must)} among "
                                f"them, verifies with {source}")]
