"""CUDA graphs of the static decode step: one per batch-size bucket, side streams forked and joined inside.

:class:`DecodeGraphs` captures :meth:`StaticDecoder.step` for a bucket the first time it is asked to run it:

1. warm-up: the step runs eagerly three times on the capture stream (and, through :func:`fork_join`, on every
   side stream), so lazy allocations, cuBLAS handles and the Triton sampler's compilation and scratch buffers
   exist before capture; the decoder's state is saved before and restored after (the cache columns the warm-up
   wrote are rewritten by the real steps before they are read: the mask keeps them hidden);
2. capture of two variants into one shared memory pool: *streamed* (the base on the capture stream, every
   other model on its own side stream, forked from it and joined back) and *sequential* (all on one stream);
3. measurement: each variant replays a few times (state saved and restored around it), the faster is kept.

Replays run on the caller's current stream. The captured logits are kept as the graph's static outputs, so
their memory is never reused while the graph lives. Everything the step reads (tokens, positions, mask,
sampling parameters, seed and step) lives in the decoder's tensors, which are only ever updated in place, so
changing them between replays takes effect.

Not yet run on a GPU by this project (no GPU in the session that wrote it): see ``tests/test_decode_graph_cuda.py``.
"""

from __future__ import annotations

import time
from typing import Callable, Optional, Sequence

import torch

from proxytune.engine.static_decoder import SPARE_STEPS, StaticDecoder

_WARMUP = 3

__all__ = ["DecodeGraphs", "fork_join"]


def fork_join(main: Callable[[], torch.Tensor], sides: Sequence[Callable[[], torch.Tensor]],
              streams: Sequence["torch.cuda.Stream"]) -> tuple[torch.Tensor, list[torch.Tensor]]:  # fmt: skip
    """Run ``main()`` on the current stream and ``sides[i]()`` on ``streams[i]``, each side stream forked from
    the current stream before its work and joined back into it afterwards, also when a function raises.

    This is the only place the engine uses side streams, so a side stream that does not rejoin (which would
    make a CUDA-graph capture fail, or an eager step read logits not yet written) cannot happen. The side
    functions' outputs are allocated on their side streams and read on the current one: each is recorded
    on the current stream (``record_stream``), so the caching allocator does not hand its memory to new
    work on the side stream, once it is freed, before the current stream's reads of it are done (eager steps
    and the warm-up; inside a capture the graph keeps its outputs alive, and PyTorch defers such events).
    """
    if len(streams) < len(sides):
        raise ValueError(f"{len(sides)} side functions but {len(streams)} side streams")
    current = torch.cuda.current_stream()
    used = streams[: len(sides)]
    for s in used:
        s.wait_stream(current)  # fork: the side streams see everything issued so far (the fed tokens)
    try:
        result = main()
        others = []
        for fn, s in zip(sides, used):
            with torch.cuda.stream(s):
                others.append(fn())
    finally:
        for s in used:
            current.wait_stream(s)  # join
    crossing = [t for out in others for t in (out if isinstance(out, (list, tuple)) else (out,))
                if isinstance(t, torch.Tensor) and t.is_cuda]  # fmt: skip
    if crossing and not torch.cuda.is_current_stream_capturing():  # a graph keeps its captured outputs alive
        for t in crossing:
            t.record_stream(current)
    return result, others


