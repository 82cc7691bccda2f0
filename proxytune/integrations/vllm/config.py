"""The proxy-tuned model directory that vLLM loads: one ``config.json`` naming the checkpoints and weights, the
shared tokenizer, and a one-tensor weights file. No vLLM import here (``proxytune vllm-config`` runs anywhere).

Layout of ``DIR`` (``write_model_dir``):

- ``config.json``: the base's own config with ``architectures = ["ProxyTunedForCausalLM"]``, ``vocab_size``
  set to the common vocabulary ``V``, ``max_position_embeddings`` to the smallest of the models' (vLLM's
  default ``max_model_len``) and a ``proxytune`` block::

      "proxytune": {"format": 1, "base": "/abs/base", "vocab_size": V,
                    "pairs": [{"expert": "/abs/e", "anti_expert": "/abs/a", "weight": 0.5}, ...]}

  Local checkpoints are stored as absolute paths, hub ids as they are (vLLM's worker resolves them, from the
  local cache when ``HF_HUB_OFFLINE=1``).
- the base's tokenizer files (or ``tokenizer=``'s), and its ``generation_config.json`` if it has one.
- ``proxytune.safetensors``: the pair weights as one float32 tensor ``proxytune.pair_weights`` (vLLM's
  weight loader needs a weights file in the directory it is given; this one is checked against ``config.json``).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Sequence

from proxytune._rules import check_bool, check_weights

__all__ = ["ARCHITECTURE", "VllmConfigError", "adapter_refusal", "ModelInfo", "kv_page_units", "check_kv_layouts", "write_model_dir"]

ARCHITECTURE = "ProxyTunedForCausalLM"
FORMAT = 1
WEIGHTS_FILE = "proxytune.safetensors"
WEIGHTS_TENSOR = "proxytune.pair_weights"


class VllmConfigError(ValueError):
    """The checkpoints cannot be served together by the vLLM plugin (the message says which and why)."""


def adapter_refusal(what: str) -> VllmConfigError:
    """The one reason the plugin takes no LoRA adapter as an expert (``what``: the flag or role and its value).

    vLLM's own LoRA support applies an adapter per request to the served model as a whole (a ``LoRARequest``
    selects it for every token of the request), through layers vLLM swaps into that model; inside the
    proxy-tuned model the expert and anti-expert are sub-models fed the same tokens of the same request, and
    vLLM has no way to apply an adapter to the expert's sub-model only. A merged adapter is an ordinary
    checkpoint, which the plugin serves."""
    return VllmConfigError(
        f"{what}: the vLLM plugin cannot take a LoRA adapter as an expert: vLLM applies a LoRA adapter per "
        "request to the whole served model, not to the expert inside the proxy-tuned model alone; merge it into "
        "its base (PeftModel.merge_and_unload(), then save_pretrained) and give that directory as --expert, with "
        "the adapter's base as --anti-expert"
    )


@dataclass
class ModelInfo:
    """What the checks need of one checkpoint."""

    role: str  # "base", "expert 1", "anti-expert 1", ...
    source: str  # absolute directory or hub id
    config: Any  # transformers PretrainedConfig

    @property
    def text_config(self) -> Any:
        return self.config.get_text_config()

    @property
    def architecture(self) -> Optional[str]:
        archs = getattr(self.config, "architectures", None) or []
        return archs[0] if archs else None


def kv_page_units(config: Any) -> tuple[int, int, int]:
    """``(num_key_value_heads, head_dim, units)`` of one decoder layer's KV cache, ``units = kv_heads * head_dim``.

    vLLM sizes a KV page as ``block_size * units * 2 * dtype bytes``; with one block size and one dtype for
    every model, two layers' pages are in the ratio of their units."""
    c = config.get_text_config()
    heads = int(getattr(c, "num_attention_heads"))
    kv_heads = int(getattr(c, "num_key_value_heads", None) or heads)
    head_dim = getattr(c, "head_dim", None) or c.hidden_size // heads
    return kv_heads, int(head_dim), kv_heads * int(head_dim)


def check_kv_layouts(models: Sequence[ModelInfo]) -> None:
    """Raise :class:`VllmConfigError` where vLLM could not give every model's layers one KV page size.

    vLLM (``unify_kv_cache_spec_page_size``) grows each layer's block until its page equals the largest page,
    which works only where the largest page is a whole multiple of every other (Llama-3.1-8B, 8 x 128, with
    Llama-3.2-1B, 8 x 64: yes; Llama-2-13B, 40 x 128, with Llama-2-7B, 32 x 128: no)."""
    units = [(m, *kv_page_units(m.config)) for m in models]
    largest = max(units, key=lambda u: u[3])
    for m, kv, hd, u in units:
        if largest[3] % u:
            raise VllmConfigError(
                f"vLLM cannot unify the KV cache layouts of the {largest[0].role} ({largest[0].source}: "
                f"{largest[1]} KV heads x head_dim {largest[2]} = {largest[3]} per token and layer) and the {m.role} "
                f"({m.source}: {kv} x {hd} = {u}): a KV page of one must be a whole multiple of the other's "
                f"({largest[3]} is not a multiple of {u}); pick models whose KV heads x head_dim divide each other"
            )


