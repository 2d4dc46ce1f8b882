"""What every shipped workflow samples with, read from both twins, against the papers' settings;
the table of them on docs/workflows.md; what the scheduler names mean, against the reference code's schedulers;
the groups, notes and titles the UI workflows carry from their layout sidecars."""

from __future__ import annotations

import re

import pytest

from harness.layout import load_layout, nodes_inside
from harness.paths import REPO
from harness.workflows import WORKFLOWS, load_api, load_ui, shipped_workflows

# (sampler, scheduler, steps, guidance) of every sampler in the workflow; docs/workflows.md names the source.
MAGICSTYLE = ("euler", "ddim_uniform", 30, 5.0)  # MagicStyle Sec. IV-A: 30-step DDIM, guidance 5
INFINITE_ID = ("euler", "ddim_uniform", 30, 5.0)  # Infinite-ID Sec. 4.1: DDIM, 30 steps, guidance 5.0
FACE_FUSION = ("euler", "ddim_uniform", 30, 7.5)  # paper silent: IP-Adapter FaceID-PlusV2's card (DDIM 30, 7.5)
# No paper samples these on a DiT: MagicStyle's schedule (30 ddim_uniform steps) at cfg 1, Flux-dev's distilled
# guidance in the conditioning; Face Fusion as ComfyUI's Flux.1-dev example samples (euler, simple, 20, cfg 1).
MAGICSTYLE_FLUX = ("euler", "ddim_uniform", 30, 1.0)
FACE_FUSION_FLUX = ("euler", "simple", 20, 1.0)
EDITING = ("uni_pc_bh2", "sgm_uniform", 20)  # portrait editing Supp. 1.3: UniPC, T = 20; demo.py: UniPC (bh2)
EXPECTED = {
    "magicstyle": [MAGICSTYLE], "magicstyle_style_library": [MAGICSTYLE], "magicstyle_sweep": [MAGICSTYLE],
    "magicstyle_small_face": [MAGICSTYLE, MAGICSTYLE],
    "infinite_id_sdxl": [INFINITE_ID], "infinite_id_sd15": [INFINITE_ID], "infinite_id_style": [INFINITE_ID],
    "infinite_id_two_people": [INFINITE_ID], "identity_mix": [INFINITE_ID],
    "face_fusion": [FACE_FUSION], "face_fusion_multi_reference": [FACE_FUSION], "face_fusion_two_people": [FACE_FUSION],
    "mcdm_edit": [(*EDITING, (3.0, 2.0, 4.0))],  # demo.py: s1 3, s2 2, s3 4 (the paper: 3 / 3 / 5)
    "diffedit_edit": [(*EDITING, 7.5)],  # plain SD: the supplement's guidance 7.5 (Supp. 1.1), DiffEdit's too
    "magicstyle_flux": [MAGICSTYLE_FLUX], "face_fusion_flux": [FACE_FUSION_FLUX], "magicstyle_sd35": [MAGICSTYLE],
    "pair_generation": [("heun", "karras", 20, 7.5)],  # Supp. 1.1: T = 20, guidance 7.5, Stochastic Karras VE
}
CONTROL_VALUES = {"fixed", "increment", "decrement", "randomize"}  # the editor's control_after_generate


def ui_inputs(workflow: dict) -> dict[str, tuple[str, dict]]:
    """{node id: (type, {widget name: value})} of a UI workflow, widgets read in the order the node
    lists them (a seed's control_after_generate value follows it in widgets_values)."""
    nodes = {}
    for node in workflow["nodes"]:
        values = list(node.get("widgets_values") or [])
        widgets = {}
        for entry in node.get("inputs", []):
            if "widget" in entry and values:
                widgets[entry["name"]] = values.pop(0)
                if entry["type"] == "INT" and values and values[0] in CONTROL_VALUES:
                    values.pop(0)
        nodes[str(node["id"])] = (node["type"], widgets)
    return nodes


def sampling_settings(nodes: dict[str, tuple[str, dict]]) -> list[tuple]:
    """(sampler, scheduler, steps, guidance) of each sampler: KSampler / KSamplerAdvanced, or the one
    KSamplerSelect + BasicScheduler + guider of a SamplerCustomAdvanced graph."""
    found = []
    for kind, inputs in nodes.values():
        if kind in ("KSampler", "KSamplerAdvanced"):
            found.append((inputs["sampler_name"], inputs["scheduler"], inputs["steps"], float(inputs["cfg"])))
    custom = [inputs for kind, inputs in nodes.values() if kind == "SamplerCustomAdvanced"]
    if custom:
        assert len(custom) == 1, "one custom sampler per workflow"
        (select,) = [inputs for kind, inputs in nodes.values() if kind == "KSamplerSelect"]
        (schedule,) = [inputs for kind, inputs in nodes.values() if kind == "BasicScheduler"]
        (guidance,) = [tuple(float(inputs[k]) for k in ("image_scale", "spatial_scale", "text_scale"))
                       if kind == "LikenessMCDMGuider" else float(inputs["cfg"])
                       for kind, inputs in nodes.values() if kind.endswith("Guider")]
        found.append((select["sampler_name"], schedule["scheduler"], schedule["steps"], guidance))
    return sorted(found, key=repr)


def test_every_shipped_workflow_has_expected_settings():
    assert set(EXPECTED) == set(shipped_workflows())


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_both_twins_sample_as_the_paper_did(name):
    api = {node_id: (node["class_type"], node["inputs"]) for node_id, node in load_api(name).items()}
    assert sampling_settings(api) == sorted(EXPECTED[name], key=repr), "API twin"
    assert sampling_settings(ui_inputs(load_ui(name))) == sorted(EXPECTED[name], key=repr), "UI workflow"


