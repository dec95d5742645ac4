"""IP-LAP renderer (models/iplap_renderer.py) and IP-LAP's input conventions (iplap.py).

Equivalence with IP-LAP's own code: tests/fixtures/iplap/renderer.npz holds the outputs IP-LAP's
``Renderer`` computed from deterministic weights and inputs (see the README beside it); where an
IP-LAP checkout is given (env IPLAP_DIR), the comparison is also made directly and the fixture's
numbers are regenerated and checked.
"""
from __future__ import annotations

import importlib.util
import json
import os
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

from talkformer_core import iplap
from talkformer_core.face import topology
from talkformer_core.models.iplap_renderer import IPLAPRenderer, count_parameters

ROOT = Path(__file__).resolve().parents[1]
FIXTURES = ROOT / "tests" / "fixtures" / "iplap"
SHARED_LAYOUTS = ROOT.parent / "shared" / "reference" / "iplap_layouts.json"
IPLAP_DIR = os.environ.get("IPLAP_DIR")


def _fixture_module():
    spec = importlib.util.spec_from_file_location("make_fixture_renderer", FIXTURES / "make_fixture_renderer.py")
    m = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(m)
    return m


@pytest.fixture(scope="module")
def fx():
    return _fixture_module()


@pytest.fixture(scope="module")
def stored():
    return dict(np.load(FIXTURES / "renderer.npz"))


@pytest.fixture(scope="module")
def ours(fx):
    net = IPLAPRenderer().eval()
    net.load_state_dict(fx.fill_deterministic(net.state_dict(), fx.RENDERER_WEIGHT_SEED), strict=True)
    return net


# ---------------------------------------------------------------------------------------------
# layout


def test_layout_equals_iplap_renderer_without_perceptual():
    net = IPLAPRenderer()
    sd = net.state_dict()
    layout = json.loads((ROOT / "talkformer_core/models/iplap_layouts/renderer.json").read_text())
    assert [k for k, _, _ in layout["state_dict"]] == list(sd)  # same keys, same order
    for k, shape, dtype in layout["state_dict"]:
        assert tuple(sd[k].shape) == tuple(shape), k
        assert str(sd[k].dtype) == f"torch.{dtype}", k
    assert count_parameters(net) == 18_963_235 == layout["n_params"]
    assert len(sd) == 252
    if SHARED_LAYOUTS.is_file():  # the packaged copy is IP-LAP's layout minus perceptual.*
        ref = json.loads(SHARED_LAYOUTS.read_text())["renderer"]
        want = [e for e in ref["state_dict"] if not e[0].startswith("perceptual.")]
        assert [list(e) for e in layout["state_dict"]] == [list(e) for e in want]
        assert ref["n_params_without_perceptual_vgg19"] == 18_963_235


# ---------------------------------------------------------------------------------------------
# function: the fixture made by IP-LAP's code


def test_matches_iplap_fixture(fx, stored, ours):
    B, N = fx.RENDERER_CASE
    x = fx.renderer_inputs(B, N)
    for k, v in x.items():  # the seeded inputs are the ones the fixture was made from
        assert v.double().sum().item() == pytest.approx(float(stored[f"renderer/input_sum/{k}"]), rel=1e-12, abs=1e-9)
    with torch.no_grad():
        generated, warped = ours(**x)
    assert generated.shape == (B, 3, 128, 128) and warped.shape == (B, 3, 128, 128)
    d_gen = np.abs(generated.numpy() - stored["renderer/generated"]).max()
    d_warp = np.abs(warped.numpy() - stored["renderer/warped_ref"]).max()
    assert d_gen < 1e-4 and d_warp < 1e-4, (d_gen, d_warp)
    assert stored["renderer/generated"].std() > 0.05  # the fixture is not a flat, saturated image


def test_reference_chunking_does_not_change_the_result(fx, ours):
    x = fx.renderer_inputs(1, 3, seed=11)
    outs = []
    for chunk in (1, 2):
        ours.ref_chunk = chunk
        with torch.no_grad():
            outs.append(ours(**x))
    ours.ref_chunk = 8
    for g, w in outs[1:]:
        torch.testing.assert_close(g, outs[0][0], atol=1e-6, rtol=0)
        torch.testing.assert_close(w, outs[0][1], atol=1e-6, rtol=0)


def test_lower_half_of_face_input_is_ignored(fx, ours):
    x = fx.renderer_inputs(1, 1, seed=5)
    with torch.no_grad():
        g0, w0 = ours(**x)
        lower = {**x, "face_frame_img": x["face_frame_img"].clone()}
        lower["face_frame_img"][..., 64:, :] = torch.rand(1, 1, 3, 64, 128)
        g1, w1 = ours(**lower)
        upper = {**x, "face_frame_img": x["face_frame_img"].clone()}
        upper["face_frame_img"][..., :64, :] = torch.rand(1, 1, 3, 64, 128)
        g2, _ = ours(**upper)
    assert torch.equal(g0, g1) and torch.equal(w0, w1)  # rows 64..127 zeroed inside, as vr.py:359
    assert (g0 - g2).abs().max() > 1e-3
    assert 0 < g0.min() and g0.max() < 1  # sigmoid output


