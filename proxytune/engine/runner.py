"""One Hugging Face model's eager forward over a batch: its KV cache, attention mask and positions
(:class:`ModelRunner`), and the small helpers that read a transformers model (its cache argument, its
position limit, its text config).

:meth:`ModelRunner.step` takes a ``[B]`` token tensor on any device and returns ``[B, W]`` logits, with no
host sync; dropping finished rows (:meth:`ModelRunner.select`) happens between steps, on the host's
decision. What a graph cannot hold is the growing part: ``DynamicCache`` and the attention mask grow by one
column per step. ``static_decoder.py`` swaps them for static caches and a preallocated mask (its prefill is
this module's :meth:`ModelRunner.prefill`, whose cache it copies), and ``decode_graphs.py`` captures that step.
"""

from __future__ import annotations

import inspect
from typing import TYPE_CHECKING, Optional

import torch

from proxytune.engine.prompts import position_ids

if TYPE_CHECKING:
    from proxytune.engine.members import LocalModel

__all__ = ["ModelRunner", "forget_tail", "to_device", "cache_argument", "forward_parameters", "position_limit", "text_config"]


def to_device(x: torch.Tensor, device: torch.device) -> torch.Tensor:
    """``x`` on ``device``; asynchronous only into a GPU (a non-blocking copy into CPU memory could be read
    before it lands)."""
    if x.device == device:
        return x
    return x.to(device, non_blocking=device.type == "cuda")


def forward_parameters(module: torch.nn.Module) -> frozenset:
    """The keyword arguments ``module.forward`` names."""
    return frozenset(inspect.signature(module.forward).parameters)


def cache_argument(module: torch.nn.Module) -> str:
    """The name under which ``module.forward`` takes the KV cache: ``cache`` (transformers >= 5.24, where
    ``past_key_values`` is deprecated; removed in 5.40) or ``past_key_values`` (earlier releases)."""
    return "cache" if "cache" in forward_parameters(module) else "past_key_values"


def text_config(module: torch.nn.Module):
    """The config of ``module``'s language model (the text part of a multimodal config)."""
    config = module.config
    return config.get_text_config() if hasattr(config, "get_text_config") else config


def position_limit(module: torch.nn.Module) -> Optional[int]:
    """The most positions ``module`` is made for (prompt and generated tokens together), or None if its
    config names no limit: ``max_position_embeddings`` (Llama, Qwen2, ...) or ``n_positions`` (GPT-2)."""
    config = text_config(module)
    for name in ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length"):
        value = getattr(config, name, None)
        if isinstance(value, int) and not isinstance(value, bool) and value > 0:
            return value
    return None


def forget_tail(mask: torch.Tensor, next_pos: torch.Tensor, cache, fed: int, kept: torch.Tensor):
    """The rollback rule, for every runner: forget all but the first ``kept[r]`` (``[R]`` int64 on the mask's
    device, ``0 <= kept[r] <= fed``) of the last ``fed`` tokens of each row. Their mask columns become holes (0)
    and the row's next position moves back; trailing columns no row keeps are cropped from ``cache`` (a
    transformers cache, cropped in place). Returns the new ``(mask [R, L'], next_pos [R])``. One host sync (the
    crop length)."""
    cols = torch.arange(fed, device=mask.device)
    tail = (cols[None, :] < kept[:, None]).to(mask.dtype)
    mask = torch.cat([mask[:, :-fed], mask[:, -fed:] * tail], dim=1)
    next_pos = next_pos - (fed - kept)
    drop = fed - int(kept.max())
    if drop > 0:
        mask = mask[:, :-drop]
        cache.crop(-drop)  # a negative count removes that many tokens (every transformers release)
    return mask, next_pos


