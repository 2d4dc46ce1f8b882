"""Regenerate the UI-format workflows from their API-format twins.

    <host python> tests/tools/make_workflows.py [name ...]   (names: only those workflows)

The API twins (workflows/api/*.json, tests/workflows/api/*.json) are
written by hand; the real graph editor lays each one out and serialises it
as the UI workflow beside it, with the editor's model metadata on each
model-loading node (install.MODEL_FILES: name, URL, models folder), and
draws it, with the example pictures, as the template thumbnail beside it
(workflows/<name>.jpg). tests/test_workflows.py checks that every UI
workflow still turns into its API twin.

What an API prompt cannot say (groups by stage with titles, Markdown notes, node titles, nodes
bypassed by default) comes from a sidecar per workflow, workflows/layout/<name>.json
(harness/layout.py); a node bypassed by default leaves the UI workflow's prompt as the editor's
bypass does. A note's "{models}" becomes the list of the model files the twin loads, each with
its folder and link.
"""

from __future__ import annotations

import json
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from harness.base import make_base_directory  # noqa: E402
from harness.editor import GraphEditor  # noqa: E402
from harness.layout import apply_layout, load_layout  # noqa: E402
from harness.paths import REPO, host_root, load_installer  # noqa: E402
from harness.server import ComfyServer  # noqa: E402

FOLDERS = (REPO / "workflows", REPO / "tests" / "workflows")
SHIPPED = REPO / "workflows"


def with_model_links(workflow: dict, model_files) -> dict:
    """properties.models on every node whose widget values name a file of ``model_files``: what
    the editor's missing-models dialog reads (only files it can download: see install.editor_downloads)."""
    for node in workflow["nodes"]:
        values = node.get("widgets_values") or []
        values = values.values() if isinstance(values, dict) else values
        named = {v for v in values if isinstance(v, str)}
        models = [{key: model[key] for key in ("name", "url", "directory")} for model in model_files
                  if model["name"] in named]
        if models:
            node.setdefault("properties", {})["models"] = models
    return workflow


def models_markdown(prompt: dict, installer) -> str:
    """The model files an API prompt loads, as a Markdown list for its note: each file, its folder
    and its link (install.MODEL_FILES), and the insightface pack its Face Analysis loads."""
    values = {value for node in prompt.values() for value in node["inputs"].values() if isinstance(value, str)}
    lines = []
    for model in installer.MODEL_FILES:
        if model["name"] in values:
            where = "the editor's missing-models dialog offers it" if installer.editor_downloads(model) else \
                "not in the editor's missing-models dialog, which downloads only .safetensors: save it yourself"
            lines.append(f"- `{model['name']}` → `models/{model['directory']}/`. {model['what']}. <{model['url']}> "
                         f"({where})")
    packs = sorted({node["inputs"]["model_name"] for node in prompt.values()
                    if node["class_type"] == "LikenessFaceAnalysis"})
    for pack in packs:
        lines.append(f"- insightface `{pack}` → `models/insightface/models/{pack}/`. Unzip "
                     f"<{installer.INSIGHTFACE_PACK_URL.format(pack=pack)}> so its `.onnx` files sit directly in that "
                     "folder (not in the editor's dialog: it lists no zips)")
    return "\n".join(lines)


def main() -> int:
    installer = load_installer()
    host = installer.Host(host_root())
    with tempfile.TemporaryDirectory() as base:
        base = make_base_directory(Path(base) / "base")
        installer.copy_examples(base / "input")  # the thumbnails show the example pictures
        server = ComfyServer(Path(sys.executable), host.comfyui, base, base / "server.log")
        try:
            server.wait_ready()
            editor = GraphEditor(server.url, base)
            for folder in FOLDERS:
                for api_file in sorted((folder / "api").glob("*.json")):
                    if sys.argv[1:] and api_file.stem not in sys.argv[1:]:
                        continue
                    prompt = json.loads(api_file.read_text())
                    workflow = editor.ui_from_api(prompt, api_file.stem)
                    workflow = apply_layout(workflow, load_layout(folder, api_file.stem),
                                            models_markdown(prompt, installer))
                    workflow = with_model_links(workflow, [model for model in installer.MODEL_FILES
                                                           if installer.editor_downloads(model)])
                    target = folder / api_file.name
                    target.write_text(json.dumps(workflow, indent=1) + "\n")
                    print(f"wrote {target.relative_to(REPO)}")
                    if folder == SHIPPED:  # the graph as the canvas draws it: notes are page elements it leaves blank
                        editor.load({**workflow, "nodes": [node for node in workflow["nodes"]
                                                           if node["type"] != "MarkdownNote"]}, api_file.stem)
                        thumbnail = editor.screenshot_graph(target.with_suffix(".jpg"))
                        print(f"wrote {thumbnail.relative_to(REPO)}")
            editor.close()
        finally:
            server.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
