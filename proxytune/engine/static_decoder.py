"""The static decode step: every model's KV cache, inputs and mask in preallocated tensors, advanced in place.

:class:`StaticDecoder` holds, for up to ``capacity`` rows and ``max_len`` positions:

* per model (:class:`StaticModel`): the keys and values of every layer ``[capacity, H, max_len, D]``, the
  input token ids ``[capacity, 1]``, the positions ``[capacity, 1]``, the cache column the next token is
  written to (``write_pos``, one ``[1]`` tensor: the rows of a left-padded batch are aligned) and an additive
  4-D attention mask ``[capacity, 1, 1, max_len]`` (0 where a row may attend, the dtype's minimum elsewhere);
* the per-row sampling parameters and ``(seed, step)`` as device tensors (:class:`SamplerState`);
* a ring of the last ``ring_len`` drawn tokens (and log-probabilities), written at a device-side slot counter,
  which the host copies out every few steps.

:meth:`StaticDecoder.step` runs one token for the first ``b`` rows (a batch-size bucket; rows past the live
ones are padding and never touch a real row: every op of a decoder-only transformer and of the sampler is
row-wise): every model's forward, the fused sampler, and the write of the drawn token into every model's input
buffer and the ring; positions, cache columns and steps advance in place. It allocates nothing that must
persist, reads nothing back to the host and takes no data-dependent branch, so it is the function a CUDA
graph captures (``decode_graphs.py``). On a CPU it simply runs eagerly.

The prefill runs eagerly through :class:`~proxytune.engine.runner.ModelRunner` (a ``DynamicCache``, exactly
the eager engine's prefill); :meth:`StaticDecoder.load` then copies its keys and values into the static
storage. Nothing is reallocated after the first load but by :meth:`StaticDecoder.grow` (a request longer than
the caches), so captured graphs stay valid across batches until then.

Supported: decoder-only models whose every layer is full attention with a plain per-layer key/value cache and
that accept a prepared 4-D mask (``sdpa`` or ``eager`` attention). :func:`static_support` says why a model
set cannot use it. Tested: Llama, Qwen2, GPT-2.
"""

from __future__ import annotations

from typing import Callable, Optional, Sequence

import torch

from proxytune.engine.ensemble import split_roles
from proxytune.engine.runner import ModelRunner, cache_argument, forward_parameters, position_limit, text_config
from proxytune.engine.sampler_state import SamplerState

__all__ = [
    "StaticDecoder", "StaticModel", "RingReader", "static_support", "bucket_for", "VERIFIED_MODEL_TYPES", "BUCKETS",
    "SPARE_STEPS", "STATIC_INITIAL_STEPS",
]  # fmt: skip

BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)
# Positions kept free past the last decode step: capturing a CUDA graph runs a few eager warm-up and timing
# steps (state restored afterwards) that write cache columns and advance positions beyond the real ones; an
# index past the cache would be a device-side assert.
SPARE_STEPS = 16
# Decode steps the caches first have room for; they double as a request needs more (StaticDecoder.grow).
STATIC_INITIAL_STEPS = 256
VERIFIED_MODEL_TYPES = frozenset({"llama", "qwen2", "gpt2"})  # covered by tests/test_static_step.py
_ATTENTION = ("sdpa", "eager")


