"""Chat templates and prompt masking: which tokens of a rendered chat are trained.

A chat is rendered with `tokenizer.apply_chat_template` (transformers renders Jinja in a sandbox).
Assistant turn k spans the characters between the render of `messages[:k]` with the generation
prompt and the render of `messages[:k+1]`; both must be prefixes of the full render (a template
that rewrites earlier turns, e.g. one that drops old reasoning, cannot be masked this way and is
refused). The full text is tokenized once with offsets; tokens overlapping an assistant span are
trained, so the role headers and the generation prompt are not.

Every assistant span must end in an end-of-turn token that is trained, or the tuned model never
learns to stop: text after the last special token of a span (a newline) is not trained, and a
template that ends turns with no marker at all gets the tokenizer's eos appended, trained.
"""

from __future__ import annotations

import signal
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tunelab.data.types import IGNORE
from tunelab.data.validate import RecordError
from tunelab.errors import DataError

_BOS = "{% if bos_token %}{{ bos_token }}{% endif %}"


def _gen(prompt: str) -> str:
    return "{% if add_generation_prompt %}{{ '" + prompt + "' }}{% endif %}"



BUILTIN_TEMPLATES: dict[str, str] = {
    # Qwen style.
    "chatml": "{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>\\n' }}"
    "{% endfor %}" + _gen("<|im_start|>assistant\\n"),
    "llama3": _BOS + "{% for m in messages %}{{ '<|start_header_id|>' + m['role'] + '<|end_header_id|>\\n\\n'"
    " + m['content'] + '<|eot_id|>' }}{% endfor %}" + _gen("<|start_header_id|>assistant<|end_header_id|>\\n\\n"),
    # Mistral v0.3 style; a system message opens the first [INST] block.
    "mistral": _BOS + "{% for m in messages %}"
    "{% if m['role'] == 'system' %}{{ '[INST] ' + m['content'] + '\\n\\n' }}"
    "{% elif m['role'] == 'user' %}"
    "{% if loop.previtem is defined and loop.previtem['role'] == 'system' %}{{ m['content'] + '[/INST]' }}"
    "{% else %}{{ '[INST] ' + m['content'] + '[/INST]' }}{% endif %}"
    "{% else %}{{ ' ' + m['content'] + eos_token }}{% endif %}{% endfor %}",
    # Gemma has no system role: a system message opens the first user turn.
    "gemma": _BOS + "{% for m in messages %}"
    "{% if m['role'] == 'system' %}{{ '<start_of_turn>user\\n' + m['content'] + '\\n\\n' }}"
    "{% elif m['role'] == 'user' and loop.previtem is defined and loop.previtem['role'] == 'system' %}"
    "{{ m['content'] + '<end_of_turn>\\n' }}"
    "{% else %}{{ '<start_of_turn>' + ('model' if m['role'] == 'assistant' else m['role']) + '\\n'"
    " + m['content'] + '<end_of_turn>\\n' }}{% endif %}{% endfor %}" + _gen("<start_of_turn>model\\n"),
    "phi3": "{% for m in messages %}{{ '<|' + m['role'] + '|>\\n' + m['content'] + '<|end|>\\n' }}{% endfor %}"
    + _gen("<|assistant|>\\n"),
    "zephyr": "{% for m in messages %}{{ '<|' + m['role'] + '|>\\n' + m['content'] + eos_token + '\\n' }}"
    "{% endfor %}" + _gen("<|assistant|>\\n"),
}

# Markers each built-in template needs as single tokens, end-of-turn first; "eos" stands for the tokenizer's eos token.
_MARKERS: dict[str, tuple[str, ...]] = {
    "chatml": ("<|im_end|>", "<|im_start|>"),
    "llama3": ("<|eot_id|>", "<|start_header_id|>", "<|end_header_id|>"),
    "mistral": ("eos",),
    "gemma": ("<end_of_turn>", "<start_of_turn>"),
    "phi3": ("<|end|>", "<|user|>", "<|assistant|>", "<|system|>"),
    "zephyr": ("eos",),
}


@dataclass(frozen=True)
class ChatTemplate:
    name: str  # for messages: a built-in name, a file path, or "the tokenizer's chat template"
    source: str  # Jinja


