"""What every method shares. A method package imports these; these import no method.

    dispatch.py          the one patch dispatcher per attention key: chains Likeness' processors
                         and other packs' patches, runs each in its passes (``Pass``: the image
                         being made or a patch's own auxiliary call); ``default_attention`` is
                         the attention call
    layer_table.py       where a model's attention layers are, by ComfyUI's block keys (a DiT's
                         joint blocks too); the named layer sets, each layer's token grid and the
                         model families the methods run on (``family_of``)
    joint_attention.py   the one hook per DiT model: joint (text + image) attention through
                         ComfyUI's ``optimized_attention_override``, chained onto any override
                         already there; processors get q/k/v after modulation, QK-norm and RoPE
    rows.py              which batch rows are cond and which uncond (``cond_or_uncond``)
    sigmas.py            sigma <-> timestep and start/end percentages as sigma windows
    token_masks.py       masks resized to a layer's token grid
    extra_rows.py        rows a patch adds to the image's own model call: counted in ComfyUI's memory
                         estimate, checked against free memory, given ControlNet residuals
    adain.py             AdaIN (MagicStyle Eq. 4) and AdaIN-mean (Infinite-ID Eq. 8)
    training_loop.py     the diffusion loss through a patched model and the optimisation loop (one
                         process or torchrun: DDP, accumulation, mixed precision, checkpoints)
    recipes.py           each trainer's optimiser settings and where each value comes from
    training_folders.py  a trainer's folder of <stem>.png + companion image + caption
    atomic_files.py      files written whole or not at all

A new architecture plugs in here: its layer table in layer_table.py (and ``FAMILIES``), its
attention call in dispatch.py (a UNet) or joint_attention.py (a joint-attention DiT such as
Flux.1 and SD3.5; Flux.2, Qwen-Image, HiDream would join there); ``nodes/common.require_model_family``
is the gate that admits it.
"""
