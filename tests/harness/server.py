"""ComfyUI's own server (main.py) on a free 127.0.0.1 port, driven over HTTP."""

from __future__ import annotations

import json
import socket
import subprocess
import time
import urllib.error
import urllib.request
import uuid
from dataclasses import dataclass, field
from pathlib import Path


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@dataclass
class PromptResult:
    prompt_id: str
    status: str  # "success" or "error"
    outputs: dict = field(default_factory=dict)
    files: list[Path] = field(default_factory=list)
    error: dict | None = None  # the node error ComfyUI reported, if any

    @property
    def ok(self) -> bool:
        return self.status == "success"


class PromptRejected(Exception):
    """POST /prompt answered 400: the prompt failed validation."""

    def __init__(self, body: dict) -> None:
        super().__init__(json.dumps(body, indent=1)[:4000])
        self.body = body


class ComfyServer:
    def __init__(self, python: Path, comfyui: Path, base_directory: Path, log_path: Path,
                 env: dict[str, str] | None = None) -> None:
        self.base_directory = base_directory
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = log_path
        self._log = open(log_path, "wb")
        # ComfyUI's output cache stays on, as on users' servers: a node that changed a cached input
        # would show up in the next prompt that reuses it.
        command = [str(python), "main.py", "--cpu", "--listen", "127.0.0.1", "--port", str(self.port),
                   "--base-directory", str(base_directory), "--disable-api-nodes",
                   "--database-url", "sqlite:///:memory:"]
        self.process = subprocess.Popen(command, cwd=comfyui, stdout=self._log, stderr=subprocess.STDOUT, env=env)

    def wait_ready(self, timeout: float = 120.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"ComfyUI exited with {self.process.returncode}:\n{self.log_tail()}")
            try:
                self.get("/system_stats", timeout=2)
                return
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                time.sleep(0.5)
        raise TimeoutError(f"ComfyUI did not answer within {timeout}s:\n{self.log_tail()}")

    def log_tail(self, chars: int = 6000) -> str:
        self._log.flush()
        return self.log_path.read_text(errors="replace")[-chars:]

    def get(self, path: str, timeout: float = 30) -> dict:
        with urllib.request.urlopen(self.url + path, timeout=timeout) as response:
            return json.loads(response.read())

    def post(self, path: str, body: dict, timeout: float = 30) -> dict:
        request = urllib.request.Request(self.url + path, data=json.dumps(body).encode(),
                                         headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(request, timeout=timeout) as response:
                body = response.read()
                return json.loads(body) if body else {}
        except urllib.error.HTTPError as error:
            if error.code == 400:
                raise PromptRejected(json.loads(error.read() or b"{}")) from None
            raise

    def run_prompt(self, prompt: dict, timeout: float = 300.0, targets: list[str] | None = None) -> PromptResult:
        """POST an API-format prompt, wait for it in /history, collect its files.

        ``targets``: run only these output nodes (the editor's "queue selected
        output nodes"); the rest of the prompt is not even validated."""
        body = {"prompt": prompt, "client_id": uuid.uuid4().hex}
        if targets:
            body["partial_execution_targets"] = targets
        queued = self.post("/prompt", body)
        prompt_id = queued["prompt_id"]
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"ComfyUI died while running {prompt_id}:\n{self.log_tail()}")
            history = self.get(f"/history/{prompt_id}")
            entry = history.get(prompt_id)
            if entry and entry.get("status", {}).get("completed") is not None and (
                    entry["status"].get("status_str") in ("success", "error")):
                return self._result(prompt_id, entry)
            time.sleep(0.25)
        raise TimeoutError(f"prompt {prompt_id} did not finish in {timeout}s:\n{self.log_tail()}")

    def clear_cache(self) -> None:
        """Empty ComfyUI's output cache: POST /free, which the server applies after its next prompt
        (a one-node prompt here), so the prompt after that computes everything again."""
        self.post("/free", {"free_memory": True, "unload_models": True})
        flush = {"1": {"class_type": "EmptyImage", "inputs": {"width": 8, "height": 8, "batch_size": 1,
                                                             "color": 0}},
                 "2": {"class_type": "PreviewImage", "inputs": {"images": ["1", 0]}}}
        result = self.run_prompt(flush)
        assert result.ok, result.error

    def _result(self, prompt_id: str, entry: dict) -> PromptResult:
        status = entry["status"]["status_str"]
        error = None
        for kind, message in entry["status"].get("messages", []):
            if kind == "execution_error":
                error = message
        files = []
        for node_output in entry.get("outputs", {}).values():
            for image in node_output.get("images", []):
                folder = self.base_directory / image.get("type", "output")
                files.append(folder / image.get("subfolder", "") / image["filename"])
        return PromptResult(prompt_id, status, entry.get("outputs", {}), files, error)

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self._log.close()
