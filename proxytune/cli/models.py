"""The model flags of ``generate``, ``score`` and ``vllm-config``: declared, checked before anything loads,
and turned into a :class:`proxytune.engine.ProxyTuner`."""

from __future__ import annotations

import argparse
from typing import Optional

from proxytune.cli.args import ALPHA, CliError, Once, dtype, nonempty, one_line, text
from proxytune.engine.remote_base import check_block, check_logprobs, check_tail_choice
from proxytune.remote.client import check_url

__all__ = ["add_model_flags", "check_base", "pairs", "check_devices_and_backend", "load_tuner"]


def add_model_flags(p: argparse.ArgumentParser, *, loading: bool = True) -> None:
    """The models' flags (``loading``: also devices, dtype, templates and the backend, which only the commands
    that load the models take)."""
    model = nonempty("a directory or hub id")
    p.add_argument("--base", required=not loading, type=model, action=Once,
                   help="the base model (directory or hub id)" + ("; or --base-url" if loading else ""))  # fmt: skip
    p.add_argument("--expert", action=PairFlag, type=model, help="a tuned small model; repeat for several pairs")
    p.add_argument("--expert-adapter", action=PairFlag, type=model, metavar="DIR",
                   help="a LoRA adapter (PEFT directory) as an expert: its base, with and without it, in one forward; "
                        "repeatable; its --anti-expert may be left out (the adapter's recorded base)")  # fmt: skip
    p.add_argument("--anti-expert", action=AntiFlag, type=model,
                   help="the expert's untuned counterpart: one per pair in order, or one per --expert only, each "
                        "after its --expert")  # fmt: skip
    p.add_argument("--alpha", type=ALPHA, action="append",
                   help="weight of (expert - anti-expert): one for all pairs or one per pair (default 1.0)")  # fmt: skip
    p.add_argument("--tokenizer", default=None, type=model, action=Once, help="the shared tokenizer (default: the base's)")
    p.add_argument("--trust-remote-code", action="store_true", help="allow models' own Python code (off by default)")
    if not loading:
        return
    p.add_argument("--expert-template", default=None, type=text,
                   help="how experts see the prompt: 'chat' (their tokenizer's chat template) or a text with {prompt}")  # fmt: skip
    p.add_argument("--device", default=None, help="device of every model (default: cuda if available, else cpu)")
    p.add_argument("--base-device", default=None, help="device of the base only")
    p.add_argument("--expert-device", default=None, help="device of the experts and anti-experts")
    p.add_argument("--dtype", default=None, type=dtype,
                   help="float32, bfloat16 or float16 (default: float32 on CPU, bfloat16 on GPU)")  # fmt: skip
    p.add_argument("--backend", default="auto", help="op backend (auto, reference, cpu, triton)")
    served = p.add_argument_group("a served base, instead of --base (an OpenAI-compatible completions server such as "
                                  "vLLM; API key from PROXYTUNE_API_KEY or OPENAI_API_KEY)")  # fmt: skip
    served.add_argument("--base-url", type=_remote_rule(check_url, "--base-url"), action=Once,
                        help="the server, e.g. http://host:8000")  # fmt: skip
    served.add_argument("--base-model", type=nonempty("a model name"), action=Once,
                        help="the served model's name (default: the one the server serves)")  # fmt: skip
    served.add_argument("--base-logprobs", type=_remote_rule(check_logprobs, "--base-logprobs"), action=Once,
                        metavar="K|all", help="top-k log-probs per position, or all (the whole vocabulary: equals a "
                        "local base; the server needs --max-logprobs -1); default 20")  # fmt: skip
    served.add_argument("--base-tail", type=_remote_rule(check_tail_choice, "--base-tail"), action=Once,
                        metavar="drop|floor", help="tokens outside the top k: drop (cannot be drawn; default) or "
                        "floor (the smallest returned log-prob)")  # fmt: skip
    served.add_argument("--base-block", type=_remote_rule(lambda v, name: check_block(v, "drop", name), "--base-block"),
                        action=Once, metavar="N|adaptive", help="tokens the server drafts per request, verified by "
                        "the local pair (1: one request per token); default adaptive (4 up to 16; 1 with floor)")  # fmt: skip


