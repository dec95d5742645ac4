"""What opens the renderer's mouth on frames it never saw: the frame's context, or the landmarks?

On a person checkpoint trained by ``finetune --holdout 0.4`` (frames [0, 0.6)), the person's most
closed training frames' true landmarks are drawn on several contexts (the masked upper face the
renderer completes), and mediapipe reads the opening of the faces (inner-lip gap over the nose
length, ``talkformer_core.eval.dubbing``; the generated lower face pasted into the real crop at
256 px, as the dubbing report measures the faces):

- ``train, own``: the closed training frames themselves, with their own landmarks;
- ``unseen closed, own``: held-out frames the tracker finds as closed, with their own landmarks
  (a context never seen, a mouth that agrees with it);
- ``template, placed``: the template frames ([0.8, 1.0)) with the closed frames' jaw and lips in
  the template's landmark box, slid onto its mouth centre, the template's own pose points kept
  (what the dubbing report's renderer check does);
- ``template, aligned``: the template frames with all 131 of the closed frames' landmarks moved by
  a similarity fitted on the eyes, brows and nose (the pose points taken from the closed frame);
- ``unseen closed, placed``: as ``template, placed`` on the unseen closed frames (context closed,
  landmarks placed like the template's).
- ``train open, placed``: as ``template, placed`` on the person's most open training frames (a
  context the renderer trained on, whose mouth was open there).

Against the real crops' readings of the same frames, these say whether a closed mouth needs a
context the renderer trained on, a closed context, or closed pose points (docs/dubbing.md).

    python bench/renderer_context.py --checkpoint CKPT --shard SHARD [--holdout 0.4] [--frames 16]
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def aligned(src: np.ndarray, dst: np.ndarray) -> np.ndarray:
    """Each frame's 131 points (n, 131, 2) moved by the similarity taking its upper face onto dst's."""
    from talkformer_core.eval.dubbing import upper_face_similarity

    out = np.empty_like(src)
    for i in range(len(src)):
        m = upper_face_similarity(src[i], dst[i])
        out[i] = src[i] @ m[:, :2].T + m[:, 2]
    return out


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--checkpoint", required=True)
    ap.add_argument("--shard", required=True, help="the clip's shard, as finetune wrote it")
    ap.add_argument("--holdout", type=float, default=0.4)
    ap.add_argument("--frames", type=int, default=16, help="closed training frames drawn")
    ap.add_argument("--noise-scale", type=float, default=None)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", default=None, help="write the readings here")
    a = ap.parse_args(argv)

    from talkformer_core.eval import dubbing as D
    from talkformer_core.face import topology
    from talkformer_core.face.blend import lower_face_mask
    from talkformer_core.finetune.dubbing import _anchor_x, points478
    from talkformer_core.finetune.holdout import load_holdout, paste_lower_face, reference_frame
    from talkformer_core.pipeline import encode_reference, initial_noise, landmarks_to_crop, load_model, sample_faces

    h = load_holdout(a.shard, a.holdout)
    split = D.split_clip(len(h.crops), h.analysis.found, 1.0 - a.holdout, 1.0 - a.holdout / 2)
    au, te, tr = split.audio, split.template, split.train
    model = load_model(a.checkpoint, "cpu")
    box = model.config.model.landmark_box
    ref = encode_reference(model, h.crops[reference_frame(h)])
    noise = initial_noise(model, a.seed, a.noise_scale)
    mask = lower_face_mask(h.crops.shape[1])
    true_open = D.mouth_opening(h.analysis.track.points131_filled.astype(np.float64))  # the tracker's

    def read(idx: np.ndarray, lms_crop: np.ndarray | None) -> np.ndarray:
        """mediapipe's opening of the faces drawn on frames idx from lms_crop (None: the real crops)."""
        crops = h.crops[idx]
        if lms_crop is not None:
            gen = sample_faces(model, crops, lms_crop.astype(np.float32), ref, steps=25, sampler="ddim",
                               seed=a.seed, batch_size=32, noise=noise)
            crops = paste_lower_face(gen, crops, mask)
        return D.mouth_opening(points478(crops))

    closed = tr[np.argsort(true_open[tr])[: a.frames]]
    unseen = np.concatenate([au, te])
    unseen = unseen[true_open[unseen] <= true_open[closed].max()]  # held-out frames as closed as those
    n = len(closed)
    tmpl = np.resize(te, n)
    lm_box = h.analysis.points_box(closed, box)

    def placed(idx: np.ndarray, src: np.ndarray) -> np.ndarray:
        """The closed frames' jaw + lips (src) in idx's landmark boxes, on their mouth centres."""
        tb = h.analysis.points_box(idx, box)
        out = tb.copy()
        out[:, list(topology.CONTENT_POS)] = _anchor_x(lm_box[src][:, list(topology.CONTENT_POS)], tb)
        return landmarks_to_crop(h.analysis, out, idx, model)

    cells: dict[str, tuple[np.ndarray, np.ndarray | None]] = {
        "train, own": (closed, h.points_crop[closed]),
        "template, placed": (tmpl, placed(tmpl, np.arange(n))),
        "template, aligned": (tmpl, aligned(h.points_crop[closed].astype(np.float64), h.points_crop[tmpl])),
    }
    wide = tr[np.argsort(true_open[tr])[::-1][:n]]
    cells["train open, placed"] = (wide, placed(wide, np.arange(n)))
    if len(unseen):
        src = np.resize(np.arange(n), len(unseen))
        cells["unseen closed, own"] = (unseen, h.points_crop[unseen])
        cells["unseen closed, placed"] = (unseen, placed(unseen, src))
    res: dict[str, dict] = {"frames": {"closed_train": closed.tolist(), "unseen_closed": unseen.tolist()}}
    print(f"{a.checkpoint}: {n} closed training frames (tracker opening <= {true_open[closed].max():.4f}), "
          f"{len(unseen)} held-out frames as closed, {len(te)} template frames")
    print("| drawn on, landmarks | faces read: median (min-max) | the real frames read: median |")
    print("|---|---|---|")
    for name, (idx, lms) in cells.items():
        o, real = read(idx, lms), read(idx, None)
        res[name] = {"faces": o.tolist(), "real": real.tolist()}
        print(f"| {name} | {np.nanmedian(o):.3f} ({np.nanmin(o):.3f}-{np.nanmax(o):.3f}) | {np.nanmedian(real):.3f} |")
    if a.json:
        Path(a.json).write_text(json.dumps(res, indent=1))
    return res


if __name__ == "__main__":
    main()
