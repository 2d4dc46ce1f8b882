"""Infinite-ID's model calls: the text stream and each identity stream of one latent.

Where the cost goes: every model call ComfyUI makes (N rows: the cond and
uncond chunks, together or, when ComfyUI splits them, one call each) needs
the text stream's prediction and one identity stream's per active identity I,
all of the same N rows. Two ways give the same prediction:

* batched (the default where it applies): one UNet call of (1 + I)·N rows,
  [text stream rows; identity 1's block; …], each block a copy of the N
  rows' inputs (x, timesteps, context, y, ControlNet residuals) with
  ``cond_or_uncond`` repeated. In each patched attention the text rows attend
  as the text stream does, and each identity's processors take their own
  block out of the batch (:class:`StreamRows`) and compute what its stream
  computes, K_t/V_t (Eq. 5) being the text rows' K/V of that same layer and
  FaceID's LoRA acting on its rows only; the rest go on down the chain.
  One call per model call, at (1 + I) times the rows.
* separate: 1 + I UNet calls of N rows, the text stream first (its K_t/V_t
  kept per layer), then each identity stream. Taken where batching does not
  apply: another Likeness patch acting in the same call (FFA, Face Fusion:
  designed for whole calls), per-row extra model inputs, a batch that would
  not fit in free memory (the extra rows are counted in ComfyUI's
  ``memory_required``, shared/extra_rows.py), or ``BATCH_STREAMS`` off.

Either way the result is ε_text + Σ_i weight_i·M_i·(ε_id,i − ε_text).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, replace

import torch

from ..shared.dispatch import ATTENTION_KINDS, PASS, Pass, other_likeness_processors, pass_of
from ..shared.extra_rows import control_for_rows, count_rows_in_estimate, fits, per_row_inputs, rows_counted
from ..shared.layer_table import layer_key
from ..shared.sigmas import current_sigma

# transformer_options keys: which stream a UNet call is, and the text stream's K_t/V_t per layer.
TEXT_STREAM = "likeness_infinite_id_text_stream"
IDENTITY_STREAM = "likeness_infinite_id_identity_stream"
# Which identity (its InfiniteID settings) the identity stream of this call runs for.
ACTIVE_IDENTITY = "likeness_infinite_id_active"
# Per block call: the identity stream's attention inputs and outputs the LoRA needs. ComfyUI gives
# the patches of one block call one extra_options dict; processors may see copies of it, so the
# value is a dict that every copy shares.
LORA_STATE = "likeness_infinite_id_lora"
LORA_BLOCKS = "blocks"  # in LORA_STATE, a call holding every stream: each identity's own share, by id
STREAM_ROWS = "likeness_infinite_id_stream_rows"  # a call holding every stream: its StreamRows
MEMORY = "likeness_infinite_id_memory"  # this step's ExtraRowsMemory: whether the streams fit in one call
OWNER = "infinite_id"  # whose rows the model's memory estimate counts
# Tests set this False to run the separate stream calls everywhere and compare the two paths.
BATCH_STREAMS = True

log = logging.getLogger("likeness")


@dataclass(frozen=True)
class StreamRows:
    """A model call holding every stream: rows [0, text_rows) are the text stream's, in ``chunks``
    order, then a block of as many rows per identity stream, in ``identities`` order. ``taken``:
    identities whose processor has taken its block out at this layer; an attention further down
    sees the text rows and the blocks not taken, in order."""

    text_rows: int
    chunks: tuple
    uuids: tuple | None
    identities: tuple
    taken: frozenset = frozenset()

    def index_of(self, settings) -> int | None:
        return next((i for i, s in enumerate(self.identities) if s is settings and i not in self.taken), None)

    def in_model_call(self, index: int) -> slice:
        start = self.text_rows * (1 + index)
        return slice(start, start + self.text_rows)

    def in_batch(self, index: int) -> slice:
        start = self.text_rows * (1 + sum(1 for i in range(index) if i not in self.taken))
        return slice(start, start + self.text_rows)

    def chunk_options(self, streams: int) -> dict:
        """cond_or_uncond (and uuids) of ``streams`` copies of the chunks."""
        found = {"cond_or_uncond": list(self.chunks) * streams}
        if self.uuids is not None:
            found["uuids"] = list(self.uuids) * streams
        return found

    def rest_options(self, extra_options: dict, index: int) -> dict:
        """The options of the rows left once ``index``'s block is taken out."""
        taken = self.taken | {index}
        rest = {**extra_options, **self.chunk_options(1 + len(self.identities) - len(taken))}
        if len(taken) == len(self.identities):
            del rest[STREAM_ROWS]
        else:
            rest[STREAM_ROWS] = replace(self, taken=taken)
        return rest


