#!/usr/bin/env python3
"""Write the drag-and-drop workflows (UI format 0.4) and their API-format twins from one graph each.

    python workflows/build_workflows.py            # (re)write workflows/*.json
    python workflows/build_workflows.py --check    # exit 1 if a file on disk differs from the graphs
    python workflows/build_workflows.py --object-info http://127.0.0.1:8188   # node defs from a live server

Each graph below lists nodes (type, position, widget values by input name) and links (from node
and output name to node and input name). Both files are derived from it with the node definitions
of ComfyUI's /object_info: for core nodes the recorded tests/fixtures/comfy_object_info.json (ComfyUI
0.3.64), for ours the pack's own classes, converted the way ComfyUI's server.py node_info does. So
widget order, socket order and the API input names are the real ones, and the twins cannot drift.

What the frontend (1.27) writes and we mirror: every widget is also
listed in ``inputs`` (after the sockets) with ``"widget": {"name"}``; ``widgets_values`` holds the
widget values in order plus frontend-only entries: the control_after_generate combo after a seed,
LoadVideo/LoadImage's upload button ("image"), LoadAudio's audioUI (null) and upload (""). The API
prompt has widget values by name (audioUI as ""), links as [node id, output slot], no
frontend-only nodes (MarkdownNote).
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import sys
import urllib.request
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
WORKFLOWS = ROOT / "workflows"
FIXTURE = ROOT / "tests" / "fixtures" / "comfy_object_info.json"
FRONTEND_VERSION = "1.27.10"
WIDGET_TYPES = {"INT", "FLOAT", "STRING", "BOOLEAN", "COMBO"}
FRONTEND_ONLY = {"MarkdownNote", "Note", "Reroute", "PrimitiveNode"}
PACK_ID = "comfyui-talkformer"  # pyproject [project] name = the registry id (cnr_id)

# Default file names the workflows point at (run_api.py --input replaces them).
CHECKPOINT = "demo_astronaut.safetensors"
TEMPLATE_VIDEO = "talkformer_template.mp4"
DRIVING_AUDIO = "talkformer_speech.wav"


# ---------------------------------------------------------------------------------------------
# node definitions

def load_pack(root: Path = ROOT):
    """Import the pack the way ComfyUI does (by file, under a path-derived module name)."""
    name = "talkformer_pack_build"
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, root / "__init__.py", submodule_search_locations=[str(root)])
    mod = importlib.util.module_from_spec(spec)
    sys.modules[name] = mod
    spec.loader.exec_module(mod)
    return mod


def node_info(name: str, cls: type, display: dict[str, str]) -> dict:
    """A classic node class -> its /object_info entry (ComfyUI server.py node_info)."""
    inputs = cls.INPUT_TYPES()
    info = {
        "input": inputs,
        "input_order": {k: list(v.keys()) for k, v in inputs.items()},
        "output": list(cls.RETURN_TYPES),
        "output_is_list": list(getattr(cls, "OUTPUT_IS_LIST", [False] * len(cls.RETURN_TYPES))),
        "output_name": list(getattr(cls, "RETURN_NAMES", cls.RETURN_TYPES)),
        "name": name,
        "display_name": display.get(name, name),
        "description": getattr(cls, "DESCRIPTION", ""),
        "category": getattr(cls, "CATEGORY", "sd"),
        "output_node": bool(getattr(cls, "OUTPUT_NODE", False)),
    }
    if hasattr(cls, "OUTPUT_TOOLTIPS"):
        info["output_tooltips"] = list(cls.OUTPUT_TOOLTIPS)
    return info


def our_object_info() -> dict[str, dict]:
    pack = load_pack()
    return {k: json.loads(json.dumps(node_info(k, c, pack.NODE_DISPLAY_NAME_MAPPINGS)))
            for k, c in pack.NODE_CLASS_MAPPINGS.items()}


def core_object_info() -> dict[str, dict]:
    return json.loads(FIXTURE.read_text())["nodes"]


def object_info(url: str | None = None) -> dict[str, dict]:
    if url:
        with urllib.request.urlopen(url.rstrip("/") + "/object_info", timeout=60) as r:
            return json.loads(r.read())
    return {**core_object_info(), **our_object_info()}


def _spec_type(spec: list) -> str:
    t = spec[0]
    return "COMBO" if isinstance(t, list) else t


def _spec_opts(spec: list) -> dict:
    return spec[1] if len(spec) > 1 and isinstance(spec[1], dict) else {}


def _combo_options(spec: list) -> list | None:
    if isinstance(spec[0], list):
        return spec[0]
    return _spec_opts(spec).get("options") if spec[0] == "COMBO" else None


def is_widget(spec: list) -> bool:
    return _spec_type(spec) in WIDGET_TYPES


def input_specs(info: dict) -> list[tuple[str, list, bool]]:
    """(name, spec, optional) in definition order: required then optional (hidden left out)."""
    out = []
    for section in ("required", "optional"):
        for name in info.get("input_order", {}).get(section, list(info["input"].get(section, {}))):
            out.append((name, info["input"][section][name], section == "optional"))
    return out


def has_control(name: str, spec: list) -> bool:
    """The frontend adds a control_after_generate combo after this INT widget."""
    if _spec_type(spec) != "INT":
        return False
    flag = _spec_opts(spec).get("control_after_generate")
    return bool(flag) if flag is not None else name in ("seed", "noise_seed")


# ---------------------------------------------------------------------------------------------
# graphs

@dataclass
class N:
    id: int
    type: str
    pos: tuple[float, float]
    widgets: dict[str, Any] = field(default_factory=dict)
    title: str | None = None
    size: tuple[float, float] | None = None
    control: str = "fixed"  # control_after_generate value for a seed widget


@dataclass
class Graph:
    name: str
    description: str
    nodes: list[N]
    links: list[tuple[int, str, int, str]]  # (from node, output name, to node, input name)


NOTE = """## TalkFormer lip-sync, stage by stage
Opens on `{ckpt}`: the **smoke-test** model (one synthetic face, 32 px; on a real person it gives a blurred
box). For a real result train your person with `finetune_then_lipsync.json` and pick that model here.
1. Pick a checkpoint from `models/talkformer/` in **Load TalkFormer Model**.
2. **Template video**: a video of one person talking (LoadVideo); **Driving audio**: the new speech.
3. Queue. Match Length fits the frames to the audio (pingpong / loop / trim); the face is tracked,
   lips and jaw landmarks are predicted from the audio, the lower face is re-synthesised and blended back.
