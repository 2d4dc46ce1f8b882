"""Make the portrait-editing paper's training pairs on any number of ComfyUI servers.

    python jobs/make_pairs.py --identities faces/ --poses poses/ --source "normal costume" \\
        --target "Santa Claus costume" --target "cute flower costume" --pairs 69900 \\
        --output pairs/ --server http://gpu1:8188 --server http://gpu2:8188

Each pair i is the shipped ``pair_generation`` workflow (Composable Diffusion on a double-width
canvas, Eq. 2, s'_d 0.1, s'_a = s'_b 0.9; identity through Infinite-ID; pose through ControlNet)
with the supplement's recipe: a random identity photo and a random pose from the pose bank (put
side by side for the double canvas), prompts "the same [X] on the left and right", "a [X], [Y]",
"a [X], [Z]" with [X] read from the photo by insightface's gender-age model on the server, [Z]
the targets in turn. All of it follows from one seed per pair, kept in the pair's manifest, so any
pair can be made again.

Every server's queue is kept fed (``--depth`` prompts each: a faster GPU finishes sooner and takes
more); the pictures come back through /history and /view and are written in the layout
LikenessTrainMCDM reads (``pair_00001.png`` target, ``.source.png``, ``.txt``, ``.source.txt``)
with a manifest ``pair_00001.json``, each file whole, the manifest and the target last. A server
that fails or vanishes has its pairs made elsewhere. Run the same command again after a crash or
Ctrl-C: finished pairs are kept, the rest are made; none twice.

Standard library and Pillow only (the Python that runs ComfyUI has both); the servers need
Likeness and the models ``pair_generation`` loads.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import os
import queue
import random
import sys
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
import uuid
from dataclasses import asdict, dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
WORKFLOW = REPO / "workflows" / "api" / "pair_generation.json"
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp")
UPLOAD_FOLDER = "likeness_job"
ATTEMPTS = 3  # a pair that fails this often on working servers is reported, not retried forever


class ServerGone(Exception):
    """The server did not answer (refused, reset, timed out): its pairs go elsewhere."""


# --- the recipe ---------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class PairPlan:
    index: int
    seed: int
    identity: str  # file name in the identity folder
    pose: str  # file name in the pose bank
    source_domain: str
    target_domain: str

    @property
    def stem(self) -> str:
        return f"pair_{self.index:05d}"


def images_in(folder: Path, what: str) -> list[str]:
    names = sorted(p.name for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES) if folder.is_dir() else []
    if not names:
        raise SystemExit(f"{what}={str(folder)!r}: expected a folder of .png/.jpg/.webp pictures")
    return names


def plan(index: int, job_seed: int, identities: list[str], poses: list[str], source: str,
         targets: list[str]) -> PairPlan:
    """Pair ``index`` (from 1): its seed and choices, the same on every run and machine."""
    seed = int.from_bytes(hashlib.sha256(f"{job_seed}:{index}".encode()).digest()[:4], "big")
    rng = random.Random(seed)
    return PairPlan(index, seed, rng.choice(identities), rng.choice(poses), source,
                    targets[(index - 1) % len(targets)])


def side_by_side(pose_file: Path) -> bytes:
    """The pose twice, left and right: the double-width canvas's ControlNet image (PNG bytes)."""
    from PIL import Image

    with Image.open(pose_file) as pose:
        pose = pose.convert("RGB")
        pair = Image.new("RGB", (2 * pose.width, pose.height))
        pair.paste(pose, (0, 0))
        pair.paste(pose, (pose.width, 0))
    out = io.BytesIO()
    pair.save(out, format="PNG")
    return out.getvalue()


@dataclass
class PairPrompt:
    prompt: dict  # API format
    halves: dict[str, str]  # SaveImage node id -> "source" | "target"
    prompts_node: str  # the Likeness Pair Prompts node, whose ui text holds the prompts


