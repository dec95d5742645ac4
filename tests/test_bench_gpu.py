"""bench/bench_gpu.py runs on the CPU (--quick) without mediapipe or PyAV and writes its JSON."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]

# what a GPU box without the front end's packages sees: importing either fails
BLOCKED = ("import sys, runpy; sys.modules['mediapipe'] = None; sys.modules['av'] = None; "
           "sys.argv = ['bench_gpu.py'] + sys.argv[1:]; runpy.run_path('bench/bench_gpu.py', run_name='__main__')")


def test_bench_gpu_quick_on_cpu(tmp_path):
    out = tmp_path / "bench.json"
    # cap and budget far above the run's length: every row runs to the end (no clock decides)
    r = subprocess.run([sys.executable, "-c", BLOCKED, "--quick", "--cap", "1e6", "--budget", "1e6",
                        "--out", str(out)], cwd=ROOT, capture_output=True, text=True, timeout=600,
                       env={"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "PATH": "/usr/bin:/bin"})
    assert r.returncode == 0, r.stderr[-2000:]
    res = json.loads(out.read_text())
    assert res["device"] == "cpu" and res["quick"] and res["matmul_bf16_tflops"] > 0
    rows = res["rows"]
    assert len(rows) == 9
    assert {(x["dtype"], x["temporal"]) for x in rows} == {("fp32", False), ("fp32", True), ("bf16", False),
                                                           ("bf16", True)}
    for x in rows:
        assert x["status"] == "ok"
        for k in ("fps", "loop_tflops", "unet_tflops", "unet_of_matmul", "unet_forward_ms", "seconds",
                  "flops_unet_per_frame_step", "flops_autoencoder_per_frame", "batch", "frames", "steps"):
            assert isinstance(x[k], (int, float)) and x[k] > 0, (k, x)
        assert x["peak_mem_gib"] is None  # CPU: no device memory counter
        assert x["frames"] == (4 * x["batch"] if x["temporal"] else x["batch"])
    assert any(x.get("ablation") == "autocast NCHW" for x in rows)
    assert res["lipsync_e2e"]["status"].startswith("skipped")
    assert "bf16 matmul" in r.stdout and "fps" in r.stdout  # the printed table


def test_fast_sampler_choice_and_seam_helpers():
    sys.path.insert(0, str(ROOT / "bench"))
    import fast_sampler
    import seam_jitter

    rows = [dict(sampler="ddim", steps=200, psnr=30.0, lmd=1.00), dict(sampler="dpmpp_2m", steps=25, psnr=30.1, lmd=0.99),
            dict(sampler="dpmpp_2m", steps=10, psnr=29.5, lmd=1.015), dict(sampler="dpmpp_2m", steps=8, psnr=29.3, lmd=1.0),
            dict(sampler="dpmpp_2m", steps=5, psnr=28.0, lmd=1.0)]
    assert fast_sampler.choose(rows)["steps"] == 10  # 29.3 < 0.98 * 30 = 29.4: 8 steps is out
    assert fast_sampler.choose(rows[:1] + rows[-1:]) is None
    lucky = rows[:3] + [dict(sampler="dpmpp_2m", steps=8, psnr=29.0, lmd=1.0),
                        dict(sampler="dpmpp_2m", steps=6, psnr=29.9, lmd=1.0)]
    assert fast_sampler.choose(lucky)["steps"] == 10  # 6 passes but 8 does not: noise, not a choice
    p = np.zeros((6, 2, 2))
    p[:, :, 0] = np.arange(6)[:, None]  # steady motion: no second difference
    p[4:, :, 1] += 3.0  # a jump between frames 3 and 4
    d = seam_jitter.second_difference(p)
    assert np.isnan(d[0]) and np.isnan(d[-1])
    np.testing.assert_allclose(d[1:-1], [0, 0, 3, 3])
    assert seam_jitter.seam_frames([(0, 10), (7, 20)], 3).tolist() == [6, 7, 8, 9, 10]
