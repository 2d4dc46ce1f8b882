"""A second interpreter for the tests that must pass under transformers 5 as well as 4.

ComfyUI 0.3.75 does not pin transformers, so users' hosts have 5.x while the test host
holds 4.x. Rather than a second multi-GB host, this is a small virtual environment whose
own site-packages hold transformers 5 and only those of its dependencies the host lacks
(or has at versions it does not accept), followed by the host's site-packages through a
.pth file: torch, ComfyUI's packages and open_clip come from the host, the environment's
transformers shadows the host's. pip never installs torch here (the resolution is checked)
and never touches the host (``--ignore-installed``: nothing is uninstalled anywhere).

It is cached under $LIKENESS_HOST_CACHE (default ~/.cache/likeness), keyed by the
recipe (the transformers pin, the host it extends, this file), and reused offline.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.metadata
import json
import shutil
import subprocess
import sys
import sysconfig
import tempfile
import time
from pathlib import Path

from harness.paths import cache_root

TRANSFORMERS = "transformers==5.24.0"
TORCH_FAMILY = ("torch", "torchvision", "torchaudio")
FOLDER_PREFIX = "transformers5-"
STAMP = "recipe.json"


def recipe() -> dict:
    """What the environment depends on; a change builds a new one."""
    return {
        "transformers": TRANSFORMERS,
        "host_site_packages": sorted({sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]}),
        "python": sys.version.split()[0],
        "torch_family": {name: _installed(name) for name in TORCH_FAMILY},
        "harness": hashlib.sha256(Path(__file__).read_bytes()).hexdigest()[:16],
    }


def _installed(name: str) -> str | None:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def _digest(wanted: dict) -> str:
    return hashlib.sha256(json.dumps(wanted, sort_keys=True).encode()).hexdigest()[:12]


def _python(environment: Path) -> Path:
    return environment / "bin" / "python"


def _pip(environment: Path, *arguments: str) -> None:
    """The host's pip acting on the environment's interpreter (which has no pip of its own)."""
    subprocess.run([sys.executable, "-m", "pip", "--python", str(_python(environment)), "--disable-pip-version-check",
                    "--quiet", *arguments], check=True)


@contextlib.contextmanager
def _locked(path: Path):
    import fcntl

    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _build(environment: Path, wanted: dict) -> dict:
    shutil.rmtree(environment, ignore_errors=True)
    start = time.perf_counter()
    base = getattr(sys, "_base_executable", sys.executable)
    subprocess.run([base, "-m", "venv", "--without-pip", str(environment)], check=True)
    site = Path(subprocess.run([str(_python(environment)), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                               check=True, capture_output=True, text=True).stdout.strip())
    # addsitedir (not a bare path) so the host's own .pth files are read too; after ours, so ours shadow.
    (site / "zz_likeness_host.pth").write_text(
        "".join(f"import site; site.addsitedir({path!r})\n" for path in wanted["host_site_packages"]))
    with tempfile.TemporaryDirectory() as folder:
        constraints = Path(folder) / "torch-pins.txt"
        constraints.write_text("".join(f"{name}=={version}\n" for name, version in wanted["torch_family"].items()
                                       if version))
        report = Path(folder) / "report.json"
        _pip(environment, "install", "--dry-run", "--report", str(report), "-c", str(constraints), TRANSFORMERS)
        plan = [f"{item['metadata']['name']}=={item['metadata']['version']}"
                for item in json.loads(report.read_text())["install"]]
    family = [p for p in plan if p.split("==")[0].lower() in TORCH_FAMILY]
    if family:
        raise RuntimeError(f"pip wanted to install {family} for {TRANSFORMERS}; the host's torch must be used")
    _pip(environment, "install", "--no-deps", "--ignore-installed", *plan)
    built = {"recipe": wanted, "installed": plan, "build_seconds": round(time.perf_counter() - start, 1)}
    (environment / STAMP).write_text(json.dumps(built, indent=1, sort_keys=True))
    return built


def _prune(keep: Path) -> None:
    """Environments of other recipes whose host is gone are not used again."""
    for old in keep.parent.glob(f"{FOLDER_PREFIX}*"):
        if old == keep or not old.is_dir():
            continue
        try:
            paths = json.loads((old / STAMP).read_text())["recipe"]["host_site_packages"]
        except (OSError, ValueError, KeyError):
            paths = []
        if not paths or not all(Path(p).exists() for p in paths):
            shutil.rmtree(old, ignore_errors=True)


def environment() -> tuple[Path, dict]:
    """(its python, what was built: installed pins and build_seconds), built if needed."""
    wanted = recipe()
    folder = cache_root() / f"{FOLDER_PREFIX}{_digest(wanted)}"
    with _locked(cache_root() / f"{FOLDER_PREFIX}lock"):
        stamp = folder / STAMP
        built = json.loads(stamp.read_text()) if stamp.exists() else None
        if not built or built["recipe"] != wanted or not _python(folder).exists():
            built = _build(folder, wanted)
        _prune(folder)
    return _python(folder), built
