"""Feature-preserving portrait editing (Chen et al. 2024): pair generation, mask-guided editing and
the Multi-Conditioned Diffusion Model.

    editing_math.py     pair generation's combination (Eq. 2), mask-guided blending (Eq. 3), the
                        editing masks (noise differences, normalised, blurred, thresholded)
    editing_guiders.py  the three GUIDERs: mask-guided (Eq. 3), pair (Eq. 2), MCDM (Eq. 1 + Eq. 3)
    mcdm.py             the MCDM (Sec. 3.3): its released files read and converted, the embedding
                        adapter, the null images, the conditioning rows and Eq. 1's combination
    clip_b32.py         the ViT-B/32 image tower the MCDM adapter was trained on
    mcdm_training.py    fine-tuning an MCDM on generated pairs, with the released dropout cases

Start at editing_math.py (no MCDM needed) or mcdm.py.
"""