def test_weights_average_references(fx, ours):
    """With N copies of one reference the weighted average equals that reference's warp."""
    x = fx.renderer_inputs(1, 1, seed=7)
    x3 = {**x, "ref_N_frame_img": x["ref_N_frame_img"].repeat(1, 3, 1, 1, 1),
          "ref_N_frame_sketch": x["ref_N_frame_sketch"].repeat(1, 3, 1, 1, 1)}
    with torch.no_grad():
        g1, w1 = ours(**x)
        g3, w3 = ours(**x3)
    torch.testing.assert_close(w3, w1, atol=1e-4, rtol=0)  # differs only by the 1e-5 in the denominator
    torch.testing.assert_close(g3, g1, atol=1e-4, rtol=0)


# ---------------------------------------------------------------------------------------------
# sketch conventions


def test_sketch_matches_iplap_fixture(fx, stored):
    for i, (name, (h, w)) in enumerate(fx.SKETCH_CROPS.items()):
        s = iplap.draw_sketch(stored["sketch/points"][i], h, w)
        assert s.shape == (3, 128, 128) and s.dtype == np.float32
        assert np.array_equal(s[0], stored[f"sketch/{name}"]), name
        assert np.array_equal(s[0], s[1]) and np.array_equal(s[0], s[2])
        net = stored["sketch/points"][i][list(topology.NETWORK_ORDER)]
        assert np.array_equal(iplap.draw_sketch(net, h, w, order="network"), s)


def test_sketch_canvas_size():
    assert iplap.sketch_canvas_size(128, 128) == (128, 128)
    assert iplap.sketch_canvas_size(211, 157) == (int(211 * 128 / 157), 128) == (172, 128)
    assert iplap.sketch_canvas_size(140, 263) == (128, int(263 * 128 / 140)) == (128, 240)


def _one_edge_points(a_xy, b_xy, edge=(61, 146)):
    """Every point outside [0, 1] (dropped) except the two ends of one lip edge."""
    pts = np.full((131, 2), -1.0, dtype=np.float32)
    pos = {m: p for p, m in enumerate(topology.FULL_131)}
    pts[pos[edge[0]]] = a_xy
    pts[pos[edge[1]]] = b_xy
    return pts


def test_sketch_line_colour_thickness_and_clipping():
    # a 128x128 crop draws on a 128x128 canvas, so the resize is the identity and pixels are exact
    s = iplap.draw_sketch(_one_edge_points((10 / 128, 50 / 128), (100 / 128, 50 / 128)), 128, 128)[0]
    on = np.argwhere(s > 0)
    assert set(on[:, 0]) == {50}  # one row: thickness 1
    assert on[:, 1].min() == 10 and on[:, 1].max() == 100 and len(on) == 91
    assert np.allclose(s[s > 0], 224 / 255)  # colour (224, 224, 224), /255
    # one end outside [0, 1]: the edge is not drawn (no clipping of lines, the point is dropped)
    assert iplap.draw_sketch(_one_edge_points((10 / 128, 50 / 128), (1.01, 0.5)), 128, 128).max() == 0
    assert iplap.draw_sketch(_one_edge_points((-1e-6, 0.5), (0.5, 0.5)), 128, 128).max() == 0
    # exactly 1 maps to the last pixel; 0 to the first
    s = iplap.draw_sketch(_one_edge_points((0.0, 1.0), (1.0, 1.0)), 128, 128)[0]
    assert np.argwhere(s > 0)[:, 0].tolist() == [127] * 128
    # a float32 value just above 1 is outside (math.isclose uses rel_tol 1e-9)
    assert iplap.draw_sketch(_one_edge_points((0.0, 1.0), (np.float32(1.0000001), 1.0)), 128, 128).max() == 0


def test_sketch_of_non_square_crop_is_drawn_at_canvas_then_resized():
    h, w = 100, 200  # canvas 128 x 256, then squeezed to 128 x 128
    pts = _one_edge_points((0.0, 0.5), (0.999, 0.5))
    s = iplap.draw_sketch(pts, h, w)[0]
    canvas = np.zeros((128, 256))
    cv2.line(canvas, (0, 64), (255, 64), 224.0, 1)
    assert np.array_equal(s, (cv2.resize(canvas, (128, 128)) / 255.0).astype(np.float32))
    assert iplap.sketch_pixels(pts, 128, 256)[146] == (255, 64)  # floor(0.999 * 256) = 255


def test_sketch_edges_are_iplaps():
    assert len(iplap.SKETCH_EDGES) == 125 == len(set(iplap.SKETCH_EDGES))
    assert {m for e in iplap.SKETCH_EDGES for m in e} == set(topology.FULL_131)
    if SHARED_LAYOUTS.is_file():
        groups = json.loads(SHARED_LAYOUTS.read_text())["landmark_indices"]["sketch_edges"]
        assert set(iplap.SKETCH_EDGES) == {tuple(e) for g in groups.values() for e in g}


