"""Rendering: labels only on assistant turns (+ end of turn), one BOS, train == inference."""

from tuneforge.data.render import (
    IGNORE,
    PLAIN_TEMPLATE,
    end_of_turn_ids,
    render_dataset,
    render_messages,
    render_prompt,
)

CHAT = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "What is 2+2?"},
    {"role": "assistant", "content": "4"},
    {"role": "user", "content": "And 3+3?"},
    {"role": "assistant", "content": "It is 6."},
]


def supervised_runs(sample):
    """Contiguous runs of supervised token ids."""
    runs, cur = [], []
    for tok, lab in zip(sample.input_ids, sample.labels, strict=True):
        if lab != IGNORE:
            assert lab == tok
            cur.append(tok)
        elif cur:
            runs.append(cur)
            cur = []
    if cur:
        runs.append(cur)
    return runs


def test_supervised_tokens_are_exactly_assistant_turns_plus_end_of_turn(tokenizer):
    sample = render_messages(tokenizer, CHAT, 512)
    runs = [tokenizer.decode(r) for r in supervised_runs(sample)]
    eot = tokenizer.decode(end_of_turn_ids(tokenizer))
    assert runs == [f"4{eot}", f"It is 6.{eot}"]


def test_exactly_one_bos_and_no_doubled_special_tokens(tokenizer):
    sample = render_messages(tokenizer, CHAT, 512)
    bos = tokenizer.bos_token_id
    assert sample.input_ids[0] == bos and sample.input_ids[1] != bos
    ids = sample.input_ids
    eos = tokenizer.eos_token_id
    assert all(not (a == b == eos) for a, b in zip(ids, ids[1:], strict=False))
    text = tokenizer.decode(ids)
    assert text == tokenizer.apply_chat_template(CHAT, tokenize=False)


def test_training_prompt_equals_inference_prompt(tokenizer):
    sample = render_messages(tokenizer, CHAT, 512)
    prompt = render_prompt(tokenizer, CHAT[:-1])  # multi-turn: the prompt holds turn 1's answer
    assert sample.input_ids[: len(prompt)] == prompt
    assert sample.labels[len(prompt)] != IGNORE  # the reply starts right after the prompt
    single = render_messages(tokenizer, CHAT[:3], 512)
    prompt = render_prompt(tokenizer, CHAT[:2])
    assert single.input_ids[: len(prompt)] == prompt
    assert all(lab == IGNORE for lab in single.labels[: len(prompt)])


def test_truncation_drops_samples_left_with_no_supervised_token(tokenizer):
    long_prompt = [
        {"role": "user", "content": "word " * 200},
        {"role": "assistant", "content": "ok"},
    ]
    short = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello there"}]
    samples, stats = render_dataset(tokenizer, [long_prompt, short], ["f:1", "f:2"], 64)
    assert len(samples) == 1 and stats.dropped_no_labels == 1 and stats.dropped_sources == ["f:1"]
    assert render_messages(tokenizer, long_prompt, 64) is None
    # truncation that keeps some supervised tokens is counted, not dropped
    long_reply = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yes " * 100}]
    samples, stats = render_dataset(tokenizer, [long_reply], ["f:3"], 64)
    assert stats.truncated == 1 and len(samples[0]) == 64
    assert samples[0].supervised_token_count > 0


def test_plain_template_for_base_tokenizers(tokenizer):
    tok = type(tokenizer).from_pretrained(tokenizer.name_or_path)
    tok.chat_template = PLAIN_TEMPLATE
    msgs = [{"role": "user", "content": "Say hi"}, {"role": "assistant", "content": "hi"}]
    sample = render_messages(tok, msgs, 128)
    [run] = supervised_runs(sample)
    assert tok.decode(run) == "hi" + tok.eos_token
    assert sample.input_ids[: len(render_prompt(tok, msgs[:1]))] == render_prompt(tok, msgs[:1])
