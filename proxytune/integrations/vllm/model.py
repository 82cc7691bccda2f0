"""``ProxyTunedForCausalLM``: the base and every (expert, anti-expert) pair as vLLM models inside one vLLM model.

Imported by vLLM only (the plugin registers it lazily, as ``"proxytune.integrations.vllm.model:ProxyTunedForCausalLM"``).

How it maps onto vLLM:

- Each checkpoint becomes the vLLM model class of its own architecture (``init_vllm_registered_model`` with
  its own Hugging Face config), under the prefix ``base.`` or ``expert_a.`` / ``anti_expert_a.``, ``expert_b.``, ... (no digits:
  vLLM reads a layer's index from the one integer in its name). Their
  attention layers are ordinary vLLM attention layers, so every model gets its own paged KV cache, continuous
  batching and prefix caching; tensor parallelism shards each model as vLLM shards it alone.
- ``forward`` runs every model on the same tokens and positions and returns their last hidden states side by
  side (``[tokens, sum of hidden sizes]``); ``compute_logits`` splits them, applies each model's own LM head
  and hands the logits to :func:`proxytune.combine` (fp32, over the common vocabulary ``V`` of the config).
  vLLM's sampler, logprobs and stop rules then see the combined logits as if one model had produced them.
- Weights: each sub-model reads its own checkpoint through vLLM's loader (``secondary_weights``, one source per
  checkpoint, prefixed); the directory's own ``proxytune.safetensors`` carries the pair weights.

Not supported: pipeline parallelism, prompt embeddings (``inputs_embeds``), speculative decoding, LoRA.
"""

from __future__ import annotations

import itertools
from typing import Iterable, Optional

import torch
from torch import nn

from proxytune._rules import check_weight
from proxytune.engine.ensemble import in_order, split_roles
from proxytune.integrations.vllm.config import WEIGHTS_FILE, WEIGHTS_TENSOR, VllmConfigError, read_block

__all__ = ["ProxyTunedForCausalLM"]

_LETTERS = "abcdefghijklmnopqrstuvwxyz"


def _sub_config(source: str, trust_remote_code: bool):
    from transformers import AutoConfig

    from proxytune.engine.loading import hub_kwargs

    return AutoConfig.from_pretrained(source, trust_remote_code=trust_remote_code, **hub_kwargs(source))


class ProxyTunedForCausalLM(nn.Module):
    """``base + sum_i w_i * (expert_i - anti_expert_i)`` as one vLLM text-generation model."""

    # the directory's own weights file: the pair weights, nothing else
    allow_patterns_overrides = [WEIGHTS_FILE]

    def __init__(self, *, vllm_config, prefix: str = ""):
        super().__init__()
        from vllm.model_executor.model_loader.default_loader import DefaultModelLoader
        from vllm.model_executor.models.utils import init_vllm_registered_model, maybe_prefix

        model_config = vllm_config.model_config
        block = read_block(model_config.hf_config)
        self.vocab_size = int(block["vocab_size"])
        pairs = block["pairs"]
        self.num_pairs = len(pairs)
        if self.num_pairs > len(_LETTERS):
            raise VllmConfigError(f"at most {len(_LETTERS)} (expert, anti-expert) pairs, got {self.num_pairs}")
        # sub-model names without digits: vLLM reads a layer's index as the one integer in its name; the
        # models in the ensemble's order (base, experts, anti-experts)
        letters = _LETTERS[: self.num_pairs]
        sources = in_order(("base", block["base"]), [(f"expert_{x}", p["expert"]) for x, p in zip(letters, pairs)],
                           [(f"anti_expert_{x}", p["anti_expert"]) for x, p in zip(letters, pairs)])  # fmt: skip
        trust = model_config.trust_remote_code
        self._names, self._hidden = [], []
        for name, source in sources:
            cfg = _sub_config(source, trust)
            self.add_module(name, init_vllm_registered_model(vllm_config, prefix=maybe_prefix(prefix, name), hf_config=cfg))
            self._names.append(name)
            self._hidden.append(int(cfg.get_text_config().hidden_size))
        # the one weight rule (proxytune._rules): a hand-edited config.json fails here, not at every forward
        self.pair_weights = [check_weight(p["weight"], f"config.json: proxytune pairs[{i}].weight") for i, p in enumerate(pairs)]
        self.secondary_weights = [
            DefaultModelLoader.Source(source, revision=None, prefix=f"{name}.") for name, source in sources
        ]

    def _models(self) -> list[nn.Module]:
        """base, expert_a, expert_b, ..., anti_expert_a, ...: the ensemble's model order, that of :meth:`forward`'s
        hidden states."""
        return [getattr(self, n) for n in self._names]

    def embed_input_ids(self, input_ids: torch.Tensor) -> torch.Tensor:
        """The base's embeddings (vLLM's interface asks for it); :meth:`forward` does not accept embeddings."""
        return self.base.embed_input_ids(input_ids)

    def forward(self, input_ids: Optional[torch.Tensor], positions: torch.Tensor, intermediate_tensors=None,
                inputs_embeds: Optional[torch.Tensor] = None, **kwargs) -> torch.Tensor:  # fmt: skip
        """Every model on the same tokens; their hidden states concatenated, ``[tokens, sum of hidden sizes]``."""
        if inputs_embeds is not None or intermediate_tensors is not None:
            raise NotImplementedError("proxy-tuned models take token ids only (no prompt embeddings, no pipeline parallelism)")
        return torch.cat([m(input_ids, positions) for m in self._models()], dim=-1)

    def compute_logits(self, hidden_states: torch.Tensor) -> Optional[torch.Tensor]:
        """``proxytune.combine`` of every model's logits: ``[rows, V]`` float32."""
        from proxytune import combine

        parts = torch.split(hidden_states, self._hidden, dim=-1)
        logits = [m.compute_logits(h) for m, h in zip(self._models(), parts)]
        if any(x is None for x in logits):  # a tensor-parallel rank that does not hold the gathered logits
            return None
        base, experts, anti_experts = split_roles(logits, self.num_pairs)
        return combine(base, experts, anti_experts, weights=self.pair_weights,
                       vocab_size=self.vocab_size, validate=False)  # fmt: skip

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        """Route each checkpoint's tensors (prefixed by the loader) to its model; check the pair weights."""
        loaded: set[str] = set()
        by_name = dict(zip(self._names, self._models()))
        seen_weights = False

        def owner(item) -> str:
            name = item[0]
            for n in self._names:
                if name.startswith(n + "."):
                    return n
            return ""

        for key, group in itertools.groupby(weights, key=owner):
            if key:
                cut = len(key) + 1
                got = by_name[key].load_weights((name[cut:], t) for name, t in group)
                loaded.update(f"{key}.{name}" for name in got)
                continue
            for name, tensor in group:
                if name != WEIGHTS_TENSOR:
                    raise VllmConfigError(f"unexpected tensor {name!r} in the proxy-tuned directory's {WEIGHTS_FILE}")
                stored = [float(x) for x in tensor.float().flatten()]
                if stored != [float(torch.tensor(w, dtype=torch.float32)) for w in self.pair_weights]:
                    raise VllmConfigError(
                        f"{WEIGHTS_FILE} holds the weights {stored} but config.json says {self.pair_weights}; "
                        "write the directory again with `proxytune vllm-config`"
                    )
                seen_weights = True
        if not seen_weights:
            raise VllmConfigError(f"the proxy-tuned directory has no {WEIGHTS_TENSOR} in {WEIGHTS_FILE}")
        return loaded