def _supported_architectures() -> Optional[set]:
    """vLLM's registered architectures, or ``None`` where vLLM is not installed (the check is then skipped)."""
    try:
        from vllm import ModelRegistry
    except ImportError:
        return None
    return set(ModelRegistry.get_supported_archs())


def check_architectures(models: Sequence[ModelInfo], supported: Optional[set]) -> None:
    """Every model is an ordinary checkpoint (never a proxy-tuned directory: checked with or without vLLM)
    whose architecture vLLM has (checked only where vLLM is importable: ``supported`` is None otherwise)."""
    for m in models:
        if m.architecture == ARCHITECTURE or getattr(m.config, "proxytune", None) is not None:
            raise VllmConfigError(
                f"the {m.role} ({m.source}) is itself a proxy-tuned model directory; give the checkpoints it names"
            )
    if supported is None:
        return
    for m in models:
        if m.architecture is None:
            raise VllmConfigError(f"the {m.role} ({m.source}) names no architecture in its config.json")
        if m.architecture not in supported:
            raise VllmConfigError(
                f"vLLM has no model class for the {m.role}'s architecture {m.architecture} ({m.source}); "
                "it cannot run inside the proxy-tuned model"
            )


WEIGHT_PATTERNS = ("*.safetensors", "*.bin", "*.pt", "*.pth")  # the files vLLM's default loader reads


def check_has_weights(m: ModelInfo) -> None:
    """A local checkpoint must hold weights (vLLM would fail only when it loads); hub ids are not checked."""
    path = Path(m.source)
    if path.is_dir() and not any(f.is_file() for pattern in WEIGHT_PATTERNS for f in path.glob(pattern)):
        raise VllmConfigError(
            f"the {m.role} ({m.source}) has no weights: no {', '.join(WEIGHT_PATTERNS)} file next to its config.json"
        )


def _check_not_an_input(out: Path, inputs: Sequence[tuple[str, str]]) -> None:
    """``out`` must not be (or hold, or sit inside) a checkpoint it names: writing would replace that
    checkpoint's own config.json and tokenizer."""
    target = os.path.realpath(out)
    for role, source in inputs:
        if not Path(source).is_dir():
            continue
        src = os.path.realpath(source)
        if target == src or target.startswith(src + os.sep) or src.startswith(target + os.sep):
            raise VllmConfigError(f"--output: {out} is the {role}'s directory ({source}) or overlaps it; writing "
                                  "there would replace that checkpoint's own files: give another directory")  # fmt: skip


def _check_output_dir(out: Path) -> None:
    if out.exists():
        if not out.is_dir():
            raise VllmConfigError(f"--output: {out} exists and is not a directory")
        entries = list(out.iterdir())
        if entries:
            try:
                ours = ARCHITECTURE in json.loads((out / "config.json").read_text()).get("architectures", [])
            except (OSError, ValueError):
                ours = False
            if not ours:
                raise VllmConfigError(
                    f"--output: {out} is not empty and not a proxy-tuned model directory; give a new or empty one"
                )
        writable = out
    else:
        writable = out.absolute().parent
        while not writable.exists():
            writable = writable.parent
    if not os.access(writable, os.W_OK | os.X_OK):
        raise VllmConfigError(f"--output: cannot write in {writable}")


