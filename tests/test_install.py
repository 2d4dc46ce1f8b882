"""install.py: ComfyUI-Manager's job (one onnxruntime flavour, torch untouched)."""

from __future__ import annotations

import base64
import hashlib
import socket
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from harness.paths import REPO, load_installer


@pytest.fixture(scope="module")
def installer():
    return load_installer()


@pytest.mark.parametrize("installed,cuda,remove,reinstall", [
    ({}, False, [], True),
    ({"onnxruntime": "1"}, False, [], False),
    ({"onnxruntime": "1"}, True, ["onnxruntime"], True),
    ({"onnxruntime-gpu": "1"}, True, [], False),
    ({"onnxruntime-gpu": "1"}, False, ["onnxruntime-gpu"], True),
    ({"onnxruntime": "1", "onnxruntime-gpu": "1"}, True, ["onnxruntime"], True),
    ({"onnxruntime": "1", "onnxruntime-gpu": "1"}, False, ["onnxruntime-gpu"], True),
])
def test_onnxruntime_plan_ends_with_one_flavour(installer, installed, cuda, remove, reinstall):
    assert installer.onnxruntime_plan(installed, cuda) == (remove, reinstall)


def test_requirement_names(installer):
    assert installer.requirement_name("open_clip_torch>=2.24") == "open-clip-torch"
    assert installer.requirement_name("onnx>=1.13; python_version>'3'") == "onnx"
    assert installer.requirement_name("Pillow") == "pillow"


def test_the_host_venv_has_what_install_py_promises(installer):
    installed = installer.installed_distributions(sys.executable)
    flavours = [name for name in installer.ONNXRUNTIME_FLAVOURS if name in installed]
    assert flavours == [installer.wanted_onnxruntime(installer.torch_sees_cuda(sys.executable))]
    assert "insightface" in installed and "open-clip-torch" in installed
    assert installed["torch"].startswith("2.14.1")


def _fake_wheel(folder: Path, name: str, version: str) -> Path:
    """A wheel that claims to be ``name``: stands in for the flavour a user's
    other pack installed (the real onnxruntime-gpu is a large download)."""
    dist = f"{name.replace('-', '_')}-{version}"
    files = {f"{dist}.dist-info/METADATA": f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n",
             f"{dist}.dist-info/WHEEL": ("Wheel-Version: 1.0\nGenerator: likeness-test\nRoot-Is-Purelib: true\n"
                                         "Tag: py3-none-any\n"),
             "likeness_fake_flavour_marker.py": "# installed by the test\n"}
    record = []
    for path, text in files.items():
        digest = base64.urlsafe_b64encode(hashlib.sha256(text.encode()).digest()).rstrip(b"=").decode()
        record.append(f"{path},sha256={digest},{len(text)}")
    record.append(f"{dist}.dist-info/RECORD,,")
    wheel = folder / f"{dist}-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as archive:
        for path, text in files.items():
            archive.writestr(path, text)
        archive.writestr(f"{dist}.dist-info/RECORD", "\n".join(record) + "\n")
    return wheel


@pytest.mark.slow
def test_manager_install_repairs_a_second_onnxruntime_flavour(installer, tmp_path):
    """A user whose other pack put the wrong flavour beside the right one:
    install.py removes it, reinstalls the right one and leaves torch alone."""
    env_dir = tmp_path / "user-comfyui-python"
    subprocess.run([sys.executable, "-m", "venv", str(env_dir)], check=True)
    python = str(env_dir / "bin" / "python")
    # The user's packages (torch, onnxruntime...) come from the host's environment.
    site = subprocess.run([python, "-c", "import site; print(site.getsitepackages()[0])"],
                          capture_output=True, text=True, check=True).stdout.strip()
    host_site = next(p for p in sys.path if p.endswith("site-packages"))
    (Path(site) / "host-packages.pth").write_text(host_site + "\n")
    cuda = installer.torch_sees_cuda(python)
    wrong = installer.ONNXRUNTIME_CPU if cuda else installer.ONNXRUNTIME_GPU
    subprocess.run([python, "-m", "pip", "install", "-q", "--no-deps", "--disable-pip-version-check",
                    str(_fake_wheel(tmp_path, wrong, "1.0.0"))], check=True)
    before = installer.installed_distributions(python)
    assert wrong in before

    run = subprocess.run([python, str(REPO / "install.py")], capture_output=True, text=True, cwd=REPO)
    assert run.returncode == 0, run.stdout + run.stderr

    after = installer.installed_distributions(python)
    assert [n for n in installer.ONNXRUNTIME_FLAVOURS if n in after] == [installer.wanted_onnxruntime(cuda)]
    for name in installer.TORCH_FAMILY:
        assert after.get(name) == before.get(name)
    check = subprocess.run([python, "-c", "import onnxruntime, insightface; print(onnxruntime.get_device())"],
                           capture_output=True, text=True)
    assert check.returncode == 0, check.stderr