def bucket_for(n: int) -> int:
    """The smallest bucket that holds ``n`` rows (a multiple of 512 past the largest)."""
    for b in BUCKETS:
        if n <= b:
            return b
    return -(-n // BUCKETS[-1]) * BUCKETS[-1]


def static_support(modules: Sequence[torch.nn.Module], names: Sequence[str]) -> tuple[Optional[str], Optional[str]]:
    """``(reason, caveat)``: ``reason`` says why these models cannot use the static step (None: they can);
    ``caveat`` names a model whose architecture is not among :data:`VERIFIED_MODEL_TYPES` (None: all are)."""
    devices = {next(m.parameters()).device for m in modules}
    if len(devices) > 1:
        return f"the models sit on different devices ({', '.join(sorted(map(str, devices)))})", None
    caveat = None
    for module, name in zip(modules, names):
        config = module.config
        if getattr(config, "is_encoder_decoder", False):
            return f"{name} is an encoder-decoder model", None
        impl = getattr(config, "_attn_implementation", None) or "eager"
        if impl not in _ATTENTION:
            return f"{name} uses attention implementation {impl!r} (the static step needs one of {_ATTENTION})", None
        layer_types = getattr(config, "layer_types", None)
        if layer_types is not None and any(t != "full_attention" for t in layer_types):
            kinds = sorted(set(layer_types) - {"full_attention"})
            return f"{name} has {', '.join(kinds)} layers (the static step supports full attention only)", None
        if layer_types is None and getattr(config, "sliding_window", None) and getattr(config, "use_sliding_window", True):
            return f"{name} uses sliding-window attention (the static step supports full attention only)", None
        text = text_config(module)
        rope = getattr(text, "rope_parameters", None) or getattr(text, "rope_scaling", None) or {}
        if isinstance(rope, dict) and rope.get("rope_type", rope.get("type")) == "dynamic":
            # dynamic NTK scaling compares the sequence length on the host inside the forward: a sync per
            # step and a data-dependent branch, which a CUDA graph cannot hold
            return f"{name} uses dynamic RoPE scaling (rope_type 'dynamic' decides on the host each step)", None
        kind = getattr(config, "model_type", "?")
        if kind not in VERIFIED_MODEL_TYPES and caveat is None:
            caveat = f"{name} is a {kind!r} model, not among the architectures the static step is tested on"
    return None, caveat


def _view_layer_class():
    from transformers.cache_utils import StaticLayer

    class ViewLayer(StaticLayer):
        """One layer's keys and values, views ``[b, H, max_len, D]`` of a model's storage, written at the
        shared ``write_pos`` (a ``[1]`` device tensor) instead of a per-layer counter."""

        def __init__(self, keys: torch.Tensor, values: torch.Tensor, write_pos: torch.Tensor):
            super().__init__(max_cache_len=keys.shape[2])
            self.keys, self.values, self.write_pos = keys, values, write_pos
            self.dtype, self.device = keys.dtype, keys.device
            self.batch_size, self.num_heads = keys.shape[:2]
            self.k_head_dim, self.v_head_dim = keys.shape[-1], values.shape[-1]
            self.is_initialized = True

        def update(self, key_states, value_states, *args, **kwargs):
            self.keys.index_copy_(2, self.write_pos, key_states)
            self.values.index_copy_(2, self.write_pos, value_states)
            return self.keys, self.values

        def get_seq_length(self) -> int:  # only read when no position ids are given; they always are
            raise RuntimeError("the static step passes position ids; the sequence length is not tracked")

    return ViewLayer


class StaticModel:
    """One model's static state. Allocated on the first :meth:`load`; later loads copy in place."""

    def __init__(self, module: torch.nn.Module, name: str, capacity: int, max_len: int):
        self.module, self.name = module, name
        self.capacity, self.max_len = capacity, max_len
        self.device = next(module.parameters()).device
        self._extra = {"logits_to_keep": 1} if "logits_to_keep" in forward_parameters(module) else {}
        self._cache_arg = cache_argument(module)
        limit = position_limit(module)
        self.last_position = limit - 1 if limit is not None else None
        self.keys: list[torch.Tensor] = []
        self.values: list[torch.Tensor] = []
        self.ids = torch.zeros(capacity, 1, dtype=torch.int64, device=self.device)
        self.pos = torch.zeros(capacity, 1, dtype=torch.int64, device=self.device)
        self.write_pos = torch.zeros(1, dtype=torch.int64, device=self.device)
        self.mask: Optional[torch.Tensor] = None  # [capacity, 1, 1, max_len], the cache dtype
        self._caches: dict[int, object] = {}

    def load(self, runner: ModelRunner, pad_id: int) -> None:
        """Copy a prefilled runner's cache, mask and next positions into rows ``[0, B)``; reset the rest."""
        layers = getattr(runner.cache, "layers", None)
        if not layers or any(type(layer).__name__ != "DynamicLayer" for layer in layers):
            kinds = sorted({type(layer).__name__ for layer in layers or []})
            raise RuntimeError(f"{self.name}: the static step needs plain DynamicLayer caches after prefill, got {kinds}")
        batch, length = runner.mask.shape
        if batch > self.capacity or length >= self.max_len:
            raise ValueError(f"{self.name}: {batch} rows x {length} prompt positions do not fit {self.capacity} x {self.max_len}")
        if not self.keys:
            for layer in layers:
                k, v = layer.keys, layer.values
                self.keys.append(k.new_zeros(self.capacity, k.shape[1], self.max_len, k.shape[3]))
                self.values.append(v.new_zeros(self.capacity, v.shape[1], self.max_len, v.shape[3]))
            self.mask = torch.empty(self.capacity, 1, 1, self.max_len, dtype=self.keys[0].dtype, device=self.device)
        if len(layers) != len(self.keys) or layers[0].keys.dtype != self.keys[0].dtype:
            raise RuntimeError(f"{self.name}: the prefill cache does not match the static storage")
        for layer, k, v in zip(layers, self.keys, self.values):
            k[:batch, :, :length].copy_(layer.keys)
            v[:batch, :, :length].copy_(layer.values)
        neg = torch.finfo(self.mask.dtype).min
        self.mask.fill_(neg)
        self.mask[:batch, 0, 0, :length].masked_fill_(runner.mask.bool(), 0.0)
        self.ids.fill_(pad_id)
        self.pos.zero_()
        self.pos[:batch, 0].copy_(runner.next_pos)
        self.write_pos.fill_(length)

    def grow(self, max_len: int) -> None:
        """Room for ``max_len`` positions: new storage holding the old columns (views and graphs over the old
        storage are invalid afterwards)."""
        if max_len <= self.max_len:
            return
        if self.keys:
            extra = max_len - self.max_len
            self.keys = [torch.nn.functional.pad(k, (0, 0, 0, extra)) for k in self.keys]
            self.values = [torch.nn.functional.pad(v, (0, 0, 0, extra)) for v in self.values]
            self.mask = torch.nn.functional.pad(self.mask, (0, extra), value=torch.finfo(self.mask.dtype).min)
        self.max_len = max_len
        self._caches.clear()

    def cache(self, b: int):
        """A transformers ``Cache`` over rows ``[0, b)`` of the storage (built once per bucket)."""
        if b not in self._caches:
            from transformers.cache_utils import Cache

            view = _view_layer_class()
            self._caches[b] = Cache(layers=[view(k[:b], v[:b], self.write_pos) for k, v in zip(self.keys, self.values)])
        return self._caches[b]

    def forward(self, b: int) -> torch.Tensor:
        """Logits ``[b, W]`` for the token in ``ids`` at ``pos``; writes its keys and values at ``write_pos``."""
        mask = self.mask[:b]
        mask.index_fill_(3, self.write_pos, 0.0)
        out = self.module(
            input_ids=self.ids[:b], attention_mask=mask, position_ids=self.pos[:b], use_cache=True,
            **{self._cache_arg: self.cache(b)}, **self._extra,
        )  # fmt: skip
        return out.logits[:, -1]

    def advance(self, b: int) -> None:
        self.pos[:b] += 1
        if self.last_position is not None:  # rows that finished, or graph warm-up steps, may run on: keep them
            self.pos[:b].clamp_(max=self.last_position)  # inside the position table (live rows never get here)
        self.write_pos += 1

    def feed(self, b: int, tokens: torch.Tensor) -> None:
        self.ids[:b, 0].copy_(tokens, non_blocking=True)

    def compact(self, rows: torch.Tensor, b: int) -> None:
        """Move rows ``rows`` (indices into ``[0, b)``) to the front, in order."""
        for t in (*self.keys, *self.values, self.ids, self.pos, self.mask):
            t[: len(rows)].copy_(t[:b].index_select(0, rows))

    def state(self) -> list[torch.Tensor]:
        """The small tensors a step changes (the cache columns it writes are rewritten before being read)."""
        return [self.ids, self.pos, self.write_pos, self.mask]


Fork = Callable[[Callable[[], torch.Tensor], Sequence[Callable[[], torch.Tensor]]], tuple]


class StaticDecoder:
    """The static step over a base and its (expert, anti-expert) pairs; see the module docstring.

    Parameters
    ----------
    modules, names : the base, the experts, then the anti-experts (all on one device)
    capacity : most rows of a batch (a bucket size)
    max_len : most positions per row, prompt included
    vocab_size, backend : passed to ``proxytune.sample``
    ring_len : tokens kept on the device between two reads by the host
    """

    def __init__(self, modules, names, *, capacity: int, max_len: int, vocab_size: int, backend: str, ring_len: int):
        self.models = [StaticModel(m, n, capacity, max_len) for m, n in zip(modules, names)]
        self.n_pairs = len(split_roles(modules)[1])
        self.capacity, self.max_len, self.ring_len = capacity, max_len, ring_len
        self.vocab_size, self.backend = vocab_size, backend
        dev = self.device = self.models[0].device
        self.sampler = SamplerState.neutral(self.n_pairs, capacity, dev)
        self.ring = torch.zeros(ring_len, capacity, dtype=torch.int64, device=dev)
        self.ring_logprobs = torch.zeros(ring_len, capacity, dtype=torch.float32, device=dev)
        self.slot = torch.zeros(1, dtype=torch.int64, device=dev)

    def grow(self, max_len: int) -> None:
        """Room for ``max_len`` positions per row, the state kept (graphs captured before must be recaptured)."""
        for m in self.models:
            m.grow(max_len)
        self.max_len = max(self.max_len, max_len)

    def fits(self, modules, batch: int, max_len: int) -> bool:
        return (
            len(modules) == len(self.models) and all(m is s.module for m, s in zip(modules, self.models))
            and batch <= self.capacity and max_len <= self.max_len
        )  # fmt: skip

    @torch.no_grad()
    def load(self, runners: Sequence[ModelRunner], state: SamplerState, tokens: torch.Tensor, pad_id: int) -> None:
        """Take over a prefilled batch: the runners' caches, the sampler state (``step`` already counts the
        first token) and that first token ``[B]``, fed to every model. Rows past ``B`` become neutral padding."""
        batch = tokens.shape[0]
        for model, runner in zip(self.models, runners):
            model.load(runner, pad_id)
            model.feed(batch, tokens)
        self.sampler.load_(state)
        self.slot.zero_()

    def start_chunk(self) -> None:
        """The ring's slot counter restarts: the next steps' tokens land in ring slots 0, 1, ..."""
        self.slot.zero_()

    def logits(self, b: int, fork: Optional[Fork] = None) -> list[torch.Tensor]:
        """Every model's logits for rows ``[0, b)``: in order, or the base on the current stream and the others
        through ``fork`` (``decode_graphs.fork_join`` bound to side streams)."""
        if fork is None:
            return [m.forward(b) for m in self.models]
        base, others = fork(lambda: self.models[0].forward(b), [lambda m=m: m.forward(b) for m in self.models[1:]])
        return [base, *others]

    @torch.no_grad()
    def step(self, b: int, return_logprobs: bool = False, fork: Optional[Fork] = None) -> list[torch.Tensor]:
        """One decode step for rows ``[0, b)``; returns the models' logits (a graph keeps them alive)."""
        logits = self.logits(b, fork)
        for m in self.models:
            m.advance(b)
        tokens, logprobs = self.sampler.head(b).sample(
            logits, vocab_size=self.vocab_size, backend=self.backend, return_logprobs=return_logprobs, validate=False
        )
        for m in self.models:
            m.feed(b, tokens)
        self.sampler.step[:b] += 1
        self.ring[:, :b].index_copy_(0, self.slot, tokens[None])
        if logprobs is not None:
            self.ring_logprobs[:, :b].index_copy_(0, self.slot, logprobs[None])
        self.slot.add_(1).remainder_(self.ring_len)  # a ring: extra steps (graph warm-up, timing) stay in bounds
        return logits

    @torch.no_grad()
    def compact(self, rows: Sequence[int], b: int) -> None:
        """Keep rows ``rows`` (indices into ``[0, b)``, increasing) as rows ``[0, len(rows))``."""
        idx = torch.tensor(list(rows), dtype=torch.int64).to(self.device)
        for m in self.models:
            m.compact(idx, b)
        self.sampler.compact_(idx, b)

    def state(self) -> list[torch.Tensor]:
        """Every tensor a step changes except the cache columns (see :meth:`StaticModel.state`)."""
        return [t for m in self.models for t in m.state()] + [self.sampler.step, self.slot, self.ring, self.ring_logprobs]

    def snapshot(self) -> list[torch.Tensor]:
        return [t.clone() for t in self.state()]

    def restore(self, saved: list[torch.Tensor]) -> None:
        for t, s in zip(self.state(), saved):
            t.copy_(s)


class RingReader:
    """Copies a decoder's token ring to the host: on CUDA asynchronously into one of two pinned buffers, with
    an event to wait on later (the host reads chunk ``i`` while the device runs chunk ``i + 1``); on a CPU at once.
    """

    def __init__(self, decoder: StaticDecoder):
        self.decoder = decoder
        self.cuda = decoder.device.type == "cuda"
        self._buffers = []
        if self.cuda:
            for _ in range(2):
                self._buffers.append(
                    (torch.empty(decoder.ring.shape, dtype=torch.int64, pin_memory=True),
                     torch.empty(decoder.ring_logprobs.shape, dtype=torch.float32, pin_memory=True))
                )  # fmt: skip
        self._next = 0

    def read(self, k: int, b: int, logprobs: bool) -> Callable[[], tuple[list, Optional[list]]]:
        """Start reading the first ``k`` ring slots of rows ``[0, b)``; the returned function waits for the copy
        and gives ``(tokens [k][b], logprobs [k][b] or None)``. Without CUDA it is already done."""
        dec = self.decoder
        if not self.cuda:
            toks = dec.ring[:k, :b].tolist()
            lps = dec.ring_logprobs[:k, :b].tolist() if logprobs else None
            return lambda: (toks, lps)
        tok_buf, lp_buf = self._buffers[self._next]
        self._next ^= 1
        tok_buf.copy_(dec.ring, non_blocking=True)
        if logprobs:
            lp_buf.copy_(dec.ring_logprobs, non_blocking=True)
        event = torch.cuda.Event()
        event.record()

        def wait():
            event.synchronize()
            return tok_buf[:k, :b].tolist(), lp_buf[:k, :b].tolist() if logprobs else None

        return wait
