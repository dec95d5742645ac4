#!/usr/bin/env python3
"""Run an API-format workflow on a running ComfyUI and save what it produced.

    python workflows/run_api.py http://127.0.0.1:8188 workflows/lipsync_video.api.json \
        --input video=my_clip.mp4 --input audio=speech.wav --out results/

Steps: upload every ``--input`` file (POST /upload/image, type=input; the endpoint takes any file,
video and audio included), put the uploaded name into the loader node(s) it names, POST /prompt,
wait for the prompt to finish (polling /history, with a timeout; a timeout interrupts the prompt
and takes it off the queue), report node errors clearly (the 400 answer's node_errors, and the
execution_error of a failed run), then download every output file (/view) into --out.

``--input KEY=PATH``: KEY names the loader nodes to fill: ``video`` (every LoadVideo), ``audio``
(every LoadAudio), ``image`` (every LoadImage), a node id ("1"), or a node title ("Template video").
``--set ID_OR_TITLE.INPUT=VALUE`` overrides any widget value (JSON parsed when it parses, e.g.
``--set "TalkFormer Sampler.steps=10"``, ``--set 4.ckpt_name=my.safetensors``).

Exit status: 0 success; 2 the server rejected the prompt (validation errors printed); 3 a node
failed while running; 4 interrupted; 5 timed out; 1 anything else (connection, bad arguments).
Standard library only (urllib): no requests, no websocket package.
"""
from __future__ import annotations

import argparse
import json
import mimetypes
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
import uuid
from pathlib import Path
from typing import Any

# loader class -> the input that names its file in ComfyUI's input folder
LOADERS = {"LoadVideo": "file", "LoadAudio": "audio", "LoadImage": "image"}
ALIASES = {"video": "LoadVideo", "audio": "LoadAudio", "image": "LoadImage"}


class ComfyError(Exception):
    def __init__(self, message: str, code: int = 1):
        super().__init__(message)
        self.code = code


# ---------------------------------------------------------------------------------------------
# HTTP

def _request(url: str, data: bytes | None = None, headers: dict | None = None, timeout: float = 60.0,
             method: str | None = None) -> tuple[int, bytes]:
    req = urllib.request.Request(url, data=data, headers=headers or {}, method=method)
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as e:  # 4xx/5xx carry a JSON body we want to show
        return e.code, e.read()
    except urllib.error.URLError as e:
        raise ComfyError(f"cannot reach ComfyUI at {url}: {e.reason}") from None


def _json(url: str, payload: Any | None = None, timeout: float = 60.0) -> tuple[int, Any]:
    data = None if payload is None else json.dumps(payload).encode("utf-8")
    status, body = _request(url, data, {"Content-Type": "application/json"} if data else None, timeout)
    try:
        return status, json.loads(body.decode("utf-8")) if body else None
    except ValueError:
        return status, body.decode("utf-8", "replace")


def upload(base: str, path: Path, subfolder: str = "", overwrite: bool = True) -> str:
    """POST /upload/image (multipart) -> the name to put in a loader node ("sub/name" in a subfolder)."""
    if not path.is_file():
        raise ComfyError(f"{path}: no such input file")
    boundary = uuid.uuid4().hex
    ctype = mimetypes.guess_type(path.name)[0] or "application/octet-stream"
    parts = []
    for name, value in (("type", "input"), ("subfolder", subfolder), ("overwrite", "true" if overwrite else "false")):
        parts.append(f"--{boundary}\r\nContent-Disposition: form-data; name=\"{name}\"\r\n\r\n{value}\r\n".encode())
    parts.append(f"--{boundary}\r\nContent-Disposition: form-data; name=\"image\"; filename=\"{path.name}\"\r\n"
                 f"Content-Type: {ctype}\r\n\r\n".encode() + path.read_bytes() + b"\r\n")
    parts.append(f"--{boundary}--\r\n".encode())
    status, body = _request(f"{base}/upload/image", b"".join(parts),
                            {"Content-Type": f"multipart/form-data; boundary={boundary}"}, timeout=600)
    if status != 200:
        raise ComfyError(f"upload of {path} failed: HTTP {status}: {body[:300]!r}")
    info = json.loads(body)
    return f"{info['subfolder']}/{info['name']}" if info.get("subfolder") else info["name"]


# ---------------------------------------------------------------------------------------------
# The prompt

def load_prompt(path: Path) -> dict:
    try:
        prompt = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise ComfyError(f"{path}: cannot read an API workflow ({e})") from None
    if isinstance(prompt, dict) and "nodes" in prompt and "links" in prompt:
        raise ComfyError(f"{path}: this is a UI-format workflow (drag it into ComfyUI); give its API "
                         f"twin (*.api.json) or export one with 'Export (API)'")
    if not isinstance(prompt, dict) or not all(isinstance(v, dict) and "class_type" in v for v in prompt.values()):
        raise ComfyError(f"{path}: expected an API-format workflow {{node id: {{class_type, inputs}}}}")
    return prompt