# ---------------------------------------------------------------------------------------------
# crop, references, windows


def test_crop_face_is_bgr_resized_over_255():
    rng = np.random.default_rng(0)
    frame = rng.integers(0, 256, size=(240, 320, 3), dtype=np.uint8)
    box = (40, 30, 231, 200)  # x1, y1, x2, y2
    c = iplap.crop_face(frame, box)
    assert c.shape == (3, 128, 128) and c.dtype == np.float32
    want = cv2.resize(np.ascontiguousarray(frame[30:200, 40:231, ::-1]), (128, 128)) / 255.0
    assert np.array_equal(c, want.astype(np.float32).transpose(2, 0, 1))
    red = np.zeros((64, 64, 3), np.uint8)
    red[..., 0] = 200  # RGB red
    c = iplap.crop_face(red, (0, 0, 64, 64))
    assert c[2].min() == pytest.approx(200 / 255) and c[0].max() == 0 and c[1].max() == 0  # BGR: red last
    with pytest.raises(ValueError):
        iplap.crop_face(frame, (10, 10, 10, 50))


def test_face_to_rgb_uint8_truncates_and_flips():
    g = torch.zeros(3, 128, 128)
    g[0] = 0.999  # blue in BGR
    out = iplap.face_to_rgb_uint8(g)
    assert out.shape == (128, 128, 3) and out.dtype == np.uint8
    assert out[..., 2].min() == 254 and out[..., :2].max() == 0  # int(0.999 * 255) = 254, now RGB


def test_select_references_by_lip_openness():
    assert iplap.select_references([5.0, 3.0, 9.0, 1.0, 7.0], 3).tolist() == [3, 0, 2]
    op = np.random.default_rng(1).random(40)
    refs = iplap.select_references(op, 25)
    assert len(refs) == 25 and refs[0] == op.argmin() and refs[-1] == op.argmax()
    assert np.all(np.diff(op[refs]) > 0)  # spread over the ranking, ascending
    # fewer frames than references: ranks repeat (IP-LAP does the same)
    assert iplap.select_references([0.2, 0.1], 5).tolist() == [1, 1, 1, 1, 0]  # int(linspace(0, 1, 5))


def test_pingpong_and_window():
    assert iplap.pingpong_sequence(3, 10) == [0, 1, 2, 2, 1, 0, 0, 1, 2, 2]
    assert iplap.pingpong_sequence(1, 4) == [0, 0, 0, 0]
    assert iplap.window(5, 20) == [3, 4, 5, 6, 7]
    assert iplap.window(0, 20) == [0, 0, 0, 1, 2]
    assert iplap.window(19, 20) == [17, 18, 19, 19, 19]


# ---------------------------------------------------------------------------------------------
# against IP-LAP's own code (IPLAP_DIR)


@pytest.mark.skipif(not IPLAP_DIR, reason="set IPLAP_DIR to a checkout of Weizhi-Zhong/IP_LAP")
def test_against_iplap_checkout(fx, stored, ours):
    theirs = fx.iplap_renderer(IPLAP_DIR)
    x = fx.renderer_inputs(2, 4, seed=21)
    with torch.no_grad():
        g_t, w_t, _, _ = theirs(**x)
        g_o, w_o = ours(**x)
    d = max((g_t - g_o).abs().max().item(), (w_t - w_o).abs().max().item())
    print(f"\nrenderer vs IP-LAP (B=2, N=4, eval): largest difference {d:.3e}")
    assert d < 1e-4

    # training mode (BatchNorm on batch statistics, one reference per pass as IP-LAP's loop)
    theirs.train()
    ours_t = IPLAPRenderer().train()
    ours_t.load_state_dict(ours.state_dict())
    with torch.no_grad():
        g_t, w_t, _, _ = theirs(**x)
        g_o, w_o = ours_t(**x)
    d = max((g_t - g_o).abs().max().item(), (w_t - w_o).abs().max().item())
    print(f"renderer vs IP-LAP (B=2, N=4, train mode): largest difference {d:.3e}")
    assert d < 1e-4

    # the stored fixture is what IP-LAP's code computes
    fresh = fx.renderer_fixture_arrays(IPLAP_DIR)
    assert set(fresh) == set(stored)
    for k, v in fresh.items():
        np.testing.assert_allclose(v, stored[k], atol=1e-5, rtol=0, err_msg=k)

    # sketches: IP-LAP's draw_landmarks on random sets and crop sizes, bit-exact
    rng = np.random.default_rng(4)
    for _ in range(6):
        h, w = (int(v) for v in rng.integers(60, 400, size=2))
        pts = (rng.random((131, 2)) * 1.1 - 0.05).astype(np.float32)
        want = fx.iplap_sketch(IPLAP_DIR, pts, h, w)
        got = iplap.draw_sketch(pts, h, w)
        assert np.array_equal(got, (want / 255.0).astype(np.float32).transpose(2, 0, 1)), (h, w)
