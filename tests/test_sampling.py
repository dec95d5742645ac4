"""Stage 2's one batch loop (talkformer_core.sampling): equality with the serial chain, parallel
Temp-Att chains and their seams, streaming state, run counts, batch size from free memory."""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch

from talkformer_core import pipeline as P
from talkformer_core import sampling as S
from talkformer_core.config import tiny
from talkformer_core.diffusion import NoiseSchedule, get_sampler
from talkformer_core.errors import InputError
from talkformer_core.models.model import TalkFormer

FIXTURES = Path(__file__).resolve().parent / "fixtures"


def loaded(temporal: bool, seed: int = 0) -> P.LoadedModel:
    """A tiny random model; with Temp-Att its zero-initialised output projections get random weights
    so motion frames change the output (at init Temp-Att is the identity)."""
    torch.manual_seed(seed)
    cfg = tiny()
    cfg.model.temporal_attention = temporal
    m = TalkFormer(cfg).eval().requires_grad_(False)
    if temporal:
        g = torch.Generator().manual_seed(5)
        for b in m.unet.blocks:
            w = b.temporal.proj_out.weight
            w.copy_(torch.randn(w.shape, generator=g) * 0.2)
    return P.LoadedModel("talkformer", cfg, m, NoiseSchedule(cfg.model.diffusion), torch.device("cpu"), torch.float32)