Steps: DPM-Solver++(2M) at 10 is within 2 % of the paper's 200 DDIM steps (docs/speed.md)."""


def _core_chain(upscale: bool = False, previews: bool = False) -> tuple[list[N], list[tuple]]:
    # 6 columns 320 apart, output nodes stacked: the graph opens at a zoom where the frontend draws text
    x = [0, 320, 640, 960, 1280, 1600]
    nodes = [
        N(1, "LoadVideo", (x[0], 0), {"file": TEMPLATE_VIDEO}, title="Template video", size=(300, 380)),
        N(2, "LoadAudio", (x[0], 430), {"audio": DRIVING_AUDIO}, title="Driving audio", size=(300, 140)),
        N(3, "TalkFormerModelLoader", (x[0], 620), {"ckpt_name": CHECKPOINT, "dtype": "auto"}),
        N(4, "GetVideoComponents", (x[1], 0)),
        N(5, "TalkFormerMatchLength", (x[1], 140), {"mode": "pingpong"}),
        N(6, "TalkFormerAudioFeatures", (x[2], 380), {"fps": 25.0, "frame_count": 0}),
        N(7, "TalkFormerDetectFaceLandmarks", (x[2], 0), {"crop_size": 256, "face_index": -1}),
        N(8, "TalkFormerEncodeReference", (x[3], 0), {"frame_index": -1}),
        N(9, "TalkFormerCompleteLandmarks", (x[3], 300)),
        N(10, "TalkFormerSampler", (x[4], 0), {"steps": 10, "sampler": "dpmpp_2m", "seed": 0, "eta": 0.0}),
        N(11, "TalkFormerBlendFace", (x[4], 360), {"feather": -1}),
        N(12, "CreateVideo", (x[5], 0), {"fps": 25.0}),
        N(16, "TalkFormerMarkVideo", (x[5], 170), {"c2pa_cert": "", "c2pa_key": "", "filename_prefix": ""},
          title="Mark Video"),
        N(13, "SaveVideo", (x[5], 400), {"filename_prefix": "talkformer/lipsync", "format": "auto", "codec": "auto"},
          size=(300, 400)),
        N(14, "MarkdownNote", (x[0], 820), {"text": NOTE.format(ckpt=CHECKPOINT)}, title="Read me", size=(520, 260)),
    ]
    links = [
        (1, "VIDEO", 4, "video"),
        (4, "images", 5, "images"), (2, "AUDIO", 5, "audio"), (4, "fps", 5, "fps"),
        (5, "audio", 6, "audio"), (4, "fps", 6, "fps"), (5, "frame_count", 6, "frame_count"),
        (5, "images", 7, "images"),
        (3, "model", 8, "model"), (7, "face_track", 8, "face_track"), (5, "images", 8, "images"),
        (3, "model", 9, "model"), (7, "face_track", 9, "face_track"), (6, "audio_features", 9, "audio_features"),
        (3, "model", 10, "model"), (5, "images", 10, "images"), (7, "face_track", 10, "face_track"),
        (9, "landmarks", 10, "landmarks"), (8, "reference", 10, "reference"),
        (5, "images", 11, "images"), (10, "face_crops", 11, "face_crops"), (7, "face_track", 11, "face_track"),
        (5, "audio", 12, "audio"), (4, "fps", 12, "fps"),
        (12, "VIDEO", 16, "video"), (16, "video", 13, "video"),
    ]
    if upscale:
        nodes.append(N(15, "ImageScaleBy", (x[4], 560), {"upscale_method": "lanczos", "scale_by": 2.0},
                       title="Upscale (lanczos x2)"))
        links += [(11, "images", 15, "image"), (15, "IMAGE", 12, "images")]
        nodes[-2].widgets["text"] += "\n\nThis variant upscales the result 2x (ImageScaleBy, lanczos) before encoding."
    else:
        links.append((11, "images", 12, "images"))
    if previews:
        links.append((5, "images", 9, "images"))  # Complete Landmarks draws its preview on the crops
        for nid, (src, out) in enumerate([(7, "preview"), (9, "preview"), (10, "face_crops"), (11, "images")], start=20):
            xx, y = {7: (x[2], 560), 9: (x[3], 560), 10: (x[4], 560), 11: (x[4], 900)}[src]
            nodes.append(N(nid, "PreviewImage", (xx, y), size=(300, 300),
                           title={7: "Face track", 9: "Predicted landmarks", 10: "Generated faces",
                                  11: "Blended frames"}[src]))
            links.append((src, out, nid, "images"))
    return nodes, links


