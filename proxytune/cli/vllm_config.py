"""``proxytune vllm-config``: write the proxy-tuned model directory that vLLM serves
(:mod:`proxytune.integrations.vllm.config`)."""

from __future__ import annotations

import argparse

from proxytune.cli.args import CliError, Once, nonempty
from proxytune.cli.models import add_model_flags, pairs

__all__ = ["add_vllm_config_parser"]


def _vllm_config(args: argparse.Namespace) -> int:
    from proxytune.integrations.vllm.config import adapter_refusal, write_model_dir

    if args.expert_adapter:
        raise CliError(str(adapter_refusal(f"--expert-adapter {args.expert_adapter[0]}")))
    experts, antis, weights = pairs(args, required=True)

    block = write_model_dir(  # its errors (VllmConfigError, vocabulary, loading) are ValueErrors: one line each
        args.output, args.base, experts, antis, weights,
        tokenizer=args.tokenizer, trust_remote_code=args.trust_remote_code,
    )  # fmt: skip
    pairs_text = ", ".join(f"{p['weight']:g} x ({p['expert']} - {p['anti_expert']})" for p in block["pairs"])
    print(f"{args.output}: {block['base']} + {pairs_text}, vocabulary {block['vocab_size']}")
    return 0


def add_vllm_config_parser(sub) -> None:
    vc = sub.add_parser(
        "vllm-config", help="write a model directory that vLLM serves as base + alpha * (expert - anti_expert)",
        description="Check the checkpoints (one shared vocabulary, architectures vLLM has, KV cache layouts vLLM "
        "can unify) and write DIR: a config.json naming them and the weights, the shared tokenizer and a small "
        "weights file. vllm.LLM(model=DIR) and vLLM's OpenAI server load it through the proxytune plugin.",
    )  # fmt: skip
    add_model_flags(vc, loading=False)
    vc.add_argument("--output", "-o", required=True, type=nonempty("a directory"), action=Once,
                    help="the directory to write (new, empty, or one this command wrote before)")  # fmt: skip
    vc.set_defaults(run=_vllm_config)
