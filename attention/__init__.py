"""Everything that changes what the model computes, in plain torch: one package per method, one
for what they share.

    magicstyle/        MagicStyle (Deng et al. 2024): DDIM inversion, the feature cache, FFA
                       (Algorithm 1, Eq. 5), small faces (MagicID's DIIR)
    face_fusion/       Face Fusion ("Fusion is all you need", Eq. 1-7): face keys/values, their
                       file, their trainer
    infinite_id/       Infinite-ID (Wu et al., ECCV 2024, Eq. 3, 5-8): identity and text streams,
                       the FaceID-PlusV2 adapter file, FaceID's LoRA, identity-enhanced training
    portrait_editing/  feature-preserving portrait editing (Chen et al. 2024, Eq. 1-3): pair and
                       mask guidance, the MCDM and its ViT-B/32 tower, the MCDM's trainer
    shared/            what every method uses: the attention dispatcher, cond/uncond rows, sigma
                       windows, masks on token grids, the model's layer table, AdaIN, the
                       training loop, recipes and folders, atomic file writes
    faces/             insightface behind the face nodes (detect, align, embed)
    measuring/         the papers' metrics as tensor math, and plots of them

A reader who comes for one method opens its folder; each package's ``__init__`` says which module
holds which equation. A new architecture (a DiT) plugs in at ``shared/layer_table.py`` (where its
attention layers are, by ComfyUI's block keys) and ``shared/dispatch.py`` (its attention call).

No node classes live here (those are in ``nodes/``), and nothing heavy is imported at module level:
ComfyUI imports the pack at start-up. Imports point down: a method package imports ``shared/``
(and Face Fusion reads Infinite-ID's stream markers so the two chain), never ``nodes/``.
"""
