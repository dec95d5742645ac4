"""C2PA content credentials (content_credentials.py): signed with a certificate chain the test makes
itself (a CA and an end-entity certificate, ES256 or PS256), read back valid / trusted, invalid after
a one-byte change, gone after a stream copy; bad certificates and keys refused before any work with
the file named; the sync CLI, the pipeline and TalkFormer Mark Video sign; detect reports all three
marks; without c2pa-python detect says the credentials were not checked."""
from __future__ import annotations

import datetime as dt
import os
import subprocess
import sys
from pathlib import Path

import pytest

from pipeline_helpers import save_tiny_checkpoint, synthetic_clip, write_video, write_wav
from talkformer_core import content_credentials as cc
from talkformer_core import detect
from talkformer_core import provenance as pv
from talkformer_core.errors import InputError

pytest.importorskip("c2pa")
x509 = pytest.importorskip("cryptography.x509")

ROOT = Path(__file__).resolve().parents[1]


def make_chain(d: Path, kind: str = "ec", eku: str = "email") -> dict[str, Path]:
    """A test CA and a signer certificate issued by it (what c2pa accepts: v3, the signer not a CA,
    digitalSignature key usage, the extended key usage emailProtection; c2pa-python 0.38 refuses
    documentSigning alone).
    -> paths of chain.pem (signer first, then the CA), key.pem (the signer's), ca.pem, ca_key.pem."""
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec, rsa
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID, ObjectIdentifier

    def new_key():
        return ec.generate_private_key(ec.SECP256R1()) if kind == "ec" else \
            rsa.generate_private_key(public_exponent=65537, key_size=2048)

    def name(cn):
        return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn),
                          x509.NameAttribute(NameOID.ORGANIZATION_NAME, "TalkFormer test")])

    def usage(sign: bool, ca: bool):
        return x509.KeyUsage(digital_signature=sign, content_commitment=False, key_encipherment=False,
                             data_encipherment=False, key_agreement=False, key_cert_sign=ca, crl_sign=ca,
                             encipher_only=False, decipher_only=False)

    now = dt.datetime.now(dt.timezone.utc)
    ca_key, key = new_key(), new_key()
    ca = (x509.CertificateBuilder().subject_name(name("TalkFormer test CA")).issuer_name(name("TalkFormer test CA"))
          .public_key(ca_key.public_key()).serial_number(x509.random_serial_number())
          .not_valid_before(now - dt.timedelta(days=1)).not_valid_after(now + dt.timedelta(days=30))
          .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
          .add_extension(usage(False, True), critical=True)
          .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), critical=False)
          .sign(ca_key, hashes.SHA256()))
    issuer_key, issuer = ca_key, ca.subject
    ekus = {"email": [ExtendedKeyUsageOID.EMAIL_PROTECTION],
            "document": [ObjectIdentifier("1.3.6.1.5.5.7.3.36")]}[eku]  # id-kp-documentSigning
    ee = (x509.CertificateBuilder().subject_name(name("TalkFormer test signer")).issuer_name(issuer)
          .public_key(key.public_key()).serial_number(x509.random_serial_number())
          .not_valid_before(now - dt.timedelta(days=1)).not_valid_after(now + dt.timedelta(days=30))
          .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
          .add_extension(usage(True, False), critical=True)
          .add_extension(x509.ExtendedKeyUsage(ekus), critical=False)
          .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
          .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(issuer_key.public_key()), critical=False)
          .sign(issuer_key, hashes.SHA256()))
    pem = serialization.Encoding.PEM
    d.mkdir(parents=True, exist_ok=True)
    paths = {"chain": d / "chain.pem", "key": d / "key.pem", "ca": d / "ca.pem", "ca_key": d / "ca_key.pem"}
    paths["chain"].write_bytes(ee.public_bytes(pem) + ca.public_bytes(pem))
    for k, which in ((key, "key"), (ca_key, "ca_key")):
        paths[which].write_bytes(k.private_bytes(pem, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()))
    paths["ca"].write_bytes(ca.public_bytes(pem))
    return paths