def build_prompt(workflow: dict, pair: PairPlan, identity_name: str, pose_name: str,
                 size: tuple[int, int] | None, steps: int | None) -> PairPrompt:
    """The shipped workflow for one pair: its pictures, domains, seed; the server writes nothing of
    its own (no Save Pairs); the two halves come back as output images."""
    prompt = json.loads(json.dumps(workflow))
    by_type = {}
    for node_id, node in prompt.items():
        by_type.setdefault(node["class_type"], []).append(node_id)
    (prompts_id,) = by_type["LikenessPairPrompts"]
    identity_loader = prompt[prompts_id]["inputs"]["image"][0]
    (pose_loader,) = {prompt[n]["inputs"]["image"][0] for n in by_type["ControlNetApplyAdvanced"]}
    prompt[identity_loader]["inputs"]["image"] = identity_name
    prompt[pose_loader]["inputs"]["image"] = pose_name
    prompt[prompts_id]["inputs"].update(source_domain=pair.source_domain, target_domain=pair.target_domain)
    for node_id in by_type["RandomNoise"]:
        prompt[node_id]["inputs"]["noise_seed"] = pair.seed
    for node_id in by_type.get("LikenessSavePairs", []):
        del prompt[node_id]
    (split_id,) = by_type["LikenessSplitPair"]
    halves = {}
    for node_id in by_type["SaveImage"]:
        source, slot = prompt[node_id]["inputs"]["images"]
        if source != split_id:
            raise ValueError(f"{WORKFLOW.name}: SaveImage {node_id} saves something other than a half of the pair")
        halves[node_id] = "source" if slot == 0 else "target"  # Split Pair: left (source), right (target)
        prompt[node_id]["inputs"]["filename_prefix"] = f"{UPLOAD_FOLDER}/{pair.stem}_{pair.seed}_{halves[node_id]}"
    if size is not None:
        for node_id in by_type["EmptyLatentImage"]:
            prompt[node_id]["inputs"].update(width=size[0], height=size[1])
    if steps is not None:
        for node_id in by_type["BasicScheduler"]:
            prompt[node_id]["inputs"]["steps"] = steps
    return PairPrompt(prompt, halves, prompts_id)


# --- one ComfyUI server over HTTP ---------------------------------------------------------------------------------

class Server:
    def __init__(self, url: str, timeout: float = 60.0) -> None:
        self.url = url.rstrip("/")
        self.timeout = timeout
        self.client_id = uuid.uuid4().hex
        self.alive = True
        self.uploaded: dict[str, str] = {}  # content hash -> name on this server
        self.lock = threading.Lock()

    def _open(self, request, timeout=None):
        try:
            return urllib.request.urlopen(request, timeout=timeout or self.timeout)
        except urllib.error.HTTPError:
            raise
        except (urllib.error.URLError, ConnectionError, TimeoutError, OSError) as error:
            raise ServerGone(f"{self.url}: {error}") from error

    def get_json(self, path: str):
        with self._open(self.url + path) as response:
            return json.loads(response.read())

    def get_bytes(self, path: str) -> bytes:
        with self._open(self.url + path) as response:
            return response.read()

    def post_json(self, path: str, body: dict):
        request = urllib.request.Request(self.url + path, data=json.dumps(body).encode(),
                                         headers={"Content-Type": "application/json"})
        with self._open(request) as response:
            data = response.read()
            return json.loads(data) if data else {}

    def upload(self, data: bytes, suffix: str) -> str:
        """Put a picture in the server's input folder once (named by its content); its name there."""
        digest = hashlib.sha256(data).hexdigest()[:20]
        with self.lock:
            if digest in self.uploaded:
                return self.uploaded[digest]
        boundary = uuid.uuid4().hex
        name = f"{digest}{suffix}"
        parts = []
        for field, value in (("subfolder", UPLOAD_FOLDER), ("type", "input"), ("overwrite", "true")):
            parts.append(f'--{boundary}\r\nContent-Disposition: form-data; name="{field}"\r\n\r\n{value}\r\n'.encode())
        parts.append(f'--{boundary}\r\nContent-Disposition: form-data; name="image"; filename="{name}"\r\n'
                     f"Content-Type: application/octet-stream\r\n\r\n".encode() + data + b"\r\n")
        parts.append(f"--{boundary}--\r\n".encode())
        request = urllib.request.Request(self.url + "/upload/image", data=b"".join(parts),
                                         headers={"Content-Type": f"multipart/form-data; boundary={boundary}"})
        with self._open(request) as response:
            answer = json.loads(response.read())
        on_server = f"{answer.get('subfolder') + '/' if answer.get('subfolder') else ''}{answer['name']}"
        with self.lock:
            self.uploaded[digest] = on_server
        return on_server

    def run(self, prompt: dict, poll: float = 0.2, timeout: float = 3600.0) -> dict:
        """Queue a prompt and wait for its /history entry; the entry (a failed prompt's included)."""
        try:
            queued = self.post_json("/prompt", {"prompt": prompt, "client_id": self.client_id})
        except urllib.error.HTTPError as error:
            raise PromptFailed(f"{self.url} refused the prompt: {error.read()[:2000]!r}") from error
        prompt_id = queued["prompt_id"]
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            entry = self.get_json(f"/history/{prompt_id}").get(prompt_id)
            if entry and entry.get("status", {}).get("status_str") in ("success", "error"):
                return entry
            time.sleep(poll)
        raise ServerGone(f"{self.url}: prompt {prompt_id} did not finish in {timeout:.0f} s")