def find_nodes(prompt: dict, key: str) -> list[str]:
    """Node ids that ``key`` names: an alias (video/audio/image), a node id, a title, a class."""
    if key in prompt:
        return [key]
    cls = ALIASES.get(key)
    hits = [i for i, n in prompt.items()
            if (cls and n["class_type"] == cls) or n.get("_meta", {}).get("title") == key
            or (not cls and n["class_type"] == key)]
    if not hits:
        titles = sorted({n.get("_meta", {}).get("title", "") for n in prompt.values()} - {""})
        raise ComfyError(f"--input/--set {key!r} names no node; use video, audio, image, a node id "
                         f"({', '.join(sorted(prompt, key=lambda s: int(s) if s.isdigit() else 0))}) "
                         f"or a title ({'; '.join(titles)})")
    return hits


def substitute_input(prompt: dict, key: str, name: str) -> list[str]:
    ids = find_nodes(prompt, key)
    for i in ids:
        cls = prompt[i]["class_type"]
        field = LOADERS.get(cls)
        if field is None:
            raise ComfyError(f"--input {key}: node {i} is a {cls}, not a loader ({', '.join(LOADERS)}); "
                             f"use --set for other nodes")
        prompt[i]["inputs"][field] = name
    return ids


def set_value(prompt: dict, spec: str) -> None:
    target, sep, value = spec.partition("=")
    node, dot, field = target.rpartition(".")
    if not sep or not dot:
        raise ComfyError(f"--set {spec!r}: expected ID_OR_TITLE.INPUT=VALUE")
    try:
        v: Any = json.loads(value)
    except ValueError:
        v = value
    for i in find_nodes(prompt, node):
        if isinstance(prompt[i]["inputs"].get(field), list):
            raise ComfyError(f"--set {spec!r}: input {field!r} of node {i} is a link, not a widget")
        prompt[i]["inputs"][field] = v


def format_node_errors(resp: Any, prompt: dict) -> str:
    """The /prompt 400 answer as readable lines."""
    if not isinstance(resp, dict):
        return f"  {resp}"
    lines = []
    err = resp.get("error")
    if isinstance(err, dict):
        lines.append(f"  {err.get('type', 'error')}: {err.get('message', '')} {err.get('details', '')}".rstrip())
    for nid, ne in (resp.get("node_errors") or {}).items():
        title = prompt.get(nid, {}).get("_meta", {}).get("title", "")
        lines.append(f"  node {nid} {ne.get('class_type', '')}{f' ({title})' if title else ''}:")
        for e in ne.get("errors", []):
            inp = (e.get("extra_info") or {}).get("input_name")
            lines.append(f"    - {e.get('message', '')}{f' [input {inp}]' if inp else ''}: {e.get('details', '')}")
    return "\n".join(lines)


def format_execution_error(data: dict) -> str:
    tb = "".join(data.get("traceback") or []).rstrip().splitlines()[-6:]
    return (f"  node {data.get('node_id')} {data.get('node_type')} failed: "
            f"{data.get('exception_type')}: {data.get('exception_message', '').strip()}"
            + ("\n    " + "\n    ".join(tb) if tb else ""))


def queue_prompt(base: str, prompt: dict, client_id: str) -> str:
    status, resp = _json(f"{base}/prompt", {"prompt": prompt, "client_id": client_id})
    if status != 200:
        raise ComfyError(f"ComfyUI rejected the prompt (HTTP {status}):\n{format_node_errors(resp, prompt)}", 2)
    if resp.get("node_errors"):
        print("warnings from ComfyUI:\n" + format_node_errors(resp, prompt), file=sys.stderr)
    return resp["prompt_id"]


