"""Workflows: registered node types only, links between matching types, API twins equal to their UI
workflows, files in sync with build_workflows.py; run_api.py's offline parts.

Node definitions: ours from the pack's NODE_CLASS_MAPPINGS, core ones from
tests/fixtures/comfy_object_info.json (recorded from ComfyUI 0.3.64's /object_info). The twin check
below re-derives the API prompt from the UI file independently of the builder, with the frontend's
rules (widget inputs in order, control_after_generate after a seed, upload widgets not sent,
LoadAudio's audioUI sent as "").
"""
from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
WF = ROOT / "workflows"
FIXTURE = ROOT / "tests" / "fixtures" / "comfy_object_info.json"
UI_FILES = sorted(p for p in WF.glob("*.json") if not p.name.endswith(".api.json"))
FRONTEND_ONLY = {"MarkdownNote", "Note", "Reroute", "PrimitiveNode"}
WIDGET_TYPES = {"INT", "FLOAT", "STRING", "BOOLEAN", "COMBO"}
STAGE_NODES = {"TalkFormerModelLoader", "TalkFormerAudioFeatures", "TalkFormerMatchLength",
               "TalkFormerDetectFaceLandmarks", "TalkFormerCompleteLandmarks", "TalkFormerEncodeReference",
               "TalkFormerSampler", "TalkFormerBlendFace"}


def _load(path: Path, name: str):
    spec = importlib.util.spec_from_file_location(name, path)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[name] = mod
    spec.loader.exec_module(mod)
    return mod


build_workflows = _load(WF / "build_workflows.py", "tf_build_workflows")
run_api = _load(WF / "run_api.py", "tf_run_api")


@pytest.fixture(scope="module")
def infos() -> dict:
    core = json.loads(FIXTURE.read_text())["nodes"]
    ours = build_workflows.our_object_info()
    assert not set(core) & set(ours)
    return {**core, **ours}


def _spec(info: dict, name: str):
    for section in ("required", "optional"):
        if name in info["input"].get(section, {}):
            return info["input"][section][name]
    raise KeyError(name)


def _type(spec) -> str:
    return "COMBO" if isinstance(spec[0], list) else spec[0]


def test_the_three_workflows_and_twins_exist():
    names = {p.stem for p in UI_FILES}
    assert {"lipsync_video", "lipsync_upscale", "stage_by_stage"} <= names
    for p in UI_FILES:
        assert (WF / f"{p.stem}.api.json").exists()


@pytest.mark.parametrize("path", UI_FILES, ids=lambda p: p.stem)
def test_ui_workflow_uses_registered_types_and_typed_links(path: Path, infos: dict):
    wf = json.loads(path.read_text())
    assert wf["version"] == 0.4
    nodes = {n["id"]: n for n in wf["nodes"]}
    for n in nodes.values():
        assert n["type"] in infos or n["type"] in FRONTEND_ONLY, f"{path.name}: unregistered node type {n['type']}"
    assert wf["last_node_id"] == max(nodes)
    assert wf["last_link_id"] == max(link[0] for link in wf["links"])
    for link_id, src, slot, dst, dslot, ltype in wf["links"]:
        s, d = nodes[src], nodes[dst]
        out_type = infos[s["type"]]["output"][slot]
        in_name = d["inputs"][dslot]["name"]
        in_type = _type(_spec(infos[d["type"]], in_name))
        assert out_type == ltype == in_type, f"{path.name}: link {link_id} {s['type']}[{slot}] -> {d['type']}.{in_name}"
        assert s["outputs"][slot]["type"] == ltype and link_id in s["outputs"][slot]["links"]
        assert d["inputs"][dslot]["link"] == link_id
    # every required socket input is connected (the prompt would be rejected otherwise)
    for n in nodes.values():
        if n["type"] in FRONTEND_ONLY:
            continue
        info = infos[n["type"]]
        linked = {i["name"] for i in n["inputs"] if i.get("link") is not None}
        for name, spec in info["input"].get("required", {}).items():
            if _type(spec) not in WIDGET_TYPES:
                assert name in linked, f"{path.name}: node {n['id']} {n['type']}: required {name} unconnected"


def _api_from_ui(wf: dict, infos: dict) -> dict:
    """The frontend's graphToPrompt, re-derived from the UI file."""
    links = {link[0]: link for link in wf["links"]}
    api = {}
    for n in wf["nodes"]:
        if n["type"] in FRONTEND_ONLY or n.get("mode", 0) in (2, 4):
            continue
        info = infos[n["type"]]
        values = list(n.get("widgets_values", []))
        inputs = {}
        k = 0
        for inp in n["inputs"]:
            link = links.get(inp.get("link")) if inp.get("link") is not None else None
            if "widget" in inp:
                name = inp["widget"]["name"]
                value = values[k]
                k += 1
                if name == "upload":
                    continue  # the upload button: not sent
                if name == "audioUI":
                    inputs[name] = ""
                    continue
                spec = _spec(info, name)
                inputs[name] = [str(link[1]), link[2]] if link else value
                ctl = spec[1].get("control_after_generate") if len(spec) > 1 else None
                if _type(spec) == "INT" and (ctl if ctl is not None else name in ("seed", "noise_seed")):
                    assert values[k] in ("fixed", "increment", "decrement", "randomize")
                    k += 1
            elif link:
                inputs[inp["name"]] = [str(link[1]), link[2]]
        assert k == len(values), f"node {n['id']} {n['type']}: {len(values)} widget values, {k} widgets"
        api[str(n["id"])] = {"class_type": n["type"], "inputs": inputs}
    return api