def _remote_rule(check, flag: str):
    """An argparse ``type=`` for a served-base flag by the engine's own rule (``engine/remote_base.py``, the
    client's ``check_url``)."""

    def parse(value: str):
        try:
            return check(value, flag)
        except ValueError as e:
            raise argparse.ArgumentTypeError(str(e).removeprefix(flag + " ")) from None

    parse.__name__ = "value"
    return parse


def check_base(args: argparse.Namespace) -> None:
    """Exactly one base: ``--base`` or ``--base-url``; the served base's flags only with ``--base-url``, and
    ``--base-block`` by the tail rule (checked before anything loads)."""
    url = getattr(args, "base_url", None)
    if args.base is None and url is None:
        raise CliError(f"{args.command} needs a base: --base (a model) or --base-url (a served model)")
    if args.base is not None and url is not None:
        raise CliError("--base and --base-url: give one base (a model, or a server's)")
    served = [f for f in ("--base-model", "--base-logprobs", "--base-tail", "--base-block")
              if getattr(args, f[2:].replace("-", "_"), None) is not None]  # fmt: skip
    if url is None and served:
        raise CliError(f"{served[0]} needs --base-url (it applies to a served base)")
    if url is not None and args.base_device is not None:
        raise CliError("--base-device applies to a local --base; a served base runs on its server")
    if url is not None:
        tail = "all" if args.base_logprobs == "all" else (args.base_tail or "drop")
        try:
            check_block(args.base_block, tail, "--base-block", "--base-tail")
        except ValueError as e:
            raise CliError(str(e)) from None


class PairFlag(argparse._AppendAction):
    """``--expert`` / ``--expert-adapter``: appended to its own list and, tagged, to ``args.pair_flags`` (the
    pairs in command-line order, which ``--anti-expert`` and ``--alpha`` follow)."""

    def __call__(self, parser, namespace, values, option_string=None):
        super().__call__(parser, namespace, values, option_string)
        namespace.pair_flags = (getattr(namespace, "pair_flags", None) or []) + [(self.dest, values)]


class AntiFlag(argparse._AppendAction):
    """``--anti-expert``: appended, and how many pair flags came before it to ``args.anti_after``."""

    def __call__(self, parser, namespace, values, option_string=None):
        super().__call__(parser, namespace, values, option_string)
        namespace.anti_after = (getattr(namespace, "anti_after", None) or []) + [len(getattr(namespace, "pair_flags", None) or [])]


def _check_short_form(order: list, adapters: list[bool], anti: list, after: list[int]) -> None:
    """With ``--expert-adapter`` in the command and one ``--anti-expert`` per ``--expert`` only (the adapters
    take their recorded bases), the k-th ``--anti-expert`` pairs with the k-th ``--expert``: it must come after
    it, or a forgotten anti-expert would pair the others silently with the wrong experts."""
    if not any(adapters) or len(anti) == len(order) or len(anti) != len(order) - sum(adapters):
        return
    plain = [j for j, a in enumerate(adapters) if not a]
    for k, (j, seen) in enumerate(zip(plain, after)):
        if seen <= j:
            raise CliError(f"--anti-expert {anti[k]}: given before --expert {order[j][1]}, the expert it pairs with "
                           "(with --expert-adapter, one --anti-expert per --expert pairs each with an --expert "
                           "before it; the adapters take their recorded bases): move it after its --expert, or "
                           "give one --anti-expert per pair")  # fmt: skip