def inputs(T: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    crops = rng.integers(0, 256, (T, 32, 32, 3), dtype=np.uint8)
    lms = rng.uniform(0.2, 0.8, (T, 131, 2)).astype(np.float32)
    return crops, lms


def serial_chain(model: P.LoadedModel, crops, lms, ref, steps: int, motion=None, sampler: str = "ddim"):
    """The serial Temp-Att chain written out independently of sampling.py (the loop this project ran
    before parallel chains): clips of L, the last padded by repeating, M motion frames carried.
    -> (latents (T, C, h, w), motion)."""
    tf, L, M = model.model, model.sequence_length, model.config.model.unet.num_motion_frames
    x = P.crops_to_tensor(crops, model.device)
    known, upper = tf.encode_masked(x).float(), tf.encode(x).float()
    mask = tf.known_mask(*known.shape[2:]).bool()
    lm = torch.as_tensor(lms)
    x_T = P.initial_noise(model, 0).expand(len(crops), -1, -1, -1).contiguous()
    outs = []
    for c0 in range(0, len(crops), L):
        sel = list(range(c0, min(len(crops), c0 + L)))
        n = len(sel)
        sel += [sel[-1]] * (L - n)
        lc = tf.prepare_landmarks(lm[sel])
        mc = None if motion is None else tf.prepare_motion(motion[None])
        x0 = get_sampler(sampler)(lambda z, t: tf.unet(z, t, lc, ref, motion=mc, num_frames=L), x_T[sel],
                                  model.schedule, steps, known=known[sel], known_mask=mask)
        outs.append(torch.where(mask, upper[c0:c0 + n], x0[:n]))
        motion = x0[n - M:n] if n >= M else torch.cat([x0[:1]] * (M - n) + [x0[:n]])
    return torch.cat(outs), motion


@pytest.fixture(scope="module")
def temporal():
    m = loaded(True)
    crops, lms = inputs(23)
    return m, crops, lms, P.encode_reference(m, crops[0])


RECORDED = {"ddim3": dict(steps=3), "ddim3_bs3": dict(steps=3, batch_size=3),
            "dpm4_bs8": dict(steps=4, sampler="dpmpp_2m", batch_size=8),
            "ddim3_eta": dict(steps=3, eta=0.5, seed=2, batch_size=5)}


def recorded_outputs() -> dict[str, np.ndarray]:
    """The outputs tests/fixtures/stage2_outputs.npz holds (`python tests/test_sampling.py --record` writes them)."""
    m = loaded(False)
    crops, lms = inputs(12)
    ref = P.encode_reference(m, crops[0])
    out = {f"temporal0_{k}": P.sample_faces(m, crops, lms, ref, **kw) for k, kw in RECORDED.items()}
    m = loaded(True)
    out["temporal1_ddim3"] = P.sample_faces(m, crops, lms, P.encode_reference(m, crops[0]), steps=3)
    return out


def test_outputs_match_the_recorded_ones():
    """Stage 2's faces for fixed seeds stay what they were when recorded (a change of maths, seeds
    or batching shows as a large difference); CPUs and thread counts round differently, so a level
    of 255 is allowed on a few pixels, never a changed face."""
    rec = np.load(FIXTURES / "stage2_outputs.npz")
    got = recorded_outputs()
    assert sorted(rec.files) == sorted(got)
    for k, v in got.items():
        d = np.abs(v.astype(np.int16) - rec[k].astype(np.int16))
        assert d.max() <= 2 and (d > 0).mean() < 0.01, (k, d.max(), (d > 0).mean())
    # batch size and the sampler's own batching leave the faces alone
    assert np.abs(got["temporal0_ddim3"].astype(int) - got["temporal0_ddim3_bs3"]).max() <= 1


def test_short_temporal_video_equals_the_serial_chain(temporal):
    m, crops, lms, ref = temporal
    T = 12  # shorter than the smallest automatic segment (MIN_SEGMENT_CLIPS clips)
    fs = S.FaceSampler(m, ref, steps=3)
    assert fs.segments(T) == [(0, T)]
    z = fs.latents(crops[:T], lms[:T])
    want, motion = serial_chain(m, crops[:T], lms[:T], ref, 3)
    # equal up to CPU rounding (kernels sum in an order that depends on batch shape and threads);
    # a wrong clip, motion frame or mask differs by ~1
    torch.testing.assert_close(z, want, atol=1e-4, rtol=0)
    torch.testing.assert_close(fs.motion, motion, atol=1e-4, rtol=0)
    faces = P.sample_faces(m, crops[:T], lms[:T], ref, steps=3)
    assert np.abs(faces.astype(int) - P.tensor_to_crops(m.model.decode(want))).max() <= 1


def _expected_parallel(m, crops, lms, ref, segs, crossfade: bool):
    out = None
    for j, (a, b) in enumerate(segs):
        z, _ = serial_chain(m, crops[a:b], lms[a:b], ref, 2)
        if out is None:
            out = torch.empty((len(crops),) + z.shape[1:])
        K = segs[j - 1][1] - a if j else 0
        if K and crossfade:
            w = torch.as_tensor(S.crossfade_weights(K), dtype=z.dtype)[:, None, None, None]
            out[a:a + K] = (1 - w) * out[a:a + K] + w * z[:K]
        out[a + K:b] = z[K:]
    return out


@pytest.mark.parametrize("crossfade", [True, False])
def test_parallel_chains_are_serial_chains_per_segment(temporal, crossfade):
    """One chain per run (batch_size = L): each segment's chain is exactly a serial chain from no
    motion frames over its frames; overlaps cross-faded (or the warm-up dropped)."""
    m, crops, lms, ref = temporal
    fs = S.FaceSampler(m, ref, steps=2, batch_size=5, segment=10, overlap=3, crossfade=crossfade)
    segs = fs.segments(23)
    assert segs == [(0, 10), (7, 20), (17, 23)]
    z = fs.latents(crops, lms)
    torch.testing.assert_close(z, _expected_parallel(m, crops, lms, ref, segs, crossfade), atol=1e-4, rtol=0)
    serial, _ = serial_chain(m, crops, lms, ref, 2)
    d = (z - serial).abs().flatten(1).amax(1)
    # the first chain, before its overlap, is the serial chain (up to the rounding of encoding
    # 23 crops at once instead of 10); later chains started without the serial chain's history
    assert d[:7].max() < 1e-4 and d[10:].min() > 100 * d[:7].max()


def test_parallel_chains_batched_together_match_one_by_one(temporal):
    """All chains in one run (batch 3 x L) equals running them one by one, up to CPU rounding of a
    different batch size; the number of runs is the longest chain's clips."""
    m, crops, lms, ref = temporal
    one = S.FaceSampler(m, ref, steps=2, batch_size=5, segment=10, overlap=3).latents(crops, lms)
    calls = []
    fs = S.FaceSampler(m, ref, steps=2, batch_size=15, segment=10, overlap=3,
                       step_callback=lambda i, n: calls.append(i))
    n_runs = fs.num_runs(23)
    z = fs.latents(crops, lms)
    torch.testing.assert_close(z, one, atol=1e-4, rtol=0)
    assert n_runs == 3 == len(calls) // 2  # chains of 2, 3 and 2 clips in parallel


def test_seams_crossfade_inside_the_overlap_only(temporal):
    m, crops, lms, ref = temporal
    a = S.FaceSampler(m, ref, steps=2, batch_size=5, segment=10, overlap=3, crossfade=True).latents(crops, lms)
    b = S.FaceSampler(m, ref, steps=2, batch_size=5, segment=10, overlap=3, crossfade=False).latents(crops, lms)
    diff = (a - b).abs().flatten(1).amax(1)
    seam_frames = {7, 8, 9, 17, 18, 19}
    assert all(diff[i] > 0 for i in seam_frames)
    assert all(diff[i] == 0 for i in range(23) if i not in seam_frames)
    w = S.crossfade_weights(3)
    np.testing.assert_allclose(w, [0.25, 0.5, 0.75])
    # the lower half only: the upper half is E(crop) in both chains
    h = a.shape[2]
    assert torch.equal(a[:, :, :h // 2], b[:, :, :h // 2])


def test_streaming_calls_carry_motion_frames(temporal):
    m, crops, lms, ref = temporal
    whole = S.FaceSampler(m, ref, steps=2, segment=40).latents(crops[:15], lms[:15])
    fs = S.FaceSampler(m, ref, steps=2, segment=40)
    parts = torch.cat([fs.latents(crops[:10], lms[:10]), fs.latents(crops[10:15], lms[10:15])])
    torch.testing.assert_close(parts, whole, atol=1e-4, rtol=0)  # without the carried motion: ~1.6 apart
    # a later call that runs parallel chains: its first chain starts from the carried motion frames
    fs2 = S.FaceSampler(m, ref, steps=2, batch_size=10, segment=5, overlap=2)
    fs2.latents(crops[:5], lms[:5])
    calls = []
    fs2.step_callback = lambda i, n: calls.append(i)
    n_runs = fs2.num_runs(10)
    fs2.latents(crops[5:15], lms[5:15])
    # chains (0, 5) with the carried motion frames and (3, 10) without: apart at clip 0, then one run
    assert n_runs == 3 == len(calls) // 2


def test_num_runs_counts_the_sampler_runs(temporal):
    m, crops, lms, ref = temporal
    for kw in (dict(), dict(batch_size=5), dict(batch_size=10, segment=5, overlap=4), dict(batch_size=7)):
        calls = []
        fs = S.FaceSampler(m, ref, steps=1, step_callback=lambda i, n: calls.append(n), **kw)
        n = fs.num_runs(23)
        fs(crops, lms)
        assert len(calls) == n, kw
    flat = loaded(False)
    fs = S.FaceSampler(flat, ref, steps=2, batch_size=5)
    calls = []
    fs.step_callback = lambda i, n: calls.append(i)
    fs(*inputs(12))
    assert fs.num_runs(12) == 3 == len(calls) // 2


def test_automatic_segments_fill_the_batch():
    m = loaded(True)
    fs = S.FaceSampler(m, None, steps=1, batch_size=40)  # 8 chains of L = 5 per run
    segs = fs.segments(200)
    assert len(segs) == 8 and segs[0] == (0, 25) and segs[1] == (15, 50) and segs[-1][1] == 200  # 2 clips warm-up
    assert S.FaceSampler(m, None, steps=1, batch_size=8).segments(200) == [(0, 200)]  # 1 chain per run: serial
    assert fs.segments(20) == [(0, 20)]  # at least MIN_SEGMENT_CLIPS clips per chain


def test_auto_batch_size_from_free_memory():
    m = loaded(False)
    assert S.auto_batch_size(m) == S.CPU_BATCH  # the CPU keeps its recorded batch
    per = S.frame_bytes(m)
    assert S.auto_batch_size(m, free_bytes=0) == 1
    assert S.auto_batch_size(m, free_bytes=2 * 20 * per) == 16  # half of the free memory, a multiple of 8
    assert S.auto_batch_size(m, free_bytes=10 ** 15) == 256
    sizes = [S.auto_batch_size(m, free_bytes=k * per) for k in range(1, 600, 7)]
    assert sizes == sorted(sizes)
    mt = loaded(True)
    assert S.auto_batch_size(mt, free_bytes=2 * 23 * S.frame_bytes(mt)) == 20  # whole clips of L = 5
    paper = P.LoadedModel("talkformer", __import__("talkformer_core.config", fromlist=["paper"]).paper(), None, None,
                          torch.device("cuda"), torch.bfloat16)
    # an H200 with ~130 GiB free: the paper preset gets a batch large enough for full GPU use
    assert 32 <= S.auto_batch_size(paper, free_bytes=130 * 2 ** 30) <= 256


def test_sampler_checks_inputs():
    from talkformer_core.errors import InputError

    m = loaded(False)
    with pytest.raises(InputError, match="steps 0"):
        S.FaceSampler(m, None, steps=0)
    with pytest.raises(InputError, match="unknown sampler"):
        S.FaceSampler(m, None, sampler="euler_x")
    with pytest.raises(InputError, match="overlap 10"):
        S.FaceSampler(m, None, segment=10, overlap=10)
    fs = S.FaceSampler(m, None, steps=1)
    with pytest.raises(InputError, match="crops must be uint8"):
        fs(np.zeros((2, 16, 16, 3), np.uint8), np.zeros((2, 131, 2), np.float32))
    with pytest.raises(InputError, match="landmarks must be"):
        fs(np.zeros((2, 32, 32, 3), np.uint8), np.zeros((3, 131, 2), np.float32))
    assert math.isclose(S.crossfade_weights(1)[0], 0.5)


def test_noise_scale_is_the_models_unless_given():
    """x_T = scale * N(0, I): the model's DiffusionConfig.noise_scale (person presets 0.5, the paper's
    1, a checkpoint saved before the field: 1) unless a scale is given; sampling with a scale is
    sampling from the scaled x_T; a negative scale is an InputError."""
    from talkformer_core.config import TalkFormerConfig, paper, person_config
    from talkformer_core.errors import InputError

    assert person_config(64).model.diffusion.noise_scale == 0.5 and paper().model.diffusion.noise_scale == 1.0
    d = person_config(64).to_dict()
    del d["model"]["diffusion"]["noise_scale"]
    assert TalkFormerConfig.from_dict(d).model.diffusion.noise_scale == 1.0
    m = loaded(False)
    assert torch.equal(S.initial_noise(m, 3), S.initial_noise(m, 3, 1.0))
    m.config.model.diffusion.noise_scale = 0.5
    try:
        assert torch.allclose(S.initial_noise(m, 3), 0.5 * S.initial_noise(m, 3, 1.0))
        assert torch.allclose(S.initial_noise(m, 3, 0.25), 0.25 * S.initial_noise(m, 3, 1.0))
        assert not S.initial_noise(m, 3, 0.0).any()
        crops, lms = inputs(4)
        ref = P.encode_reference(m, crops[0])
        a = P.sample_faces(m, crops, lms, ref, steps=2, noise_scale=0.25)
        b = P.sample_faces(m, crops, lms, ref, steps=2, noise=0.25 * S.initial_noise(m, 0, 1.0))
        c = P.sample_faces(m, crops, lms, ref, steps=2)  # the model's 0.5
        assert np.array_equal(a, b) and not np.array_equal(a, c)
        with pytest.raises(InputError, match="noise scale -1"):
            S.FaceSampler(m, None, noise_scale=-1.0)
        with pytest.raises(InputError, match="noise scale"):
            P.lipsync(np.zeros((8, 8, 3), np.uint8), None, m, "/nonexistent/out.mp4",
                      options=P.SyncOptions(noise_scale=float("nan")))
    finally:
        m.config.model.diffusion.noise_scale = 1.0


def test_speed_knobs_on_the_cpu():
    """channels_last gives the same faces (up to conv rounding); bf16 weights without autocast stay
    close to fp32; the CPU default changes nothing (bit-equal, tested above)."""
    crops, lms = inputs(6)
    ref32 = None
    outs = {}
    for name, dtype, speed in (("fp32", torch.float32, None),
                               ("cl", torch.float32, S.SpeedOptions(channels_last=True)),
                               ("bf16", torch.bfloat16, S.SpeedOptions(channels_last=True, half_weights=True))):
        m = loaded(False)
        m.dtype = dtype
        ref = P.encode_reference(m, crops[0]) if ref32 is None or dtype != torch.float32 else ref32
        ref32 = ref if name == "fp32" else ref32
        fs = S.FaceSampler(m, ref, steps=3, speed=speed)
        outs[name] = fs(crops, lms).astype(np.float64)
        if name != "fp32":
            assert m.channels_last and next(m.model.unet.parameters()).dtype == dtype
            assert next(m.model.landmark.parameters()).dtype == torch.float32  # stage 1 stays fp32
    assert np.abs(outs["cl"] - outs["fp32"]).max() <= 1
    psnr = 10 * np.log10(255.0 ** 2 / np.mean((outs["bf16"] - outs["fp32"]) ** 2))
    assert psnr > 30, psnr


def test_speed_knobs_with_temporal_attention_and_fused_encode():
    """The GPU knob set (channels_last, bf16 weights, one encoder pass) through the parallel
    Temp-Att chains (motion features in bf16) stays close to the fp32 CPU path."""
    crops, lms = inputs(23)
    outs = {}
    for name, dtype, speed in (("fp32", torch.float32, None),
                               ("fused", torch.float32, S.SpeedOptions(fused_encode=True)),
                               ("gpu_set", torch.bfloat16, S.SpeedOptions(channels_last=True, half_weights=True,
                                                                          fused_encode=True))):
        m = loaded(True)
        m.dtype = dtype
        ref = P.encode_reference(m, crops[0])
        fs = S.FaceSampler(m, ref, steps=2, batch_size=15, segment=10, overlap=3, speed=speed)
        outs[name] = fs(crops, lms).astype(np.float64)
    assert np.abs(outs["fused"] - outs["fp32"]).max() <= 2  # batch 2B instead of B: rounding only
    psnr = 10 * np.log10(255.0 ** 2 / np.mean((outs["gpu_set"] - outs["fp32"]) ** 2))
    assert psnr > 30, psnr


def test_temporal_attention_in_batch_pieces_is_exact(monkeypatch):
    """Temp-Att's many short sequences go through SDPA in pieces (CUDA grids cap the batch); the
    pieces give the same output as one call."""
    from talkformer_core.models import talkformer as TFM

    torch.manual_seed(0)
    att = TFM.TemporalAttention(32, 2, 2)
    torch.nn.init.normal_(att.proj_out.weight, std=0.1)
    x = torch.randn(10, 32, 4, 4)  # 2 clips of 5 frames, 16 positions: 32 sequences
    motion = att.kv(torch.randn(4, 32, 4, 4), 2)
    whole = att(x, 5, motion)
    monkeypatch.setattr(TFM, "SDPA_MAX_BATCH", 7)
    assert torch.equal(att(x, 5, motion), whole)


def test_prefetched_keeps_order_and_raises_where_taken():
    seen = []

    def fn(i):
        seen.append(i)
        if i == 3:
            raise ValueError("bad chunk 3")
        return i * i

    for enabled in (False, True):
        seen.clear()
        got = []
        with pytest.raises(ValueError, match="bad chunk 3"):
            for v in P.prefetched(fn, list(range(6)), enabled):
                got.append(v)
        assert got == [0, 1, 4]
        assert seen[:4] == [0, 1, 2, 3] and len(seen) <= 5  # at most one item read ahead
    assert list(P.prefetched(fn, [], True)) == []


def test_lipsync_with_prefetch_writes_the_same_video(tmp_path):
    from pipeline_helpers import synthetic_clip, write_video, write_wav
    from talkformer_core.video import iter_frames

    clip = synthetic_clip(0, 1.2, 256)
    video = write_video(tmp_path / "clip.mp4", clip.frames, clip.audio)
    wav = write_wav(tmp_path / "a.wav", np.concatenate([clip.audio, clip.audio[:8000]]))  # pingpong: a backward run
    model = P.load_model(Path(__file__).resolve().parents[1] / "checkpoints" / "demo_astronaut.safetensors")
    outs = []
    for prefetch in (False, True):
        out = tmp_path / f"out{int(prefetch)}.mp4"
        P.lipsync(video, wav, model, out, P.SyncOptions(steps=2, watermark=False, chunk_size=7, crf=12,
                                                        prefetch=prefetch))
        outs.append(np.stack(list(iter_frames(out))))
    assert len(outs[0]) == 43  # 1.7 s of audio at 25 fps, over 30 template frames (pingpong)
    np.testing.assert_array_equal(outs[0], outs[1])
    # stopping from the callback while a chunk is being written in the background: no output file

    def stop(done, total, preview):
        if done >= 14:
            raise KeyboardInterrupt

    out = tmp_path / "stopped.mp4"
    with pytest.raises(KeyboardInterrupt):
        P.lipsync(video, wav, model, out, P.SyncOptions(steps=1, watermark=False, chunk_size=7, prefetch=True),
                  callback=stop)
    assert not out.exists()


def test_auto_chunk_size():
    m = loaded(False)
    assert P.auto_chunk_size(m, 8, (1080, 1920)) == P.CPU_CHUNK == 32  # the CPU keeps its recorded chunks
    gpu = P.LoadedModel("talkformer", m.config, None, None, torch.device("cuda"), torch.bfloat16)
    assert P.auto_chunk_size(gpu, 104, (1080, 1920)) == 104  # a whole sampler batch per chunk
    assert P.auto_chunk_size(gpu, 8, (512, 512)) == 32
    mt = loaded(True)
    gpu_t = P.LoadedModel("talkformer", mt.config, None, None, torch.device("cuda"), torch.bfloat16)
    assert P.auto_chunk_size(gpu_t, 100, (256, 256)) == 400  # 4 batches: parallel chains fill a batch
    assert P.auto_chunk_size(gpu_t, 100, (1080, 1920)) == 2 ** 30 // (3 * 1080 * 1920)  # 1 GiB of frames


def test_default_sampler_is_the_measured_one_everywhere():
    from talkformer_core.sync import build_parser

    assert (S.DEFAULT_SAMPLER, S.DEFAULT_STEPS) == ("dpmpp_2m", 10)  # docs/speed.md's fast-sampler table
    assert (P.SyncOptions().sampler, P.SyncOptions().steps) == (S.DEFAULT_SAMPLER, S.DEFAULT_STEPS)
    a = build_parser().parse_args(["--video", "v", "--audio", "a", "--checkpoint", "c", "--out", "o.mp4"])
    assert (a.sampler, a.steps) == (S.DEFAULT_SAMPLER, S.DEFAULT_STEPS)
    # the Sampler node repeats them for its functions' signatures (it imports the core inside functions)
    src = (Path(__file__).resolve().parents[1] / "nodes" / "generate_nodes.py").read_text()
    assert f'DEFAULT_SAMPLER, DEFAULT_STEPS = "{S.DEFAULT_SAMPLER}", {S.DEFAULT_STEPS}' in src


if __name__ == "__main__":
    import sys

    if sys.argv[1:] == ["--record"]:
        np.savez_compressed(FIXTURES / "stage2_outputs.npz", **recorded_outputs())


def test_decode_refine_takes_the_template_mouth_out_of_the_decode():
    """sampling.decode_faces: 0 passes is the plain decode; each pass re-encodes the crop with its
    lower half replaced by the decoded one. Two templates with the same upper half and different
    lower halves, decoded with the same generated lower latent, differ because E(crop)'s upper rows
    see the lower half (the encoder's receptive field); after passes they differ less. The model's
    DiffusionConfig.decode_refine is the default; a negative count is refused."""
    model = loaded(False)
    tf = model.model
    rng = np.random.default_rng(3)
    crops = rng.integers(0, 256, (2, 32, 32, 3), dtype=np.uint8)
    crops[1, :16] = crops[0, :16]  # same upper half, other lower half
    with torch.no_grad():
        up = tf.encode(P.crops_to_tensor(crops, model.device)).float()
        h = up.shape[2] // 2
        low = torch.randn(1, *up.shape[1:], generator=torch.Generator().manual_seed(0)).expand(2, -1, -1, -1)
        z = torch.cat([up[:, :, :h], low[:, :, h:]], 2)
    assert np.array_equal(S.decode_faces(model, z, crops, 0), S.decode_latents(model, z))
    gaps = []
    for k in range(3):
        f = S.decode_faces(model, z, crops, k).astype(np.float64)
        gaps.append(np.abs(f[0, 16:] - f[1, 16:]).mean())  # the two templates' lower faces apart
    assert gaps[0] > 1.0 and gaps[1] < 0.5 * gaps[0] and gaps[2] < gaps[1], gaps
    assert S.decode_refine_of(model) == 0
    model.config.model.diffusion.decode_refine = 2
    assert S.decode_refine_of(model) == 2 and S.decode_refine_of(model, 1) == 1
    assert S.FaceSampler(model, None).decode_refine == 2
    with pytest.raises(InputError, match="decode refine -1"):
        S.decode_refine_of(model, -1)
