"""bench/bench_gpu.py runs on the CPU (--quick) without mediapipe or PyAV and writes its JSON."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

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