def load_image_values() -> dict[str, set[str]]:
    """{workflow file: the pictures its Load Image nodes load}, UI and API files alike."""
    import json

    found = {}
    for path in sorted((REPO / "workflows").glob("*.json")) + sorted((REPO / "workflows" / "api").glob("*.json")):
        workflow = json.loads(path.read_text())
        if "nodes" in workflow:
            values = {n["widgets_values"][0] for n in workflow["nodes"] if n["type"] == "LoadImage"}
        else:
            values = {n["inputs"]["image"] for n in workflow.values() if n["class_type"] == "LoadImage"}
        found[str(path.relative_to(REPO))] = values
    return found


def test_every_workflow_loads_pictures_the_pack_ships(installer):
    shipped = {p.name for p in installer.EXAMPLES_DIR.glob("*.png")}
    used = load_image_values()
    assert sum(bool(values) for values in used.values()) >= 20  # 12 workflows, UI and API
    for workflow, values in used.items():
        assert values <= shipped, f"{workflow} loads {sorted(values - shipped)}, which the pack does not ship"
        assert all(v.startswith(installer.EXAMPLE_PREFIX) for v in values), workflow


def test_examples_reach_the_input_folder_and_never_replace_a_users_file(installer, tmp_path):
    input_dir = tmp_path / "input"
    input_dir.mkdir()
    users = {"likeness_style.png": b"the user's own picture", "photo.png": b"another of theirs"}
    for name, data in users.items():
        (input_dir / name).write_bytes(data)
    written = installer.copy_examples(input_dir)
    examples = sorted(p.name for p in installer.EXAMPLES_DIR.glob("likeness_*.png"))
    assert sorted(p.name for p in written) == [n for n in examples if n != "likeness_style.png"]
    for name in examples:
        if name not in users:
            assert (input_dir / name).read_bytes() == (installer.EXAMPLES_DIR / name).read_bytes()
    before = {p.name: (p.read_bytes(), p.stat().st_mtime_ns) for p in input_dir.iterdir()}
    assert installer.copy_examples(input_dir) == []  # running the installer again writes nothing
    assert {p.name: (p.read_bytes(), p.stat().st_mtime_ns) for p in input_dir.iterdir()} == before
    assert all((input_dir / name).read_bytes() == data for name, data in users.items())
    assert not list(input_dir.glob("*.partial"))


def test_the_built_host_has_every_picture_a_workflow_loads(host):
    """tests/run.py builds this host with the installer's build_host, as --new-host does."""
    present = {p.name for p in (host.comfyui / "input").glob("*")}
    for workflow, values in load_image_values().items():
        assert values <= present, f"{workflow}: {sorted(values - present)} missing from {host.comfyui / 'input'}"


# Node inputs that name a model file (insightface packs are a folder, not a file: see the README).
MODEL_INPUTS = {"CheckpointLoaderSimple": ["ckpt_name"], "CLIPVisionLoader": ["clip_name"],
                "ControlNetLoader": ["control_net_name"], "LikenessIDAdapterLoader": ["adapter_name"],
                "LikenessMCDMLoader": ["unet_name", "adapter_name", "clip_vision_name"],
                "LikenessSweepGrid": ["clip_checkpoint"], "UNETLoader": ["unet_name"],
                "DualCLIPLoader": ["clip_name1", "clip_name2"], "VAELoader": ["vae_name"],
                "TripleCLIPLoader": ["clip_name1", "clip_name2", "clip_name3"]}