LONG_NOTE = """## TalkFormer lip-sync, long videos (one node, streaming)
Opens on `{ckpt}`: the **smoke-test** model (one synthetic face, 32 px; on a real person it gives a blurred
box). For a real result train your person with `finetune_then_lipsync.json` and pick that model here.
1. Pick a checkpoint from `models/talkformer/` in **Load TalkFormer Model**.
2. **Template video**: a video of one person talking (Load Video); **Driving audio**: the new speech
   (disconnect it to re-sync the video to its own audio track).
3. Queue. **TalkFormer Lip Sync (Video)** reads the video from its file and writes the result chunk by
   chunk, so memory stays flat however long the clip is; Save Video keeps the mp4 (h264 + AAC).
For short clips you want to chain with other image nodes, use the stage-by-stage workflows instead."""


def _long_video_chain() -> tuple[list[N], list[tuple]]:
    """LoadVideo + LoadAudio -> Load TalkFormer Model -> TalkFormer Lip Sync (Video) -> SaveVideo."""
    nodes = [
        N(1, "LoadVideo", (0, 0), {"file": TEMPLATE_VIDEO}, title="Template video", size=(300, 380)),
        N(2, "LoadAudio", (0, 430), {"audio": DRIVING_AUDIO}, title="Driving audio", size=(300, 140)),
        N(3, "TalkFormerModelLoader", (0, 620), {"ckpt_name": CHECKPOINT, "dtype": "auto"}),
        N(4, "TalkFormerLipSyncVideo", (380, 0),
          {"steps": 10, "sampler": "dpmpp_2m", "seed": 0, "length_mode": "pingpong", "face_index": -1,
           "reference_frame": -1, "feather": -1, "watermark": True}),
        N(5, "SaveVideo", (780, 0), {"filename_prefix": "talkformer/lipsync", "format": "auto", "codec": "auto"},
          size=(300, 400)),
        N(6, "MarkdownNote", (380, 430), {"text": LONG_NOTE.format(ckpt=CHECKPOINT)}, title="Read me", size=(520, 260)),
    ]
    links = [
        (1, "VIDEO", 4, "video"), (3, "model", 4, "model"), (2, "AUDIO", 4, "audio"),
        (4, "video", 5, "video"),
    ]
    return nodes, links