class PromptFailed(Exception):
    """The server ran the prompt and it failed (or refused it): worth another try elsewhere."""


# --- the pair files ---------------------------------------------------------------------------------------------

def write_whole(path: Path, data: bytes) -> None:
    partial = path.with_name(path.name + ".partial")
    partial.write_bytes(data)
    os.replace(partial, path)


def pair_files(output: Path, stem: str) -> dict[str, Path]:
    return {name: output / f"{stem}{suffix}" for name, suffix in
            (("source_image", ".source.png"), ("source_text", ".source.txt"), ("target_text", ".txt"),
             ("manifest", ".json"), ("target_image", ".png"))}


def is_done(output: Path, stem: str) -> bool:
    files = pair_files(output, stem)
    return all(path.exists() for path in files.values())


def write_pair(output: Path, pair: PairPlan, source: bytes, target: bytes, prompts: list[str], gender: str,
               server: str) -> None:
    """All five files, each whole; the manifest and then the target picture last (a trainer sees a
    pair once its target exists; a rerun treats a pair without both as not made)."""
    files = pair_files(output, pair.stem)
    write_whole(files["source_image"], source)
    write_whole(files["source_text"], prompts[1].encode())
    write_whole(files["target_text"], prompts[2].encode())
    manifest = {**asdict(pair), "gender": gender, "prompts": {"shared": prompts[0], "source": prompts[1],
                                                              "target": prompts[2]}, "server": server}
    write_whole(files["manifest"], json.dumps(manifest, indent=1).encode())
    write_whole(files["target_image"], target)


def outputs_of(server: Server, entry: dict, built: PairPrompt) -> tuple[bytes, bytes, list[str], str]:
    """(source png, target png, [shared, source, target] prompts, gender) of a finished prompt."""
    images, prompts = {}, None
    outputs = entry.get("outputs", {})
    for node_id, half in built.halves.items():
        for image in outputs.get(node_id, {}).get("images", []):
            query = urllib.parse.urlencode({"filename": image["filename"], "subfolder": image.get("subfolder", ""),
                                            "type": image.get("type", "output")})
            images[half] = server.get_bytes(f"/view?{query}")
    text = outputs.get(built.prompts_node, {}).get("text")
    if text and text[0].startswith("[X] = "):
        prompts = text
    if prompts is None or set(images) != {"source", "target"}:
        raise PromptFailed(f"{server.url}: the prompt's outputs lack the pair or its prompts ({sorted(images)})")
    return images["source"], images["target"], prompts[1:4], prompts[0][len("[X] = "):]


# --- the job ----------------------------------------------------------------------------------------------------

class PairProgress:
    def __init__(self, total: int, done: int) -> None:
        self.total, self.done, self.start_done = total, done, done
        self.start = time.monotonic()
        self.lock = threading.Lock()
        self.per_server: dict[str, int] = {}

    def finished(self, server: str) -> None:
        with self.lock:
            self.done += 1
            self.per_server[server] = self.per_server.get(server, 0) + 1
            made = self.done - self.start_done
            rate = made / max(time.monotonic() - self.start, 1e-9)
            left = (self.total - self.done) / rate if rate > 0 else float("inf")
            shares = ", ".join(f"{url}: {n}" for url, n in sorted(self.per_server.items()))
            print(f"[pairs] {self.done}/{self.total} ({rate * 60:.1f} pairs/min, ETA {left / 60:.1f} min; {shares})",
                  file=sys.stderr, flush=True)