@pytest.mark.parametrize("path", UI_FILES, ids=lambda p: p.stem)
def test_api_twin_matches_ui_workflow(path: Path, infos: dict):
    wf = json.loads(path.read_text())
    twin = json.loads((WF / f"{path.stem}.api.json").read_text())
    derived = _api_from_ui(wf, infos)
    assert set(twin) == set(derived)
    for nid, node in twin.items():
        assert node["class_type"] == derived[nid]["class_type"]
        assert node["inputs"] == derived[nid]["inputs"], f"{path.name} node {nid}"
        title = next(n.get("title") for n in wf["nodes"] if str(n["id"]) == nid)
        assert node["_meta"]["title"] == (title or infos[node["class_type"]]["display_name"])
    # every widget value the server validates is a legal one (combos in their lists, numbers in range)
    for nid, node in twin.items():
        info = infos[node["class_type"]]
        for name, value in node["inputs"].items():
            if isinstance(value, list) or name == "audioUI":
                continue
            spec = _spec(info, name)
            opts = spec[1] if len(spec) > 1 else {}
            if isinstance(spec[0], list) and spec[0] and not any(k.endswith("_upload") for k in opts):
                assert value in spec[0], f"node {nid}: {name}={value!r}"
            if _type(spec) in ("INT", "FLOAT"):
                assert opts.get("min", -1e300) <= value <= opts.get("max", 1e300), f"node {nid}: {name}={value}"


def test_main_workflow_shape(infos: dict):
    """(a) and (b): the core video nodes around our stages; (b) upscales with lanczos before CreateVideo;
    (c) every preview IMAGE of our nodes reaches a PreviewImage."""
    a = json.loads((WF / "lipsync_video.api.json").read_text())
    types = {n["class_type"] for n in a.values()}
    assert {"LoadVideo", "GetVideoComponents", "LoadAudio", "CreateVideo", "SaveVideo"} <= types
    assert STAGE_NODES <= types
    b = json.loads((WF / "lipsync_upscale.api.json").read_text())
    (up,) = [i for i, n in b.items() if n["class_type"] == "ImageScaleBy"]
    assert b[up]["inputs"]["upscale_method"] == "lanczos" and b[up]["inputs"]["scale_by"] > 1
    (cv,) = [n for n in b.values() if n["class_type"] == "CreateVideo"]
    assert cv["inputs"]["images"] == [up, 0]
    c = json.loads((WF / "stage_by_stage.api.json").read_text())
    fed = {tuple(n["inputs"]["images"]) for n in c.values() if n["class_type"] == "PreviewImage"}
    for nid, n in c.items():
        info = infos[n["class_type"]]
        for slot, name in enumerate(info["output_name"]):
            if name == "preview":
                assert (nid, slot) in fed, f"stage_by_stage: {n['class_type']}.preview not previewed"