def in_own_block(settings, q, k, v, extra_options: dict, attend, stream, *, text_kv: bool) -> torch.Tensor:
    """An identity's processor in a call holding every stream: ``stream(q, k, v, options, attend)``,
    what the processor computes in its identity stream's own call, on its identity's block under
    the options that call has (``text_kv``: the text rows' K/V of this layer as the text stream's
    K_t/V_t); the other rows go on to ``attend`` with the block marked taken; rows stitched back."""
    rows: StreamRows = extra_options[STREAM_ROWS]
    index = rows.index_of(settings)
    if index is None:
        return attend(q, k, v, extra_options)
    own, text = rows.in_batch(index), slice(0, rows.text_rows)
    options = {name: value for name, value in extra_options.items() if name != STREAM_ROWS}
    options.update({**rows.chunk_options(1), PASS: Pass.IDENTITY_STREAM, ACTIVE_IDENTITY: settings,
                    IDENTITY_STREAM: {layer_key(extra_options): (k[text], v[text])} if text_kv else {}})
    state = extra_options.get(LORA_STATE)
    if state is not None:
        # The projections' inputs were kept for the whole call: this identity's rows of them.
        span = rows.in_model_call(index)
        block = {kind: tuple(None if t is None else t[span] for t in inputs)
                 for kind, inputs in state.items() if kind in ATTENTION_KINDS}
        state.setdefault(LORA_BLOCKS, {})[id(settings)] = options[LORA_STATE] = block
    mine = stream(q[own], k[own], v[own], options, attend)
    rest = [torch.cat([t[:own.start], t[own.stop:]]) for t in (q, k, v)]
    out = attend(*rest, rows.rest_options(extra_options, index))
    return torch.cat([out[:own.start], mine, out[own.start:]])


def own_rows_output(settings, kind: str, extra_options: dict) -> tuple[slice, torch.Tensor] | None:
    """In a call holding every stream: (this identity's rows of the call, the attention output its
    stream kept for the LoRA of to_out), or None."""
    rows: StreamRows = extra_options[STREAM_ROWS]
    index = rows.index_of(settings)
    block = extra_options.get(LORA_STATE, {}).get(LORA_BLOCKS, {}).get(id(settings), {})
    hidden = block.pop(f"{kind}_out", None)
    return None if index is None or hidden is None else (rows.in_model_call(index), hidden)


def _repeated(tensor: torch.Tensor | None, streams: int, rows: int) -> torch.Tensor | None:
    if tensor is None or tensor.dim() == 0 or tensor.shape[0] != rows:
        return tensor  # one for every row (broadcast): the same for the extra rows
    return torch.cat([tensor] * streams)