IPLAP_CHECKPOINT = "iplap.safetensors"
IPLAP_NOTE = """## Lip-sync with IP-LAP's published weights
1. Download IP-LAP's two checkpoints (links in IP-LAP's README, github.com/Weizhi-Zhong/IP_LAP) and convert them once:
   `python -m talkformer_core.convert iplap --landmark-generator landmarkgenerator_checkpoint.pth --renderer renderer_checkpoint.pth --out models/talkformer/{ckpt}`
2. Pick `{ckpt}` in **Load TalkFormer Model** (the loader reads the kind from the file).
3. Queue. The same streaming node runs IP-LAP's landmark generator and 128x128 renderer instead of the
   diffusion stage (steps / sampler / seed are not used). This is IP-LAP's model (CVPR 2023, Apache-2.0),
   not the TalkFormer paper's; see docs/iplap.md."""


def _iplap_chain() -> tuple[list[N], list[tuple]]:
    """The long-video chain on an IP-LAP checkpoint converted by talkformer_core.convert (docs/iplap.md)."""
    nodes, links = _long_video_chain()
    nodes[2].widgets["ckpt_name"] = IPLAP_CHECKPOINT
    nodes[2].title = "Load TalkFormer Model (IP-LAP weights)"
    nodes[-1].widgets["text"] = IPLAP_NOTE.format(ckpt=IPLAP_CHECKPOINT)
    return nodes, links


FINETUNE_NOTE = """## Your person, your new audio (start here)
1. **Person video**: 5-10 s (or more) of ONE person talking, with its audio (Load Video).
2. **New speech**: the audio the person should say (Load Audio).
3. Queue. **Train TalkFormer on Video** trains a model of that person within `budget_minutes` (30 min fits
   a 5-10 s clip on a small CPU; a GPU does far more in the same time) and saves
   `models/talkformer/<name>.safetensors`; **TalkFormer Lip Sync (Video)** then dubs the video.
4. New audio for the same person: change only **New speech** and queue again. The model of this video
   with these settings exists, so training is skipped and sampling starts at once.
Cancel keeps a checkpoint; queue again with `resume` on to continue. Optional: your Stable Diffusion VAE
(Load VAE) skips the autoencoder stage; IP-LAP weights converted by `talkformer_core.convert` start the
landmark module. `max_steps` > 0 caps training by steps instead of time."""


