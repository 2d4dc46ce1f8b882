"""Numbers for the issues, measured the same way each time.

    <host python> tests/tools/benchmark.py      (or: python3 tests/run.py builds the host first)

Timings on these machines are noisy: each figure is a ratio or a median
from one run, never a test assertion.
"""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from harness.base import make_base_directory  # noqa: E402
from harness.paths import PACK_NAME, REPO, TESTS, host_root, load_installer  # noqa: E402


def pack_import_cost(repeats: int = 5) -> dict:
    """Seconds load_custom_node spends on the pack in a started ComfyUI."""
    host = load_installer().Host(host_root())
    with tempfile.TemporaryDirectory() as folder:
        base = make_base_directory(Path(folder) / "base")
        seconds = []
        for _ in range(repeats):
            out = subprocess.run([sys.executable, str(TESTS / "harness" / "import_probe.py"), str(host.comfyui),
                                  str(base / "custom_nodes" / PACK_NAME)], capture_output=True, text=True, check=True)
            seconds.append(json.loads(out.stdout.strip().splitlines()[-1])["seconds"])
    return {"pack_import_seconds_median": statistics.median(seconds), "runs": repeats}


def magicstyle(size: int = 256, steps: int = 10, bytes_size: int | None = 512, bytes_steps: int = 3) -> dict:
    """Issue 3's figures on a full-size random SD1.5 UNet, ComfyUI on this CPU.

    Cache bytes come from a real 512×512 inversion of ``bytes_steps`` steps,
    scaled to 30 (a 30-step one takes ~20 minutes here); step times are
    per step, so 10 steps at 256×256 measure them."""
    attention = _attention_modules(("magicstyle.ddim_inversion", "magicstyle.ffa", "shared.sigmas",
                                    "shared.layer_table", "magicstyle.feature_bank"))
    from harness.magicstyle_bench import full_sd15, measure
    from tiny import tiny_models

    return measure(full_sd15(tiny_models.initialise), attention, size=size, steps=steps, bytes_size=bytes_size,
                   bytes_steps=bytes_steps)


def _attention_modules(paths):
    import importlib

    sys.path.insert(0, str(host_root_comfyui()))
    import comfy.cli_args

    comfy.cli_args.args.cpu = True
    sys.path.insert(0, str(REPO))  # nodes.py is never imported here, so attention/ cannot shadow it
    return {path.rsplit(".", 1)[-1]: importlib.import_module(f"attention.{path}") for path in paths}


