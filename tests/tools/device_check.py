"""Checks for a machine with a GPU, run by hand (never by the test suite).

    python tests/tools/device_check.py COMFYUI_DIR [--bench]

Runs the MagicStyle invariants on ComfyUI's default device and dtype (CUDA,
fp16 on a GPU, where users run), without the server or the node layer:
only comfy/ and the pack's attention/ are imported. Prints JSON.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import json
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[2]
TESTS = REPO / "tests"


def load(comfyui: str) -> dict:
    sys.path.insert(0, comfyui)
    sys.path.insert(0, str(TESTS))
    sys.path.insert(0, str(REPO))  # safe here: ComfyUI's nodes.py is never imported
    import comfy.cli_args

    comfy.cli_args.args.cpu = not torch.cuda.is_available()  # lets the script be tried on a CPU too

    return {path.rsplit(".", 1)[-1]: importlib.import_module(f"attention.{path}")
            for path in ("magicstyle.ddim_inversion", "magicstyle.ffa", "shared.sigmas", "shared.layer_table",
                         "magicstyle.feature_bank", "shared.dispatch", "face_fusion.face_kv_attention",
                         "infinite_id.identity_streams", "face_fusion.face_pass", "infinite_id.stream_calls")}


def tiny_unet(kind: str):
    """A tiny UNet loaded the way UNETLoader loads a user's file."""
    import comfy.sd
    from tiny import tiny_models

    classes = tiny_models.register()
    config_dict = tiny_models.SD15_UNET if kind == "sd15" else tiny_models.SDXL_UNET
    model = classes[kind](config_dict).get_model({})
    tiny_models.initialise(model, tiny_models.SEED)
    state = {k: v.half() for k, v in model.diffusion_model.state_dict().items()}
    return comfy.sd.load_diffusion_model_state_dict(state)


def conditioning(kind: str):
    if kind == "sd15":
        return [[torch.randn(1, 77, 64, generator=torch.Generator().manual_seed(1)), {}]]
    return [[torch.randn(1, 77, 128, generator=torch.Generator().manual_seed(1)),
             {"pooled_output": torch.zeros(1, 64)}]]


def invariants(attention, kind: str) -> dict:
    import comfy.model_management

    from harness.calm import calm
    from harness.magicstyle_bench import forward as bench_forward

    def forward(attention, model, latent, cond, steps, cfg=1.0):
        return bench_forward(model, latent, cond, steps, cfg, attention)

    inversion, ffa, schedule, layers = (attention[n] for n in ("ddim_inversion", "ffa", "sigmas", "layer_table"))
    model = tiny_unet(kind)
    steps, cond = 10, conditioning(kind)
    calm_model = calm(model, 1e-3)
    keys = layers.attention_keys(layers.diffusion_model_of(model))
    latents = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    device = comfy.model_management.get_torch_device()
    z_t, bank = inversion.invert(calm_model, cond, latents, steps, capture="qkv", layers=keys,
                                 storage_device=device, disable_pbar=True)
    back = forward(attention, calm_model, z_t, cond, steps)
    content, style = bank.select(0, 1), bank.select(1, 1)
    sampling = schedule.model_sampling_of(model)

    def fused(c, s, alpha, beta):
        fusion = ffa.FeatureFusion(c, s, style_index=0, alpha=alpha, beta=beta, temperature=1.0, layers=keys,
                                   sigma_range=schedule.SigmaRange.always(), model_sampling=sampling)
        return ffa.apply_ffa(calm_model, fusion)

    start = z_t[:1]
    plain = forward(attention, calm_model, start, cond, steps)
    same = forward(attention, fused(content, content, 1.0, 0.0), start, cond, steps)
    styled = forward(attention, fused(content, style, 0.8, 0.2), start, cond, steps, cfg=5.0)
    before = forward(attention, model, start, cond, steps, cfg=5.0)
    forward(attention, fused(content, style, 0.8, 0.2), start, cond, steps, cfg=5.0)
    after = forward(attention, model, start, cond, steps, cfg=5.0)
    face_fusion = attention["face_kv_attention"]
    face = face_fusion.Identity(latent=torch.randn(1, 4, 8, 8), noise=torch.randn(1, 4, 8, 8), weight=1.0,
                                sigma_range=schedule.SigmaRange.always())
    with_face = forward(attention, face_fusion.apply_face_fusion(model, face, keys), start, cond, steps, cfg=5.0)
    no_face = forward(attention, face_fusion.apply_face_fusion(model, dataclasses.replace(face, weight=0.0), keys),
                      start, cond, steps, cfg=5.0)
    from harness.face_bench import with_infinite_id

    two_streams = forward(attention, with_infinite_id(model, attention), start, cond, steps, cfg=5.0)
    unet = layers.diffusion_model_of(model)
    return {
        "device": str(device), "unet_dtype": str(next(unet.parameters()).dtype),
        "bank_device": str(next(iter(bank.features.values())).values.device), "entries": len(bank.features),
        "round_trip_max_error": (back - latents).abs().max().item(),
        "ffa_identity_gap": (same - plain).abs().max().item(),
        "ffa_style_gap": (styled - plain).abs().max().item(),
        "styled_finite": bool(torch.isfinite(styled).all()),
        "unpatched_bit_identical": bool(torch.equal(before, after)),
        "face_fusion_finite": bool(torch.isfinite(with_face).all()),
        "face_fusion_changes_output": bool((with_face - before).abs().max() > 1e-2 * before.abs().max()),
        "face_weight_0_bit_identical": bool(torch.equal(no_face, before)),
        "infinite_id_finite": bool(torch.isfinite(two_streams).all()),
        "infinite_id_changes_output": bool((two_streams - before).abs().max() > 1e-2 * before.abs().max()),
    }


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("comfyui")
    parser.add_argument("--bench", action="store_true")
    parser.add_argument("--skip-magicstyle", action="store_true")
    args = parser.parse_args()
    attention = load(args.comfyui)
    report = {"torch": torch.__version__, "cuda": torch.cuda.is_available()}
    for kind in ("sd15", "sdxl"):
        started = time.perf_counter()
        report[kind] = invariants(attention, kind)
        report[kind]["seconds"] = round(time.perf_counter() - started, 1)
    print(json.dumps(report, indent=1), flush=True)
    if args.bench:
        from harness.magicstyle_bench import full_sd15, measure
        from tiny import tiny_models

        from harness.face_bench import measure_gpu

        model = full_sd15(tiny_models.initialise)
        report["face_fusion_bench_gpu"] = measure_gpu(model, attention, size=512, steps=20)
        print(json.dumps(report["face_fusion_bench_gpu"], indent=1), flush=True)
        # Issue 21: face rows and identity streams batched vs separate calls, interleaved, fp16 at 512.
        from harness.face_bench import face_rows_figures

        report["face_rows_gpu"] = face_rows_figures(model, attention, size=512, rounds=5, steps=10)
        print(json.dumps(report["face_rows_gpu"], indent=1), flush=True)
        if "--skip-magicstyle" not in sys.argv:
            report["magicstyle_bench_gpu"] = measure(model, attention, size=512, steps=30, bytes_size=512)
            print(json.dumps(report["magicstyle_bench_gpu"], indent=1), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
