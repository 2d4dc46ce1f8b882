"""Face Fusion ("Fusion is all you need", 2024): identity from face photos through the face's own
keys and values in every cross-attention.

    face_kv_attention.py  the fused cross-attention: K_f/V_f (Eq. 2), K' = [K_text; K_f] and V' likewise
                          (Eq. 3, 6), the biased softmax (Eq. 4) and several people's masks (Eq. 7)
    face_pass.py          the reference faces through the UNet each step: as extra rows of the image's
                          model call, or a call of their own where that does not apply
    joint_face_attention.py  the training-free mode on Flux.1 / SD3.5: the face pass's image-token K/V in
                          every joint attention, the same weight and mask rules (fusion_bias)
    face_kv_files.py      trained Linear_kf / Linear_vf as safetensors
    face_kv_training.py   training Linear_kf / Linear_vf with the UNet frozen (the loop is shared/'s)

Start at face_kv_attention.py.
"""