def test_every_model_a_workflow_loads_carries_its_publishers_link(installer):
    """In the editor's model metadata where its missing-models dialog can download the file (a
    .safetensors); the others (h94's FaceID .bin, ByteDance's .pth) are left out of the dialog,
    which would show them as a red error, and their link stands in the workflow's note."""
    import json

    catalogue = {model["name"]: model for model in installer.MODEL_FILES}
    readme = (REPO / "README.md").read_text()
    for model in installer.MODEL_FILES:
        assert model["url"].startswith("https://huggingface.co/"), model  # a source the editor downloads from
        assert model["url"] in readme, f"the README's model table lacks {model['url']}"
        assert model["url"].rsplit("/", 1)[1].rsplit(".", 1)[1] == model["name"].rsplit(".", 1)[1], model
    assert [m["name"] for m in installer.MODEL_FILES if not installer.editor_downloads(m)] == [
        "ip-adapter-faceid-plusv2_sd15.bin", "ip-adapter-faceid-plusv2_sdxl.bin", "outfit/unet.pth",
        "outfit/adapter.pth"]
    for path in sorted((REPO / "workflows").glob("*.json")):
        ui = json.loads(path.read_text())
        api = json.loads((REPO / "workflows" / "api" / path.name).read_text())
        loaded = {value for node in api.values() for key in MODEL_INPUTS.get(node["class_type"], [])
                  if (value := node["inputs"][key]) != "none"}
        assert loaded <= catalogue.keys(), f"{path.name}: {sorted(loaded - catalogue.keys())} not in MODEL_FILES"
        linked = []
        for node in ui["nodes"]:
            values = set(node.get("widgets_values") or [])
            for model in node.get("properties", {}).get("models", []):
                assert model["name"] in values, (path.name, node["type"], model)  # what the editor matches on
                assert {k: model[k] for k in ("name", "url", "directory")} == \
                    {k: catalogue[model["name"]][k] for k in ("name", "url", "directory")}
                linked.append(model["name"])
        assert sorted(set(linked)) == sorted(n for n in loaded if installer.editor_downloads(catalogue[n])), path.name
        notes = " ".join(node["widgets_values"][0] for node in ui["nodes"] if node["type"] == "MarkdownNote")
        assert all(catalogue[n]["url"] in notes for n in loaded), path.name


@pytest.mark.parametrize("installed, plan", [
    ({}, ([], "opencv-python-headless")),
    ({"opencv-python": "5"}, ([], None)),
    ({"opencv-python-headless": "5"}, ([], None)),
    ({"opencv-contrib-python": "5"}, ([], None)),
    ({"opencv-contrib-python-headless": "5"}, ([], None)),
    # two builds in one cv2/ folder: one headless build left, reinstalled over what the uninstall deletes
    ({"opencv-python": "5.0.0.93", "opencv-python-headless": "5.0.0.93"},
     (["opencv-python"], "opencv-python-headless==5.0.0.93")),
    ({"opencv-python": "4.14.0.94", "opencv-contrib-python-headless": "4.14.0.94"},
     (["opencv-python"], "opencv-contrib-python-headless==4.14.0.94")),
    ({"opencv-python-headless": "5", "opencv-contrib-python": "5"},
     (["opencv-python-headless", "opencv-contrib-python"], "opencv-contrib-python-headless==5")),
])
def test_opencv_plan_keeps_one_build_and_adds_only_a_headless_one(installer, installed, plan):
    assert installer.opencv_plan(installed) == plan


def _host_without_opencv(tmp_path: Path) -> Path:
    """The host's site-packages, every entry but OpenCV's, as a folder of links: a user's Python
    with everything ComfyUI and the pack need, and no OpenCV of its own yet."""
    host_site = Path(next(p for p in sys.path if p.endswith("site-packages")))
    overlay = tmp_path / "host-site-packages"
    overlay.mkdir()
    for entry in host_site.iterdir():
        if entry.name.lower().startswith(("cv2", "opencv")):
            continue
        (overlay / entry.name).symlink_to(entry)
    return overlay


@pytest.mark.slow
@pytest.mark.parametrize("flavour", [None, "opencv-python", "opencv-python-headless", "opencv-contrib-python",
                                     "opencv-contrib-python-headless"])