def run_job(identities: Path, poses: Path, source: str, targets: list[str], pairs: int, output: Path,
            servers: list[str], *, seed: int = 0, depth: int = 2, size: tuple[int, int] | None = None,
            steps: int | None = None, timeout: float = 3600.0) -> dict:
    """Make every missing pair of 1..``pairs``; returns {"made", "kept", "failed", "servers"}."""
    output.mkdir(parents=True, exist_ok=True)
    identity_names, pose_names = images_in(identities, "identities"), images_in(poses, "poses")
    workflow = json.loads(WORKFLOW.read_text())
    for stale in output.glob("*.partial"):
        stale.unlink()
    todo: queue.Queue = queue.Queue()
    kept = 0
    for index in range(1, pairs + 1):
        pair = plan(index, seed, identity_names, pose_names, source, targets)
        if is_done(output, pair.stem):
            kept += 1
        else:
            todo.put((pair, 0))
    progress = PairProgress(pairs, kept)
    print(f"[pairs] {kept} of {pairs} already made in {output}; {todo.qsize()} to make on {len(servers)} server(s)",
          file=sys.stderr, flush=True)
    live = [Server(url) for url in servers]
    failed: list[str] = []
    remaining = [todo.qsize()]
    state = threading.Lock()
    stop = threading.Event()

    def settle() -> None:
        with state:
            remaining[0] -= 1
            if remaining[0] == 0:
                stop.set()

    def worker(server: Server) -> None:
        while not stop.is_set() and server.alive:
            try:
                pair, attempts = todo.get(timeout=0.2)
            except queue.Empty:
                continue
            try:
                identity = server.upload((identities / pair.identity).read_bytes(), Path(pair.identity).suffix)
                pose = server.upload(side_by_side(poses / pair.pose), ".png")
                built = build_prompt(workflow, pair, identity, pose, size, steps)
                entry = server.run(built.prompt, timeout=timeout)
                if entry["status"]["status_str"] != "success":
                    messages = [m for m in entry["status"].get("messages", []) if m[0] == "execution_error"]
                    raise PromptFailed(f"{server.url}: {messages[-1][1].get('exception_message') if messages else '?'}")
                source_png, target_png, prompts, gender = outputs_of(server, entry, built)
                write_pair(output, pair, source_png, target_png, prompts, gender, server.url)
                progress.finished(server.url)
                settle()
            except ServerGone as error:
                server.alive = False
                print(f"[pairs] {error}: its pairs go to the other servers", file=sys.stderr, flush=True)
                todo.put((pair, attempts))
            except PromptFailed as error:
                if attempts + 1 >= ATTEMPTS:
                    failed.append(f"{pair.stem}: {error}")
                    settle()
                else:
                    todo.put((pair, attempts + 1))

    threads = [threading.Thread(target=worker, args=(server,), daemon=True)
               for server in live for _ in range(depth)]
    for thread in threads:
        thread.start()
    if remaining[0] == 0:
        stop.set()
    try:
        while not stop.is_set():
            if not any(server.alive for server in live):
                raise SystemExit(f"[pairs] no server left answering ({', '.join(servers)}); "
                                 f"{remaining[0]} pair(s) not made: run the command again when one is back")
            stop.wait(0.5)
    finally:
        stop.set()
        for thread in threads:
            thread.join(timeout=5)
    return {"made": progress.done - kept, "kept": kept, "failed": failed,
            "servers": {s.url: {"alive": s.alive, "pairs": progress.per_server.get(s.url, 0)} for s in live}}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--identities", type=Path, required=True, help="folder of identity photos (one face each)")
    parser.add_argument("--poses", type=Path, required=True, help="the pose bank: a folder of OpenPose images")
    parser.add_argument("--source", required=True, help="[Y], the source domain, e.g. 'normal costume'")
    parser.add_argument("--target", action="append", required=True, help="[Z], an edit direction; repeat for more")
    parser.add_argument("--pairs", type=int, required=True, help="how many pairs (the paper: 17,475 per direction)")
    parser.add_argument("--output", type=Path, required=True, help="the pairs folder LikenessTrainMCDM reads")
    parser.add_argument("--server", action="append", required=True, help="a ComfyUI server URL; repeat for more")
    parser.add_argument("--seed", type=int, default=0, help="the job's seed; each pair's follows from it")
    parser.add_argument("--depth", type=int, default=2, help="prompts kept queued on each server (2)")
    parser.add_argument("--size", type=int, nargs=2, metavar=("WIDTH", "HEIGHT"),
                        help="the double canvas (default: the workflow's 1024 512)")
    parser.add_argument("--steps", type=int, help="sampling steps (default: the workflow's)")
    parser.add_argument("--timeout", type=float, default=3600.0, help="seconds one pair may take on a server")
    args = parser.parse_args(argv)
    try:
        result = run_job(args.identities, args.poses, args.source, args.target, args.pairs, args.output, args.server,
                         seed=args.seed, depth=args.depth, size=tuple(args.size) if args.size else None,
                         steps=args.steps, timeout=args.timeout)
    except KeyboardInterrupt:
        print("[pairs] stopped; run the same command again to make the rest", file=sys.stderr)
        return 130
    print(json.dumps(result, indent=1))
    return 1 if result["failed"] else 0


if __name__ == "__main__":
    sys.exit(main())
