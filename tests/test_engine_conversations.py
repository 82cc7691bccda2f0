"""A prompt may be a conversation: the chat expert sees every turn in its chat template, the other models
the messages' contents, one per line; the generated ids are shared as for text prompts."""

import pytest

from proxytune import ModelSpec, ProxyTuner
from proxytune.testing import ForwardInputs
from tiny_models import tiny_trio

CONVERSATION = [
    {"role": "user", "content": "hello world"},
    {"role": "assistant", "content": "the quick brown fox"},
    {"role": "user", "content": "proxy tuning"},
]


def test_a_multi_turn_conversation_reaches_the_chat_expert_whole(tok):
    base, expert, anti = tiny_trio("llama")
    tuner = ProxyTuner(base, ModelSpec(expert, template="chat"), anti, tokenizer=tok)
    seen = {name: ForwardInputs(m) for name, m in [("base", base), ("expert", expert), ("anti", anti)]}
    try:
        single = tuner.generate(CONVERSATION, temperature=0, max_new_tokens=3)
        batch = tuner.generate([CONVERSATION, "hello world"], temperature=0, max_new_tokens=3)
    finally:
        for s in seen.values():
            s.handle.remove()
    chat_text = tok.apply_chat_template(CONVERSATION, tokenize=False, add_generation_prompt=True)
    assert all(m["content"] in chat_text for m in CONVERSATION)  # every turn, not only the last
    assert seen["expert"].seen[0][0].tolist() == tok(chat_text, add_special_tokens=False).input_ids
    plain = tok("hello world\nthe quick brown fox\nproxy tuning").input_ids
    assert seen["base"].seen[0][0].tolist() == plain == seen["anti"].seen[0][0].tolist()
    assert len(single.token_ids) == 3 and single.prompt == CONVERSATION
    assert batch[0].token_ids == single.token_ids  # a conversation in a batch is one prompt


def test_bad_messages_are_named(tok):
    base, expert, anti = tiny_trio("llama")
    tuner = ProxyTuner(base, ModelSpec(expert, template="chat"), anti, tokenizer=tok)
    with pytest.raises(TypeError, match="prompt 0: message 1 must have a string 'role' and a string 'content'"):
        tuner.generate([{"role": "user", "content": "hi"}, {"role": "user"}], max_new_tokens=2)
    with pytest.raises(TypeError, match="prompt 1: message 0 must have a string 'role' and a string 'content'"):
        tuner.generate(["fine", [{"role": "user", "content": 5}]], max_new_tokens=2)