def _finetune_chain() -> tuple[list[N], list[tuple]]:
    """LoadVideo -> Train TalkFormer on Video -> TalkFormer Lip Sync (Video) (+ new audio) -> SaveVideo."""
    nodes = [
        N(1, "LoadVideo", (0, 0), {"file": TEMPLATE_VIDEO}, title="Person video", size=(300, 380)),
        N(2, "LoadAudio", (0, 430), {"audio": DRIVING_AUDIO}, title="New speech", size=(300, 140)),
        N(3, "TalkFormerTrainOnVideo", (380, 0),
          {"name": "person", "budget_minutes": 30.0, "preset": "cpu64", "resume": True, "holdout": 0.0,
           "fps": 25.0, "max_steps": 0, "iplap_checkpoint": "none"}),
        N(4, "TalkFormerLipSyncVideo", (780, 0),
          {"steps": 10, "sampler": "dpmpp_2m", "seed": 0, "length_mode": "pingpong", "face_index": -1,
           "reference_frame": -1, "feather": -1, "watermark": True}),
        N(5, "SaveVideo", (1180, 0), {"filename_prefix": "talkformer/person_lipsync", "format": "auto",
                                      "codec": "auto"}, size=(300, 400)),
        N(6, "MarkdownNote", (380, 430), {"text": FINETUNE_NOTE}, title="Read me", size=(560, 300)),
    ]
    links = [
        (1, "VIDEO", 3, "video"), (1, "VIDEO", 4, "video"), (3, "model", 4, "model"), (2, "AUDIO", 4, "audio"),
        (4, "video", 5, "video"),
    ]
    return nodes, links


def graphs() -> list[Graph]:
    n_a, l_a = _core_chain()
    n_b, l_b = _core_chain(upscale=True)
    n_c, l_c = _core_chain(previews=True)
    n_d, l_d = _long_video_chain()
    return [
        Graph("lipsync_long_video", "Template video + driving audio -> lip-synced video in one streaming node "
              "(long videos, bounded memory).", n_d, l_d),
        Graph("lipsync_video", "Template video + driving audio -> lip-synced video (core video nodes).", n_a, l_a),
        Graph("lipsync_upscale", "The same, upscaled 2x with core ImageScaleBy (lanczos) before encoding.", n_b, l_b),
        Graph("stage_by_stage", "Every stage's preview wired to PreviewImage.", n_c, l_c),
        Graph("iplap_lipsync", "Template video + driving audio -> lip-synced video with IP-LAP's published "
              "weights (converted by talkformer_core.convert), streaming.", *_iplap_chain()),
        Graph("finetune_then_lipsync", "Start here: train a model of the person in a video (once per video and "
              "settings), then lip-sync that video to new audio.", *_finetune_chain()),
    ]


# ---------------------------------------------------------------------------------------------
# graph -> UI workflow and API prompt

class GraphError(ValueError):
    pass


def _widget_rows(node: N, info: dict) -> list[dict]:
    """Widgets of a node in frontend order: {name, type, value, api (send in prompt), input (listed in inputs)}."""
    rows = []
    for name, spec, optional in input_specs(info):
        if not is_widget(spec):
            continue
        opts = _spec_opts(spec)
        if name in node.widgets:
            value = node.widgets[name]
        elif "default" in opts:
            value = opts["default"]
        elif _combo_options(spec):
            value = _combo_options(spec)[0]
        else:
            raise GraphError(f"node {node.id} {node.type}: no value for widget {name!r} and no default")
        options = _combo_options(spec)
        upload = any(opts.get(k) for k in ("image_upload", "video_upload", "audio_upload"))
        if options and not upload and value not in options:
            raise GraphError(f"node {node.id} {node.type}: {name}={value!r} is not one of {options}")
        rows.append({"name": name, "type": _spec_type(spec), "value": value, "api": True, "input": True,
                     "optional": optional})
        if has_control(name, spec):
            rows.append({"name": "control_after_generate", "value": node.control, "api": False, "input": False})
        if opts.get("image_upload") or opts.get("video_upload"):
            rows.append({"name": "upload", "type": "IMAGEUPLOAD", "value": "image", "api": False, "input": True,
                         "localized": "choose file to upload"})
        if opts.get("audio_upload"):
            rows.append({"name": "audioUI", "type": "AUDIO_UI", "value": None, "api": True, "api_value": "",
                         "input": True})
            rows.append({"name": "upload", "type": "AUDIOUPLOAD", "value": "", "api": False, "input": True,
                         "localized": "choose file to upload"})
    return rows


def _estimate_size(node: N, n_sockets: int, n_outputs: int, n_widgets: int) -> list[float]:
    if node.size:
        return list(node.size)
    w = 315 if node.type.startswith("TalkFormer") else 270
    return [w, 30 + 22 * max(n_sockets, n_outputs, 1) + 24 * n_widgets + 8]


