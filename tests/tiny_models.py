"""Tiny causal LMs and a tiny tokenizer built locally, for the engine's tests and benchmarks (no downloads).

``tiny_tokenizer()`` trains a byte-level BPE of 320 ids (five special tokens, a chat template) on a few
sentences; ``tiny_model(kind, vocab_size, seed)`` builds a random-weight Llama, Qwen2 or GPT-2 with two
layers. Weights are drawn with a larger spread than the usual 0.02 so the next-token logits have clear
gaps (greedy comparisons then do not hinge on the last bit of a float).
"""

from __future__ import annotations

import os
from typing import Optional

import torch

SPECIAL_TOKENS = ["<pad>", "<s>", "</s>", "<|user|>", "<|assistant|>"]
PAD_ID, BOS_ID, EOS_ID = 0, 1, 2
CHAT_TEMPLATE = (
    "{% for m in messages %}<|user|>{{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)
CORPUS = [
    "the quick brown fox jumps over the lazy dog",
    "hello world, this is a tiny tokenizer for tests",
    "proxy tuning steers a large model with small ones",
    "once upon a time there was a model that wrote stories",
]
PROMPTS = ["hello world", "the quick brown fox jumps over", "a", "proxy tuning steers a large model with"]


def tiny_tokenizer(vocab_size: int = 320, corpus: Optional[list[str]] = None, chat_template: bool = True):
    """A ``PreTrainedTokenizerFast``: byte-level BPE, BOS prepended, ids 0..4 = pad, <s>, </s>, <|user|>, <|assistant|>."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator((corpus or CORPUS) * 10, trainer)
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", BOS_ID)])
    hf = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>")
    if chat_template:
        hf.chat_template = CHAT_TEMPLATE
    return hf


def tiny_config(kind: str, vocab_size: int = 320, hidden: int = 32, layers: int = 2, heads: int = 4,
                intermediate: Optional[int] = None, std: float = 0.2):  # fmt: skip
    """A config for ``kind`` in {"llama", "qwen2", "gpt2"} with the tiny tokenizer's special ids."""
    from transformers import GPT2Config, LlamaConfig, Qwen2Config

    special = dict(bos_token_id=BOS_ID, eos_token_id=EOS_ID, pad_token_id=PAD_ID)
    intermediate = intermediate or 2 * hidden
    if kind == "llama":
        return LlamaConfig(vocab_size=vocab_size, hidden_size=hidden, intermediate_size=intermediate,
                           num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=max(1, heads // 2),
                           max_position_embeddings=512, initializer_range=std, **special)  # fmt: skip
    if kind == "qwen2":
        return Qwen2Config(vocab_size=vocab_size, hidden_size=hidden, intermediate_size=intermediate,
                           num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=max(1, heads // 2),
                           max_position_embeddings=512, initializer_range=std, tie_word_embeddings=False,
                           **special)  # fmt: skip
    if kind == "gpt2":
        return GPT2Config(vocab_size=vocab_size, n_embd=hidden, n_layer=layers, n_head=heads, n_positions=512,
                          n_inner=intermediate, initializer_range=std, **special)  # fmt: skip
    raise ValueError(f"unknown kind {kind!r}")


def tiny_model(kind: str = "llama", vocab_size: int = 320, seed: int = 0, **config_kwargs):
    """A random-weight causal LM in eval mode (fp32, CPU); the same ``seed`` gives the same weights."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_config(kind, vocab_size, **config_kwargs))
    model.generation_config.pad_token_id = PAD_ID
    model.generation_config.eos_token_id = EOS_ID
    model.generation_config.bos_token_id = BOS_ID
    return model.eval()


KINDS = ("llama", "qwen2", "gpt2")


def tiny_trio(kind: str = "llama") -> tuple:
    """(base, expert, anti-expert): three ``kind`` models with different random weights (seeds 0, 1, 2)."""
    return tuple(tiny_model(kind, seed=s) for s in (0, 1, 2))


def save_tiny(directory: str | os.PathLike, kind: str = "llama", vocab_size: int = 320, seed: int = 0,
              tokenizer=None, **config_kwargs) -> str:  # fmt: skip
    """Save a tiny model and its tokenizer to ``directory`` (safetensors) and return the path as a string."""
    model = tiny_model(kind, vocab_size, seed, **config_kwargs)
    model.save_pretrained(directory)
    (tokenizer or tiny_tokenizer()).save_pretrained(directory)
    return str(directory)


def save_trio(root, kinds=("llama", "llama", "llama")) -> dict[str, str]:
    """A base, an expert and an anti-expert (seeds 0, 1, 2) saved under ``root``: ``{"base", "expert", "anti"}``."""
    return {name: save_tiny(os.path.join(root, name), kind, seed=seed)
            for (name, seed), kind in zip((("base", 0), ("expert", 1), ("anti", 2)), kinds)}  # fmt: skip


def trio_args(command: str, dirs: dict[str, str], *extra: str) -> list[str]:
    """``proxytune COMMAND`` over a :func:`save_trio`, quiet."""
    return [command, "--base", dirs["base"], "--expert", dirs["expert"], "--anti-expert", dirs["anti"], "-q", *extra]


def save_lora_adapter(small, directory, seed: int, r: int, targets, recorded: str) -> str:
    """A LoRA adapter made by PEFT on a copy of ``small`` (rank ``r`` on ``targets``, random non-zero ``B`` so
    it matters), recording ``recorded`` as its base, saved to ``directory`` (safetensors)."""
    import copy

    import peft

    torch.manual_seed(seed)
    config = peft.LoraConfig(r=r, lora_alpha=2 * r, target_modules=list(targets), lora_dropout=0.0,
                             init_lora_weights=False, task_type="CAUSAL_LM")  # fmt: skip
    model = peft.get_peft_model(copy.deepcopy(small), config)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.3)
    model.peft_config["default"].base_model_name_or_path = recorded
    model.save_pretrained(directory, safe_serialization=True)
    return str(directory)


LORA_ADAPTERS = ((2, 4, ("q_proj", "v_proj", "down_proj")), (3, 8, ("k_proj", "o_proj", "gate_proj", "up_proj")))


def save_lora_family(root) -> dict:
    """On disk under ``root``, with the tiny tokenizer: a large base ``"big"`` (Llama, hidden 64), a small base
    ``"small"``, two LoRA adapters on it recording it as their base (``"adapters"``, seeds and shapes
    :data:`LORA_ADAPTERS`), and each merged into a copy of it (``"merged"``: the two-model path's experts)."""
    import copy

    import peft

    big, small = tiny_model("llama", seed=0, hidden=64), tiny_model("llama", seed=1)
    out = {"big": os.path.join(root, "big"), "small": os.path.join(root, "small"), "adapters": [], "merged": []}
    for name, model in (("big", big), ("small", small)):
        model.save_pretrained(out[name])
        tiny_tokenizer().save_pretrained(out[name])
    for i, (seed, r, targets) in enumerate(LORA_ADAPTERS):
        d = save_lora_adapter(small, os.path.join(root, f"lora{i}"), seed, r, targets, out["small"])
        merged = peft.PeftModel.from_pretrained(copy.deepcopy(small), d).merge_and_unload()
        out["adapters"].append(d)
        out["merged"].append(os.path.join(root, f"merged{i}"))
        merged.save_pretrained(out["merged"][-1])
        tiny_tokenizer().save_pretrained(out["merged"][-1])
    return out