def test_workflow_files_are_in_sync_with_the_builder():
    r = subprocess.run([sys.executable, str(WF / "build_workflows.py"), "--check"], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr


def test_builder_rejects_bad_graphs(infos: dict):
    B = build_workflows
    ok = B.Graph("t", "", [B.N(1, "LoadImage", (0, 0), {"image": "x.png"}), B.N(2, "PreviewImage", (0, 0))],
                 [(1, "IMAGE", 2, "images")])
    ui, api = B.build(ok, infos)
    assert api["2"]["inputs"] == {"images": ["1", 0]} and ui["nodes"][0]["widgets_values"] == ["x.png", "image"]
    bad_type = B.Graph("t", "", [B.N(1, "LoadImage", (0, 0)), B.N(2, "TalkFormerBlendFace", (0, 0))],
                       [(1, "MASK", 2, "images")])
    with pytest.raises(B.GraphError, match="types differ"):
        B.build(bad_type, infos)
    unconnected = B.Graph("t", "", [B.N(1, "PreviewImage", (0, 0))], [])
    with pytest.raises(B.GraphError, match="not connected"):
        B.build(unconnected, infos)
    bad_combo = B.Graph("t", "", [B.N(1, "LoadImage", (0, 0)), B.N(2, "ImageScaleBy", (0, 0), {"upscale_method": "magic"})],
                        [(1, "IMAGE", 2, "image")])
    with pytest.raises(B.GraphError, match="not one of"):
        B.build(bad_combo, infos)


# ---------------------------------------------------------------------------------------------
# run_api.py: the parts that need no server (the integration test runs the rest)

def test_run_api_prompt_editing(tmp_path: Path):
    prompt = run_api.load_prompt(WF / "lipsync_video.api.json")
    assert run_api.substitute_input(prompt, "video", "mine.mp4") == ["1"]
    assert prompt["1"]["inputs"]["file"] == "mine.mp4"
    assert run_api.substitute_input(prompt, "Driving audio", "speech.wav") == ["2"]
    assert prompt["2"]["inputs"]["audio"] == "speech.wav"
    run_api.set_value(prompt, "TalkFormer Sampler.steps=7")
    run_api.set_value(prompt, "3.ckpt_name=other.safetensors")
    (sampler,) = [n for n in prompt.values() if n["class_type"] == "TalkFormerSampler"]
    assert sampler["inputs"]["steps"] == 7 and prompt["3"]["inputs"]["ckpt_name"] == "other.safetensors"
    with pytest.raises(run_api.ComfyError, match="not a loader"):
        run_api.substitute_input(prompt, "3", "x")
    with pytest.raises(run_api.ComfyError, match="names no node"):
        run_api.substitute_input(prompt, "nonesuch", "x")
    with pytest.raises(run_api.ComfyError, match="is a link"):
        run_api.set_value(prompt, "TalkFormer Sampler.model=1")
    with pytest.raises(run_api.ComfyError, match="UI-format"):
        run_api.load_prompt(WF / "lipsync_video.json")


def test_run_api_error_reports():
    # the shape of a real /prompt 400 answer (ComfyUI 0.3.64, execution.py validate_prompt)
    resp = {"error": {"type": "prompt_outputs_failed_validation", "message": "Prompt outputs failed validation",
                      "details": "", "extra_info": {}},
            "node_errors": {"3": {"errors": [{"type": "value_not_in_list", "message": "Value not in list",
                                              "details": "ckpt_name: 'x.safetensors' not in []",
                                              "extra_info": {"input_name": "ckpt_name"}}],
                                  "dependent_outputs": ["13"], "class_type": "TalkFormerModelLoader"}}}
    prompt = {"3": {"class_type": "TalkFormerModelLoader", "inputs": {}, "_meta": {"title": "Load TalkFormer Model"}}}
    text = run_api.format_node_errors(resp, prompt)
    assert "node 3 TalkFormerModelLoader (Load TalkFormer Model)" in text
    assert "[input ckpt_name]" in text and "not in []" in text
    err = run_api.format_execution_error({"node_id": "7", "node_type": "TalkFormerDetectFaceLandmarks",
                                          "exception_type": "FaceError", "exception_message": "no face found",
                                          "traceback": ["  File x\n", "FaceError: no face found\n"]})
    assert "node 7 TalkFormerDetectFaceLandmarks failed: FaceError: no face found" in err
    entry = {"outputs": {"13": {"images": [{"filename": "a.mp4", "subfolder": "talkformer", "type": "output"}],
                                "animated": [True]},
                         "20": {"images": [{"filename": "p.png", "subfolder": "", "type": "temp"}]}}}
    assert [f["filename"] for f in run_api.output_files(entry)] == ["a.mp4"]
    assert len(run_api.output_files(entry, ("output", "temp"))) == 2


def test_run_api_unreachable_server_is_a_clear_error(tmp_path: Path):
    r = subprocess.run([sys.executable, str(WF / "run_api.py"), "http://127.0.0.1:9", str(WF / "lipsync_video.api.json"),
                        "--out", str(tmp_path), "--timeout", "5"], capture_output=True, text=True, timeout=60)
    assert r.returncode == 1 and "cannot reach ComfyUI" in r.stderr


def test_every_workflow_opens_readable_inside_a_1400x900_window():
    """The saved view shows every node (title bars included) inside 1400x900 below the tab strip, at
    a zoom where the frontend still draws text."""
    build = build_workflows
    for path in UI_FILES:
        ui = json.loads(path.read_text())
        ds = ui["extra"]["ds"]
        assert ds["scale"] >= build.VIEW_MIN_SCALE, (path.name, ds)
        sx = lambda v: (v + ds["offset"][0]) * ds["scale"]  # noqa: E731
        sy = lambda v: (v + ds["offset"][1]) * ds["scale"]  # noqa: E731
        for n in ui["nodes"]:
            x0, y0 = sx(n["pos"][0]), sy(n["pos"][1] - build.TITLE_H)
            x1, y1 = sx(n["pos"][0] + n["size"][0]), sy(n["pos"][1] + n["size"][1])
            assert x0 >= 0 and y0 >= build.VIEW_TOP - 1 and x1 <= build.VIEW_W and y1 <= build.VIEW_H, (path.name, n["type"])