class InfiniteIDWrapper:
    """DIFFUSION_MODEL wrapper: the text stream and one identity stream per active identity, in one
    UNet call or in one each, then ε_text + Σ_i weight_i·M_i·(ε_id,i − ε_text)."""

    def __init__(self, identities: list) -> None:
        self.identities = list(identities)

    def __deepcopy__(self, memo):
        return self

    def __call__(self, executor, x, timesteps, context, y, control, transformer_options, **kwargs):
        # Runs on the image only: a face reference pass is read as the plain model reads it.
        if current_sigma(transformer_options) is None or pass_of(transformer_options) is not Pass.IMAGE:
            return executor(x, timesteps, context, y, control, transformer_options, **kwargs)
        blends = [(s, s.blend(x)) for s in self.identities if s.active(transformer_options)]
        blends = [(s, b) for s, b in blends if b is not None]
        if not blends:
            return executor(x, timesteps, context, y, control, transformer_options, **kwargs)
        reason = self._separate_because(x, transformer_options, kwargs, len(blends))
        self._report(reason)
        run = self._batched if reason is None else self._separate
        text, identities = run(executor, x, timesteps, context, y, control, transformer_options, blends, **kwargs)
        out = text
        for (_, blend), identity in zip(blends, identities):
            out = out + blend * (identity - text)
        return out

    def _separate(self, executor, x, timesteps, context, y, control, transformer_options, blends, **kwargs):
        text_kv: dict = {}
        # Every stream gets the control: each call its own lists, as the UNet pops them.
        same = lambda: control_for_rows(control, lambda c: c)  # noqa: E731
        text = executor(x, timesteps, context, y, same(), {**transformer_options, TEXT_STREAM: text_kv}, **kwargs)
        return text, [executor(x, timesteps, context, y, same(),
                               {**transformer_options, IDENTITY_STREAM: text_kv, ACTIVE_IDENTITY: settings,
                                PASS: Pass.IDENTITY_STREAM}, **kwargs)
                      for settings, _ in blends]

    def _batched(self, executor, x, timesteps, context, y, control, transformer_options, blends, **kwargs):
        rows, streams = x.shape[0], 1 + len(blends)
        uuids = transformer_options.get("uuids")
        layout = StreamRows(rows, tuple(transformer_options["cond_or_uncond"]),
                            None if uuids is None else tuple(uuids), tuple(s for s, _ in blends))
        options = {**transformer_options, **layout.chunk_options(streams), STREAM_ROWS: layout}
        each = lambda t: _repeated(t, streams, rows)  # noqa: E731
        # The same control for every stream, as each separate stream call gets it.
        out = executor(each(x), each(timesteps), each(context), each(y), control_for_rows(control, each), options,
                       **kwargs)
        return out[:rows], [out[layout.in_model_call(i)] for i in range(len(blends))]

    def _owns(self, processor) -> bool:
        return any(getattr(processor, "settings", None) is s for s in self.identities)

    def batching_applies(self, transformer_options: dict) -> bool:
        """What can be known before a call: batching on, and no other Likeness patch in the call."""
        return BATCH_STREAMS and not other_likeness_processors(transformer_options, self._owns)

    def _separate_because(self, x, transformer_options: dict, kwargs: dict, identities: int) -> str | None:
        """Why this call's streams need a call each; None: they share one."""
        if not BATCH_STREAMS:
            return "batching turned off"
        others = other_likeness_processors(transformer_options, self._owns)
        if others:
            return f"another Likeness patch acts in the same call ({', '.join(sorted(others))})"
        if per_row_inputs(kwargs, x.shape[0]):
            return "the model call has per-row inputs of its own"
        chunks = transformer_options.get("cond_or_uncond") or []
        if not chunks or x.shape[0] % len(chunks):
            return "the call's rows are not whole cond/uncond chunks"
        if not fits(transformer_options.get(MEMORY), x, x.shape[0] * identities):
            return "the larger batch would not fit in free memory"
        return None

    def _report(self, reason: str | None) -> None:
        reported = self.identities[0].reported
        if reason in reported:
            return
        reported.add(reason)
        if reason is None:
            log.info("Likeness Infinite-ID: the text and identity streams share one model call")
        else:
            log.info("Likeness Infinite-ID: a model call per stream (%s)", reason)

    def extra_rows(self, transformer_options: dict, sigma: float | None = None):
        """Rows a call of n rows gains on the batched path: n per identity stream that may run."""
        if not self.batching_applies(transformer_options):
            return lambda rows: 0
        streams = sum(1 for s in self.identities if s.weight > 0 and (sigma is None or s.sigma_range.contains(sigma)))
        return lambda rows: rows * streams


def per_step(wrapper: InfiniteIDWrapper):
    """CALC_COND_BATCH wrapper: ComfyUI's choice of how many cond/uncond chunks go into one call
    counts the identity streams' rows (where they can share it)."""
    def calc_cond_batch(executor, model, conds, x_in, timestep, model_options):
        options = model_options.get("transformer_options", {})
        sigma = float(timestep.detach().flatten()[0])
        with rows_counted(model, OWNER, wrapper.extra_rows(options, sigma)) as memory:
            return executor(model, conds, x_in, timestep,
                            {**model_options, "transformer_options": {**options, MEMORY: memory}})
    return calc_cond_batch


def count_stream_rows_in_estimate(wrapper: InfiniteIDWrapper):
    """PREPARE_SAMPLING wrapper: the memory ComfyUI frees before loading the model counts them too."""
    return count_rows_in_estimate(
        OWNER, lambda model: wrapper.extra_rows(model.model_options.get("transformer_options", {})))
