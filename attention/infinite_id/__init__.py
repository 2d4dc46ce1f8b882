"""Infinite-ID (Wu et al., ECCV 2024): identity-preserved generation with an identity stream beside
the text stream.

    identity_streams.py     inference: the two streams on one latent, mixed attention (Eq. 5), the
                            image cross-attention and its merge with the text's (Eq. 6), AdaIN-mean
                            alignment (Eq. 7-8), several identities and regions
    stream_calls.py         the streams' model calls: one UNet call holding every stream's rows, or a
                            call per stream; the cost of each
    identity_tokens.py      what the identity stream reads: c_id of one or several references (stacked
                            or averaged), the "no face" tokens of the uncond rows
    id_adapter.py           the identity stream's weights in the IP-Adapter FaceID-PlusV2 file layout:
                            image projection, image K/V per layer, LoRA; read and written
    faceid_projection.py    the image projection: face mapper, Perceiver resampler, V2's shortcut
    faceid_lora.py          FaceID's LoRA on the identity stream's rows, from the adapter file or a
                            separate LoRA file
    id_adapter_training.py  identity-enhanced training (Sec. 3.2, Eq. 3), text cross-attention off

AdaIN-mean's formula (Eq. 8) lives in ``shared/adain.py``. Start at identity_streams.py.
"""