def readme_settings() -> dict[str, tuple]:
    """{workflow: (sampler, scheduler, steps, guidance, source)} from the settings table of the
    workflows' page (docs/workflows.md, which the README links)."""
    text = (REPO / "docs" / "workflows.md").read_text()
    section = text[text.index("| workflows | sampler | scheduler | steps | guidance | source |"):]
    rows = {}
    for line in section.splitlines()[2:]:
        if not line.startswith("|"):
            break
        names, sampler, scheduler, steps, guidance, source = [cell.strip() for cell in line.strip("|").split("|")]
        scales = tuple(float(v) for v in guidance.split("/"))
        for name in re.findall(r"`(\w+)`", names):
            rows[name] = (sampler, scheduler, int(steps), scales[0] if len(scales) == 1 else scales, source)
    return rows


def test_the_readme_names_each_workflows_settings_and_their_source():
    rows = readme_settings()
    assert set(rows) == set(EXPECTED)
    for name, settings in EXPECTED.items():
        assert {row[:4] for row in [rows[name]]} == set(settings), name
        assert len(rows[name][4]) > 20, f"{name}: the source of its settings"


def comfy_timesteps(sampling, scheduler: str, steps: int) -> list[float]:
    import comfy.samplers

    sigmas = comfy.samplers.calculate_sigmas(sampling, scheduler, steps)
    return [float(sampling.timestep(sigma)) for sigma in sigmas if sigma > 0]


def test_the_scheduler_names_visit_the_reference_codes_timesteps(comfy):
    """The released code samples with diffusers: DDIM as IP-Adapter FaceID's card and Infinite-ID
    configure it (SD's betas, steps_offset 1, "leading" spacing), UniPC with its defaults (bh2,
    "linspace" spacing) as the portrait-editing demo builds it. ComfyUI's ddim_uniform and sgm_uniform
    visit the same timesteps; at 30 steps ddim_uniform adds one at t = 991 (1000 // 30 leaves room
    for a 31st), which docs/workflows.md says."""
    import comfy.model_sampling
    from diffusers import DDIMScheduler, UniPCMultistepScheduler

    sampling = comfy.model_sampling.ModelSamplingDiscrete()  # SD1.5's and SDXL's betas
    betas = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")
    ddim = DDIMScheduler(**betas, clip_sample=False, set_alpha_to_one=False, steps_offset=1)
    for steps in (20, 30):
        ddim.set_timesteps(steps)
        reference = [float(t) for t in ddim.timesteps]
        ours = comfy_timesteps(sampling, "ddim_uniform", steps)
        extra = [991.0] if steps == 30 else []
        assert [round(t, 3) for t in ours] == extra + reference, steps
    unipc = UniPCMultistepScheduler(**betas)
    assert unipc.config.solver_type == "bh2" and unipc.config.timestep_spacing == "linspace"
    unipc.set_timesteps(20)
    ours = comfy_timesteps(sampling, "sgm_uniform", 20)
    assert len(ours) == 20
    assert max(abs(a - float(b)) for a, b in zip(ours, unipc.timesteps)) <= 0.5 + 1e-3  # diffusers rounds them


@pytest.mark.parametrize("name", [name for name in shipped_workflows() if load_layout(WORKFLOWS, name)])
def test_the_ui_workflow_carries_its_layout(name):
    """Each group holds exactly its nodes (and its notes) by the editor's rule, the centre of each
    node; titles and nodes bypassed by default are as the sidecar says."""
    layout, ui = load_layout(WORKFLOWS, name), load_ui(name)
    by_id = {str(node["id"]): node for node in ui["nodes"]}
    groups = {group["title"]: group for group in ui["groups"]}
    for wanted in layout.get("groups", []):
        inside = {str(i) for i in nodes_inside(ui, groups[wanted["title"]])}
        notes = {node_id for node_id in inside if by_id[node_id]["type"] == "MarkdownNote"}
        assert inside - notes == set(wanted["nodes"]), wanted["title"]
        expected_notes = [n["text"] for n in layout.get("notes", []) if n.get("group") == wanted["title"]]
        assert sorted(by_id[i]["widgets_values"][0] for i in notes) == sorted(expected_notes)
    for node_id, title in layout.get("titles", {}).items():
        assert by_id[node_id]["title"] == title
    assert {node_id for node_id, node in by_id.items() if node.get("mode") == 4} == set(layout.get("bypassed", []))


def test_magicstyle_small_face_has_a_switchable_identity_group():
    layout = load_layout(WORKFLOWS, "magicstyle_small_face")
    (group,) = [group for group in layout["groups"] if group.get("optional")]
    api = load_api("magicstyle_small_face")
    kinds = {api[node_id]["class_type"] for node_id in group["nodes"]}
    assert kinds == {"LikenessFaceCrop", "VAEEncode", "LikenessFaceFusion"}
    (fusion,) = [node_id for node_id in group["nodes"] if api[node_id]["class_type"] == "LikenessFaceFusion"]
    # Face Fusion sits between the FFA-patched model and the sampler that restores the crop
    (restorer,) = [n for n in api.values()
                   if n["class_type"] == "KSamplerAdvanced" and n["inputs"]["model"][0] == fusion]
    assert api[api[fusion]["inputs"]["model"][0]]["class_type"] == "LikenessFeatureFusionAttention"
    assert restorer["inputs"]["latent_image"][0] == "24"  # the crop's AdaIN latent
