#!/usr/bin/env python3
"""Peak memory of lip-syncing a 10 s and a 60 s clip: inside a real ComfyUI server, and with the CLI.

    COMFYUI_DIR=/work/comfyui python bench/bench_comfy_memory.py [--size 0] [--steps 2] [--port 8193]

Not a test: it starts ComfyUI (``--cpu``, loopback) in a base directory of its own (models/,
custom_nodes/ with this pack linked in, input/, output/, temp/), so it touches nothing of the
ComfyUI checkout. What it measures:

1. *Node*: ``workflows/lipsync_long_video.api.json`` (LoadVideo + LoadAudio -> Load TalkFormer
   Model -> TalkFormer Lip Sync (Video) -> SaveVideo) on a 10 s and a 60 s clip of the same
   resolution, a fresh server for each; peak RSS of the server process (``VmHWM`` of
   /proc/PID/status, which covers start-up too, cross-checked by polling ``VmRSS`` at 20 Hz).
   The issue's bar: peak(60 s) / peak(10 s) <= 1.2.
2. *CLI*: ``python -m talkformer_core.sync`` on the same two clips; peak RSS from
   ``/usr/bin/time -v`` (Maximum resident set size), else the same /proc poller.
3. *Contrast*: the 60 s clip through ComfyUI's own IMAGE route, which decodes every frame into one
   float32 tensor: ``workflows/lipsync_video.api.json`` (LoadVideo -> GetVideoComponents -> the
   stage nodes -> CreateVideo -> SaveVideo) when the stage nodes are registered, else
   LoadVideo -> GetVideoComponents -> CreateVideo -> SaveVideo. A watchdog kills the server when its
   RSS passes ``--rss-limit-gb`` (the machine is shared); the table then says "> limit".

Clips: a talking clip (``--media``, default ../shared/media/videoretalking_face_5.mp4, 524x524,
25 fps, AAC) looped to length with its audio looped alike (``talkformer_core.video``), optionally
resized (``--size``, 0 = native). Checkpoint: the tiny preset with random weights (memory, not
quality, is measured), ``--steps`` denoising steps. Provenance marks are off unless
``--watermark`` (they cost time, not memory that grows with length).
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
import uuid
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MEDIA = ROOT.parent / "shared" / "media"
sys.path.insert(0, str(ROOT))


# ---------------------------------------------------------------------------------------------
# memory sampling (no psutil needed: /proc)

def _status_kb(pid: int, key: str) -> int | None:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1])
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        return None
    return None


class RSSPoller:
    """Polls VmRSS of a process (and its children) every ``interval`` s; keeps the peak. With
    ``limit_kb``, kills the process group when the sum passes it (``tripped`` then True)."""

    def __init__(self, pid: int, interval: float = 0.05, limit_kb: int | None = None, kill_pgid: int | None = None):
        self.pid, self.interval, self.limit_kb, self.kill_pgid = pid, interval, limit_kb, kill_pgid
        self.peak_kb = 0  # the whole tree (RSS summed: shared pages of a forked child count twice)
        self.main_peak_kb = 0  # the process itself
        self.children: dict[int, tuple[str, int]] = {}  # pid -> (command line, peak kB)
        self.tripped = False
        self._stop = threading.Event()
        self._t = threading.Thread(target=self._run, daemon=True)

    def _tree(self) -> list[int]:
        pids, todo = [], [self.pid]
        while todo:
            p = todo.pop()
            pids.append(p)
            try:
                for tid in os.listdir(f"/proc/{p}/task"):
                    with open(f"/proc/{p}/task/{tid}/children") as f:
                        todo += [int(c) for c in f.read().split()]
            except (FileNotFoundError, ProcessLookupError, PermissionError):
                pass
        return pids

    def _run(self) -> None:
        while not self._stop.is_set():
            total = 0
            for p in self._tree():
                kb = _status_kb(p, "VmRSS") or 0
                total += kb
                if p == self.pid:
                    self.main_peak_kb = max(self.main_peak_kb, kb)
                else:
                    cmd, peak = self.children.get(p, (None, 0))
                    if cmd is None:
                        try:
                            with open(f"/proc/{p}/cmdline", "rb") as f:
                                cmd = f.read().replace(b"\0", b" ").decode(errors="replace").strip()[:120]
                        except OSError:
                            cmd = "?"
                    self.children[p] = (cmd, max(peak, kb))
            self.peak_kb = max(self.peak_kb, total)
            if self.limit_kb and total > self.limit_kb and not self.tripped:
                self.tripped = True
                try:
                    os.killpg(self.kill_pgid or self.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            time.sleep(self.interval)

    def __enter__(self) -> "RSSPoller":
        self._t.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._t.join()


def gib(kb: float | None) -> str:
    return "n/a" if kb is None else f"{kb / 1024 / 1024:.2f} GiB"


# ---------------------------------------------------------------------------------------------
# inputs

def make_clip(src: Path, seconds: float, out: Path, size: int) -> Path:
    """``src`` looped to ``seconds`` (frames at 25 fps, audio looped alike), resized to size x size
    when ``size`` > 0. Streams: never holds the clip in memory."""
    import cv2
    import numpy as np

    from talkformer_core.video import VideoWriter, iter_frames, probe_video, read_audio_track

    if out.exists():
        return out
    info = probe_video(src)
    audio, rate = read_audio_track(src)  # (C, T)
    fps = 25.0
    n = int(round(seconds * fps))
    reps = int(np.ceil(seconds * rate / audio.shape[1]))
    audio = np.tile(audio, (1, reps))[:, : int(round(seconds * rate))]
    k = 0
    with VideoWriter(out, fps, audio=audio, audio_rate=rate, crf=20, preset="veryfast",
                     metadata={"comment": f"{src.name} looped to {seconds:g} s"}) as w:
        while k < n:
            for f in iter_frames(src, fps):
                if size and (f.shape[0] != size or f.shape[1] != size):
                    f = cv2.resize(f, (size, size), interpolation=cv2.INTER_AREA)
                w.write(f)
                k += 1
                if k >= n:
                    break
    print(f"  made {out.name}: {n} frames, {size or info.width}px, audio {rate} Hz x {audio.shape[0]}", flush=True)
    return out


def make_checkpoint(path: Path) -> Path:
    import torch

    from talkformer_core.config import tiny
    from talkformer_core.models.checkpoint import save_checkpoint
    from talkformer_core.models.model import TalkFormer

    if path.exists():
        return path
    torch.manual_seed(0)
    m = TalkFormer.from_config(tiny())
    mods = {"autoencoder": m.autoencoder, "landmark": m.landmark, "unet": m.unet}
    if m.appearance is not None:
        mods["appearance"] = m.appearance
    save_checkpoint(path, mods, m.config)
    return path


# ---------------------------------------------------------------------------------------------
# ComfyUI server

class Server:
    def __init__(self, comfy_dir: Path, python: str, base: Path, port: int, limit_kb: int | None):
        self.comfy_dir, self.python, self.base, self.port, self.limit_kb = comfy_dir, python, base, port, limit_kb
        self.url = f"http://127.0.0.1:{port}"
        self.proc: subprocess.Popen | None = None
        self.poller: RSSPoller | None = None
        self.log = base / f"server_{port}.log"

    def __enter__(self) -> "Server":
        cmd = [self.python, "main.py", "--cpu", "--listen", "127.0.0.1", "--port", str(self.port),
               "--base-directory", str(self.base), "--disable-auto-launch", "--preview-size", "256"]
        self.proc = subprocess.Popen(cmd, cwd=self.comfy_dir, stdout=open(self.log, "w"), stderr=subprocess.STDOUT,
                                     start_new_session=True)
        self.poller = RSSPoller(self.proc.pid, limit_kb=self.limit_kb, kill_pgid=self.proc.pid).__enter__()
        t0 = time.time()
        while time.time() - t0 < 180:
            if self.proc.poll() is not None:
                raise RuntimeError(f"ComfyUI died at start; see {self.log}:\n" + self.log.read_text()[-3000:])
            try:
                with urllib.request.urlopen(self.url + "/object_info/TalkFormerLipSyncVideo", timeout=5) as r:
                    if json.loads(r.read()):
                        return self
                    raise RuntimeError(f"TalkFormerLipSyncVideo is not registered; see {self.log}")
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                time.sleep(1)
        raise RuntimeError(f"ComfyUI did not answer in 180 s; see {self.log}")

    def object_info(self, name: str) -> dict:
        with urllib.request.urlopen(f"{self.url}/object_info/{name}", timeout=30) as r:
            return json.loads(r.read())

    def run(self, prompt: dict, timeout: float = 1800) -> dict:
        body = json.dumps({"prompt": prompt, "client_id": uuid.uuid4().hex}).encode()
        req = urllib.request.Request(self.url + "/prompt", body, {"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(req, timeout=60) as r:
                pid = json.loads(r.read())["prompt_id"]
        except urllib.error.HTTPError as e:
            raise RuntimeError(f"prompt rejected: {e.read().decode()[:2000]}") from None
        t0 = time.time()
        while time.time() - t0 < timeout:
            if self.proc.poll() is not None:
                return {"status": {"status_str": "killed" if self.poller.tripped else "died"}}
            try:
                with urllib.request.urlopen(f"{self.url}/history/{pid}", timeout=30) as r:
                    h = json.loads(r.read())
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                h = {}
            if pid in h and h[pid].get("status", {}).get("completed") is not None and \
                    h[pid]["status"].get("status_str") in ("success", "error"):
                return h[pid]
            time.sleep(0.5)
        raise RuntimeError(f"prompt did not finish in {timeout} s")

    def hwm_kb(self) -> int | None:
        return _status_kb(self.proc.pid, "VmHWM") if self.proc and self.proc.poll() is None else None

    def __exit__(self, *exc) -> None:
        if self.poller:
            self.poller.__exit__()
        if self.proc and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()


def prepare_base(base: Path, ckpt: Path) -> None:
    for d in ("custom_nodes", "models/talkformer", "input", "output", "temp", "user"):
        (base / d).mkdir(parents=True, exist_ok=True)
    link = base / "custom_nodes" / "talkformer_nodes"
    if not link.exists():
        link.symlink_to(ROOT, target_is_directory=True)
    dst = base / "models" / "talkformer" / ckpt.name
    if not dst.exists():
        shutil.copyfile(ckpt, dst)


def node_prompt(clip: str, ckpt: str, steps: int, watermark: bool) -> dict:
    p = json.loads((ROOT / "workflows" / "lipsync_long_video.api.json").read_text())
    for node in p.values():
        ct, inp = node["class_type"], node["inputs"]
        if ct == "LoadVideo":
            inp["file"] = clip
        elif ct == "LoadAudio":
            inp["audio"] = clip
        elif ct == "TalkFormerModelLoader":
            inp["ckpt_name"] = ckpt
        elif ct == "TalkFormerLipSyncVideo":
            inp.update(steps=steps, watermark=watermark)
        elif ct == "SaveVideo":
            inp["filename_prefix"] = "bench/node"
    return p


def stage_prompt(clip: str, ckpt: str, steps: int) -> dict:
    p = json.loads((ROOT / "workflows" / "lipsync_video.api.json").read_text())
    for node in p.values():
        ct, inp = node["class_type"], node["inputs"]
        if ct == "LoadVideo":
            inp["file"] = clip
        elif ct == "LoadAudio":
            inp["audio"] = clip
        elif ct == "TalkFormerModelLoader":
            inp["ckpt_name"] = ckpt
        elif ct == "TalkFormerSampler":
            inp["steps"] = steps
        elif ct == "SaveVideo":
            inp["filename_prefix"] = "bench/stage"
    return p


def core_prompt(clip: str) -> dict:
    return {
        "1": {"class_type": "LoadVideo", "inputs": {"file": clip}},
        "2": {"class_type": "GetVideoComponents", "inputs": {"video": ["1", 0]}},
        "3": {"class_type": "CreateVideo", "inputs": {"images": ["2", 0], "audio": ["2", 1], "fps": ["2", 2]}},
        "4": {"class_type": "SaveVideo", "inputs": {"video": ["3", 0], "filename_prefix": "bench/core",
                                                     "format": "auto", "codec": "auto"}},
    }


def measure_server(args, base: Path, prompt: dict, label: str) -> dict:
    limit = int(args.rss_limit_gb * 1024 * 1024) if args.rss_limit_gb > 0 else None
    with Server(Path(args.comfy_dir), args.comfy_python, base, args.port, limit) as srv:
        idle = srv.hwm_kb()
        t0 = time.time()
        h = srv.run(prompt)
        dt = time.time() - t0
        hwm = srv.hwm_kb()
        status = h.get("status", {}).get("status_str")
        err = None
        if status == "error":
            for ev, data in h["status"].get("messages", []):
                if ev == "execution_error":
                    err = f"{data.get('node_type')}: {data.get('exception_message', '')[:300]}"
        # the server process's own peak: VmHWM while it lives, the poller's once the watchdog killed it
        peak = max(hwm or 0, srv.poller.main_peak_kb)
        tripped = srv.poller.tripped
    kids = {str(p): {"cmd": c, "peak_kb": k} for p, (c, k) in srv.poller.children.items()}
    r = {"label": label, "status": status, "seconds": dt, "idle_kb": idle, "hwm_kb": hwm,
         "poll_main_peak_kb": srv.poller.main_peak_kb, "poll_tree_peak_kb": srv.poller.peak_kb,
         "children": kids, "peak_kb": peak, "tripped": tripped, "error": err}
    print(f"  {label}: {status}{' (RSS limit hit, killed)' if tripped else ''} in {dt:.1f} s, "
          f"idle {gib(idle)}, peak {gib(peak)} (VmHWM {gib(hwm)}, polled {gib(srv.poller.main_peak_kb)}; "
          f"process tree summed {gib(srv.poller.peak_kb)})" + (f"; {err}" if err else ""), flush=True)
    for p, (c, k) in srv.poller.children.items():
        print(f"    child {p}: peak {gib(k)}: {c}", flush=True)
    return r


def measure_cli(args, clip: Path, ckpt: Path, out: Path, label: str) -> dict:
    cmd = [sys.executable, "-m", "talkformer_core.sync", "--video", str(clip), "--audio", str(clip),
           "--checkpoint", str(ckpt), "--out", str(out), "--steps", str(args.steps), "--device", "cpu"]
    if not args.watermark:
        cmd.append("--no-watermark")
    use_time = Path("/usr/bin/time").exists()
    full = ["/usr/bin/time", "-v"] + cmd if use_time else cmd
    t0 = time.time()
    proc = subprocess.Popen(full, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    with RSSPoller(proc.pid) as poller:
        so, se = proc.communicate()
    dt = time.time() - t0
    max_kb = None
    for line in se.splitlines():
        if "Maximum resident set size" in line:
            max_kb = int(line.split(":")[1])
    peak = max_kb or poller.peak_kb
    status = "success" if proc.returncode == 0 else f"exit {proc.returncode}"
    r = {"label": label, "status": status, "seconds": dt, "peak_kb": peak, "time_v_kb": max_kb,
         "poll_peak_kb": poller.peak_kb}
    print(f"  {label}: {status} in {dt:.1f} s, peak {gib(peak)} (time -v {gib(max_kb)}, polled {gib(poller.peak_kb)})",
          flush=True)
    if proc.returncode != 0:
        print("    " + "\n    ".join(se.strip().splitlines()[-8:]), flush=True)
    return r


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--comfy-dir", default=os.environ.get("COMFYUI_DIR"))
    ap.add_argument("--comfy-python", default=os.environ.get("COMFYUI_PYTHON", "/work/comfyui-venv/bin/python"))
    ap.add_argument("--media", default=str(MEDIA / "videoretalking_face_5.mp4"))
    ap.add_argument("--work", default="/tmp/talkformer_bench_comfy_memory")
    ap.add_argument("--durations", type=float, nargs=2, default=(10.0, 60.0))
    ap.add_argument("--size", type=int, default=0, help="resize clips to size x size (0 = the source's size)")
    ap.add_argument("--steps", type=int, default=2)
    ap.add_argument("--port", type=int, default=8193)
    ap.add_argument("--watermark", action="store_true")
    ap.add_argument("--rss-limit-gb", type=float, default=9.0, help="kill the contrast run's server above this")
    ap.add_argument("--skip", nargs="*", default=[], choices=["node", "cli", "contrast"])
    ap.add_argument("--contrast", choices=["auto", "stage", "core"], default="auto")
    ap.add_argument("--json", help="also write the results here")
    args = ap.parse_args(argv)
    if not args.comfy_dir or not (Path(args.comfy_dir) / "main.py").is_file():
        print("needs a ComfyUI checkout: set COMFYUI_DIR (or --comfy-dir)", file=sys.stderr)
        return 2
    src = Path(args.media)
    if not src.is_file():
        print(f"{src}: not found (../shared/media)", file=sys.stderr)
        return 2

    work = Path(args.work)
    base = work / "comfy_base"
    work.mkdir(parents=True, exist_ok=True)
    print("inputs:", flush=True)
    ckpt = make_checkpoint(work / "bench_tiny.safetensors")
    short_s, long_s = args.durations
    tag = f"{args.size}px" if args.size else "native"
    clips = {d: make_clip(src, d, work / f"clip_{d:g}s_{tag}.mp4", args.size) for d in (short_s, long_s)}
    prepare_base(base, ckpt)
    for c in clips.values():
        dst = base / "input" / c.name
        if not dst.exists():
            shutil.copyfile(c, dst)

    res: dict[str, dict] = {}
    if "node" not in args.skip:
        print("ComfyUI, TalkFormer Lip Sync (Video) (a fresh server per clip):", flush=True)
        for d, c in clips.items():
            res[f"node_{d:g}"] = measure_server(args, base, node_prompt(c.name, ckpt.name, args.steps, args.watermark),
                                                f"node {d:g} s")
    if "cli" not in args.skip:
        print("CLI python -m talkformer_core.sync:", flush=True)
        for d, c in clips.items():
            res[f"cli_{d:g}"] = measure_cli(args, c, ckpt, work / f"cli_{d:g}s.mp4", f"cli {d:g} s")
    if "contrast" not in args.skip:
        kind = args.contrast
        if kind == "auto":
            kind = "stage" if (ROOT / "workflows" / "lipsync_video.api.json").exists() else "core"
        c = clips[long_s]
        print(f"ComfyUI, IMAGE route ({kind}), {long_s:g} s clip, RSS limit {args.rss_limit_gb:g} GiB:", flush=True)
        prompt = stage_prompt(c.name, ckpt.name, args.steps) if kind == "stage" else core_prompt(c.name)
        res[f"contrast_{kind}_{long_s:g}"] = measure_server(args, base, prompt, f"{kind} route {long_s:g} s")

    print()
    print(f"| path | {short_s:g} s peak RSS | {long_s:g} s peak RSS | ratio |")
    print("|---|---|---|---|")
    for key, name in (("node", "ComfyUI server, TalkFormer Lip Sync (Video)"), ("cli", "CLI talkformer_core.sync")):
        a, b = res.get(f"{key}_{short_s:g}"), res.get(f"{key}_{long_s:g}")
        if a and b and a["status"] == "success" and b["status"] == "success":
            print(f"| {name} | {gib(a['peak_kb'])} | {gib(b['peak_kb'])} | {b['peak_kb'] / a['peak_kb']:.3f} |")
        elif a or b:
            print(f"| {name} | {a and a['status']} | {b and b['status']} | n/a |")
    for k, v in res.items():
        if k.startswith("contrast"):
            more = " (killed at the limit: the real peak is higher)" if v["tripped"] else ""
            print(f"| ComfyUI server, {v['label']} | | {gib(v['peak_kb'])}{more} | |")
    if args.json:
        Path(args.json).write_text(json.dumps(res, indent=2))
    ok = all(res.get(f"{k}_{long_s:g}", {}).get("peak_kb", 0) <= 1.2 * res.get(f"{k}_{short_s:g}", {}).get("peak_kb", 1e18)
             for k in ("node", "cli") if f"{k}_{short_s:g}" in res)
    print("\nratio <= 1.2:", "yes" if ok else "NO")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