def _topo_order(g: Graph) -> dict[int, int]:
    deps = {n.id: {src for src, _, dst, _ in g.links if dst == n.id} for n in g.nodes}
    order, done = {}, set()
    while len(done) < len(deps):
        ready = sorted(i for i, d in deps.items() if i not in done and d <= done)
        if not ready:
            raise GraphError(f"{g.name}: the graph has a cycle")
        for i in ready:
            order[i] = len(order)
            done.add(i)
    return order


def build(g: Graph, infos: dict[str, dict]) -> tuple[dict, dict]:
    """-> (ui_workflow, api_prompt)."""
    by_id = {n.id: n for n in g.nodes}
    for n in g.nodes:
        if n.type not in infos and n.type not in FRONTEND_ONLY:
            raise GraphError(f"{g.name}: node {n.id} has unknown type {n.type!r}")
    order = _topo_order(g)
    # resolve links: output slot by name, input by name
    resolved = []
    for k, (src, out, dst, inp) in enumerate(g.links, start=1):
        s_info, d_info = infos[by_id[src].type], infos[by_id[dst].type]
        if out not in s_info["output_name"]:
            raise GraphError(f"{g.name}: node {src} {by_id[src].type} has no output {out!r} ({s_info['output_name']})")
        slot = s_info["output_name"].index(out)
        otype = s_info["output"][slot]
        specs = {name: spec for name, spec, _ in input_specs(d_info)}
        if inp not in specs:
            raise GraphError(f"{g.name}: node {dst} {by_id[dst].type} has no input {inp!r}")
        itype = _spec_type(specs[inp])
        if itype != otype and "*" not in (itype, otype):
            raise GraphError(f"{g.name}: link {src}.{out} ({otype}) -> {dst}.{inp} ({itype}): types differ")
        resolved.append({"id": k, "src": src, "slot": slot, "dst": dst, "input": inp, "type": otype})
    into = {(r["dst"], r["input"]): r for r in resolved}

    ui_nodes, api = [], {}
    for n in sorted(g.nodes, key=lambda n: n.id):
        if n.type in FRONTEND_ONLY:
            ui_nodes.append({"id": n.id, "type": n.type, "pos": list(n.pos), "size": list(n.size or (400, 200)),
                             "flags": {}, "order": order[n.id], "mode": 0, "inputs": [], "outputs": [],
                             **({"title": n.title} if n.title else {}), "properties": {},
                             "widgets_values": [n.widgets.get("text", "")]})
            continue
        info = infos[n.type]
        rows = _widget_rows(n, info)
        inputs, api_inputs, api_links = [], {}, {}
        for name, spec, optional in input_specs(info):
            if is_widget(spec):
                continue
            link = into.get((n.id, name))
            entry = {"localized_name": name, "name": name}
            if optional:
                entry["shape"] = 7
            entry.update({"type": _spec_type(spec), "link": link["id"] if link else None})
            inputs.append(entry)
            if link:
                api_links[name] = [str(link["src"]), link["slot"]]
            elif not optional:
                raise GraphError(f"{g.name}: required input {name!r} of node {n.id} {n.type} is not connected")
        n_sockets = len(inputs)
        for r in rows:
            if r["input"]:
                link = into.get((n.id, r["name"]))
                entry = {"localized_name": r.get("localized", r["name"]), "name": r["name"]}
                if r.get("optional"):
                    entry["shape"] = 7
                entry.update({"type": r["type"], "widget": {"name": r["name"]}, "link": link["id"] if link else None})
                inputs.append(entry)
            if r["api"]:
                link = into.get((n.id, r["name"]))
                api_inputs[r["name"]] = [str(link["src"]), link["slot"]] if link else r.get("api_value", r["value"])
        outputs = []
        for slot, (otype, oname) in enumerate(zip(info["output"], info["output_name"])):
            ids = [r["id"] for r in resolved if r["src"] == n.id and r["slot"] == slot]
            outputs.append({"localized_name": oname, "name": oname, "type": otype, "links": ids or None})
        props: dict[str, Any] = {"Node name for S&R": n.type}
        if n.type.startswith("TalkFormer"):
            props.update({"cnr_id": PACK_ID, "ver": _pack_version()})
        node = {"id": n.id, "type": n.type, "pos": list(n.pos),
                "size": _estimate_size(n, n_sockets, len(outputs), sum(1 for r in rows if r["input"])),
                "flags": {}, "order": order[n.id], "mode": 0, "inputs": inputs, "outputs": outputs}
        if n.title:
            node["title"] = n.title
        node["properties"] = props
        if rows:
            node["widgets_values"] = [r["value"] for r in rows]
        ui_nodes.append(node)
        api[str(n.id)] = {"inputs": {**api_inputs, **api_links}, "class_type": n.type,
                          "_meta": {"title": n.title or info.get("display_name", n.type)}}
    ui = {
        "id": str(uuid.uuid5(uuid.NAMESPACE_URL, f"https://github.com/talkformer/comfyui-talkformer/{g.name}")),
        "revision": 0,
        "last_node_id": max(n.id for n in g.nodes),
        "last_link_id": len(resolved),
        "nodes": ui_nodes,
        "links": [[r["id"], r["src"], r["slot"], r["dst"], _input_index(ui_nodes, r["dst"], r["input"]), r["type"]]
                  for r in resolved],
        "groups": [],
        "config": {},
        "extra": {"ds": fit_view(ui_nodes), "frontendVersion": FRONTEND_VERSION,
                  "info": {"name": g.name, "description": g.description}},
        "version": 0.4,
    }
    return ui, api