def pairs(args: argparse.Namespace, *, required: bool = False) -> tuple[list, list[str], list[float]]:
    """``(experts, anti_experts, one weight per pair)`` from the flags, checked before anything loads: an
    expert is a model's directory or hub id, or an :class:`~proxytune.engine.adapters.Adapter` read from
    ``--expert-adapter`` (its anti-expert, when not given, the adapter's recorded base found here). The
    anti-experts pair up by the ensemble's rule (:func:`~proxytune.engine.adapter_experts.pair_anti_experts`)."""
    order = getattr(args, "pair_flags", None) or []
    adapters = [dest == "expert_adapter" for dest, _ in order]
    if required and not order:
        raise CliError(f"{args.command} needs at least one --expert and --anti-expert pair")
    from proxytune.engine.adapter_experts import pair_anti_experts

    _check_short_form(order, adapters, args.anti_expert or [], getattr(args, "anti_after", None) or [])
    try:
        antis = pair_anti_experts(adapters, args.anti_expert or [], experts_name="--expert",
                                  adapters_name="--expert-adapter", anti_name="--anti-expert")  # fmt: skip
    except ValueError as e:
        raise CliError(str(e)) from None
    for flag, value in (("--alpha", args.alpha), ("--expert-template", getattr(args, "expert_template", None))):
        if value is not None and not order:
            raise CliError(f"{flag} needs --expert and --anti-expert (it applies to the expert pairs)")
    alphas = args.alpha or [1.0]
    if len(alphas) not in (1, len(order)):
        raise CliError(f"--alpha: give one for all pairs or one per pair ({len(order)}), got {len(alphas)}")
    experts = [value for _, value in order]
    if any(adapters):
        experts, antis = _read_adapters(experts, antis, adapters)
    return experts, antis, alphas * len(order) if len(alphas) == 1 else alphas


def _read_adapters(experts: list, antis: list, adapters: list[bool]) -> tuple[list, list]:
    """Each ``--expert-adapter`` read (its files and config checked), and its anti-expert, when not given, the
    adapter's recorded base found on this machine: errors name the flags."""
    from proxytune.engine.adapter_members import recorded_base_of
    from proxytune.engine.adapters import read_adapter

    experts = [read_adapter(e, "--expert-adapter") if a else e for e, a in zip(experts, adapters)]
    antis = [recorded_base_of([e], "--anti-expert") if x is None else x for e, x in zip(experts, antis)]
    return experts, antis


def _check_device(flag: str, value: Optional[str]):
    """``torch.device(value)`` if this machine has it (the engine's rule, :func:`proxytune.engine.loading.
    check_device`, plus other device types and indices past the count), else a CliError naming ``flag``."""
    import torch

    from proxytune.engine.loading import check_device

    try:
        device = check_device(value, flag)
    except ValueError as e:
        raise CliError(one_line(str(e))) from None
    if device is None or device.type == "cpu":
        return device
    module = getattr(torch, device.type, None)
    available = getattr(module, "is_available", None)
    if not callable(available) or not available():
        raise CliError(f"{flag}: no {device.type} device to run models on here (got {value!r})")
    count = getattr(module, "device_count", None)
    if device.index is not None and callable(count) and device.index >= count():
        raise CliError(f"{flag}: {value} does not exist; this machine has {count()} {device.type} device(s)")
    return device


def check_devices_and_backend(args: argparse.Namespace) -> None:
    """The device flags and the backend, checked (cheaply) before the models load."""
    import torch

    from proxytune import backends

    device = _check_device("--device", args.device)
    base_device = _check_device("--base-device", args.base_device) or device
    _check_device("--expert-device", args.expert_device)
    try:
        backends.resolve(args.backend, base_device or torch.device("cuda" if torch.cuda.is_available() else "cpu"))
    except (ValueError, backends.BackendUnavailableError) as e:
        raise CliError(f"--backend: {e}") from None


def load_tuner(args: argparse.Namespace, experts, antis, weights, progress: bool, **options):
    """The ProxyTuner of the model flags (transformers' own progress bars off unless ``progress``)."""
    from proxytune.engine import ModelSpec, ProxyTuner

    if not progress:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()  # transformers' own "Loading weights" bars
    small_device = args.expert_device or args.device
    base = ModelSpec(args.base, device=args.base_device or args.device)
    if getattr(args, "base_url", None) is not None:  # a served base: Ensemble.load asks its server before loading
        from proxytune.engine.remote_base import RemoteModel

        base = RemoteModel(args.base_url, args.base_model, logprobs=args.base_logprobs or 20,
                           tail=args.base_tail or "drop", block=args.base_block)  # fmt: skip
    return ProxyTuner(
        base,
        [ModelSpec(e, device=small_device, template=args.expert_template) if isinstance(e, str)  # an adapter:
         else ModelSpec(adapter=e, device=small_device, template=args.expert_template) for e in experts],  # read
        [ModelSpec(a, device=small_device) for a in antis],
        weights=weights, tokenizer=args.tokenizer, dtype=args.dtype, trust_remote_code=args.trust_remote_code,
        backend=args.backend, progress=progress, **options,
    )  # fmt: skip
