"""Ensemble members: what a model must provide to take a role (base, expert, anti-expert) in an
:class:`~proxytune.engine.ensemble.Ensemble`, and the one kind there is today, a local Hugging Face model.

The interface (:class:`Member`) is all the engine reads of a model outside its own runner:

* ``name`` (``"base"``, ``"expert 0"``, ``"anti-expert 0"``, ... for messages) and ``source`` (where it came from);
* ``device``: where its logits land (sampling runs on the base's; a served base: the first local member's);
* :meth:`Member.join`: told the shared tokenizer, vocabulary and device once the ensemble knows them;
* ``width``: how many logits columns it produces (the common vocabulary is the smallest width and the
  tokenizer's length; None: as wide as the common vocabulary, a served base's rows);
* ``tokenizer``: its own tokenizer for the shared-vocabulary check and its chat template, or None;
* ``template``: a :class:`~proxytune.engine.prompts.PromptTemplate` or None, and :meth:`Member.template_ids`,
  its prefix and suffix ids;
* ``position_limit``: the most positions it takes (prompt and new tokens), or None;
* :meth:`Member.runner`: a fresh runner for one batch, with the methods of
  :class:`~proxytune.engine.runner.ModelRunner`: ``prefill(ids, mask) -> [B, W]``, ``step(tokens [B]) ->
  [B, W]``, ``extend(tokens [B, n]) -> [B, n, W]`` (speculation), ``rollback(fed, kept)`` and ``select(rows)``
  (cache row moves), each with its cache; and :meth:`Member.score_logits`, the logits of the last ``keep``
  positions of a left-padded batch without a cache (``ProxyTuner.score``).
* ``module``: the ``torch.nn.Module``, only for the static and CUDA-graph decoders (None where there is
  none: such a member runs in the eager decoders only, for the reason :attr:`Member.eager_only` gives).

A new kind of member (a base served over HTTP that returns top-k log-probabilities, a LoRA adapter sharing
its anti-expert's weights) is one new subclass implementing these; the ensemble, the decoders and scoring
do not change.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional

import torch

from proxytune.engine.prompts import PromptTemplate, position_ids
from proxytune.engine.runner import ModelRunner, forward_parameters, position_limit

__all__ = ["Member", "LocalModel"]


class Member:
    """The interface of an ensemble member (see the module docstring); subclasses set the attributes."""

    name: str
    source: str
    device: torch.device
    width: int
    tokenizer: Any
    template: Optional[PromptTemplate]
    module: Any  # the torch module, or None (eager decoders only)

    @property
    def position_limit(self) -> Optional[int]:
        """The most positions this member takes, prompt and new tokens together (None: no limit)."""
        return None

    @property
    def eager_only(self) -> Optional[str]:
        """Why this member runs in the eager decoders only (None: it has a module the static step may take);
        the static and CUDA-graph decoders refuse it with this reason."""
        return f"{self.name} is not a local model" if self.module is None else None

    def template_ids(self, shared_tokenizer: Any) -> Optional[tuple[list[int], list[int]]]:
        """The template's prefix and suffix ids (None: no template), by this member's tokenizer if it has one."""
        if self.template is None:
            return None
        return self.template.token_ids(self.tokenizer or shared_tokenizer, self.name)

    def connect(self) -> None:
        """Called by :meth:`Ensemble.load <proxytune.engine.ensemble.Ensemble.load>` before the other members
        load, for what can fail fast (a served base asks its server); nothing by default."""

    def join(self, tokenizer: Any, vocab_size: int, device: torch.device) -> None:
        """Called once by the ensemble with the shared tokenizer, the common vocabulary and the sampling
        device (a served base checks its server here); nothing by default."""

    def runner(self, use_cache: bool = True) -> ModelRunner:
        raise NotImplementedError(f"{type(self).__name__} cannot run a batch")

    def score_logits(self, ids: torch.Tensor, mask: torch.Tensor, keep: int) -> torch.Tensor:
        raise NotImplementedError(f"{type(self).__name__} cannot score a batch")


@dataclass(eq=False)
class LocalModel(Member):
    """A Hugging Face causal LM in this process: module in eval mode, its device, its logits width, its
    tokenizer (if any) and template."""

    name: str
    module: Any  # transformers.PreTrainedModel
    device: torch.device
    width: int
    tokenizer: Any
    template: Optional[PromptTemplate]
    source: str
    _limit: Optional[int] = field(default=None, init=False, repr=False)

    def __post_init__(self):
        self._limit = position_limit(self.module)

    @classmethod
    def adopt(cls, module: Any, name: str) -> "LocalModel":
        """A loaded ``PreTrainedModel`` as it is (its device, its dtype), without tokenizer or template;
        a model on the meta device (shapes without weights) is refused."""
        from transformers import PreTrainedModel

        if not isinstance(module, PreTrainedModel):
            raise TypeError(f"{name} must be a transformers PreTrainedModel, got {type(module).__name__}")
        device = next(module.parameters()).device
        if device.type == "meta":
            raise ValueError(f"{name} is on the meta device (shapes without weights): load its weights before generating")
        return cls(name, module.eval(), device, logits_width(module), None, None,
                   getattr(module, "name_or_path", "") or name)  # fmt: skip

    @property
    def position_limit(self) -> Optional[int]:
        return self._limit

    def runner(self, use_cache: bool = True) -> ModelRunner:
        return ModelRunner(self, use_cache)

    def score_logits(self, ids: torch.Tensor, mask: torch.Tensor, keep: int) -> torch.Tensor:
        """The logits of the last ``keep`` positions ``[B, keep, W]`` of a left-padded batch (no cache)."""
        extra = {"logits_to_keep": keep} if "logits_to_keep" in forward_parameters(self.module) else {}
        out = self.module(input_ids=ids, attention_mask=mask, position_ids=position_ids(mask), use_cache=False, **extra)
        return out.logits[:, -keep:]


def logits_width(module: Any) -> int:
    """How many logits columns a transformers model produces (its output embedding's rows)."""
    out = module.get_output_embeddings()
    if out is not None and hasattr(out, "weight"):
        return int(out.weight.shape[0])
    return int(module.config.get_text_config().vocab_size)
