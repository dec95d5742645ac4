"""Optional C2PA content credentials on the mp4s we write (the third provenance mark, beside the
invisible watermark and the ``comment`` tag of provenance.py).

A signed C2PA manifest is embedded in the mp4 (a top-level ``uuid`` box, written by the
``c2pa-python`` package, which carries the c2pa-rs library in its wheel and needs no network to
sign or read). The manifest names the claim generator (``provenance.GENERATOR_NAME`` and the
version) and holds one ``c2pa.created`` action whose digitalSourceType is
``compositeWithTrainedAlgorithmicMedia``: IPTC's term for media mixing captured and
AI-generated parts, which is what a lip-synced video is (real frames, re-synthesised lower face);
``trainedAlgorithmicMedia`` would claim the whole picture was generated. A hard binding (the
BMFF hash) covers every other byte, so any change to the file invalidates the manifest, and a
remux (ComfyUI's Save Video copies the streams into a new container) drops it: docs/provenance.md.

The signer is the user's: a PEM certificate chain (end-entity certificate first, then its CA(s);
c2pa refuses self-signed end-entity certificates and wants digitalSignature key usage and an
accepted extended key usage: emailProtection works, documentSigning alone is refused by c2pa-python
0.38) and its PEM private key (EC
P-256/384/521 -> ES256/384/512, RSA -> PS256, Ed25519). ``Credentials.load`` checks both files
and signs a tiny mp4 in memory, so a bad certificate or key fails with a message naming the file
before any long work. ``c2pa-python`` is optional: without it signing raises InputError and
reading reports "not checked (package not installed)".
"""
from __future__ import annotations

import io
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from .errors import InputError

DIGITAL_SOURCE_TYPE = "http://cv.iptc.org/newscodes/digitalsourcetype/compositeWithTrainedAlgorithmicMedia"
ACTION = "c2pa.created"
MIME = "video/mp4"


def available() -> bool:
    """True when ``c2pa-python`` imports (its native library ships in the wheel)."""
    try:
        import c2pa  # noqa: F401
    except Exception:
        return False
    return True


def _c2pa():
    try:
        import c2pa
    except Exception as e:
        raise InputError(f"C2PA content credentials need the package c2pa-python ({type(e).__name__}: {e}); "
                         f"install it (pip install c2pa-python) or leave the certificate and key empty") from None
    return c2pa


def _read_pem(path: str | Path, what: str) -> bytes:
    p = Path(path)
    if not p.is_file():
        raise InputError(f"{p}: C2PA {what} file not found")
    data = p.read_bytes()
    if b"-----BEGIN " not in data:
        raise InputError(f"{p}: not a PEM file (expected the C2PA {what} in PEM, '-----BEGIN ...')")
    return data