def patch_worker(kind: str, size: int, steps: int) -> None:
    """One sampling run in this process; prints seconds per step and peak RSS.
    Each kind runs in its own process so that peak memory is its own."""
    import resource

    attention = _attention_modules(("face_fusion.face_kv_attention", "infinite_id.identity_streams", "shared.sigmas",
                                    "shared.layer_table"))
    from harness.face_bench import sample_steps, with_face, with_infinite_id
    from harness.magicstyle_bench import full_sd15
    from tiny import tiny_models

    model = full_sd15(tiny_models.initialise)
    latent = torch_zeros(size)
    sample_steps(model, latent, 1)  # loads the model
    candidate = {"vanilla": lambda: model, "face": lambda: with_face(model, attention, size),
                 "infinite_id": lambda: with_infinite_id(model, attention)}[kind]()
    seconds = min(sample_steps(candidate, latent, steps) for _ in range(2))
    print(json.dumps({"step_s": seconds, "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}))


def face_rows(size: int = 256) -> dict:
    """Issue 21: Face Fusion's face rows batched into the image's call vs a separate face call, and
    Infinite-ID's streams in one call vs a call per stream, per step over a plain step, interleaved
    in one process (full-size random SD1.5)."""
    attention = _attention_modules(("face_fusion.face_kv_attention", "face_fusion.face_pass",
                                    "infinite_id.identity_streams", "infinite_id.stream_calls", "shared.sigmas",
                                    "shared.layer_table"))
    import torch

    torch.set_num_threads(1)  # CPU time of one thread: the work, whatever else the machine runs
    from harness.face_bench import face_rows_figures
    from harness.magicstyle_bench import full_sd15
    from tiny import tiny_models

    return face_rows_figures(full_sd15(tiny_models.initialise), attention, size=size)


def torch_zeros(size: int):
    import torch

    return torch.zeros(1, 4, size // 8, size // 8)


def patches_vs_vanilla(kinds=("face", "infinite_id"), size: int = 256, steps: int = 5) -> dict:
    """Issues 4 and 5: one face reference (Face Fusion) and both Infinite-ID
    streams vs vanilla, full-size random SD1.5 on this CPU."""
    runs = {}
    for kind in ("vanilla", *kinds):
        out = subprocess.run([sys.executable, __file__, "--worker", kind, str(size), str(steps)],
                             capture_output=True, text=True, check=True)
        runs[kind] = json.loads(out.stdout.strip().splitlines()[-1])
    vanilla = runs["vanilla"]
    results = {"size": size, "steps": steps, "vanilla_step_s": round(vanilla["step_s"], 3),
               "vanilla_peak_rss_bytes": vanilla["peak_rss_bytes"]}
    for kind in kinds:
        results[f"{kind}_step_s"] = round(runs[kind]["step_s"], 3)
        results[f"{kind}_over_vanilla_step"] = round(runs[kind]["step_s"] / vanilla["step_s"], 3)
        results[f"{kind}_peak_rss_bytes"] = runs[kind]["peak_rss_bytes"]
        results[f"{kind}_over_vanilla_peak_rss"] = round(runs[kind]["peak_rss_bytes"] / vanilla["peak_rss_bytes"], 3)
    return results


def editing(size: int = 256, steps: int = 5) -> dict:
    """Issue 6's figures: mask generation and a mask-guided edit, full-size random SD1.5 on this CPU."""
    attention = _attention_modules(("portrait_editing.editing_math", "portrait_editing.editing_guiders",
                                    "shared.sigmas"))
    from harness.editing_bench import measure as measure_editing
    from harness.magicstyle_bench import full_sd15
    from tiny import tiny_models

    return measure_editing(full_sd15(tiny_models.initialise), attention, size=size, steps=steps)


def mcdm(size: int = 256, steps: int = 5) -> dict:
    """The MCDM guider's cost: full-size random 8-channel SD1.5 on this CPU."""
    attention = _attention_modules(("portrait_editing.editing_guiders", "portrait_editing.mcdm",
                                    "portrait_editing.editing_math", "shared.sigmas"))
    from harness.editing_bench import measure_mcdm
    from harness.magicstyle_bench import full_sd15
    from tiny import tiny_models

    return measure_mcdm(full_sd15(tiny_models.initialise, in_channels=8), attention, size=size, steps=steps)


MEMORY_ROWS = (("sd15", 512), ("sd15", 768), ("sdxl", 1024), ("sdxl", 1536))


def memory_worker(kind: str, side: int, steps: int = 30) -> None:
    """One row of the Memory table in this process (a full-size model each): prints its JSON."""
    attention = _attention_modules(("magicstyle.ddim_inversion", "shared.layer_table", "magicstyle.feature_bank"))
    from harness.magicstyle_bench import empty_conditioning, full_sd15, full_sdxl, measure_cache
    from tiny import tiny_models

    if kind == "sd15":
        model, cond = full_sd15(tiny_models.initialise), empty_conditioning(768)
    else:
        model, cond = full_sdxl(tiny_models.initialise), empty_conditioning(2048, pooled=1280)
    print(json.dumps(measure_cache(model, attention, cond, side, steps=steps)))


def magicstyle_memory(rows=MEMORY_ROWS) -> dict:
    """MagicStyle's feature cache for content + style, 30 steps, every self-attention layer and the
    decoder's, measured on real inversions of full-size random UNets (SD1.5, SDXL with fp16
    weights): the bytes the cache's tensors occupy (harness/magicstyle_bench.measure_cache), beside
    the fp16 Q/K/V a naive cache would keep, counted from the model's own projections. Each row in
    its own process. The SD1.5 rows take minutes on a CPU, the SDXL ones hours (minutes on a GPU)."""
    table = {}
    for kind, side in rows:
        out = subprocess.run([sys.executable, __file__, "--memory-worker", kind, str(side)],
                             capture_output=True, text=True, check=True)
        for layer_set, row in json.loads(out.stdout.strip().splitlines()[-1]).items():
            table[f"{kind}_{side}px_{layer_set}"] = row
    return table


def soak_figures(prompts: int = 300) -> dict:
    """Issue 12's soak: resident memory of one server before and after hundreds of mixed prompts."""
    _attention_modules(("shared.layer_table",))  # ComfyUI importable, on the CPU
    from harness.server import ComfyServer
    from harness.soak import soak
    from harness.workflows import place_tiny_models
    from harness.paths import cache_root
    from tiny import tiny_models

    with tempfile.TemporaryDirectory() as folder:
        base = make_base_directory(Path(folder) / "base")
        load_installer().copy_examples(base / "input")
        tiny_models.register()
        checkpoints = tiny_models.write_checkpoints(cache_root() / f"tiny-{tiny_models.recipe_digest()}")
        place_tiny_models(base / "models", checkpoints)
        server = ComfyServer(Path(sys.executable), host_root_comfyui(), base, base / "server.log")
        try:
            server.wait_ready()
            figures = soak(server, prompts=prompts, first={"magicstyle_style_library": ["7"]})
        finally:
            server.stop()
    return figures.as_dict()


def pair_figures() -> dict:
    """Issue 13: jobs/make_pairs.py's pairs per minute with one and with two servers."""
    _attention_modules(("shared.layer_table",))
    from harness.pairs_bench import pair_throughput
    from harness.paths import cache_root
    from tiny import tiny_models

    tiny_models.register()
    checkpoints = tiny_models.write_checkpoints(cache_root() / f"tiny-{tiny_models.recipe_digest()}")
    return pair_throughput(host_root_comfyui(), checkpoints)


def scale_figures() -> dict:
    """Issue 13: one pair and one training step of a full-size SD1.5 UNet, for the paper-scale arithmetic."""
    _attention_modules(("shared.layer_table",))
    from harness.magicstyle_bench import full_sd15
    from harness.scale_bench import paper_scale
    from tiny import tiny_models

    return paper_scale(full_sd15(tiny_models.initialise), full_sd15(tiny_models.initialise, in_channels=8))


def training_figures(steps: int = 12) -> dict:
    """Issue 13: jobs/train.py's optimiser steps per second on the tiny models, each process held to
    one CPU thread (as each would hold one GPU): one process with a batch of 1 and of 2, and two
    processes with a batch of 1 each (gloo) — the same global batch of 2 as one process's batch of 2."""
    _attention_modules(("shared.layer_table",))
    from harness.paths import cache_root
    from harness.training_job import steps_per_second, training_inputs
    from tiny import tiny_models

    tiny_models.register()
    checkpoints = tiny_models.write_checkpoints(cache_root() / f"tiny-{tiny_models.recipe_digest()}")
    comfyui = host_root_comfyui()
    with tempfile.TemporaryDirectory() as folder:
        root = Path(folder)
        inputs = training_inputs(root, checkpoints["sd15"], pairs=8)
        rates = {"one_process_batch_1": steps_per_second(comfyui, inputs, root, 0, steps, batch=1),
                 "one_process_batch_2": steps_per_second(comfyui, inputs, root, 0, steps, batch=2),
                 "two_processes_batch_1_each": steps_per_second(comfyui, inputs, root, 2, steps, batch=1)}
    figures = {"steps": steps, "threads_per_process": 1, "pair_size": 64,
               "steps_per_second": {k: round(v, 3) for k, v in rates.items()}}
    figures["two_processes_over_one_same_global_batch"] = round(
        rates["two_processes_batch_1_each"] / rates["one_process_batch_2"], 3)
    figures["pairs_per_second_two_processes_over_one_process_batch_1"] = round(
        2 * rates["two_processes_batch_1_each"] / rates["one_process_batch_1"], 3)
    return figures


def dit_section() -> dict:
    """MagicStyle on Flux: FFA step ÷ plain step (cache, recompute), tiny and full-width one-block
    Flux on this CPU; cache vs recompute memory for Flux and SDXL at 1024² (harness/dit_bench.py)."""
    from harness.dit_bench import dit_figures
    from harness.inprocess import ComfyInProcess

    host = load_installer().Host(host_root())
    with tempfile.TemporaryDirectory() as folder:
        base = make_base_directory(Path(folder) / "base")
        comfy = ComfyInProcess(host.comfyui, base, base / "custom_nodes" / PACK_NAME)
        return dit_figures(comfy)


def host_root_comfyui() -> Path:
    return load_installer().Host(host_root()).comfyui


def main() -> int:
    if "--worker" in sys.argv:
        at = sys.argv.index("--worker")
        patch_worker(sys.argv[at + 1], int(sys.argv[at + 2]), int(sys.argv[at + 3]))
        return 0
    if "--dit" in sys.argv:
        print(json.dumps({"dit": dit_section()}, indent=1))
        return 0
    if "--face-rows" in sys.argv:
        print(json.dumps({"face_rows_cpu": face_rows()}, indent=1))
        return 0
    if "--soak" in sys.argv:
        print(json.dumps({"soak": soak_figures()}, indent=1))
        return 0
    if "--pairs" in sys.argv:
        print(json.dumps({"pairs": pair_figures()}, indent=1))
        return 0
    if "--training" in sys.argv:
        print(json.dumps({"training": training_figures()}, indent=1))
        return 0
    if "--scale" in sys.argv:
        print(json.dumps({"scale": scale_figures()}, indent=1))
        return 0
    if "--memory-worker" in sys.argv:
        at = sys.argv.index("--memory-worker")
        memory_worker(sys.argv[at + 1], int(sys.argv[at + 2]))
        return 0
    if "--memory" in sys.argv:  # optionally followed by the rows to measure, e.g. sdxl:1024 sd15:768
        rows = [(arg.split(":")[0], int(arg.split(":")[1])) for arg in sys.argv[sys.argv.index("--memory") + 1:]
                if ":" in arg]
        print(json.dumps({"magicstyle_memory": magicstyle_memory(tuple(rows) or MEMORY_ROWS)}, indent=1))
        return 0
    results = {"pack_import": pack_import_cost()}
    if "--skip-magicstyle" not in sys.argv:
        results["magicstyle_cpu"] = magicstyle()
    if "--skip-patches" not in sys.argv:
        results["patches_cpu"] = patches_vs_vanilla()
    if "--skip-editing" not in sys.argv:
        results["editing_cpu"] = editing()
        results["mcdm_cpu"] = mcdm()
    print(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
