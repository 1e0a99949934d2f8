"""Several averages of the same weights, updated in one pass over the weights.

K averages of one set of weights (the power-function EMAs of :class:`polyak.PostHocEMA`, or
plain :class:`ExponentialMovingAverage` objects with different decays grouped in an
:class:`EMAGroup`) each take, per step and per weight::

    shadow_k = lerp(shadow_k, weight, w_k)          # k = 1..K

Done one average after another, that reads every weight K times from memory: ``4K + 8K``
bytes per float32 parameter. :class:`FanOutLerp` cuts the weights into cache-sized chunks (a
slice of a long span, or many small tensors side by side) and lets the K averages update a
chunk one after another before moving on, so each chunk of weights comes from memory once and
from cache K - 1 times: ``4 + 8K`` bytes, the roofline. Within a chunk each average streams
through its shadows in order: a step that switched between the K shadow buffers at every
tensor would start new memory streams at every call, which on a model of many separate
tensors costs more than the cache saves (docs/performance.md, "Post-hoc EMA"). On the CPU a
chunk is K multi-tensor ``lerp_`` calls, each with its average's weight; on accelerators
all chunks go to one ``_foreach_lerp_`` call with a list of weights (one launch series).

Each average keeps its own contiguous storage, so its views, state dict and snapshots are
those of a lone average, and each element gets exactly the arithmetic of that average's own
``lerp_``: chunk boundaries fall on multiples of a power of two far above any SIMD width, so
they do not even move where vector code ends and scalar code begins.

There is no TensorFlow equivalent: TF runs one ``assign_moving_average`` op per average.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch

from polyak import _torch_compat as torch_compat
from polyak._checks import check_int
from polyak.averaging.ema import (
    ExponentialMovingAverage,
    pending_update,
    tracked_variables,
    update_plan,
)
from polyak.averaging.plan import UpdatePlan
from polyak.flat import coalesce

__all__ = ["EMAGroup", "FanOutLerp"]

# Bytes of weights per chunk: a chunk of weights must stay in cache between the K lerps that
# read it, and be long enough that per-call overhead and broken prefetch streams do not show
# (the sizes tried: docs/performance.md, "K averages in one pass"). On CUDA the chunk sits well
# inside an L2 of tens of MiB.
_CHUNK_BYTES = {"cpu": 4 << 20, "cuda": 8 << 20}
_CHUNK_BYTES_OTHER = 8 << 20
# Devices whose chunks each take K foreach calls; elsewhere one foreach call does all chunks.
_PER_CHUNK = {"cpu"}

_data_ptr = torch.Tensor.data_ptr


def check_chunk_bytes(value: Any, who: str) -> int | None:
    """``chunk_bytes`` as given to :class:`FanOutLerp` and its users: ``None`` (the default
    for the device) or an int >= 1."""
    return None if value is None else check_int(value, "chunk_bytes", who, low=1)


def _chunk_elements(device: torch.device, element_size: int, chunk_bytes: int | None) -> int:
    """Elements per chunk: a power of two (so boundaries never split a SIMD block)."""
    nbytes = chunk_bytes or _CHUNK_BYTES.get(device.type, _CHUNK_BYTES_OTHER)
    return 1 << max(12, round(math.log2(max(nbytes // element_size, 1))))


def _pieces(
    source: torch.Tensor, shadows: list[torch.Tensor], chunk: int
) -> list[tuple[torch.Tensor, list[torch.Tensor]]]:
    """A coalesced span of weights and the matching spans of the K shadows, cut into pieces of
    ``chunk`` elements from the span's start (a strided tensor, such as a ``channels_last``
    weight, stays one piece in its own shape)."""
    n = source.numel()
    if n <= chunk or not (source.is_contiguous() and all(t.is_contiguous() for t in shadows)):
        return [(source, shadows)]
    src, rows = source.view(-1), [t.view(-1) for t in shadows]
    return [(src[a : a + chunk], [row[a : a + chunk] for row in rows]) for a in range(0, n, chunk)]


class _Chunk:
    """Pieces of weights that fill about one chunk (a slice of a long span, or many small
    tensors), with the matching pieces of the K shadows. ``staged``: views of a staging buffer
    shaped as the pieces, when the weights are cast to the shadows' dtype or device first."""

    __slots__ = ("elements", "shadows", "sources", "staged")

    def __init__(self, k: int) -> None:
        self.elements = 0
        self.sources: list[torch.Tensor] = []
        self.shadows: list[list[torch.Tensor]] = [[] for _ in range(k)]
        self.staged: list[torch.Tensor] | None = None

    def add(self, source: torch.Tensor, shadows: list[torch.Tensor]) -> None:
        self.elements += source.numel()
        self.sources.append(source)
        for row, s in zip(self.shadows, shadows):
            row.append(s)

    def lerp(self, ks: Sequence[int], weights: Sequence[float]) -> None:
        """Averages ``ks``, one after another, move their pieces towards the weights by
        ``weights[k]``: the weights come from memory for the first and from cache after."""
        sources = self.sources
        if self.staged is not None:
            for staged, src in zip(self.staged, sources):
                staged.copy_(src)
            sources = self.staged
        for k in ks:
            torch_compat.foreach_lerp_(self.shadows[k], sources, weights[k])