def _algorithm(key_pem: bytes, key_path: Path) -> str:
    """The C2PA signing algorithm for a PEM private key (cryptography ships with c2pa-python)."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa

    try:
        key = serialization.load_pem_private_key(key_pem, password=None)
    except TypeError:
        raise InputError(f"{key_path}: the C2PA private key is encrypted; give an unencrypted PEM key") from None
    except ValueError as e:
        raise InputError(f"{key_path}: not a readable PEM private key ({e})") from None
    if isinstance(key, ec.EllipticCurvePrivateKey):
        alg = {"secp256r1": "es256", "secp384r1": "es384", "secp521r1": "es512"}.get(key.curve.name)
        if alg is None:
            raise InputError(f"{key_path}: EC curve {key.curve.name}: C2PA signs with P-256, P-384 or P-521")
        return alg
    if isinstance(key, rsa.RSAPrivateKey):
        return "ps256"
    if isinstance(key, ed25519.Ed25519PrivateKey):
        return "ed25519"
    raise InputError(f"{key_path}: a {type(key).__name__}; C2PA signs with EC (P-256/384/521), RSA or Ed25519 keys")


def _check_pair(cert_pem: bytes, cert_path: Path, key_pem: bytes, key_path: Path) -> None:
    """The first certificate of the chain must hold the private key's public key."""
    from cryptography import x509
    from cryptography.hazmat.primitives import serialization

    try:
        certs = x509.load_pem_x509_certificates(cert_pem)
    except ValueError as e:
        raise InputError(f"{cert_path}: not a readable PEM certificate chain ({e})") from None
    key = serialization.load_pem_private_key(key_pem, password=None)
    fmt = (serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    if certs[0].public_key().public_bytes(*fmt) != key.public_key().public_bytes(*fmt):
        raise InputError(f"{key_path}: this private key does not belong to the first certificate of {cert_path} "
                         f"(the chain must start with the signer's own certificate)")


def _tiny_mp4() -> bytes:
    """A 2-frame 16x16 h264 mp4 in memory, for the signing check."""
    import av
    import numpy as np

    buf = io.BytesIO()
    with av.open(buf, mode="w", format="mp4") as c:
        s = c.add_stream("libx264", rate=25)
        s.width = s.height = 16
        s.pix_fmt = "yuv420p"
        for i in range(2):
            f = av.VideoFrame.from_ndarray(np.full((16, 16, 3), 60 * i, np.uint8), format="rgb24")
            for p in s.encode(f):
                c.mux(p)
        for p in s.encode(None):
            c.mux(p)
    return buf.getvalue()


def manifest_definition(title: str, generator_version: str | None = None) -> dict[str, Any]:
    from .provenance import GENERATOR_NAME, _version

    return {
        "claim_generator_info": [{"name": GENERATOR_NAME, "version": generator_version or _version()}],
        "title": title,
        "format": MIME,
        "assertions": [{
            "label": "c2pa.actions",
            "data": {"actions": [{
                "action": ACTION,
                "digitalSourceType": DIGITAL_SOURCE_TYPE,
                "softwareAgent": {"name": GENERATOR_NAME, "version": generator_version or _version()},
                "description": "AI lip-synced video: the lower face of each frame re-synthesised to new speech",
            }]},
        }],
    }


@dataclass
class Credentials:
    """A checked C2PA signer (certificate chain + private key); ``sign_file`` embeds a manifest."""

    cert_path: Path
    key_path: Path
    cert_pem: bytes
    key_pem: bytes
    alg: str

    @classmethod
    def load(cls, cert: str | Path, key: str | Path) -> "Credentials":
        """Read and check both PEM files and sign a tiny mp4 with them (c2pa's own certificate
        checks run at signing); InputError naming the file on any problem."""
        cert_path, key_path = Path(cert), Path(key)
        cert_pem, key_pem = _read_pem(cert_path, "certificate chain"), _read_pem(key_path, "private key")
        c2pa = _c2pa()
        alg = _algorithm(key_pem, key_path)
        _check_pair(cert_pem, cert_path, key_pem, key_path)
        creds = cls(cert_path, key_path, cert_pem, key_pem, alg)
        try:
            creds._sign_stream(io.BytesIO(_tiny_mp4()), io.BytesIO(), "check.mp4")
        except c2pa.C2paError as e:
            raise InputError(f"{cert_path} / {key_path}: c2pa will not sign with this certificate and key: {e} "
                             f"(docs/provenance.md says what the certificate needs)") from None
        return creds

    def _sign_stream(self, src: Any, dst: Any, title: str) -> None:
        c2pa = _c2pa()
        signer = c2pa.Signer.from_info(c2pa.C2paSignerInfo(self.alg, self.cert_pem, self.key_pem, None))
        with c2pa.Builder(manifest_definition(title)) as builder:
            builder.sign(signer, MIME, src, dst)

    def sign_file(self, src: str | Path, dst: str | Path, title: str | None = None) -> None:
        """Write ``src`` (an mp4) with an embedded, signed manifest to ``dst`` (a different path)."""
        src, dst = Path(src), Path(dst)
        if src.resolve() == dst.resolve():
            raise InputError(f"{dst}: C2PA signing needs a separate output path")
        c2pa = _c2pa()
        try:
            with open(src, "rb") as s, open(dst, "w+b") as d:
                self._sign_stream(s, d, title or dst.name)
        except c2pa.C2paError as e:
            raise InputError(f"{src}: C2PA signing failed: {e}") from None

    def finalizer(self, title: str) -> Callable[[Path], None]:
        """A ``finalize(path)`` for video.VideoWriter / video.remux: signs the finished temp file
        in place (via a sibling temp file, so a failure leaves the writer to delete both)."""
        import os
        import tempfile

        def sign_in_place(path: Path) -> None:
            path = Path(path)
            fd, tmp = tempfile.mkstemp(prefix=f".{path.stem}.", suffix=".c2pa.mp4", dir=path.parent)
            os.close(fd)
            try:
                self.sign_file(path, tmp, title)
                os.replace(tmp, path)
            except BaseException:
                Path(tmp).unlink(missing_ok=True)
                raise

        return sign_in_place


def load_credentials(cert: str | Path | None, key: str | Path | None) -> Credentials | None:
    """Credentials for a certificate + key pair; None when both are empty; InputError when only
    one is given or either is bad."""
    cert = str(cert).strip() if cert is not None else ""
    key = str(key).strip() if key is not None else ""
    if not cert and not key:
        return None
    if not cert or not key:
        raise InputError("C2PA content credentials need both a certificate chain and a private key (PEM); "
                         f"got only the {'certificate' if cert else 'key'} ({cert or key})")
    return Credentials.load(cert, key)


# ---------------------------------------------------------------------------------------------
# reading

@dataclass
class CredentialsReport:
    """What a file's C2PA manifest says. ``status``: "valid" (signature and hash check out; the
    signer is not in a trust list given), "trusted" (valid and chains to a given trust anchor),
    "invalid", "absent" (no manifest), "not checked" (c2pa-python missing)."""

    status: str
    detail: str = ""
    signer: str | None = None  # the certificate's common name (and issuer)
    generator: str | None = None  # claim generator name and version
    actions: list[str] = field(default_factory=list)
    digital_source_types: list[str] = field(default_factory=list)
    failures: list[str] = field(default_factory=list)  # c2pa validation failure codes

    @property
    def names_generator(self) -> bool:
        from .provenance import GENERATOR

        return bool(self.generator and GENERATOR.lower() in self.generator.lower())


def read_credentials(path: str | Path, trust_anchors: str | Path | None = None) -> CredentialsReport:
    """Read and validate the C2PA manifest of ``path``; ``trust_anchors`` (PEM CA certificates)
    also checks that the signer chains to one of them."""
    try:
        import c2pa
    except Exception as e:
        return CredentialsReport("not checked", f"package c2pa-python not installed ({type(e).__name__})")
    ctx = None
    if trust_anchors is not None:
        anchors = _read_pem(trust_anchors, "trust anchor").decode("utf-8", "replace")
        ctx = c2pa.Context(c2pa.Settings.from_dict({"trust": {"trust_anchors": anchors},
                                                    "verify": {"verify_trust": True}}))
    try:
        reader = c2pa.Reader(str(path), context=ctx) if ctx is not None else c2pa.Reader(str(path))
    except c2pa.C2paError.ManifestNotFound:
        return CredentialsReport("absent", "no C2PA manifest in the file")
    except c2pa.C2paError.NotSupported as e:  # e.g. a container c2pa cannot read (.mkv, .avi)
        return CredentialsReport("not checked", f"c2pa does not read this file type ({e})")
    except c2pa.C2paError as e:
        return CredentialsReport("invalid", f"the C2PA data could not be read: {e}")
    with reader:
        manifest = reader.get_active_manifest() or {}
        state = (reader.get_validation_state() or "").lower()
        results = reader.get_validation_results() or {}
    failures = [f.get("code", "?") for f in (results.get("activeManifest") or {}).get("failure", [])]
    # without a trust list every signer is "untrusted"; that alone leaves the manifest valid
    hard = [f for f in failures if f != "signingCredential.untrusted" or trust_anchors is not None]
    if state == "trusted" and not hard:
        status = "trusted"
    elif state in ("valid", "trusted") and not hard:
        status = "valid"
    else:
        status = "invalid"
    sig = manifest.get("signature_info") or {}
    signer = sig.get("common_name") or sig.get("issuer")
    if signer and sig.get("issuer") and sig.get("issuer") != signer:
        signer = f"{signer} (issued by {sig['issuer']})"
    gens = manifest.get("claim_generator_info") or []
    generator = ", ".join(f"{g.get('name', '?')} {g.get('version', '')}".strip() for g in gens) or \
        manifest.get("claim_generator")
    actions, sources = [], []
    for a in manifest.get("assertions", []):
        if str(a.get("label", "")).startswith("c2pa.actions"):
            for act in (a.get("data") or {}).get("actions", []):
                actions.append(str(act.get("action")))
                if act.get("digitalSourceType"):
                    sources.append(str(act["digitalSourceType"]).rsplit("/", 1)[-1])
    detail = {"trusted": "signature and content hash valid; signer chains to a given trust anchor",
              "valid": "signature and content hash valid" + ("" if trust_anchors is not None else
                                                           " (signer not checked against a trust list)"),
              "invalid": "manifest does not validate: " + ", ".join(hard or failures or [state or "?"])}[status]
    return CredentialsReport(status, detail, signer, generator, actions, sources, failures)


def report_dict(r: CredentialsReport) -> dict[str, Any]:
    from dataclasses import asdict

    return {**asdict(r), "names_generator": r.names_generator}


__all__ = ["available", "Credentials", "load_credentials", "CredentialsReport", "read_credentials",
           "report_dict", "manifest_definition", "DIGITAL_SOURCE_TYPE", "ACTION"]
