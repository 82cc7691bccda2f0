"""Proxy-tuning inside vLLM: a plugin that registers the architecture ``ProxyTunedForCausalLM``.

    proxytune vllm-config --base meta-llama/Llama-3.1-70B --expert meta-llama/Llama-3.2-1B-Instruct \\
        --anti-expert meta-llama/Llama-3.2-1B --alpha 1.0 -o llama70b-proxy
    python -m vllm.entrypoints.openai.api_server --model llama70b-proxy --tensor-parallel-size 4

or ``vllm.LLM(model="llama70b-proxy")``. The entry point ``proxytune = proxytune.integrations.vllm:register``
in the group ``vllm.general_plugins`` makes vLLM call :func:`register` in every process it starts, so no user
code is needed. ``config`` writes the model directory (no vLLM import); ``model`` holds the model class.

The model: the base and each (expert, anti-expert) pair run as vLLM's own model classes inside one vLLM model,
each with its own paged KV cache; their logits are combined by :func:`proxytune.combine` in fp32 over the
common vocabulary, and vLLM's sampler, batching, prefix caching, tensor parallelism and server do the rest.

Weights are fixed per model directory. Per-request weights (``SamplingParams(extra_args=...)``) are not built:
a v1 logits processor, the only per-request hook, sees the already combined logits and runs after vLLM took
the raw logprobs from them, and the model's ``compute_logits`` does not know which request a row belongs to.
Serve one directory per weight set instead.
"""

from __future__ import annotations

__all__ = ["register"]

ARCHITECTURE = "ProxyTunedForCausalLM"


def register() -> None:
    """Register ``ProxyTunedForCausalLM`` with vLLM's model registry (lazily: the class is imported when used)."""
    from vllm import ModelRegistry

    if ARCHITECTURE not in ModelRegistry.get_supported_archs():
        ModelRegistry.register_model(ARCHITECTURE, "proxytune.integrations.vllm.model:ProxyTunedForCausalLM")