class DecodeGraphs:
    """Captured decode steps of one :class:`StaticDecoder`, per (bucket, return_logprobs).

    Parameters
    ----------
    decoder : the static decoder on a CUDA device
    variant : ``"auto"`` (capture both, keep the faster by measurement), ``"streams"`` or ``"sequential"``
    timing_replays : replays per variant when measuring
    """

    def __init__(self, decoder: StaticDecoder, variant: str = "auto", timing_replays: int = 5):
        if decoder.device.type != "cuda":
            raise ValueError(f"CUDA graphs need a CUDA device, the decoder is on {decoder.device}")
        if _WARMUP + 1 + timing_replays > SPARE_STEPS:
            raise ValueError(f"timing_replays={timing_replays}: the decoder keeps only {SPARE_STEPS} spare positions")
        if variant not in ("auto", "streams", "sequential"):
            raise ValueError(f"variant must be 'auto', 'streams' or 'sequential', got {variant!r}")
        self.decoder, self.variant, self.timing_replays = decoder, variant, timing_replays
        with torch.cuda.device(decoder.device):
            self.stream = torch.cuda.Stream()
            self.side_streams = [torch.cuda.Stream() for _ in decoder.models[1:]]
            self.pool = torch.cuda.graph_pool_handle()
        self.graphs: dict[tuple[int, bool], torch.cuda.CUDAGraph] = {}
        self.outputs: dict[tuple[int, bool], list[torch.Tensor]] = {}
        self.chosen: dict[tuple[int, bool], str] = {}
        self.timings: dict[tuple[int, bool], dict[str, float]] = {}

    def _fork(self, main, sides):
        return fork_join(main, sides, self.side_streams)

    def _step_fn(self, b: int, return_logprobs: bool, streams: bool) -> Callable[[], list[torch.Tensor]]:
        fork = self._fork if streams and self.side_streams else None
        return lambda: self.decoder.step(b, return_logprobs, fork)

    def _capture(self, fn: Callable[[], list[torch.Tensor]]) -> tuple[torch.cuda.CUDAGraph, list[torch.Tensor]]:
        dec = self.decoder
        saved = dec.snapshot()
        self.stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(self.stream):
            for _ in range(_WARMUP):  # warm-up, every stream the step uses included
                fn()
        torch.cuda.current_stream().wait_stream(self.stream)
        dec.restore(saved)
        torch.cuda.synchronize(dec.device)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self.pool, stream=self.stream):
            outputs = fn()  # captured, not run: the state is untouched
        return graph, outputs

    def _time(self, graph: torch.cuda.CUDAGraph) -> float:
        dec = self.decoder
        saved = dec.snapshot()
        graph.replay()
        torch.cuda.synchronize(dec.device)
        start = time.perf_counter()
        for _ in range(self.timing_replays):
            graph.replay()
        torch.cuda.synchronize(dec.device)
        elapsed = (time.perf_counter() - start) / self.timing_replays
        dec.restore(saved)
        return elapsed

    def capture(self, b: int, return_logprobs: bool = False) -> None:
        """Capture (and choose the variant of) the step for bucket ``b``; the largest bucket should come first
        so the smaller ones reuse its pool memory."""
        key = (b, return_logprobs)
        if key in self.graphs:
            return
        if b > self.decoder.capacity:
            raise ValueError(f"bucket {b} exceeds the decoder's capacity {self.decoder.capacity}")
        variants = ["streams", "sequential"] if self.variant == "auto" else [self.variant]
        if not self.side_streams:
            variants = ["sequential"]
        with torch.cuda.device(self.decoder.device):
            captured = {v: self._capture(self._step_fn(b, return_logprobs, v == "streams")) for v in variants}
            if len(captured) > 1:
                self.timings[key] = {v: self._time(g) for v, (g, _) in captured.items()}
                best = min(self.timings[key], key=self.timings[key].get)
            else:
                best = variants[0]
        self.graphs[key], self.outputs[key] = captured[best]
        self.chosen[key] = best

    def replay(self, b: int, return_logprobs: bool = False) -> None:
        """One decode step for rows ``[0, b)`` on the current stream (capturing the bucket first if needed)."""
        key = (b, return_logprobs)
        if key not in self.graphs:
            self.capture(b, return_logprobs)
        self.graphs[key].replay()

    def logits(self, b: int, return_logprobs: bool = False) -> Optional[list[torch.Tensor]]:
        """The static logits tensors of bucket ``b``'s graph (valid after a replay), or None if not captured."""
        return self.outputs.get((b, return_logprobs))
