"""Each trainer's recipe: the optimiser settings of the paper it implements, of its released
code, or of the closest reference where the paper is silent (README "Training recipes" names the
source of every value). This is the one place these defaults live: the trainer nodes' inputs and
jobs/train.py's options read them."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Recipe:
    """AdamW (betas 0.9/0.999, eps 1e-8: torch's, the references' too) with decoupled weight
    decay, the gradients' global norm clipped to ``max_grad_norm`` before each step (0: never),
    and ``batch`` examples per device per optimiser step (under torchrun each process takes a
    batch, so N processes make a global batch N times as large, as the papers' GPUs did)."""

    learning_rate: float
    weight_decay: float
    max_grad_norm: float
    batch: int


# Portrait editing, supplementary 1.2 ("a batch size of 4 and a learning rate of 5e-6") and the released
# utils/parse_args.py (adam_weight_decay 1e-2, max_grad_norm 1.0, train_batch_size 4; train.py clips
# the UNet's gradient only, which the MCDM trainer does too).
MCDM_TRAINING = Recipe(learning_rate=5e-6, weight_decay=1e-2, max_grad_norm=1.0, batch=4)
# Infinite-ID Sec. 4.1 ("AdamW ... learning rate of 1e-4 and weight decay set to 0.01", "a batch
# size of 4 per GPU"); no clipping, as IP-Adapter's tutorial_train_faceid.py it builds on.
ID_ADAPTER_TRAINING = Recipe(learning_rate=1e-4, weight_decay=1e-2, max_grad_norm=0.0, batch=4)
# Face Fusion Sec. 4.1 gives only "a batch size of 1 per GPU" (two GPUs); the rest is IP-Adapter's
# tutorial_train.py, which trains the same kind of layer (new cross-attention K/V projections).
FACE_KV_TRAINING = Recipe(learning_rate=1e-4, weight_decay=1e-2, max_grad_norm=0.0, batch=1)

# IP-Adapter's training drops the image embedding on 5% of the examples (i_drop_rate 0.05): the
# ID adapter's "no face" tokens, which sampling reads for every uncond row, are trained that way.
ID_ADAPTER_IDENTITY_DROPOUT = 0.05