# The window a workflow must fit when it is opened: a 1400x900 browser window, below the frontend's
# menu and tab strip (about 90 px in frontend 1.27), with a margin.
VIEW_W, VIEW_H, VIEW_TOP, VIEW_MARGIN, VIEW_MAX_SCALE = 1400, 900, 100, 20, 0.8
VIEW_MIN_SCALE = 0.6  # below it the frontend (1.27) draws nodes without text (low-quality mode)
TITLE_H = 30  # a node's title bar is drawn above its pos


def fit_view(ui_nodes: list[dict]) -> dict:
    """The canvas transform (LiteGraph DragAndScale: screen = (pos + offset) * scale) that shows every
    node, title bars included, inside the window below the tab strip."""
    x0 = min(n["pos"][0] for n in ui_nodes)
    y0 = min(n["pos"][1] for n in ui_nodes) - TITLE_H
    x1 = max(n["pos"][0] + n["size"][0] for n in ui_nodes)
    y1 = max(n["pos"][1] + n["size"][1] for n in ui_nodes)
    scale = min(VIEW_MAX_SCALE, (VIEW_W - 2 * VIEW_MARGIN) / (x1 - x0), (VIEW_H - VIEW_TOP - VIEW_MARGIN) / (y1 - y0))
    scale = float(f"{scale:.3f}")
    return {"scale": scale, "offset": [round(VIEW_MARGIN / scale - x0, 1), round(VIEW_TOP / scale - y0, 1)]}


def _input_index(ui_nodes: list[dict], node_id: int, name: str) -> int:
    node = next(n for n in ui_nodes if n["id"] == node_id)
    return [i["name"] for i in node["inputs"]].index(name)


def _pack_version() -> str:
    try:
        import tomllib

        return tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]
    except Exception:
        return "0.0.0"


def dumps(obj: Any) -> str:
    return json.dumps(obj, indent=2, ensure_ascii=False) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--check", action="store_true", help="compare with the files on disk; write nothing")
    ap.add_argument("--object-info", metavar="URL", help="take node definitions from a running ComfyUI")
    ap.add_argument("--out", default=str(WORKFLOWS))
    a = ap.parse_args(argv)
    infos = object_info(a.object_info)
    out = Path(a.out)
    stale = []
    for g in graphs():
        ui, api = build(g, infos)
        for path, obj in ((out / f"{g.name}.json", ui), (out / f"{g.name}.api.json", api)):
            text = dumps(obj)
            if a.check:
                if not path.exists() or path.read_text() != text:
                    stale.append(path)
            else:
                path.write_text(text)
                print(f"wrote {path}")
    if stale:
        print("out of date (run workflows/build_workflows.py): " + ", ".join(map(str, stale)), file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
