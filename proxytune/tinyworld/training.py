"""Training the tiny family: model shapes, pretraining on the world's prose, instruction tuning, saving.

Plain PyTorch loops over ``LlamaForCausalLM`` on the CPU; seeded, so a rerun on the same machine and torch
gives the same weights. Models are trained in fp32 and saved in fp16 safetensors with the shared tokenizer.
"""

from __future__ import annotations

import math
import random
import time
from dataclasses import asdict, dataclass
from typing import Callable, Optional

import torch

from proxytune.tinyworld.world import QA, World

__all__ = ["ModelShape", "SHAPES", "Schedule", "new_model", "pretrain_batches", "pretrain", "finetune", "save_model"]


@dataclass(frozen=True)
class ModelShape:
    hidden_size: int
    layers: int
    heads: int
    intermediate_size: int


SHAPES = {
    "small": ModelShape(hidden_size=128, layers=2, heads=4, intermediate_size=384),
    "large": ModelShape(hidden_size=256, layers=4, heads=8, intermediate_size=704),
}


@dataclass(frozen=True)
class Schedule:
    steps: int
    batch_size: int
    lr: float
    warmup: int = 50
    min_lr_ratio: float = 0.1
    weight_decay: float = 0.0

    def lr_at(self, step: int) -> float:
        if step < self.warmup:
            return self.lr * (step + 1) / self.warmup
        t = (step - self.warmup) / max(1, self.steps - self.warmup)
        return self.lr * (self.min_lr_ratio + (1 - self.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * t)))


def new_model(shape: ModelShape, tokenizer, seed: int, max_positions: int = 256):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=shape.hidden_size, intermediate_size=shape.intermediate_size,
        num_hidden_layers=shape.layers, num_attention_heads=shape.heads, num_key_value_heads=shape.heads,
        max_position_embeddings=max_positions, tie_word_embeddings=True, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id, bos_token_id=None,
    )  # fmt: skip
    return LlamaForCausalLM(config)


def pretrain_batches(world: World, tokenizer, schedule: Schedule, seq_len: int, seed: int) -> torch.Tensor:
    """``[steps, batch, seq_len]`` token ids: the world's prose, paragraphs joined by EOS, packed densely."""
    need = schedule.steps * schedule.batch_size * seq_len
    eos = tokenizer.eos_token_id
    ids: list[int] = []
    chunk = 0
    while len(ids) < need:
        texts = list(world.corpus(4096, seed=seed * 1_000_003 + chunk))
        for row in tokenizer(texts)["input_ids"]:
            ids += row + [eos]
        chunk += 1
    return torch.tensor(ids[:need]).view(schedule.steps, schedule.batch_size, seq_len)


def _optimizer(model, schedule: Schedule):
    return torch.optim.AdamW(model.parameters(), lr=schedule.lr, betas=(0.9, 0.98), weight_decay=schedule.weight_decay)


def _train(model, schedule: Schedule, loss_at: Callable[[int], torch.Tensor], phase: str,
           log: Optional[Callable[[str], None]]) -> dict:  # fmt: skip
    """The loop both phases share: AdamW with the schedule's learning rate, clipping, a loss curve averaged
    over every 50 steps. ``loss_at(step)`` computes the step's loss. Returns the curve and the wall time."""
    opt = _optimizer(model, schedule)
    model.train()
    t0, curve, run = time.time(), [], 0.0
    for step in range(schedule.steps):
        for g in opt.param_groups:
            g["lr"] = schedule.lr_at(step)
        loss = loss_at(step)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        run += loss.item()
        if (step + 1) % 50 == 0 or step + 1 == schedule.steps:
            n = (step % 50) + 1
            curve.append((step + 1, round(run / n, 4)))
            if log:
                log(f"{phase} step {step + 1}/{schedule.steps} loss {run / n:.3f} ({time.time() - t0:.0f} s)")
            run = 0.0
    model.eval()
    return {"loss_curve": curve, "seconds": round(time.time() - t0, 1), "schedule": asdict(schedule)}


def pretrain(model, batches: torch.Tensor, schedule: Schedule, log: Optional[Callable[[str], None]] = None) -> dict:
    """Next-token loss on every position. Returns the loss curve (every 50 steps) and the wall time."""
    return _train(model, schedule, lambda step: model(input_ids=batches[step], labels=batches[step]).loss, "pretrain", log)


def instruction_example(tokenizer, qa: QA) -> tuple[list[int], list[int]]:
    """Prompt ids (as the engine encodes a prompt) and target ids: the answer, a newline, EOS."""
    prompt = tokenizer(qa.prompt)["input_ids"]
    target = tokenizer(qa.answer + "\n")["input_ids"] + [tokenizer.eos_token_id]
    return prompt, target


def finetune(model, tokenizer, data: list[QA], schedule: Schedule, seed: int,
             log: Optional[Callable[[str], None]] = None) -> dict:  # fmt: skip
    """Instruction tuning: loss on the answer tokens only, right-padded batches drawn by a seeded shuffle."""
    examples = [instruction_example(tokenizer, qa) for qa in data]
    rng = random.Random(seed)
    order: list[int] = []

    def loss_at(step: int) -> torch.Tensor:
        if len(order) < schedule.batch_size:
            more = list(range(len(examples)))
            rng.shuffle(more)
            order.extend(more)
        batch = [examples[i] for i in order[: schedule.batch_size]]
        del order[: schedule.batch_size]
        width = max(len(p) + len(t) for p, t in batch)
        ids = torch.full((len(batch), width), tokenizer.pad_token_id)
        labels = torch.full((len(batch), width), -100)
        mask = torch.zeros((len(batch), width), dtype=torch.long)
        for r, (p, t) in enumerate(batch):
            n = len(p) + len(t)
            ids[r, :n] = torch.tensor(p + t)
            labels[r, len(p) : n] = torch.tensor(t)
            mask[r, :n] = 1
        return model(input_ids=ids, attention_mask=mask, labels=labels).loss

    return _train(model, schedule, loss_at, "finetune", log)


def save_model(model, tokenizer, directory, info: dict) -> None:
    """A standard Hugging Face directory: config, fp16 safetensors, tokenizer, and ``training_info.json``."""
    import copy
    import json
    import os

    os.makedirs(directory, exist_ok=True)
    half = copy.deepcopy(model).to(torch.float16)
    half.generation_config.eos_token_id = tokenizer.eos_token_id
    half.generation_config.pad_token_id = tokenizer.pad_token_id
    half.save_pretrained(directory, safe_serialization=True)
    tokenizer.save_pretrained(directory)
    with open(os.path.join(directory, "training_info.json"), "w") as f:
        json.dump(info, f, indent=1)
        f.write("\n")