class ModelRunner:
    """One model's state for the rows of a batch: a transformers ``DynamicCache`` (or, with
    ``use_cache=False``, the whole sequence, recomputed every step), the attention mask and the next position.
    """

    def __init__(self, model: "LocalModel", use_cache: bool = True):
        self.model = model
        self.module = model.module
        self.device = model.device
        self.use_cache = use_cache
        self._extra = {"logits_to_keep": 1} if "logits_to_keep" in forward_parameters(self.module) else {}
        self._cache_arg = cache_argument(self.module)
        self.cache = None
        self.mask: Optional[torch.Tensor] = None  # [B, L] int64, 1 on real tokens
        self.next_pos: Optional[torch.Tensor] = None  # [B] int64
        self.ids: Optional[torch.Tensor] = None  # [B, L], only without a cache

    @torch.inference_mode()
    def prefill(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Run the left-padded prompts ``[B, L]``; returns the last position's logits ``[B, W]``."""
        self.mask = attention_mask
        pos = position_ids(attention_mask)
        self.next_pos = pos[:, -1] + 1
        if self.use_cache:
            from transformers import DynamicCache

            self.cache = DynamicCache(config=self.module.config)
        else:
            self.ids = input_ids
        return self._forward(input_ids, pos)

    @torch.inference_mode()
    def step(self, tokens: torch.Tensor) -> torch.Tensor:
        """Feed one token per row (``[B]`` int64 on any device); returns the next logits ``[B, W]``. No host sync."""
        tokens = to_device(tokens, self.device)[:, None]
        self.mask = torch.cat([self.mask, torch.ones_like(self.mask[:, :1])], dim=1)
        if self.use_cache:
            logits = self._forward(tokens, self.next_pos[:, None])
        else:
            self.ids = torch.cat([self.ids, tokens], dim=1)
            logits = self._forward(self.ids, position_ids(self.mask))
        self.next_pos = self.next_pos + 1
        return logits

    @torch.inference_mode()
    def extend(self, tokens: torch.Tensor) -> torch.Tensor:
        """Feed ``n`` tokens per row in one forward (``[B, n]`` int64, on any device); returns the logits after
        each of them ``[B, n, W]`` (speculative drafting and verification). Needs a cache. Positions past the
        model's limit are clamped to its last one: only a row's drafts beyond its budget get there, and
        :meth:`rollback` forgets them (causal attention keeps them out of the kept positions' logits). No host
        sync."""
        tokens = to_device(tokens, self.device)
        n = tokens.shape[1]
        self.mask = torch.cat([self.mask, torch.ones_like(self.mask[:, :1]).expand(-1, n)], dim=1)
        pos = self.next_pos[:, None] + torch.arange(n, device=self.device)
        limit = position_limit(self.module)
        if limit is not None:  # only drafts past a row's budget go there, and a rollback forgets them
            pos = pos.clamp(max=limit - 1)
        extra = {"logits_to_keep": n} if self._extra else {}
        out = self.module(input_ids=tokens, attention_mask=self.mask, position_ids=pos, use_cache=True,
                          **{self._cache_arg: self.cache}, **extra)  # fmt: skip
        self.next_pos = self.next_pos + n
        return out.logits[:, -n:]

    def rollback(self, fed: int, kept: torch.Tensor) -> None:
        """Forget all but the first ``kept[r]`` (``[B]`` int64, ``0 <= kept[r] <= fed``) of the last ``fed``
        tokens of each row: their mask columns become holes (0) and the row's next position moves back, so the
        row attends as if the forgotten tokens were never seen; trailing columns no row keeps are cropped from
        the cache. One host sync (the crop length)."""
        if fed:
            self.mask, self.next_pos = forget_tail(self.mask, self.next_pos, self.cache, fed, kept.to(self.device))

    def _forward(self, input_ids: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        out = self.module(
            input_ids=input_ids, attention_mask=self.mask, position_ids=pos, use_cache=self.use_cache,
            **{self._cache_arg: self.cache}, **self._extra,
        )  # fmt: skip
        return out.logits[:, -1]

    def select(self, rows: torch.Tensor) -> None:
        """Keep only ``rows`` (int64 indices into the current batch), in that order: cache included."""
        rows = rows.to(self.device)
        self.mask = self.mask[rows]
        self.next_pos = self.next_pos[rows]
        if self.cache is not None:
            self.cache.batch_select_indices(rows)
        if self.ids is not None:
            self.ids = self.ids[rows]
