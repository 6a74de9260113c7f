"""Messages -> ``input_ids`` + ``labels`` through the tokenizer's chat template.

The template that renders a prompt at inference (``render_prompt``) is the template used in
training (``render_messages``): the training sequence is tokenized in pieces cut at the
template's own prompt boundaries, so the prompt tokens of a training sample are exactly the tokens
``generate`` feeds the model. Labels are set only on assistant turns, each including its
end-of-turn token (so the model learns to stop) and excluding the whitespace the template puts
after it. Everything else is -100.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from tuneforge.errors import TuneforgeError

IGNORE = -100

# For base models without a chat template: a plain instruction layout ending turns with EOS.
PLAIN_TEMPLATE = (
    "{% for m in messages %}"
    "{% if m['role'] == 'system' %}{{ m['content'] + '\n\n' }}"
    "{% elif m['role'] == 'user' %}{{ '### Instruction:\n' + m['content'] + '\n\n' }}"
    "{% else %}{{ '### Response:\n' + m['content'] + eos_token + '\n\n' }}{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '### Response:\n' }}{% endif %}"
)


@dataclass
class Sample:
    input_ids: list[int]
    labels: list[int]

    @property
    def supervised_token_count(self) -> int:
        # Each label predicts the token at its position from the tokens before it, so position
        # 0 is never a target: count positions 1..T-1 (what the shifted loss uses).
        return sum(1 for x in self.labels[1:] if x != IGNORE)

    def __len__(self) -> int:
        return len(self.input_ids)


@dataclass
class RenderStats:
    rendered: int = 0
    truncated: int = 0
    dropped_no_labels: int = 0
    dropped_sources: list[str] = field(default_factory=list)


def ensure_chat_template(tokenizer) -> None:
    """Give template-less (base) tokenizers the plain instruction template."""
    if not getattr(tokenizer, "chat_template", None):
        tokenizer.chat_template = PLAIN_TEMPLATE


def _template(tokenizer, messages, add_generation_prompt: bool) -> str:
    return tokenizer.apply_chat_template(
        messages, tokenize=False, add_generation_prompt=add_generation_prompt
    )


def adds_bos(tokenizer) -> bool:
    """Whether encoding text puts the BOS token first."""
    bos = tokenizer.bos_token_id
    if bos is None:
        return False
    ids = tokenizer("a")["input_ids"]
    return bool(ids) and ids[0] == bos


def _encode_pieces(tokenizer, pieces: list[str], text: str) -> list[list[int]]:
    encoded = tokenizer(pieces, add_special_tokens=False)["input_ids"] if pieces else []
    # Exactly one BOS: prepend it only if the tokenizer wants one and the template did not write it.
    if encoded and adds_bos(tokenizer) and not text.startswith(tokenizer.bos_token or "\0"):
        encoded[0] = [tokenizer.bos_token_id, *encoded[0]]
    return encoded


def supervised_spans(tokenizer, messages) -> tuple[str, list[tuple[int, int]]]:
    """The full rendered text and the character spans the model is trained to produce."""
    full = _template(tokenizer, messages, False)
    spans = []
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        prefix = _template(tokenizer, messages[:i], True)
        upto = _template(tokenizer, messages[: i + 1], False)
        if not (upto.startswith(prefix) and full.startswith(upto)):
            raise TuneforgeError(
                "the model's chat template renders earlier turns differently once later turns "
                "are added, so assistant tokens cannot be located; set a simpler chat template"
            )
        supervised = upto[len(prefix) :].rstrip()
        spans.append((len(prefix), len(prefix) + len(supervised)))
    return full, spans


def render_messages(tokenizer, messages, max_length: int) -> Sample | None:
    """Tokenize a conversation with labels on assistant turns; None if nothing supervised is left.

    Args:
        tokenizer: a tokenizer with a chat template (see ``ensure_chat_template``).
        messages: validated messages (see ``records.to_messages``).
        max_length: keep at most this many tokens (right truncation).
    """
    full, spans = supervised_spans(tokenizer, messages)
    pieces, supervised = [], []
    pos = 0
    for start, end in spans:
        if start > pos:
            pieces.append(full[pos:start])
            supervised.append(False)
        pieces.append(full[start:end])
        supervised.append(True)
        pos = end
    if pos < len(full):
        pieces.append(full[pos:])
        supervised.append(False)
    input_ids: list[int] = []
    labels: list[int] = []
    for ids, sup in zip(_encode_pieces(tokenizer, pieces, full), supervised, strict=True):
        input_ids += ids
        labels += ids if sup else [IGNORE] * len(ids)
    input_ids, labels = input_ids[:max_length], labels[:max_length]
    sample = Sample(input_ids, labels)
    return sample if sample.supervised_token_count > 0 else None


def render_prompt(tokenizer, messages) -> list[int]:
    """Token ids that ask the model for the next assistant turn (what ``generate`` feeds it)."""
    text = _template(tokenizer, messages, True)
    return _encode_pieces(tokenizer, [text], text)[0]


def render_dataset(tokenizer, conversations, sources, max_length: int):
    """Render many conversations; over-long ones are truncated, ones with no labels left dropped.

    Returns:
        (samples, RenderStats)
    """
    stats = RenderStats()
    samples = []
    for messages, source in zip(conversations, sources, strict=True):
        full_len = None
        sample = render_messages(tokenizer, messages, max_length)
        if sample is None:
            stats.dropped_no_labels += 1
            stats.dropped_sources.append(source)
            continue
        if len(sample) == max_length:
            full_len = render_messages(tokenizer, messages, 10**9)
            if full_len is not None and len(full_len) > max_length:
                stats.truncated += 1
        stats.rendered += 1
        samples.append(sample)
    return samples, stats


def end_of_turn_ids(tokenizer) -> list[int]:
    """Token ids that end an assistant turn: EOS plus the template's own end marker if different."""
    ids = set()
    if tokenizer.eos_token_id is not None:
        ids.add(tokenizer.eos_token_id)
    probe = [{"role": "user", "content": "x"}, {"role": "assistant", "content": "y"}]
    try:
        _, spans = supervised_spans(tokenizer, probe)
        full = _template(tokenizer, probe, False)
        start, end = spans[-1]
        tail = tokenizer(full[start:end], add_special_tokens=False)["input_ids"]
        if tail:
            ids.add(tail[-1])
    except TuneforgeError:
        pass
    return sorted(ids)


def render_reply(tokenizer, prompt_messages, reply: str) -> tuple[Sample, int]:
    """A prompt and one assistant reply, with labels on the reply only.

    The prompt is tokenized exactly as ``render_prompt`` does (what ``generate`` feeds the model),
    so every reply to the same prompt shares the same prompt tokens; the reply is labelled with
    its end-of-turn token, as in ``render_messages``. Used for preference pairs and for scoring
    generated responses.

    Returns:
        ``(sample, prompt_length)``; ``sample.input_ids[:prompt_length] == render_prompt(...)``.
    """
    messages = [*prompt_messages, {"role": "assistant", "content": reply}]
    full, spans = supervised_spans(tokenizer, messages)
    start, end = spans[-1]
    pieces = [p for p in (full[:start], full[start:end], full[end:]) if p]
    encoded = _encode_pieces(tokenizer, pieces, full)
    prompt_ids, reply_ids = encoded[0], encoded[1]
    tail = [t for piece in encoded[2:] for t in piece]
    input_ids = prompt_ids + reply_ids + tail
    labels = [IGNORE] * len(prompt_ids) + reply_ids + [IGNORE] * len(tail)
    return Sample(input_ids, labels), len(prompt_ids)