def test_manager_install_leaves_exactly_one_opencv(installer, tmp_path, flavour):
    """A user's Python with one OpenCV build (or none): install.py keeps it (or adds the headless
    one) and `import cv2` works. A present build is a wheel of that name holding the host's cv2."""
    env_dir = tmp_path / "user-comfyui-python"
    subprocess.run([sys.executable, "-m", "venv", str(env_dir)], check=True)
    python = str(env_dir / "bin" / "python")
    site = subprocess.run([python, "-c", "import site; print(site.getsitepackages()[0])"],
                          capture_output=True, text=True, check=True).stdout.strip()
    (Path(site) / "host-packages.pth").write_text(str(_host_without_opencv(tmp_path)) + "\n")
    if flavour is not None:
        cv2 = Path(next(p for p in sys.path if p.endswith("site-packages"))) / "cv2"
        (Path(site) / "cv2").symlink_to(cv2, target_is_directory=True)
        subprocess.run([python, "-m", "pip", "install", "-q", "--no-deps", "--disable-pip-version-check",
                        str(_fake_wheel(tmp_path, flavour, "5.0.0"))], check=True)
    before = installer.installed_distributions(python)
    assert [n for n in installer.OPENCV_FLAVOURS if n in before] == ([flavour] if flavour else [])

    run = subprocess.run([python, str(REPO / "install.py")], capture_output=True, text=True, cwd=REPO)
    assert run.returncode == 0, run.stdout + run.stderr

    after = installer.installed_distributions(python)
    assert [n for n in installer.OPENCV_FLAVOURS if n in after] == [flavour or "opencv-python-headless"]
    check = subprocess.run([python, "-c", "import cv2; print(cv2.__version__)"], capture_output=True, text=True)
    assert check.returncode == 0, check.stderr


def _user_python_without_opencv(tmp_path: Path) -> str:
    env_dir = tmp_path / "user-comfyui-python"
    subprocess.run([sys.executable, "-m", "venv", str(env_dir)], check=True)
    python = str(env_dir / "bin" / "python")
    site = subprocess.run([python, "-c", "import site; print(site.getsitepackages()[0])"],
                          capture_output=True, text=True, check=True).stdout.strip()
    (Path(site) / "host-packages.pth").write_text(str(_host_without_opencv(tmp_path)) + "\n")
    return python


WARP_CHECK = ("import cv2, numpy; m = numpy.float64([[1, 0, 1], [0, 1, 0]]); "
              "out = cv2.warpAffine(numpy.arange(16, dtype=numpy.uint8).reshape(4, 4), m, (4, 4)); "
              "print(int(out[1, 1]), int(out[1, 0]), cv2.dnn.blobFromImage(numpy.zeros((8, 8, 3), numpy.uint8)).shape)")


def _the_old_advice_followed(installer, python: str) -> tuple[list[str], str]:
    """Both builds (the real wheels, at the host's version, from the package index; no torch
    involved), then what install.py used to advise, "pip uninstall opencv-python-headless": it
    leaves opencv-python listed and cv2 broken. Returns pip's install command and the version."""
    version = installer.installed_distributions(sys.executable)["opencv-python-headless"]
    pip = [python, "-m", "pip", "install", "-q", "--no-deps", "--disable-pip-version-check"]
    subprocess.run(pip + [f"opencv-python-headless=={version}", f"opencv-python=={version}"], check=True)
    subprocess.run([python, "-m", "pip", "uninstall", "-y", "opencv-python-headless"], check=True,
                   capture_output=True)
    assert installer.cv2_problem(python) is not None
    return pip, version


@pytest.mark.slow
def test_two_opencv_builds_are_repaired_to_one_working_headless_cv2(installer, tmp_path):
    """opencv-python beside opencv-python-headless (as InstantID's instructions leave it): uninstalling
    either one empties the cv2/ folder they share (shown first), and install.py leaves the headless one,
    whole."""
    python = _user_python_without_opencv(tmp_path)
    pip, version = _the_old_advice_followed(installer, python)
    subprocess.run(pip + [f"opencv-python-headless=={version}"], check=True)  # both again, as a user would have
    assert [n for n in installer.OPENCV_FLAVOURS if n in installer.installed_distributions(python)] == \
        ["opencv-python", "opencv-python-headless"]

    run = subprocess.run([python, str(REPO / "install.py")], capture_output=True, text=True, cwd=REPO)
    assert run.returncode == 0, run.stdout + run.stderr
    assert "pip uninstall opencv-python-headless" not in run.stdout + run.stderr  # the advice that broke cv2

    after = installer.installed_distributions(python)
    assert [n for n in installer.OPENCV_FLAVOURS if n in after] == ["opencv-python-headless"]
    assert after["opencv-python-headless"] == version
    assert installer.cv2_problem(python) is None
    # the pack's warp, by hand: shifted one pixel right, the first column is the border (0)
    warped = subprocess.run([python, "-c", WARP_CHECK], capture_output=True, text=True)
    assert warped.returncode == 0, warped.stderr
    assert warped.stdout.split()[:2] == ["4", "0"] and "(1, 3, 8, 8)" in warped.stdout