@pytest.fixture(scope="module")
def chain(tmp_path_factory):
    return make_chain(tmp_path_factory.mktemp("c2pa_ec"))


@pytest.fixture(scope="module")
def small_mp4(tmp_path_factory):
    clip = synthetic_clip(1, 0.8, 128)
    return write_video(tmp_path_factory.mktemp("c2pa_v") / "v.mp4", clip.frames[:8], audio=clip.audio[:5120])


@pytest.mark.parametrize("kind,eku", [("ec", "email"), ("rsa", "email")])
def test_sign_and_read_back(tmp_path, small_mp4, kind, eku):
    paths = make_chain(tmp_path / kind, kind, eku)
    creds = cc.load_credentials(paths["chain"], paths["key"])
    assert creds.alg == {"ec": "es256", "rsa": "ps256"}[kind]
    out = tmp_path / "signed.mp4"
    creds.sign_file(small_mp4, out)
    r = cc.read_credentials(out)
    assert r.status == "valid" and r.names_generator
    assert r.generator == f"{pv.GENERATOR_NAME} {pv._version()}"
    assert r.signer.startswith("TalkFormer test signer") and "TalkFormer test" in r.signer
    assert r.actions == [cc.ACTION] and r.digital_source_types == ["compositeWithTrainedAlgorithmicMedia"]
    assert cc.read_credentials(out, trust_anchors=paths["ca"]).status == "trusted"
    other = make_chain(tmp_path / "other", kind, eku)  # a trust list that does not hold our CA
    assert cc.read_credentials(out, trust_anchors=other["ca"]).status == "invalid"


def test_any_change_invalidates_and_a_stream_copy_drops_it(tmp_path, small_mp4, chain):
    from talkformer_core.video import remux

    out = tmp_path / "signed.mp4"
    cc.load_credentials(chain["chain"], chain["key"]).sign_file(small_mp4, out)
    data = bytearray(out.read_bytes())
    i = data.find(b"mdat") + 100  # one byte of the coded video
    data[i] ^= 0xFF
    (tmp_path / "tampered.mp4").write_bytes(bytes(data))
    r = cc.read_credentials(tmp_path / "tampered.mp4")
    assert r.status == "invalid" and "assertion.bmffHash.mismatch" in r.failures
    remux(out, tmp_path / "copied.mp4")  # what Save Video's "auto" stream copy does to a file
    assert cc.read_credentials(tmp_path / "copied.mp4").status == "absent"
    assert cc.read_credentials(small_mp4).status == "absent"


def test_bad_certificates_and_keys_are_refused_naming_the_file(tmp_path, chain):
    other = make_chain(tmp_path / "other")
    docsign = make_chain(tmp_path / "doc", eku="document")  # c2pa-python 0.38 does not accept documentSigning
    (tmp_path / "text.pem").write_text("hello")
    cases = [
        ((tmp_path / "none.pem", chain["key"]), "none.pem", "not found"),
        ((tmp_path / "text.pem", chain["key"]), "text.pem", "not a PEM file"),
        ((chain["chain"], other["key"]), str(other["key"]), "does not belong"),
        ((chain["ca"], chain["key"]), str(chain["key"]), "does not belong"),  # the CA alone: not the signer
        ((chain["ca"], chain["ca_key"]), str(chain["ca"]), "self-signed"),  # a CA certificate as signer
        ((docsign["chain"], docsign["key"]), str(docsign["chain"]), "EKU"),
        ((chain["chain"], ""), str(chain["chain"]), "both"),
    ]
    for (cert, key), named, says in cases:
        with pytest.raises(InputError) as e:
            cc.load_credentials(cert, key)
        assert named in str(e.value) and says in str(e.value), str(e.value)
    assert cc.load_credentials("", " ") is None and cc.load_credentials(None, None) is None


def test_without_the_package_detect_says_not_checked(monkeypatch, small_mp4):
    monkeypatch.setitem(sys.modules, "c2pa", None)  # import c2pa -> ImportError
    r = cc.read_credentials(small_mp4)
    assert r.status == "not checked" and "not installed" in r.detail
    assert not cc.available()
    with pytest.raises(InputError, match="c2pa-python"):
        cc.Credentials._sign_stream(None, None, None, "x")


