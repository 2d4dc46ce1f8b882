"""The pack as ComfyUI and ComfyUI-Manager see it: layout, metadata, import cost."""

from __future__ import annotations

import json
import subprocess
import sys
import tomllib

import pytest

from harness.paths import PACK_NAME, REPO, TESTS

HEAVY = ("insightface", "open_clip", "onnxruntime", "onnx", "cv2", "timm", "transformers")


def test_top_level_layout_is_the_designed_one():
    for path in ("__init__.py", "nodes", "attention", "install.py", "workflows", "workflows/api", "docs", "tests",
                 "pyproject.toml", "README.md", "requirements.txt", "LICENSE", ".ci/run"):
        assert (REPO / path).exists(), path
    assert "GNU GENERAL PUBLIC LICENSE" in (REPO / "LICENSE").read_text()[:200]


def test_attention_holds_no_nodes_and_nodes_hold_no_math():
    for module in (REPO / "attention").rglob("*.py"):
        assert "io.ComfyNode" not in module.read_text(), module.name
    for module in (REPO / "nodes").glob("*.py"):
        text = module.read_text()
        assert "torch.nn.functional" not in text and "einsum" not in text, module.name


def test_pyproject_carries_project_and_registry_metadata():
    meta = tomllib.loads((REPO / "pyproject.toml").read_text())
    project, comfy_meta = meta["project"], meta["tool"]["comfy"]
    assert project["name"] == "likeness" and project["version"]
    assert "GPL-3.0" in project["license"]["text"]
    assert project["urls"]
    assert not any(dep.split(">")[0].split("=")[0].strip().lower() in ("torch", "onnxruntime", "onnxruntime-gpu")
                   for dep in project["dependencies"])
    assert comfy_meta["DisplayName"] == "Likeness"
    assert comfy_meta["PublisherId"] and comfy_meta["Icon"]
    assert comfy_meta["requires-comfyui"] == ">=0.3.75"


def test_requirements_leave_torch_and_onnxruntime_alone(host):
    installer = __import__("harness.paths", fromlist=["load_installer"]).load_installer()
    names = {installer.requirement_name(r) for r in installer.pack_requirements()}
    assert names.isdisjoint({"torch", "torchvision", "torchaudio", "onnxruntime", "onnxruntime-gpu", "insightface"})
    assert all("==" not in r for r in installer.pack_requirements()), "keep requirements loose"


def test_loading_the_pack_imports_nothing_heavy(host, base_directory):
    probe = subprocess.run(
        [sys.executable, str(TESTS / "harness" / "import_probe.py"), str(host.comfyui),
         str(base_directory / "custom_nodes" / PACK_NAME)],
        capture_output=True, text=True, check=True)
    report = json.loads(probe.stdout.strip().splitlines()[-1])
    assert report["loaded"]
    heavy = [m for m in report["foreign_modules"] if m.split(".")[0] in HEAVY]
    assert heavy == []
    # Only what ComfyUI itself needs to read the pack's pyproject.toml.
    assert {m.split(".")[0] for m in report["foreign_modules"]} <= {"tomllib"}


def test_the_repository_tracks_no_symlink_and_no_absolute_path_of_a_machine():
    """What is tracked ships to users: a symlink, or a path into the machine it was made on, points
    at nothing on theirs."""
    import re

    listing = subprocess.run(["git", "ls-files", "-s"], cwd=REPO, capture_output=True, text=True, check=True).stdout
    symlinks = [line.split("\t", 1)[1] for line in listing.splitlines() if line.startswith("120000")]
    assert symlinks == []
    machine_path = re.compile(r"(?<![\w.~/-])/(?:work|root|home|Users|tmp|opt|mnt)/[\w.-]+")
    found = []
    for line in listing.splitlines():
        path = REPO / line.split("\t", 1)[1]
        if path.suffix.lower() in (".png", ".jpg", ".jpeg", ".webp", ".safetensors") or path.name == "LICENSE":
            continue
        for number, text in enumerate(path.read_text(errors="replace").splitlines(), 1):
            if machine_path.search(text):
                found.append(f"{path.relative_to(REPO)}:{number}: {text.strip()[:120]}")
    assert found == []


def test_the_registry_publish_workflow_runs_on_a_version_change():
    import yaml

    workflow = yaml.safe_load((REPO / ".github" / "workflows" / "publish.yml").read_text())
    triggers = workflow[True] if True in workflow else workflow["on"]  # YAML reads a bare `on` as True
    assert triggers["push"] == {"branches": ["main"], "paths": ["pyproject.toml"]}
    jobs = workflow["jobs"]
    assert "needs.version-changed.outputs.changed == 'true'" in jobs["publish-node"]["if"]
    steps = jobs["publish-node"]["steps"]
    action = next(step for step in steps if "uses" in step and "publish-node-action" in step["uses"])
    assert action["uses"].startswith("Comfy-Org/publish-node-action@")
    assert action["with"]["personal_access_token"] == "${{ secrets.REGISTRY_ACCESS_TOKEN }}"
    assert any("node validate" in step.get("run", "") for step in steps)


@pytest.mark.slow
def test_comfy_cli_validates_the_pack_for_the_registry(tmp_path):
    """`comfy node validate`, what the Comfy Registry's publishing runs (comfy-cli: test-only)."""
    from harness.comfy_cli import comfy_cli

    result = subprocess.run([str(comfy_cli()), "--skip-prompt", "--no-enable-telemetry", "node", "validate"],
                            cwd=REPO, capture_output=True, text=True, env={"HOME": str(tmp_path), "PATH": "/usr/bin:/bin"})
    said = result.stdout + result.stderr
    assert result.returncode == 0, said
    assert "All validation checks passed" in said and "Security warnings" not in said, said
