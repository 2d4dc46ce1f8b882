"""MagicStyle (Deng et al. 2024): portrait stylisation after a reference style image.

    ddim_inversion.py   CSDI: DDIM inversion through ComfyUI's own sampling, capturing features
    feature_bank.py     the feature cache: each self-attention layer's normed inputs per step, fp8/fp16
    feature_files.py    the cache as safetensors (Save / Load Features)
    ffa.py              FFF: Feature Fusion Attention, Algorithm 1 and Eq. 5
                        (Q = αQ_c + βQ_cur, K = [K_c; K_s], V = [AdaIN(V_c, V_s); V_s])
    joint_ffa.py        the same on Flux.1 / SD3.5: Q/K/V captured in joint attention (after
                        modulation, QK-norm, RoPE), FFA there with the text tokens' own K/V
    recompute.py        recompute mode: only the inverted latents kept; content and style run
                        beside the image in the same batch (unet_recompute.py: on SD1.5/SDXL)
    face_region.py      small faces (MagicID's DIIR): a face's square region, its crop at the
                        model's size, the restored crop pasted back under a feathered mask

AdaIN (Eq. 4) lives in ``shared/adain.py``: Infinite-ID's AdaIN-mean is beside it. Start at ffa.py.
"""