class FanOutLerp:
    """``shadows[k][i].lerp_(sources[i], weights[k])`` for every ``k`` and ``i``, reading each
    source once from memory (see the module docstring).

    Args:
        sources: the weights (any floating dtype, any device).
        shadows: ``K`` lists parallel to ``sources``; ``shadows[k][i]`` has the shape of
            ``sources[i]``, and all ``K`` shadows of one weight share a dtype and device
            (which may differ from the weight's: it is then cast, once, chunk by chunk).
        chunk_bytes: bytes of weights per chunk (default: 4 MiB on the CPU, 8 MiB on CUDA).

    Built once for fixed storage: :meth:`is_current` says whether the sources still have the
    storage they had (a ``flatten_parameters_`` or ``.to()`` since then needs a new one).
    """

    def __init__(
        self,
        sources: Sequence[torch.Tensor],
        shadows: Sequence[Sequence[torch.Tensor]],
        *,
        chunk_bytes: int | None = None,
    ) -> None:
        chunk_bytes = check_chunk_bytes(chunk_bytes, "FanOutLerp")
        self.k = len(shadows)
        if self.k == 0:
            raise ValueError("FanOutLerp needs at least one list of shadows")
        for k, row in enumerate(shadows):
            if len(row) != len(sources):
                raise ValueError(
                    f"FanOutLerp: shadows[{k}] has {len(row)} tensors for {len(sources)} sources"
                )
        groups: dict[tuple[Any, ...], list[int]] = {}
        for i, src in enumerate(sources):
            first = shadows[0][i]
            for k in range(self.k):
                s = shadows[k][i]
                if s.shape != src.shape:
                    raise ValueError(
                        f"FanOutLerp: shadows[{k}][{i}] has shape {tuple(s.shape)}, its source "
                        f"{tuple(src.shape)}"
                    )
                if s.dtype != first.dtype or s.device != first.device:
                    raise ValueError(
                        f"FanOutLerp: the shadows of source {i} differ in dtype or device "
                        f"({first.dtype} on {first.device}, {s.dtype} on {s.device}); give all "
                        "averages of one weight the same shadow dtype and device"
                    )
                if not s.is_floating_point():
                    raise TypeError(f"FanOutLerp: shadows[{k}][{i}] is {s.dtype}, not floating")
            key = (src.device, src.dtype, first.device, first.dtype)
            groups.setdefault(key, []).append(i)
        self.sources = list(sources)
        self.fingerprint = list(map(_data_ptr, self.sources))
        # Copy steps (weight 1) go span by span, lerps chunk by chunk.
        self._spans: list[tuple[torch.Tensor, list[torch.Tensor]]] = []
        chunks: list[_Chunk] = []
        cast: list[_Chunk] = []  # chunks whose weights are cast into a staging buffer first
        for (v_dev, v_dtype, s_dev, s_dtype), idx in groups.items():
            srcs = [sources[i].detach() for i in idx]
            rows = [[shadows[k][i] for i in idx] for k in range(self.k)]
            spans = coalesce(srcs, *rows)
            size = torch.empty((), dtype=s_dtype).element_size()
            chunk = _chunk_elements(s_dev, size, chunk_bytes)
            cast_group = v_dev != s_dev or v_dtype != s_dtype
            if self.k == 1 and not cast_group:  # nothing to reuse: one chunk, fewest calls
                chunk = max(chunk, sum(map(torch.Tensor.numel, srcs)))
            first = len(chunks)
            for j, src in enumerate(spans[0]):
                span_shadows = [row[j] for row in spans[1:]]
                self._spans.append((src, span_shadows))
                for piece, piece_shadows in _pieces(src, span_shadows, chunk):
                    if len(chunks) == first or chunks[-1].elements + piece.numel() > chunk:
                        chunks.append(_Chunk(self.k))
                    chunks[-1].add(piece, piece_shadows)
            if cast_group:
                cast += chunks[first:]
        staging: dict[tuple[torch.device, torch.dtype], torch.Tensor] = {}
        for c in cast:
            shadow = c.shadows[0][0]
            held = staging.get((shadow.device, shadow.dtype))
            if held is None or held.numel() < c.elements:
                held = torch.empty(c.elements, dtype=shadow.dtype, device=shadow.device)
                staging[(shadow.device, shadow.dtype)] = held
        for c in cast:
            stage = staging[(c.shadows[0][0].device, c.shadows[0][0].dtype)]
            c.staged, offset = [], 0
            for src in c.sources:
                c.staged.append(stage[offset : offset + src.numel()].view(src.shape))
                offset += src.numel()
        # On the CPU each chunk is K foreach calls with one weight each (a list of weights
        # costs more per tensor); elsewhere the chunks that need no cast all go to one
        # foreach call: a few kernel launches instead of K per chunk.
        self._chunks: list[_Chunk] = []
        self._fused: list[_Chunk] = []
        for c in chunks:
            alone = c.staged is not None or c.shadows[0][0].device.type in _PER_CHUNK
            (self._chunks if alone else self._fused).append(c)
        # Per subset of averages (those that lerp this step): the fused call's lists.
        self._lists: dict[
            tuple[int, ...], tuple[list[torch.Tensor], list[torch.Tensor], list[int]]
        ] = {}

    def is_current(self) -> bool:
        """Whether every source still has the storage this plan was built on."""
        return list(map(_data_ptr, self.sources)) == self.fingerprint

    def __call__(self, weights: Sequence[float]) -> None:
        """One step: average ``k`` moves its shadows towards the sources by ``weights[k]``.

        A weight of exactly 1 copies (``lerp`` with weight 1 would turn an infinite weight
        into NaN); 0 leaves the shadow as it is (a ``lerp`` by 0, as a lone average does).
        """
        if len(weights) != self.k:
            raise ValueError(f"FanOutLerp: {len(weights)} weights for {self.k} averages")
        ws = [float(w) for w in weights]
        lerping = [k for k, w in enumerate(ws) if w != 1.0]
        for k, w in enumerate(ws):
            if w == 1.0:
                for source, shadows in self._spans:
                    shadows[k].copy_(source)
        if not lerping:
            return
        for c in self._chunks:
            c.lerp(lerping, ws)
        if self._fused:
            shadows, sources, which = self._fused_lists(tuple(lerping))
            torch_compat.foreach_lerp_scalars_(shadows, sources, [ws[k] for k in which])

    def _fused_lists(
        self, ks: tuple[int, ...]
    ) -> tuple[list[torch.Tensor], list[torch.Tensor], list[int]]:
        """Chunk by chunk, the pieces of every average in ``ks`` (``which``: each piece's
        average), as :meth:`_Chunk.lerp` takes them."""
        lists = self._lists.get(ks)
        if lists is None:
            shadows: list[torch.Tensor] = []
            sources: list[torch.Tensor] = []
            which: list[int] = []
            for c in self._fused:
                for k in ks:
                    shadows += c.shadows[k]
                    sources += c.sources
                    which += [k] * len(c.sources)
            lists = self._lists[ks] = (shadows, sources, which)
        return lists


