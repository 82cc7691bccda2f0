"""Incremental detokenisation and stop strings (``proxytune.engine.stopping.RowText``)."""

from proxytune.engine.stopping import RowText


def feed(tok, text, stop=(), prompt="hello"):
    row = RowText(tok, tok(prompt).input_ids, stop)
    streamed, n = [], 0
    for t in tok(text, add_special_tokens=False).input_ids:
        n += 1
        done = row.add(t)
        streamed.append(row.take_stream(final=done))
        if done:
            break
    if not row.stopped:
        row.flush()
        streamed.append(row.take_stream(final=True))
    return row, "".join(streamed), n


def test_incremental_text_equals_the_full_decode(tok):
    text = " the quick brown fox, héllo wörld ✓ 你好"  # multi-byte characters split over byte-level tokens
    row, streamed, _ = feed(tok, text)
    assert row.text == text == streamed


def test_stop_string_cuts_the_text_and_ends_at_its_token(tok):
    row, streamed, n = feed(tok, " the quick brown fox jumps over", stop=["brown f", "zzz"])
    assert row.stopped and row.text == " the quick " == streamed
    ids = tok(" the quick brown fox jumps over", add_special_tokens=False).input_ids
    assert "brown f" in tok.decode(ids[:n]) and "brown f" not in tok.decode(ids[: n - 1])


def test_streaming_holds_back_a_possible_stop_string(tok):
    row = RowText(tok, [], stop=["fox!"])
    out = []
    for t in tok(" the fox jumps", add_special_tokens=False).input_ids:
        row.add(t)
        out.append(row.take_stream(final=False))
        assert "".join(out) == row.text[: len("".join(out))]
    # "fox" may still become "fox!": never streamed before the next character decides it
    row2 = RowText(tok, [], stop=["fox!"])
    for t in tok(" the fox", add_special_tokens=False).input_ids:
        row2.add(t)
    assert row2.take_stream(final=False) == " the " and row2.take_stream(final=True) == "fox"
    assert not row.stopped and "".join(out) + row.take_stream(final=True) == " the fox jumps"


def test_random_byte_soup_streams_exactly_and_stops_at_the_first_stop_string(tok):
    """Random ids (invalid UTF-8 included): the incremental text is the full decode, a stop string cuts at
    its first occurrence, and the streamed pieces add up to the text."""
    import random

    for trial in range(300):
        rng = random.Random(trial)
        ids = [rng.randrange(5, len(tok)) for _ in range(rng.randrange(1, 20))]
        full = tok.decode(ids, skip_special_tokens=True)
        row = RowText(tok, [])
        for t in ids:
            row.add(t)
        row.flush()
        assert row.text == full
        if len(full) < 4:
            continue
        k = rng.randrange(0, len(full) - 2)
        stop = full[k : k + 2]
        if "\ufffd" in stop:
            continue
        row, streamed = RowText(tok, [], [stop]), ""
        for t in ids:
            done = row.add(t)
            streamed += row.take_stream(final=done)
            if done:
                break
        assert row.stopped and row.text == full[: full.find(stop)] == streamed