@pytest.mark.slow
def test_a_cv2_broken_by_an_earlier_uninstall_is_reinstalled(installer, tmp_path):
    """The state the old advice left: one build listed, its cv2/ folder emptied by uninstalling the
    other. Running install.py again repairs it."""
    python = _user_python_without_opencv(tmp_path)
    _the_old_advice_followed(installer, python)

    run = subprocess.run([python, str(REPO / "install.py")], capture_output=True, text=True, cwd=REPO)
    assert run.returncode == 0, run.stdout + run.stderr
    assert [n for n in installer.OPENCV_FLAVOURS if n in installer.installed_distributions(python)] == \
        ["opencv-python"]
    assert installer.cv2_problem(python) is None


def test_a_port_in_use_is_one_sentence_naming_it_and_the_option(tmp_path):
    """Before any building: the host folder is not even created."""
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen()
        port = server.getsockname()[1]
        run = subprocess.run([sys.executable, str(REPO / "install.py"), "--new-host", str(tmp_path / "host"),
                              "--port", str(port)], capture_output=True, text=True, cwd=REPO, timeout=60)
    said = (run.stdout + run.stderr).strip()
    assert run.returncode == 1
    assert said.count("\n") == 0 and "Traceback" not in said, said
    assert f"Port {port} is in use" in said and f"--port {port + 1}" in said, said
    assert not (tmp_path / "host").exists()


def test_pips_resolver_line_about_a_dependency_left_out_is_explained_right_after_it(installer, capfd, tmp_path):
    resolver = ("ERROR: pip's dependency resolver does not currently take into account all the packages that are "
                "installed. This behaviour is the source of the following dependency conflicts.")
    lines = [resolver, "insightface 0.7.3 requires onnxruntime, which is not installed.",
             "insightface 0.7.3 requires opencv-python, which is not installed.", "Successfully installed tqdm"]
    pip_stand_in = tmp_path / "pip"
    pip_stand_in.mkdir()
    (pip_stand_in / "__init__.py").write_text("")  # a package in the working folder comes before the real pip
    (pip_stand_in / "__main__.py").write_text(f"print({chr(10).join(lines)!r})\n")
    installer.run([sys.executable, "-m", "pip"], cwd=tmp_path)  # pip here is the stand-in, run as pip runs
    printed = capfd.readouterr().out.splitlines()[1:]  # after the command line the installer logs
    assert printed[0] == resolver and printed[1] == lines[1]
    assert printed[2].startswith("[likeness install] expected, not a failure: insightface declares onnxruntime")
    assert printed[3] == lines[2]
    assert "insightface declares opencv-python" in printed[4] and "headless" in printed[4]
    assert printed[5:] == [lines[3]]
    # a nested install.py's output passes through unexplained: its own run explained it already
    installer.run([sys.executable, "-c", f"print({chr(10).join(lines)!r})"])
    assert capfd.readouterr().out.splitlines()[1:] == lines


def test_progress_shows_what_pip_fetches_and_installs_and_nothing_else(installer, capfd):
    lines = ["Collecting torch==2.14.1", "  Obtaining dependency information for torch", "Downloading torch.whl (2 GB)",
             "Requirement already satisfied: numpy", "Installing collected packages: torch",
             "Successfully installed torch-2.14.1"]
    installer.run([sys.executable, "-c", f"print({chr(10).join(lines)!r})"], progress="installing the host")
    printed = capfd.readouterr().out.splitlines()[1:]
    assert printed == [lines[0], lines[2], lines[4], lines[5]]


def test_the_harmless_start_up_lines_are_explained_before_the_server_starts(installer, tmp_path, capfd):
    """A host whose Python has no torchaudio (as every host built here): one line says what ComfyUI's
    log will show and that it is harmless, then the server starts (here a stand-in main.py)."""
    host = installer.Host(tmp_path / "host")
    host.python.parent.mkdir(parents=True)
    host.python.symlink_to(sys.executable)
    host.comfyui.mkdir(parents=True)
    (host.comfyui / "main.py").write_text("print('stand-in ComfyUI')\n")
    assert "torchaudio" not in installer.installed_distributions(str(host.python))
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    assert installer.start_server(host, port) == 0
    printed = capfd.readouterr().out.splitlines()
    (explained,) = [i for i, line in enumerate(printed) if "torchaudio missing" in line]
    assert "IMPORT FAILED: nodes_audio.py" in printed[explained] and "Harmless for Likeness" in printed[explained]
    started = next(i for i, line in enumerate(printed) if line.startswith("[likeness install] starting ComfyUI"))
    assert explained < started and printed[-1] == "stand-in ComfyUI"