def test_sync_cli_refuses_a_bad_key_before_work_and_signs_with_a_good_one(tmp_path, chain):
    clip = synthetic_clip(1, 0.8, 256)
    video = write_video(tmp_path / "t.mp4", clip.frames[:10], audio=clip.audio[:6400])
    audio = write_wav(tmp_path / "a.wav", clip.audio[:6400])  # 0.4 s -> 10 frames
    ckpt = save_tiny_checkpoint(tmp_path / "tiny.safetensors")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    base = [sys.executable, "-m", "talkformer_core.sync", "--video", str(video), "--audio", str(audio),
            "--checkpoint", str(ckpt), "--steps", "1"]
    bad = subprocess.run(base + ["--out", str(tmp_path / "bad.mp4"), "--c2pa-cert", str(chain["chain"]),
                                 "--c2pa-key", str(tmp_path / "missing.pem")],
                         capture_output=True, text=True, cwd=ROOT, env=env, timeout=300)
    assert bad.returncode == 2 and "missing.pem" in bad.stderr and "Traceback" not in bad.stderr
    assert not (tmp_path / "bad.mp4").exists()
    out = tmp_path / "signed.mp4"
    ok = subprocess.run(base + ["--out", str(out), "--no-watermark", "--c2pa-cert", str(chain["chain"]),
                                "--c2pa-key", str(chain["key"])],
                        capture_output=True, text=True, cwd=ROOT, env=env, timeout=600)
    assert ok.returncode == 0, ok.stderr
    assert sorted(p.name for p in tmp_path.iterdir() if p.suffix == ".mp4") == ["signed.mp4", "t.mp4"]
    det = subprocess.run([sys.executable, "-m", "talkformer_core.detect", str(out), "--frames", "4",
                          "--c2pa-trust", str(chain["ca"])],
                         capture_output=True, text=True, cwd=ROOT, env=env, timeout=300)
    assert det.returncode == 1, det.stderr  # no watermark asked for, none found
    assert "the tag says no watermark was embedded" in det.stdout
    assert "C2PA credentials trusted (signer TalkFormer test signer" in det.stdout
    assert "watermark not found" not in det.stdout


def test_mark_video_node_tags_copies_and_signs(tmp_path, chain):
    """TalkFormer Mark Video: streams copied bit-exact (no re-encode), the tag says what the frames
    carry (measured), the C2PA manifest valid; a bad key fails before any file is made."""
    import av

    from talkformer_core import pipeline as P
    from talkformer_core.detect import detect_file
    from test_nodes import node

    clip = synthetic_clip(1, 0.8, 256)
    frames = clip.frames[:12]
    a = P.analyze_frames(frames, 64)
    marked = pv.Watermarker().embed_regions(frames, a.boxes)
    src = write_video(tmp_path / "blended.mp4", marked, audio=clip.audio[:7680], crf=18)
    plain = write_video(tmp_path / "plain.mp4", frames, crf=18)
    mark = node("TalkFormerMarkVideo")
    with pytest.raises(InputError, match="nokey.pem"):
        mark.mark(str(src), c2pa_cert=str(chain["chain"]), c2pa_key=str(tmp_path / "nokey.pem"))
    (out,) = mark.mark(str(src), c2pa_cert=str(chain["chain"]), c2pa_key=str(chain["key"]))
    path = Path(out.get_stream_source())
    r = detect_file(path, frames=12)
    assert r.tag_claims_watermark is True and r.watermark_found and r.tag_names_generator
    assert r.c2pa["status"] == "valid" and r.c2pa["names_generator"]
    with av.open(str(src)) as x, av.open(str(path)) as y:  # the same coded packets: no re-encode
        px = [bytes(p) for p in x.demux(x.streams.video[0]) if p.size]
        py = [bytes(p) for p in y.demux(y.streams.video[0]) if p.size]
        assert px == py and len(y.streams.audio) == 1
    (out2,) = mark.mark(str(plain))
    r2 = detect_file(Path(out2.get_stream_source()), frames=8)
    assert r2.tag_claims_watermark is False and not r2.watermark_found and r2.c2pa["status"] == "absent"
    assert "the tag says no watermark was embedded" in r2.verdict
    res = mark.mark(str(plain), filename_prefix="kept/marked")  # outside ComfyUI: saved beside the temp file
    saved = Path(res["result"][0].get_stream_source()).parent / res["ui"]["images"][0]["filename"]
    assert saved.is_file() and saved.read_bytes() == Path(res["result"][0].get_stream_source()).read_bytes()
    for p in (path, Path(out2.get_stream_source()), saved, Path(res["result"][0].get_stream_source())):
        p.unlink()


