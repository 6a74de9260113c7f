"""Streaming generation, and ``tuneforge chat``: talk to a run's model in the terminal.

The prompt is rendered by the training template code (``render_prompt``), generation stops at
the template's end of turn, and text is printed as it is produced. Commands: ``/adapter NAME``
switches between loaded adapters, ``/base`` answers with the adapters off (peft's
``disable_adapter``), ``/reset`` forgets the conversation, ``/exit`` leaves.
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TextIO

import torch

from tuneforge.data.render import end_of_turn_ids, render_prompt
from tuneforge.errors import TuneforgeError
from tuneforge.infer.generate import generate_tokens, sampling_kwargs


@dataclass
class Sampling:
    """How to pick tokens: greedy when temperature is 0."""

    max_new_tokens: int = 256
    temperature: float = 0.0
    top_p: float = 1.0
    stop: list[str] = field(default_factory=list)
    seed: int | None = None


@dataclass
class Finished:
    text: str
    finish_reason: str  # stop | length
    prompt_tokens: int
    completion_tokens: int


class _TextStream:
    """A ``generate`` streamer: decodes the new tokens, holds back what may be the start of a stop
    string or half a UTF-8 character, and asks ``generate`` to stop at a stop string."""

    def __init__(self, tokenizer, stop: list[str], on_text: Callable[[str], None]):
        self.tokenizer = tokenizer
        self.stop = [s for s in stop if s]
        self.on_text = on_text
        self.ids: list[int] = []
        self.sent = 0  # characters of the decoded text already passed on
        self.text = ""
        self.hit_stop = False
        self.prompt_seen = False

    def put(self, value: torch.Tensor) -> None:
        if not self.prompt_seen:  # generate first pushes the prompt
            self.prompt_seen = True
            return
        if self.hit_stop:
            return
        self.ids += value.reshape(-1).tolist()
        self.text = self.tokenizer.decode(self.ids, skip_special_tokens=True)
        for s in self.stop:
            at = self.text.find(s)
            if at >= 0:
                self.text = self.text[:at]
                self.hit_stop = True
        self._flush(final=self.hit_stop)

    def end(self) -> None:
        self._flush(final=True)

    def _flush(self, final: bool) -> None:
        upto = len(self.text)
        if not final:
            if self.text.endswith("\ufffd"):
                upto -= 1  # an incomplete multi-byte character
            for s in self.stop:  # a suffix that may grow into a stop string
                for k in range(min(len(s) - 1, upto), 0, -1):
                    if self.text[:upto].endswith(s[:k]):
                        upto -= k
                        break
        if upto > self.sent:
            self.on_text(self.text[self.sent : upto])
            self.sent = upto


class _StopWhen:
    """A stopping criterion: stop once a stop string was produced or the caller gave up."""

    def __init__(self, stream: _TextStream, cancelled: Callable[[], bool]):
        self.stream = stream
        self.cancelled = cancelled

    def __call__(self, input_ids: torch.Tensor, scores, **kwargs) -> torch.Tensor:
        done = self.stream.hit_stop or self.cancelled()
        return torch.full((input_ids.shape[0],), done, dtype=torch.bool, device=input_ids.device)


@torch.no_grad()
def generate_stream(
    model,
    tokenizer,
    prompt_ids: list[int],
    sampling: Sampling,
    on_text: Callable[[str], None],
    cancelled: Callable[[], bool] = lambda: False,
) -> Finished:
    """Generate one reply, passing text to ``on_text`` as it is produced.

    Stops at the template's end-of-turn tokens, at any of ``sampling.stop`` (not included in the
    text), after ``max_new_tokens``, or when ``cancelled()`` turns true.
    """
    from transformers import StoppingCriteriaList

    stop_ids = end_of_turn_ids(tokenizer)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else stop_ids[0]
    stream = _TextStream(tokenizer, sampling.stop, on_text)
    device = next(model.parameters()).device
    ids = torch.tensor([prompt_ids], device=device)
    kwargs = dict(
        max_new_tokens=sampling.max_new_tokens,
        eos_token_id=stop_ids,
        pad_token_id=pad,
        streamer=stream,
        stopping_criteria=StoppingCriteriaList([_StopWhen(stream, cancelled)]),
    )
    if sampling.temperature > 0 and sampling.seed is not None:
        torch.manual_seed(sampling.seed)
    kwargs.update(sampling_kwargs(sampling.temperature, sampling.top_p))
    out = generate_tokens(model, ids, torch.ones_like(ids), **kwargs)
    new = out[0, len(prompt_ids) :].tolist()
    ended = bool(new) and new[-1] in stop_ids
    reason = "stop" if ended or stream.hit_stop else "length"
    if cancelled() and not (ended or stream.hit_stop):
        reason = "cancelled"
    return Finished(stream.text, reason, len(prompt_ids), len(new))


def use_adapter(model, name: str | None):
    """A context in which ``model`` answers with adapter ``name`` (None: the base model)."""
    if not hasattr(model, "peft_config"):
        return contextlib.nullcontext()
    if name is None:
        return model.disable_adapter()
    model.set_adapter(name, inference_mode=True)
    return contextlib.nullcontext()


HELP = (
    "commands: /adapter NAME (switch adapter), /adapters (list), /base (adapters off), "
    "/reset (forget the conversation), /exit"
)


class ChatSession:
    """A conversation with one loaded model; ``active`` is an adapter name or None (base)."""

    def __init__(
        self,
        model,
        tokenizer,
        adapters: list[str],
        active: str | None,
        sampling: Sampling,
        system: str | None = None,
    ):
        self.model = model
        self.tokenizer = tokenizer
        self.adapters = adapters
        self.active = active
        self.sampling = sampling
        self.system = system
        self.history: list[dict] = []

    @property
    def label(self) -> str:
        return self.active or "base"

    def command(self, line: str) -> tuple[str, bool]:
        """Run a /command; returns (message to show, keep going)."""
        cmd, _, arg = line.strip().partition(" ")
        arg = arg.strip()
        if cmd in ("/exit", "/quit"):
            return "bye", False
        if cmd == "/reset":
            self.history = []
            return "conversation cleared", True
        if cmd == "/base":
            self.active = None
            return "now answering with the base model (adapters off)", True
        if cmd == "/adapters":
            names = ", ".join(self.adapters) or "none loaded"
            return f"adapters: {names}; active: {self.label}", True
        if cmd == "/adapter":
            if not arg:
                return f"usage: /adapter NAME (loaded: {', '.join(self.adapters) or 'none'})", True
            if arg not in self.adapters:
                loaded = ", ".join(self.adapters) or "none (pass --adapters NAME=RUN)"
                return f"no adapter '{arg}'; loaded: {loaded}", True
            self.active = arg
            return f"now answering with adapter '{arg}'", True
        return f"unknown command {cmd}; {HELP}", True

    def reply(self, text: str, on_text: Callable[[str], None]) -> Finished:
        """Answer ``text`` in the conversation so far, streaming through ``on_text``."""
        messages = [{"role": "system", "content": self.system}] if self.system else []
        messages += self.history + [{"role": "user", "content": text}]
        prompt = render_prompt(self.tokenizer, messages)
        with use_adapter(self.model, self.active):
            done = generate_stream(self.model, self.tokenizer, prompt, self.sampling, on_text)
        self.history += [
            {"role": "user", "content": text},
            {"role": "assistant", "content": done.text},
        ]
        return done


def run_chat(session: ChatSession, stdin: TextIO = sys.stdin, stdout: TextIO = sys.stdout) -> None:
    """The read-reply loop until /exit or end of input."""
    interactive = stdin.isatty()

    def show(text: str) -> None:
        stdout.write(text)
        stdout.flush()

    show(f"chatting with {session.label}; {HELP}\n")
    while True:
        if interactive and stdin is sys.stdin:
            try:
                line = input(f"[{session.label}] > ")  # with readline's line editing
            except EOFError:
                show("\n")
                return
        else:
            show(f"[{session.label}] > ")
            line = stdin.readline()
            if not line:
                show("\n")
                return
            line = line.rstrip("\n")
            show(line + "\n")  # echo piped input so a transcript reads as a conversation
        if not line.strip():
            continue
        if line.startswith("/"):
            message, keep_going = session.command(line)
            show(message + "\n")
            if not keep_going:
                return
            continue
        try:
            done = session.reply(line, show)
        except KeyboardInterrupt:
            show("\n[interrupted]\n")
            continue
        show("\n" if done.finish_reason == "stop" else " [max tokens]\n")


def chat(
    ref: str,
    adapters: dict[str, str] | None = None,
    sampling: Sampling | None = None,
    system: str | None = None,
) -> None:
    """Load ``ref`` (run or model) with ``adapters`` and chat on the terminal.

    Raises:
        TuneforgeError: bad references or adapters.
    """
    from tuneforge.infer.runs import load_with_adapters

    sampling = sampling or Sampling()
    if sampling.max_new_tokens < 1:
        raise TuneforgeError("--max-new-tokens must be at least 1")
    if sampling.temperature < 0 or not 0 < sampling.top_p <= 1:
        raise TuneforgeError("--temperature must be >= 0 and --top-p in (0, 1]")
    model, tokenizer, _, names, default = load_with_adapters(ref, adapters)
    run_chat(ChatSession(model, tokenizer, names, default, sampling, system))
