"""MagicStyle's feature cache measured, not computed: the bytes its tensors' storages occupy, and
the Q/K/V a naive cache would keep, counted from what the model's own projections output.

Used by tests/test_magicstyle.py (tiny models) and tests/tools/benchmark.py --memory (full-size UNets,
the README's Memory table); neither goes through the pack's size formula.
"""

from __future__ import annotations

from contextlib import contextmanager

SELF_ATTENTION_PROJECTIONS = ("attn1.to_q", "attn1.to_k", "attn1.to_v")


def storage_bytes(features: dict) -> int:
    """What a FeatureBank's ``features`` ({(timestep, layer): StoredStates}) occupy, measured on
    their tensors' storages (a view into a larger tensor counts the whole of it; a storage shared by
    two entries counts once)."""
    storages = {}
    for stored in features.values():
        for tensor in (stored.values, stored.scale):
            if tensor is not None:
                storages[tensor.untyped_storage().data_ptr()] = tensor.untyped_storage().nbytes()
    return sum(storages.values())


def bytes_per_timestep(features: dict) -> int:
    """storage_bytes of one timestep's entries, checked to be the same at every timestep."""
    sizes = {storage_bytes({k: v for k, v in features.items() if k[0] == timestep})
             for timestep in {k[0] for k in features}}
    if len(sizes) != 1:
        raise AssertionError(f"timesteps hold different bytes: {sorted(sizes)}")
    return sizes.pop()


@contextmanager
def projection_outputs(unet):
    """Records, for every self-attention projection of ``unet`` (to_q, to_k, to_v of each attn1),
    how many elements it outputs per image in the calls made inside the block: {module name: n}."""
    sizes: dict[str, int] = {}

    def recorder(name: str):
        def record(module, args, out) -> None:  # returns None: the output is left as it is
            sizes.setdefault(name, out.shape[1] * out.shape[2])
        return record

    hooks = [module.register_forward_hook(recorder(name))
             for name, module in unet.named_modules() if name.endswith(SELF_ATTENTION_PROJECTIONS)]
    try:
        yield sizes
    finally:
        for hook in hooks:
            hook.remove()


def naive_qkv_bytes(sizes: dict[str, int], attn1_names: set[str] | None = None) -> int:
    """fp16 Q_c, K_c, V_c of one content image and K_s, V_s of one style image, from
    ``projection_outputs``: what a cache of projections would hold per timestep (only the
    self-attentions named in ``attn1_names``, e.g. "output_blocks.3.1.transformer_blocks.0.attn1",
    when given)."""
    return 2 * sum(size * (1 if name.endswith("to_q") else 2) for name, size in sizes.items()
                   if attn1_names is None or name.rsplit(".", 1)[0] in attn1_names)


def self_attention_layers(sizes: dict[str, int]) -> int:
    return len({name.rsplit(".", 1)[0] for name in sizes})