def resolve_template(
    spec: str | ChatTemplate | None, tokenizer: Any, log: Callable[[str], Any] | None = None
) -> ChatTemplate:
    """The template to render with: `spec` (built-in name, .jinja path or Jinja source), else the
    tokenizer's own, else built-in chatml (said once through `log`)."""
    if isinstance(spec, ChatTemplate):
        return spec
    fallback = spec is None
    if spec is None:
        own = getattr(tokenizer, "chat_template", None)
        if isinstance(own, dict):  # named templates: the default one is for chats
            own = own.get("default")
        if isinstance(own, str) and own.strip():
            return ChatTemplate("the tokenizer's chat template", own)
        if log is not None:
            log("data: the tokenizer has no chat template; using the built-in 'chatml' (set data.chat_template)")
        spec = "chatml"
    if spec in BUILTIN_TEMPLATES:
        _check_markers(spec, tokenizer, fallback)
        return ChatTemplate(spec, BUILTIN_TEMPLATES[spec])
    if "{{" in spec or "{%" in spec:
        return ChatTemplate("data.chat_template", spec)
    path = Path(spec)
    if path.is_file():
        return ChatTemplate(str(path), path.read_text(encoding="utf-8"))
    raise DataError(
        f"data.chat_template: {spec!r} is neither a built-in template nor an existing file",
        fix=f"use one of {', '.join(BUILTIN_TEMPLATES)} or the path of a .jinja file",
    )


def _check_markers(name: str, tokenizer: Any, fallback: bool = False) -> None:
    for marker in _MARKERS[name]:
        if marker == "eos":
            if getattr(tokenizer, "eos_token", None) is None:
                raise DataError(
                    f"template {name!r} ends assistant turns with the eos token, and the tokenizer has none",
                    fix="use a template that matches the model's tokenizer",
                )
            continue
        if len(tokenizer.encode(marker, add_special_tokens=False)) != 1:
            raise _no_token_error(marker, name, fallback)


def _no_token_error(marker: str, name: str, fallback: bool = False) -> DataError:
    if fallback:
        return DataError(
            f"the tokenizer has no chat template, and no {marker!r} token for the built-in {name!r} fallback",
            fix="set data.chat_template to a template whose markers are in the tokenizer's vocabulary (e.g. "
            "'zephyr' or 'mistral', which end turns with eos), or train on the text format",
        )
    return DataError(
        f"the tokenizer has no {marker!r} token, which chat template {name!r} needs; "
        "the template would be tokenized as plain text pieces",
        fix="the model needs the chat template that matches its tokenizer: leave data.chat_template unset to "
        "use the tokenizer's own, or pick a built-in whose markers are in its vocabulary",
    )


# ----------------------------------------------------------------------------- rendering


RENDER_SECONDS = 2.0  # one chat rendered by a sane template takes microseconds


class _RenderTimeout(BaseException):  # not an Exception: the template's own error handling cannot swallow it
    pass


@contextmanager
def _deadline(seconds: float) -> Iterator[None]:
    """Interrupt the block after `seconds` (SIGALRM timer; main thread only, else no limit)."""
    if threading.current_thread() is not threading.main_thread() or signal.getitimer(signal.ITIMER_REAL)[0]:
        yield
        return

    def expire(signum: int, frame: Any) -> None:
        raise _RenderTimeout

    old = signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)


def render(tokenizer: Any, template: ChatTemplate, messages: list[dict[str, str]], gen: bool) -> str:
    """Render `messages` to text; a template that rejects the chat is a problem of this record, one
    that runs for seconds (a sandbox bounds what a template reaches, not how long it loops) stops
    the data check."""
    try:
        with _deadline(RENDER_SECONDS):
            text = tokenizer.apply_chat_template(
                messages, tokenize=False, chat_template=template.source, add_generation_prompt=gen
            )
    except _RenderTimeout:
        raise DataError(f"chat template {template.name!r} took more than {RENDER_SECONDS:g} s to render one chat "
                        "(loops over large ranges?)", fix="use a built-in template (data.chat_template: chatml) "
                        "or fix the template") from None
    except Exception as e:  # jinja raises TemplateError, templates call raise_exception, ...
        raise RecordError("template error", f"chat template {template.name!r} failed: {e}") from None
    if not isinstance(text, str):  # a batch of one comes back as a list
        text = text[0]
    return text


def assistant_spans(tokenizer: Any, template: ChatTemplate, messages: list[dict[str, str]]) -> tuple[str, list]:
    """The full render and, per assistant turn, `(start, end, content)` character spans into it."""
    full = render(tokenizer, template, messages, gen=False)
    spans = []
    for k, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        start = len(_prefix(tokenizer, template, messages[:k], True, full))
        # the chat up to this turn is the whole chat when the turn is the last (rendering it again is the same)
        end = len(full) if k + 1 == len(messages) else len(_prefix(tokenizer, template, messages[: k + 1], False, full))
        if end <= start:
            raise _unstable(template)
        spans.append((start, end, message["content"]))
    return full, spans


def _prefix(tokenizer: Any, template: ChatTemplate, messages: list, gen: bool, full: str) -> str:
    text = render(tokenizer, template, messages, gen)
    if not full.startswith(text):
        raise _unstable(template)
    return text


