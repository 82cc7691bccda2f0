"""Train the tiny family: ``python -m proxytune.tinyworld.train`` (the command the shipped models record).

One tokenizer, then for each size (small, large): pretrain a base on the world's prose, save it, fine-tune a
copy on the instruction data (tuning entities only) and save that. Both sizes see the same token stream and
the same instruction batches. Each directory records the command, seeds, recipe and wall times in
``training_info.json``. The shipped bases: ``--answered-prose --entities 600 --tune-entities 400
--pretrain-steps 1000``, ``--sizes small`` and ``--sizes large`` in two parallel processes (see the README).
``--finetune-from DIR`` skips pretraining: it tunes copies of the bases in DIR (with their tokenizer and
world) and writes them, with the bases, to ``--out``.
"""

from __future__ import annotations

import argparse
import copy
import os
import platform
import shlex
import sys
import time

import torch

from proxytune.tinyworld import MODEL_NAMES, default_models_dir
from proxytune.tinyworld.tokenizer import train_tokenizer
from proxytune.tinyworld.training import SHAPES, Schedule, finetune, new_model, pretrain, pretrain_batches, save_model
from proxytune.tinyworld.world import make_world, world_from_config


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default=str(default_models_dir()), help="where the four model directories go")
    p.add_argument("--seed", type=int, default=0, help="seed of the world, the corpus, the weights and the batches")
    p.add_argument("--entities", type=int, default=1500)
    p.add_argument("--tune-entities", type=int, default=1000)
    p.add_argument("--answered-prose", action="store_true", help="pretraining prose also answers questions in passing")
    p.add_argument("--asked-prose", action="store_true",
                   help="pretraining prose also asks the evaluation's questions and answers them informally")
    p.add_argument("--line-breaks", action="store_true", help="prose sentences sometimes end a line")
    p.add_argument("--vocab-size", type=int, default=1024)
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--pretrain-steps", type=int, default=2200)
    p.add_argument("--pretrain-batch", type=int, default=16)
    p.add_argument("--pretrain-lr", type=float, default=2e-3)
    p.add_argument("--finetune-steps", type=int, default=300)
    p.add_argument("--finetune-batch", type=int, default=32)
    p.add_argument("--finetune-lr", type=float, default=3e-4)
    p.add_argument("--sizes", default="small,large")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--finetune-from", default=None, metavar="DIR",
                   help="skip pretraining: tune the bases of the family in DIR (its world and tokenizer too)")
    args = p.parse_args(argv)
    if args.finetune_from:
        return _finetune_only(args, argv)

    torch.set_num_threads(args.threads)
    t_start = time.time()
    log = lambda s: print(f"[{time.time() - t_start:7.1f} s] {s}", flush=True)  # noqa: E731
    world = make_world(args.seed, args.entities, args.tune_entities, args.answered_prose, args.asked_prose, args.line_breaks)
    instructions = world.questions(world.tune_ids, "all")
    sample_text = list(world.corpus(20000, seed=args.seed + 7)) + [q.prompt + q.answer + "\n" for q in instructions]
    tokenizer = train_tokenizer(sample_text, args.vocab_size)
    log(f"tokenizer: {len(tokenizer)} tokens")
    pre = Schedule(args.pretrain_steps, args.pretrain_batch, args.pretrain_lr)
    fin = Schedule(args.finetune_steps, args.finetune_batch, args.finetune_lr, warmup=20)
    batches = pretrain_batches(world, tokenizer, pre, args.seq_len, seed=args.seed)
    log(f"pretraining data: {batches.numel():,} tokens")
    common = {
        "command": _command(argv),
        "args": {k: v for k, v in vars(args).items() if k != "out"},
        "world": {"seed": args.seed, "entities": args.entities, "tune_entities": args.tune_entities,
                  "answered_prose": args.answered_prose, "asked_prose": args.asked_prose, "line_breaks": args.line_breaks},
        "machine": {"python": platform.python_version(), "torch": torch.__version__, "cpu": platform.processor() or platform.machine(),
                    "threads": args.threads},
    }  # fmt: skip
    for size in args.sizes.split(","):
        model = new_model(SHAPES[size], tokenizer, seed=args.seed + (1 if size == "small" else 2))
        n_params = sum(p.numel() for p in model.parameters())
        log(f"{size}: {n_params:,} parameters, pretraining")
        pre_info = pretrain(model, batches, pre, log=log)
        info = dict(common, size=size, shape=SHAPES[size].__dict__, parameters=n_params, pretrain=pre_info)
        save_model(model, tokenizer, os.path.join(args.out, MODEL_NAMES[f"{size}_base"]), dict(info, role=f"{size} base"))
        tuned = copy.deepcopy(model)
        log(f"{size}: instruction tuning on {len(instructions)} questions about {world.n_tune} entities")
        fin_info = finetune(tuned, tokenizer, instructions, fin, seed=args.seed + 3, log=log)
        save_model(tuned, tokenizer, os.path.join(args.out, MODEL_NAMES[f"{size}_tuned"]),
                   dict(info, role=f"{size} tuned", finetune=fin_info))  # fmt: skip
    log("done")
    return 0


def _command(argv) -> str:
    return "python -m proxytune.tinyworld.train " + " ".join(shlex.quote(a) for a in (argv if argv is not None else sys.argv[1:]))


def _finetune_only(args, argv) -> int:
    import json
    import shutil

    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.set_num_threads(args.threads)
    t_start = time.time()
    log = lambda s: print(f"[{time.time() - t_start:7.1f} s] {s}", flush=True)  # noqa: E731
    fin = Schedule(args.finetune_steps, args.finetune_batch, args.finetune_lr, warmup=20)
    for size in args.sizes.split(","):
        base_dir = os.path.join(args.finetune_from, MODEL_NAMES[f"{size}_base"])
        with open(os.path.join(base_dir, "training_info.json")) as f:
            info = json.load(f)
        world = world_from_config(info["world"])
        instructions = world.questions(world.tune_ids, "all")
        tokenizer = AutoTokenizer.from_pretrained(base_dir)
        out_base = os.path.join(args.out, MODEL_NAMES[f"{size}_base"])
        if os.path.abspath(out_base) != os.path.abspath(base_dir):
            shutil.copytree(base_dir, out_base, dirs_exist_ok=True)
        tuned = AutoModelForCausalLM.from_pretrained(base_dir, dtype="float32")
        log(f"{size}: instruction tuning on {len(instructions)} questions about {world.n_tune} entities")
        fin_info = finetune(tuned, tokenizer, instructions, fin, seed=world.seed + 3, log=log)
        save_model(tuned, tokenizer, os.path.join(args.out, MODEL_NAMES[f"{size}_tuned"]),
                   dict(info, role=f"{size} tuned", finetune=fin_info, finetune_command=_command(argv),
                        finetuned_from=f"{size} base as saved (fp16, loaded in fp32)"))  # fmt: skip
    log("done")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
