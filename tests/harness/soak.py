"""A long mixed run through one ComfyUI server: every shipped workflow again and again with
changing seeds and strengths, interrupts and bad prompts in between (tests/test_soak.py, and the
figures in tests/tools/benchmark.py). Memory is the server process's resident set, from /proc."""

from __future__ import annotations

import copy
import json
import random
import threading
import time
from dataclasses import dataclass, field

from .server import PromptRejected
from .workflows import for_tiny_models, load_api, shipped_workflows

# Inputs a user changes between prompts, per node type (name, values to pick from).
VARIED = {"KSampler": ("seed", range(1000)), "KSamplerAdvanced": ("noise_seed", range(1000)),
          "RandomNoise": ("noise_seed", range(1000)), "LikenessFeatureFusionAttention": ("alpha", (0.6, 0.7, 0.8)),
          "LikenessFaceFusion": ("weight", (0.5, 1.0, 1.5)), "LikenessInfiniteID": ("weight", (0.5, 1.0)),
          "LikenessMCDMGuider": ("text_scale", (3.0, 4.0)), "LikenessPairGuider": ("s_d", (0.1, 0.2))}
# Fewer steps: the soak is about many prompts, not long ones.
STEPS = {"KSampler": "steps", "KSamplerAdvanced": "steps", "BasicScheduler": "steps", "LikenessInvert": "steps"}


def resident_bytes(pid: int) -> int:
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"no VmRSS for process {pid}")


def quick(prompt: dict, rng: random.Random) -> dict:
    prompt = copy.deepcopy(prompt)
    for node in prompt.values():
        kind, inputs = node["class_type"], node["inputs"]
        if kind in VARIED:
            name, values = VARIED[kind]
            inputs[name] = rng.choice(list(values))
        if kind in STEPS and isinstance(inputs.get(STEPS[kind]), int):
            inputs[STEPS[kind]] = 3  # inversion and sampling alike: same steps, as MagicStyle needs
        if kind == "LikenessEditMask":
            inputs["seeds"] = 2
    return prompt


BAD_PROMPTS = [
    # rejected by validation: a file that is not there
    {"1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": "no_such_model.safetensors"}},
     "2": {"class_type": "SaveLatent", "inputs": {"samples": ["3", 0], "filename_prefix": "soak_bad"}},
     "3": {"class_type": "EmptyLatentImage", "inputs": {"width": 64, "height": 64, "batch_size": 1}}},
    # fails while running: an odd-width pair
    {"1": {"class_type": "EmptyImage", "inputs": {"width": 65, "height": 32, "batch_size": 1, "color": 0}},
     "2": {"class_type": "LikenessSplitPair", "inputs": {"pair": ["1", 0]}},
     "3": {"class_type": "PreviewImage", "inputs": {"images": ["2", 0]}}},
]


@dataclass
class Reading:
    """The server after a pass over every workflow: resident bytes, and the tensors Python holds."""
    rss: int
    tensors: int
    tensor_bytes: int

    @classmethod
    def of(cls, server) -> "Reading":
        live = server.get("/likeness_test/live_tensors")
        return cls(resident_bytes(server.process.pid), live["tensors"], live["bytes"])


@dataclass
class SoakFigures:
    prompts: int = 0
    succeeded: int = 0
    failed_as_expected: int = 0
    interrupted: int = 0
    unexpected: list = field(default_factory=list)
    readings: list[Reading] = field(default_factory=list)  # after warm-up, after each half

    def rss_growth(self, half: int) -> float:
        """Resident growth over one half of the mixed run (0 or 1), relative to the warm server."""
        return (self.readings[half + 1].rss - self.readings[half].rss) / self.readings[0].rss

    @property
    def rss_growth_total(self) -> float:
        """Resident growth from the warm server to the end (issue 12's figure)."""
        return self.readings[-1].rss / self.readings[0].rss - 1.0

    def tensor_growth(self, half: int) -> tuple[int, int]:
        before, after = self.readings[half], self.readings[half + 1]
        return after.tensors - before.tensors, after.tensor_bytes - before.tensor_bytes

    def as_dict(self) -> dict:
        return {"prompts": self.prompts, "succeeded": self.succeeded, "failed_as_expected": self.failed_as_expected,
                "interrupted": self.interrupted, "unexpected": self.unexpected,
                "readings": [vars(reading) for reading in self.readings],
                "rss_growth_per_half": [round(self.rss_growth(half), 4) for half in (0, 1)],
                "rss_growth_total": round(self.rss_growth_total, 4),
                "tensor_growth_per_half": [self.tensor_growth(half) for half in (0, 1)]}


def interrupt_soon(server, delay: float) -> threading.Thread:
    def fire():
        time.sleep(delay)
        server.post("/interrupt", {})

    thread = threading.Thread(target=fire, daemon=True)
    thread.start()
    return thread


def soak(server, prompts: int = 300, seed: int = 0, first: dict | None = None) -> SoakFigures:
    """Warm up with every workflow once, then ``prompts`` prompts in two halves, each followed by
    the same pass over every workflow and a reading: mostly workflows (with ``first`` parts queued
    before their workflow), one in twelve a bad prompt, one in fifteen interrupted."""
    rng = random.Random(seed)
    names = shipped_workflows()
    figures = SoakFigures()

    def run_workflow(name: str, interrupt: bool = False) -> None:
        prompt = quick(for_tiny_models(load_api(name)), rng)
        if first and name in first:
            assert server.run_prompt(prompt, targets=first[name]).ok
        thread = interrupt_soon(server, rng.uniform(0.05, 0.4)) if interrupt else None
        result = server.run_prompt(prompt)
        if thread is not None:
            thread.join()
        figures.prompts += 1
        if result.ok:
            figures.succeeded += 1
            if not result.files:
                figures.unexpected.append(f"{name}: no output files")
        elif interrupt and "interrupt" in json.dumps(result.error or {}).lower() or interrupt and result.error is None:
            figures.interrupted += 1
        else:
            figures.unexpected.append(f"{name}: {result.error}")

    # Each reading follows the same pass over every workflow, so that ComfyUI's cache holds the same
    # models at each (which models it holds swings RSS by hundreds of MB). A leak grows both halves
    # alike; what settles (the allocator meeting interrupts and failures for the first time) grows
    # the first.
    for name in names:
        run_workflow(name)
    figures.readings.append(Reading.of(server))
    for half in range(2):
        for index in range(half * prompts // 2, (half + 1) * prompts // 2):
            if index % 12 == 5:
                bad = BAD_PROMPTS[index % len(BAD_PROMPTS)]
                figures.prompts += 1
                try:
                    result = server.run_prompt(bad)
                    failed = not result.ok
                except PromptRejected:
                    failed = True
                figures.failed_as_expected += failed
                if not failed:
                    figures.unexpected.append("a bad prompt ran")
                continue
            run_workflow(rng.choice(names), interrupt=index % 15 == 7)
        for name in names:
            run_workflow(name)
        figures.readings.append(Reading.of(server))
    return figures