def _unstable(template: ChatTemplate) -> DataError:
    return DataError(
        f"chat template {template.name!r} renders earlier turns differently once later turns follow, "
        "so the assistant turns cannot be located for prompt masking",
        fix="set data.chat_template to a template that renders a chat as the concatenation of its turns "
        "(e.g. a built-in one matching the tokenizer)",
    )


def tokenize_chat(
    tokenizer: Any, template: ChatTemplate, messages: list[dict[str, str]], mask_prompt: bool
) -> tuple[list[int], list[int]]:
    """Token ids and labels of a chat: assistant turns and their end-of-turn tokens trained."""
    if not getattr(tokenizer, "is_fast", False):
        raise slow_tokenizer_error(tokenizer)
    full, spans = assistant_spans(tokenizer, template, messages)
    enc = tokenizer(full, add_special_tokens=False, return_offsets_mapping=True)
    chat = Encoded(full, list(enc["input_ids"]), [tuple(o) for o in enc["offset_mapping"]], special_ids(tokenizer))
    return mask_chat(tokenizer, template, chat, spans, mask_prompt)


def mask_chat(
    tokenizer: Any, template: ChatTemplate, chat: Encoded, spans: list, mask_prompt: bool
) -> tuple[list[int], list[int]]:
    """Ids and labels of a tokenized chat whose assistant turns are `spans` (`assistant_spans`)."""
    trained = [False] * len(chat.ids)
    eos_after: list[int] = []  # token indices after which a trained eos is inserted
    for span in spans:
        indices, needs_eos = _trained_in_span(chat, span, template)
        for i in indices:
            trained[i] = True
        if needs_eos and indices:
            eos_after.append(indices[-1])
    ids, trained = _insert_eos(tokenizer, chat.ids, trained, eos_after, template)
    if not mask_prompt:
        return ids, list(ids)
    return ids, [t if keep else IGNORE for t, keep in zip(ids, trained, strict=True)]


def slow_tokenizer_error(tokenizer: Any) -> DataError:
    return DataError(
        f"{type(tokenizer).__name__} is a slow tokenizer: prompt masking needs character offsets",
        fix="load a fast tokenizer (a model folder with tokenizer.json)",
    )


def special_ids(tokenizer: Any) -> set[int]:
    added = getattr(tokenizer, "added_tokens_decoder", {}) or {}
    return set(tokenizer.all_special_ids) | {i for i, tok in added.items() if getattr(tok, "special", False)}


@dataclass(frozen=True)
class Encoded:
    text: str
    ids: list[int]
    offsets: list[tuple[int, int]]
    specials: set[int]


def _trained_in_span(chat: Encoded, span: tuple[int, int, str], template: ChatTemplate) -> tuple[list[int], bool]:
    """Indices of the trained tokens of one assistant span, through its end-of-turn token, and
    whether the turn has no end-of-turn marker (then a trained eos must follow)."""
    start, end, content = span
    inside = [i for i, (a, b) in enumerate(chat.offsets) if a < end and b > start and b > a]
    found = chat.text.rfind(content, start, end) if content else -1
    content_end = found + len(content) if found >= 0 else start
    tail = [i for i in inside if chat.offsets[i][0] >= content_end]
    body = [i for i in inside if chat.offsets[i][0] < content_end]
    eot = [i for i in tail if chat.ids[i] in chat.specials]
    if eot:
        return body + [i for i in tail if i <= eot[-1]], False
    marker = [i for i in tail if chat.text[chat.offsets[i][0] : chat.offsets[i][1]].strip()]
    if not marker:
        return body, True
    # Text that is no special token cannot stop generation: usually a marker the vocabulary lacks.
    raise _no_token_error(chat.text[content_end:end].strip(), template.name)


def _insert_eos(
    tokenizer: Any, ids: list[int], trained: list[bool], after: list[int], template: ChatTemplate
) -> tuple[list[int], list[bool]]:
    if not after:
        return ids, trained
    eos = getattr(tokenizer, "eos_token_id", None)
    if eos is None:
        raise DataError(
            f"chat template {template.name!r} ends assistant turns with no end-of-turn token, "
            "and the tokenizer has no eos token to add",
            fix="use a chat template that ends assistant turns with a special token",
        )
    out_ids, out_trained = [], []
    marks = set(after)
    for i, (t, keep) in enumerate(zip(ids, trained, strict=True)):
        out_ids.append(t)
        out_trained.append(keep)
        if i in marks:
            out_ids.append(eos)
            out_trained.append(True)
    return out_ids, out_trained


def tokenize_text(tokenizer: Any, text: str) -> tuple[list[int], list[int]]:
    """Plain text, every token trained, ending in eos so the model learns where documents stop."""
    ids = list(tokenizer(text)["input_ids"])
    eos = getattr(tokenizer, "eos_token_id", None)
    if eos is not None and (not ids or ids[-1] != eos):
        ids.append(eos)
    return ids, list(ids)