def write_model_dir(
    output: str | os.PathLike,
    base: str,
    experts: Sequence[str],
    anti_experts: Sequence[str],
    weights: Sequence[float],
    *,
    tokenizer: Optional[str] = None,
    trust_remote_code: bool = False,
) -> dict:
    """Check the checkpoints and write the directory ``output`` that ``vllm.LLM(model=output)`` serves.

    Raises :class:`VllmConfigError` (or :class:`~proxytune.engine.vocabulary.VocabularyMismatchError`, or
    ``ValueError`` / ``OSError`` from loading a config) before writing anything. Returns the ``proxytune`` block.
    """
    import torch
    from safetensors.torch import save_file
    from transformers import AutoConfig, GenerationConfig

    from proxytune.engine.ensemble import check_pairs, common_position_limit, in_order, split_roles
    from proxytune.engine.loading import has_tokenizer_files, hub_hint, hub_kwargs, load_tokenizer, own_tokenizer, resolve_source
    from proxytune.engine.vocabulary import check_same_tokens, common_vocab_size

    check_bool(trust_remote_code, "trust_remote_code")
    try:  # the ensemble's pair rule and the one weight rule
        experts, anti_experts = check_pairs(experts, anti_experts, at_least_one=True)
        weights = check_weights(list(weights), len(experts))
    except ValueError as e:
        raise VllmConfigError(str(e)) from None
    out = Path(output)

    def source(role: str, s: str) -> str:
        if (Path(s) / "adapter_config.json").is_file() and not (Path(s) / "config.json").is_file():
            raise adapter_refusal(f"the {role} ({s})")
        r = resolve_source(s, role)
        return str(Path(r).absolute()) if Path(r).is_dir() else r

    n = len(experts)
    roles = in_order(("base", base), [(f"expert {i + 1}", e) for i, e in enumerate(experts)],
                     [(f"anti-expert {i + 1}", a) for i, a in enumerate(anti_experts)])  # fmt: skip
    sources = [(role, source(role, s)) for role, s in roles]
    tok_source = source("tokenizer", tokenizer) if tokenizer else None
    _check_not_an_input(out, sources + ([("tokenizer", tok_source)] if tok_source else []))
    _check_output_dir(out)
    models = []
    for role, src in sources:
        hub = hub_kwargs(src)
        try:
            cfg = AutoConfig.from_pretrained(src, trust_remote_code=trust_remote_code, **hub)
        except (OSError, ValueError) as e:
            message = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise VllmConfigError(f"the {role}: cannot load a config from {src!r}: {message}{hub_hint(src, hub)}") from None
        models.append(ModelInfo(role, src, cfg))
    check_architectures(models, _supported_architectures())
    for m in models:
        check_has_weights(m)
    check_kv_layouts(models)

    if tok_source is None:  # the base's, else the first model's that has one (as ProxyTuner does)
        tok_source = next((m.source for m in models if has_tokenizer_files(m.source)), None)
        if tok_source is None:
            raise VllmConfigError("no tokenizer: none of the checkpoints has tokenizer files; pass --tokenizer")
    tok = load_tokenizer(tok_source, trust_remote_code=trust_remote_code,
                         what=f"the tokenizer ({tok_source})")  # fmt: skip
    widths = [int(m.text_config.vocab_size) for m in models]
    vocab = common_vocab_size(tok, widths)
    others = []
    for m in models:
        if m.source == tok_source or not has_tokenizer_files(m.source):
            continue  # a checkpoint without tokenizer files: it uses the shared one
        own = own_tokenizer(m.source, f"the {m.role}", trust_remote_code)
        if own is not None:
            others.append((f"the {m.role} ({m.source})", own))
    check_same_tokens((f"the tokenizer ({tok_source})", tok), others, vocab)

    block = {
        "format": FORMAT,
        "base": models[0].source,
        "vocab_size": vocab,
        "pairs": [
            {"expert": e.source, "anti_expert": a.source, "weight": float(w)}
            for e, a, w in zip(*split_roles(models, n)[1:], weights)
        ],
    }
    config = models[0].config.to_dict()
    config["architectures"] = [ARCHITECTURE]
    config.pop("auto_map", None)  # the base's remote code is not this model's
    text = config.get("text_config")
    top = text if isinstance(text, dict) else config
    top["vocab_size"] = vocab
    positions = [getattr(m.text_config, "max_position_embeddings", None) for m in models]
    if all(isinstance(p, int) for p in positions):  # vLLM derives max_model_len from it: the smallest model's limit
        top["max_position_embeddings"] = common_position_limit(positions)
    config["proxytune"] = block

    try:
        generation = GenerationConfig.from_pretrained(models[0].source, **hub_kwargs(models[0].source))
    except OSError:
        generation = None  # the base has no generation_config.json: vLLM uses its defaults
    try:
        out.mkdir(parents=True, exist_ok=True)
        for stale in ("model.safetensors", "model.safetensors.index.json"):
            if (out / stale).exists():
                os.remove(out / stale)
        tok.save_pretrained(out)
        if generation is not None:
            generation.save_pretrained(out)
        save_file({WEIGHTS_TENSOR: torch.tensor(weights, dtype=torch.float32)}, str(out / WEIGHTS_FILE))
        (out / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    except OSError as e:
        raise VllmConfigError(f"--output: cannot write {e.filename or out}: {e.strerror or e}") from None
    return block


def read_block(hf_config: Any) -> dict:
    """The ``proxytune`` block of a loaded top-level config, checked."""
    block = getattr(hf_config, "proxytune", None)
    if not isinstance(block, dict) or block.get("format") != FORMAT:
        raise VllmConfigError(
            f"this config has no proxytune block of format {FORMAT}; write the directory with `proxytune vllm-config`"
        )
    return block