def wait(base: str, prompt_id: str, timeout: float, poll: float = 0.5, verbose: bool = True) -> dict:
    """Poll /history until the prompt is done; -> its history entry. Raises ComfyError on failure."""
    t0 = time.monotonic()
    last = ""
    while True:
        status, hist = _json(f"{base}/history/{urllib.parse.quote(prompt_id)}")
        entry = hist.get(prompt_id) if status == 200 and isinstance(hist, dict) else None
        if entry and entry.get("status", {}).get("completed") is not None and (
                entry["status"]["completed"] or entry["status"].get("status_str") == "error"):
            break
        if time.monotonic() - t0 > timeout:
            _json(f"{base}/queue", {"delete": [prompt_id]})
            _json(f"{base}/interrupt", {"prompt_id": prompt_id})
            raise ComfyError(f"timed out after {timeout:.0f} s waiting for prompt {prompt_id}; interrupted it", 5)
        if verbose:
            _, q = _json(f"{base}/queue")
            running = any(item[1] == prompt_id for item in (q or {}).get("queue_running", []))
            msg = "running" if running else "queued"
            if msg != last:
                print(f"[{time.monotonic() - t0:6.1f} s] {msg}", file=sys.stderr)
                last = msg
        time.sleep(poll)
    st = entry["status"]
    for event, data in st.get("messages", []):
        if event == "execution_error":
            raise ComfyError("the workflow failed while running:\n" + format_execution_error(data), 3)
        if event == "execution_interrupted":
            raise ComfyError(f"the workflow was interrupted at node {data.get('node_id')} {data.get('node_type')}", 4)
    if st.get("status_str") != "success":
        raise ComfyError(f"the workflow ended with status {st.get('status_str')!r}: {st.get('messages')}", 3)
    if verbose:
        print(f"[{time.monotonic() - t0:6.1f} s] done", file=sys.stderr)
    return entry


def output_files(entry: dict, types: tuple[str, ...] = ("output",)) -> list[dict]:
    """Every {filename, subfolder, type} in the history entry's outputs, of the given types."""
    files = []
    for nid, ui in (entry.get("outputs") or {}).items():
        for value in ui.values():
            for item in value if isinstance(value, list) else []:
                if isinstance(item, dict) and "filename" in item and item.get("type", "output") in types:
                    files.append({**item, "node": nid})
    return files


def download(base: str, item: dict, out_dir: Path) -> Path:
    q = urllib.parse.urlencode({"filename": item["filename"], "subfolder": item.get("subfolder", ""),
                                "type": item.get("type", "output")})
    status, body = _request(f"{base}/view?{q}", timeout=600)
    if status != 200:
        raise ComfyError(f"/view {item['filename']}: HTTP {status}")
    sub = Path(item.get("subfolder") or "")
    if sub.is_absolute() or ".." in sub.parts:
        sub = Path()
    dest = out_dir / sub / item["filename"]
    dest.parent.mkdir(parents=True, exist_ok=True)
    dest.write_bytes(body)
    return dest


def run(url: str, workflow: str | Path, inputs: list[str] = (), sets: list[str] = (), out: str | Path = "out",
        timeout: float = 3600.0, include_temp: bool = False, verbose: bool = True) -> list[Path]:
    """Everything main() does; returns the downloaded files. Raises ComfyError."""
    base = url.rstrip("/")
    prompt = load_prompt(Path(workflow))
    for spec in inputs:
        key, sep, path = spec.partition("=")
        if not sep:
            raise ComfyError(f"--input {spec!r}: expected KEY=PATH")
        name = upload(base, Path(path))
        ids = substitute_input(prompt, key, name)
        if verbose:
            print(f"uploaded {path} as {name!r} -> node(s) {', '.join(ids)}", file=sys.stderr)
    for spec in sets:
        set_value(prompt, spec)
    client_id = uuid.uuid4().hex
    prompt_id = queue_prompt(base, prompt, client_id)
    if verbose:
        print(f"queued prompt {prompt_id}", file=sys.stderr)
    entry = wait(base, prompt_id, timeout, verbose=verbose)
    out_dir = Path(out)
    out_dir.mkdir(parents=True, exist_ok=True)
    types = ("output", "temp") if include_temp else ("output",)
    paths = [download(base, item, out_dir) for item in output_files(entry, types)]
    return paths


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter,
                                 epilog=__doc__.split("\n\n", 2)[2])
    ap.add_argument("url", help="ComfyUI address, e.g. http://127.0.0.1:8188")
    ap.add_argument("workflow", help="an API-format workflow (*.api.json)")
    ap.add_argument("--input", action="append", default=[], metavar="KEY=PATH",
                    help="upload PATH and use it in the loader node(s) KEY names (video, audio, image, id, title)")
    ap.add_argument("--set", action="append", default=[], metavar="NODE.INPUT=VALUE", help="override a widget value")
    ap.add_argument("--out", default="out", help="folder for the downloaded outputs (default ./out)")
    ap.add_argument("--timeout", type=float, default=3600.0, help="seconds to wait for the run (default 3600)")
    ap.add_argument("--include-temp", action="store_true", help="also download preview (temp) images")
    ap.add_argument("-q", "--quiet", action="store_true")
    a = ap.parse_args(argv)
    try:
        paths = run(a.url, a.workflow, a.input, a.set, a.out, a.timeout, a.include_temp, verbose=not a.quiet)
    except ComfyError as e:
        print(f"error: {e}", file=sys.stderr)
        return e.code
    for p in paths:
        print(p)
    if not paths:
        print("the workflow ran but produced no output files", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