class EMAGroup:
    """Several :class:`ExponentialMovingAverage` objects of the same variables, updated in one
    pass over the variables.

    ``group.update()`` is ``for ema in emas: ema.update()``, with the same result bit for bit,
    but the lerps of all averages run chunk by chunk over the variables (:class:`FanOutLerp`),
    so each variable is read once instead of once per average::

        fast = polyak.ExponentialMovingAverage(0.99)
        slow = polyak.ExponentialMovingAverage(polyak.schedules.warmup(0.9999))
        fast.track(model); slow.track(model)
        group = polyak.averaging.EMAGroup(fast, slow)
        ...
        group.update()            # every step, instead of fast.update(); slow.update()

    Every average keeps all its own semantics and state: decay or schedule, ``num_updates``,
    ``update_every``, ``update_after``, ``exact_tf``, its step counter and its
    ``state_dict``. On each call, the averages that take a plain lerp step share the pass (those
    with shadows of the same dtypes and devices: float32 and float64 shadows make two passes);
    one that copies (``update_after``, decay 0), skips (between ``update_every`` calls), runs
    TF's exact op sequence or reads a tensor ``num_updates`` takes its own step, as alone.

    The averages must track the same variables (same names, same tensors); ``apply()`` on one
    of them alone (new entries) breaks that, and the next ``update()`` says so before changing
    anything.
    """

    def __init__(self, *emas: ExponentialMovingAverage, chunk_bytes: int | None = None) -> None:
        if not emas:
            raise ValueError("EMAGroup(*emas) needs at least one ExponentialMovingAverage in emas")
        for i, ema in enumerate(emas):
            if not isinstance(ema, ExponentialMovingAverage):
                raise TypeError(
                    f"EMAGroup: emas[{i}] is a {type(ema).__name__}, not an "
                    "ExponentialMovingAverage"
                )
        if len({id(e) for e in emas}) != len(emas):
            raise ValueError("EMAGroup: the same ExponentialMovingAverage is listed twice in emas")
        self.emas: tuple[ExponentialMovingAverage, ...] = tuple(emas)
        self.chunk_bytes = check_chunk_bytes(chunk_bytes, "EMAGroup")
        self._check_same_variables()
        # Fused steps by the plans they were built from (the subset of averages that lerp
        # changes on copy or skip steps); an EMA makes a new plan when storage moves.
        self._fans: dict[tuple[int, ...], tuple[tuple[UpdatePlan, ...], FanOutLerp]] = {}

    def update(self) -> None:
        """One :meth:`ExponentialMovingAverage.update` of every average, in one pass."""
        pending = [pending_update(ema) for ema in self.emas]
        # Averages that lerp now, by the dtypes and devices of their shadows: each such
        # bucket of two or more shares one pass.
        buckets: dict[tuple[Any, ...], list[int]] = {}
        for k, p in enumerate(pending):
            if p.fusable:
                buckets.setdefault(p.plan.lerp_layout(), []).append(k)  # type: ignore[union-attr]
        # Built (and checked) before any shadow changes.
        fans = [
            (ks, self._fan_out(tuple(pending[k].plan for k in ks)))  # type: ignore[misc]
            for ks in buckets.values()
            if len(ks) >= 2
        ]
        done: set[int] = set()
        for ks, fan in fans:
            fan([pending[k].weight for k in ks])  # type: ignore[misc]
            done.update(ks)
        for k, p in enumerate(pending):
            p.finish(lerps_done=k in done)

    def _fan_out(self, plans: tuple[UpdatePlan, ...]) -> FanOutLerp:
        """The fused step over ``plans`` (one per average that lerps now), checked and built
        when first needed, then cached while the plans stay the same objects."""
        key = tuple(map(id, plans))
        cached = self._fans.get(key)
        if cached is not None and all(a is b for a, b in zip(cached[0], plans)):
            return cached[1]
        names = [[e.name for e in p.entries] for p in plans]  # type: ignore[attr-defined]
        sources = [[e.source for e in p.entries] for p in plans]
        for k in range(1, len(plans)):
            if names[k] != names[0] or any(a is not b for a, b in zip(sources[k], sources[0])):
                self._raise_not_same()
        averaged = [p.averaged() for p in plans]
        fan = FanOutLerp(
            averaged[0][0], [shadows for _, shadows in averaged], chunk_bytes=self.chunk_bytes
        )
        # Drop fused steps built on plans that their EMA replaced (they hold old storage).
        live = {id(update_plan(ema)) for ema in self.emas}
        self._fans = {k: v for k, v in self._fans.items() if all(id(p) in live for p in v[0])}
        self._fans[key] = (plans, fan)
        return fan

    def _check_same_variables(self) -> None:
        first = tracked_variables(self.emas[0])
        for ema in self.emas[1:]:
            other = tracked_variables(ema)
            if [n for n, _ in other] != [n for n, _ in first] or any(
                a is not b for (_, a), (_, b) in zip(other, first)
            ):
                self._raise_not_same()

    def _raise_not_same(self) -> None:
        listing = "; ".join(
            f"emas[{k}]: {[n for n, _ in tracked_variables(ema)][:6]}"
            for k, ema in enumerate(self.emas)
        )
        raise ValueError(
            "EMAGroup: the averages must track the same variables, in the same order "
            f"({listing}). Track the same module or list with each of them (ema.track(model)), "
            "and apply() new entries to all of them, or group only those that match."
        )

    def __repr__(self) -> str:
        return f"EMAGroup({', '.join(map(repr, self.emas))})"