@pytest.mark.skipif(not os.environ.get("COMFYUI_DIR"), reason="set COMFYUI_DIR to a ComfyUI checkout")
def test_comfyui_save_video_keeps_the_tag_and_drops_c2pa(tmp_path, chain, small_mp4):
    """ComfyUI's own VideoFromFile.save_to (Save Video, format auto) on a marked file: the stream
    copy keeps our comment tag next to its prompt / workflow tags; the C2PA manifest does not survive."""
    sys.path.insert(0, os.environ["COMFYUI_DIR"])
    from comfy_api.input_impl import VideoFromFile

    from talkformer_core.detect import read_tags

    marked = tmp_path / "marked.mp4"
    detect.mark_file(small_mp4, marked, watermark=False, credentials=cc.load_credentials(chain["chain"], chain["key"]))
    assert cc.read_credentials(marked).status == "valid"
    saved = tmp_path / "saved.mp4"
    VideoFromFile(str(marked)).save_to(str(saved), metadata={"prompt": {"1": {"class_type": "SaveVideo"}}})
    tags = read_tags(saved)
    assert tags["comment"] == pv.generator_tag(False) and "prompt" in tags
    assert cc.read_credentials(saved).status == "absent"


def test_lipsync_refuses_credentials_for_a_non_mp4_output_before_work(tmp_path, chain):
    from talkformer_core import pipeline as P

    clip = synthetic_clip(1, 0.8, 128)
    video = write_video(tmp_path / "t.mp4", clip.frames[:10])
    audio = write_wav(tmp_path / "a.wav", clip.audio[:6400])  # 0.4 s
    opts = P.SyncOptions(steps=1, c2pa_cert=str(chain["chain"]), c2pa_key=str(chain["key"]))
    with pytest.raises(InputError, match=r"out\.mkv: C2PA .* \.mp4 files only"):
        P.lipsync(video, audio, save_tiny_checkpoint(tmp_path / "tiny.safetensors"), tmp_path / "out.mkv", opts)
    assert not (tmp_path / "out.mkv").exists()


def test_lipsync_video_node_signs_its_output(tmp_path, chain):
    """TalkFormer Lip Sync (Video) with c2pa_cert / c2pa_key: a valid manifest in its mp4, next to
    the tag (watermark off here, so the tag says so); a bad key fails before any output."""
    from talkformer_core import pipeline as P
    from talkformer_core.detect import read_tags
    from test_nodes import node

    clip = synthetic_clip(1, 0.8, 128)
    video = write_video(tmp_path / "t.mp4", clip.frames[:10], audio=clip.audio[:6400])
    model = P.load_model(save_tiny_checkpoint(tmp_path / "tiny.safetensors"))
    lip = node("TalkFormerLipSyncVideo")
    with pytest.raises(InputError, match="nokey.pem"):
        lip.lipsync(str(video), model, steps=1, watermark=False, c2pa_cert=str(chain["chain"]),
                    c2pa_key=str(tmp_path / "nokey.pem"))
    out, n = lip.lipsync(str(video), model, steps=1, watermark=False, c2pa_cert=str(chain["chain"]),
                         c2pa_key=str(chain["key"]))
    path = Path(out.get_stream_source())
    try:
        assert n == 10 and read_tags(path)["comment"] == pv.generator_tag(False)
        r = cc.read_credentials(path, trust_anchors=chain["ca"])
        assert r.status == "trusted" and r.names_generator and r.actions == ["c2pa.created"]
    finally:
        path.unlink()
