"""LLM proposer: ask a chat model for the next experiment as SEARCH/REPLACE edits.

One proposal is one short conversation: the prompt (`prompt.py`), the model's answer, and,
when the answer cannot be used (malformed, does not apply, touches a protected file or
region, leaves scope, changes nothing, breaks the syntax, repeats an experiment), the reason
sent back as a follow-up, up to `[llm] answer_tries` answers. After that the proposal comes
back with `rejected` set: the scheduler records it and runs nothing.

Two APIs, over plain HTTP (stdlib only, to keep the core light):
- OpenAI chat completions, `{base}/chat/completions` (OpenAI, vLLM, llama.cpp, Ollama, ...)
- Anthropic messages, `{base}/v1/messages`

Transient failures (429, 5xx, dropped connections, timeouts) are retried with exponential
backoff and jitter, honouring Retry-After; other HTTP errors raise at once, since asking again
would fail the same way: `LLMConfigError` (a ConfigError: the loop stops) for a bad key or
model (401, 403, 404), `LLMError` for the rest (the scheduler records a rejected proposal).
"""

from __future__ import annotations

import http.client
import json
import logging
import os
import random
import time
import urllib.error
import urllib.request
import uuid
from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field
from email.message import Message as Headers
from pathlib import Path
from typing import Any, Literal

from overnight import admission
from overnight.errors import ConfigError, OvernightError
from overnight.proposers.base import Context, Proposal, Proposer, Usage
from overnight.proposers.edits import (
    EditError,
    apply_answer,
    check_regions,
    check_syntax,
    describe_edits,
    duplicate_message,
    knob_values,
    parse_answer,
    parse_fields,
    real_changes,
)
from overnight.proposers.prompt import PromptTooLarge, build_messages, estimate_tokens, feedback
from overnight.spec import LLM, Spec

log = logging.getLogger(__name__)

OPENAI_URL = "https://api.openai.com/v1"
ANTHROPIC_URL = "https://api.anthropic.com"
ANTHROPIC_VERSION = "2023-06-01"
BACKOFF_CAP = 60.0  # seconds; the longest wait between two tries
RETRY_AFTER_CAP = 120.0  # a server asking for more is treated as asking for this


class LLMError(OvernightError):
    """The model's endpoint failed: a client error, or transient errors past every retry."""


class LLMConfigError(LLMError, ConfigError):
    """The endpoint refused who we are or what we asked for (401, 403, 404): every later
    request would fail the same way, so the loop should stop (exit 2)."""


@dataclass(frozen=True)
class Message:
    role: Literal["user", "assistant"]
    content: str


@dataclass(frozen=True)
class Reply:
    text: str
    usage: Usage
    truncated: bool = False  # the model stopped at max_tokens


# --- clients --------------------------------------------------------------------------------


class ChatClient(ABC):
    """One chat API over HTTP, with retries. Stateless between calls: safe on threads."""

    provider = "chat"

    def __init__(self, cfg: LLM, base_url: str, headers: dict[str, str],
                 sleep: Callable[[float], None] = time.sleep, backoff_base: float = 1.0) -> None:
        self.cfg = cfg
        self.url = self._endpoint(base_url.rstrip("/"))
        self.headers = {"Content-Type": "application/json", **headers}
        self.sleep = sleep
        self.backoff_base = backoff_base
        self._rng = random.Random()

    def chat(self, system: str, messages: list[Message]) -> Reply:
        data = self._post(self._body(system, messages))
        try:
            text, tokens_in, tokens_out, truncated = self._parse(data)
        except (KeyError, IndexError, TypeError, ValueError):
            shown = json.dumps(data)[:300]
            raise LLMError(f"{self.provider} API at {self.url} answered something that is not "
                           f"a {self.provider} response: {shown}") from None
        cost = (tokens_in / 1e6 * self.cfg.price_input_per_mtok
                + tokens_out / 1e6 * self.cfg.price_output_per_mtok)
        return Reply(text, Usage(tokens_in, tokens_out, cost, 1), truncated)

    @abstractmethod
    def _endpoint(self, base: str) -> str: ...

    @abstractmethod
    def _body(self, system: str, messages: list[Message]) -> dict[str, Any]: ...

    @abstractmethod
    def _parse(self, data: Any) -> tuple[str, int, int, bool]:
        """(text, tokens in, tokens out, truncated) of a response."""

    def _post(self, body: dict[str, Any]) -> Any:
        payload = json.dumps(body).encode()
        attempts = self.cfg.retries + 1
        last = ""
        for attempt in range(attempts):
            retry_after: float | None = None
            request = urllib.request.Request(self.url, data=payload, headers=self.headers,
                                             method="POST")
            try:
                with urllib.request.urlopen(request, timeout=self.cfg.timeout_seconds) as resp:
                    raw = resp.read()
                try:
                    return json.loads(raw)
                except ValueError:  # a proxy's error page, a cut-off body: worth another try
                    last = f"a response that is not JSON: {raw[:200]!r}"
            except urllib.error.HTTPError as e:
                detail = _server_message(e)
                if e.code in (401, 403, 404):
                    raise LLMConfigError(self._refused(e.code, detail)) from None
                if e.code != 429 and e.code < 500:
                    raise LLMError(self._refused(e.code, detail)) from None
                last = f"HTTP {e.code}: {detail}"
                retry_after = _retry_after(e.headers)
            except (urllib.error.URLError, http.client.HTTPException, OSError) as e:
                reason = e.reason if isinstance(e, urllib.error.URLError) else e
                last = f"{type(e).__name__}: {reason}"
            if attempt + 1 < attempts:
                delay = self._delay(attempt, retry_after)
                log.info("%s API: %s; retrying in %.1f s", self.provider, last, delay)
                self.sleep(delay)
        raise LLMError(f"{self.provider} API at {self.url} failed {attempts} times, last with "
                       f"{last}: check that the server is up and reachable, or raise [llm] "
                       "retries")

    def _delay(self, attempt: int, retry_after: float | None) -> float:
        if retry_after is not None:
            return min(max(retry_after, 0.0), RETRY_AFTER_CAP)
        # Exponential backoff with jitter, so that parallel proposers do not retry in step.
        ceiling = min(self.backoff_base * 2 ** attempt, BACKOFF_CAP)
        return ceiling * (0.5 + 0.5 * self._rng.random())

    def _refused(self, code: int, detail: str) -> str:
        msg = f"{self.provider} API at {self.url} refused the request (HTTP {code}: {detail})"
        if code in (401, 403):
            return msg + f": check {self.key_variable}"
        if code == 404:
            return msg + f": check [llm] model ({self.cfg.model!r}) and base_url"
        return msg

    key_variable = "the API key"


class OpenAIClient(ChatClient):
    """OpenAI's chat-completions API, also served by vLLM, llama.cpp, Ollama and others."""

    provider = "openai"
    key_variable = "OPENAI_API_KEY"

    def _endpoint(self, base: str) -> str:
        return f"{base}/chat/completions"

    def _body(self, system: str, messages: list[Message]) -> dict[str, Any]:
        return {
            "model": self.cfg.model,
            "messages": [{"role": "system", "content": system},
                         *({"role": m.role, "content": m.content} for m in messages)],
            "temperature": self.cfg.temperature,
            "max_tokens": self.cfg.max_tokens,
        }

    def _parse(self, data: Any) -> tuple[str, int, int, bool]:
        choice = data["choices"][0]
        content = choice["message"].get("content") or ""
        if isinstance(content, list):  # some servers answer with content parts
            content = "".join(p.get("text", "") for p in content if isinstance(p, dict))
        usage = data.get("usage") or {}
        return (str(content), int(usage.get("prompt_tokens") or 0),
                int(usage.get("completion_tokens") or 0), choice.get("finish_reason") == "length")


class AnthropicClient(ChatClient):
    """Anthropic's messages API."""

    provider = "anthropic"
    key_variable = "ANTHROPIC_API_KEY"

    def _endpoint(self, base: str) -> str:
        return f"{base.removesuffix('/v1')}/v1/messages"

    def _body(self, system: str, messages: list[Message]) -> dict[str, Any]:
        return {
            "model": self.cfg.model,
            "max_tokens": self.cfg.max_tokens,
            # The messages API takes 0..1; [llm] allows up to 2 for OpenAI-style servers.
            "temperature": min(self.cfg.temperature, 1.0),
            "system": system,
            "messages": [{"role": m.role, "content": m.content} for m in messages],
        }

    def _parse(self, data: Any) -> tuple[str, int, int, bool]:
        text = "".join(b.get("text", "") for b in data["content"] if b.get("type") == "text")
        usage = data.get("usage") or {}
        return (text, int(usage.get("input_tokens") or 0), int(usage.get("output_tokens") or 0),
                data.get("stop_reason") == "max_tokens")


def make_client(cfg: LLM, environ: Mapping[str, str],
                sleep: Callable[[float], None] = time.sleep,
                backoff_base: float = 1.0) -> ChatClient:
    """The client `[llm] provider` names, with its base URL and key from the spec or the
    environment. ConfigError when a key the endpoint needs is missing."""
    if cfg.provider == "anthropic":
        key = environ.get("ANTHROPIC_API_KEY", "")
        if not key:
            raise ConfigError('[llm] provider = "anthropic" needs ANTHROPIC_API_KEY in the '
                              "environment: export it and run again")
        base = cfg.base_url or environ.get("ANTHROPIC_BASE_URL") or ANTHROPIC_URL
        headers = {"x-api-key": key, "anthropic-version": ANTHROPIC_VERSION}
        return AnthropicClient(cfg, base, headers, sleep, backoff_base)
    base = cfg.base_url or environ.get("OPENAI_BASE_URL") or OPENAI_URL
    key = environ.get("OPENAI_API_KEY", "")
    # Local servers (vLLM, llama.cpp, Ollama) need no key; OpenAI itself does.
    if not key and "api.openai.com" in base:
        raise ConfigError(f"{base} needs OPENAI_API_KEY in the environment: export it, or "
                          "point [llm] base_url (or OPENAI_BASE_URL) at a local server")
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    return OpenAIClient(cfg, base, headers, sleep, backoff_base)


# --- the proposer ---------------------------------------------------------------------------


@dataclass
class Trace:
    """One proposal's conversation, written to `trace_dir` for debugging."""

    system: str
    requests: list[list[dict[str, str]]] = field(default_factory=list)
    answers: list[str] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)


class LLMProposer(Proposer):
    """Asks a chat model for one change per proposal; unusable answers go back to it."""

    name = "llm"
    slow = True

    def __init__(self, spec: Spec, environ: Mapping[str, str] | None = None, *,
                 trace_dir: Path | None = None, sleep: Callable[[float], None] = time.sleep,
                 backoff_base: float = 1.0) -> None:
        if spec.llm is None:
            raise ConfigError('the llm proposer needs an [llm] section in overnight.toml, e.g. '
                              '[llm] model = "gpt-4.1"')
        self.cfg = spec.llm
        self.protected = tuple(spec.files.protected)
        self.rules = admission.Rules.of(spec)
        self.client = make_client(self.cfg, os.environ if environ is None else environ,
                                  sleep=sleep, backoff_base=backoff_base)
        self.trace_dir = trace_dir

    def propose(self, ctx: Context) -> Proposal:
        protected = tuple(sorted({*ctx.protected, *self.protected}))
        system, user = build_messages(ctx, self.cfg)
        trace = Trace(system)
        messages = [Message("user", user)]
        usage = Usage()
        hypothesis = ""
        for _ in range(self.cfg.answer_tries):
            trace.requests.append([asdict(m) for m in messages])
            reply = self.client.chat(system, messages)
            usage += reply.usage
            trace.answers.append(reply.text)
            try:
                proposal = self._proposal(ctx, reply.text, protected, usage, trace.errors)
            except EditError as e:
                error = str(e)
                if reply.truncated:
                    error += (f" (your answer was cut off at {self.cfg.max_tokens} tokens: "
                              "keep it shorter, with short SEARCH parts)")
                trace.errors.append(error)
                hypothesis = parse_fields(reply.text)[0] or hypothesis
                messages = self._follow_up(ctx, reply.text, error, trace.errors[:-1])
                continue
            self._write_trace(trace)
            return proposal
        self._write_trace(trace)
        tries = self.cfg.answer_tries
        return Proposal(
            parent=ctx.incumbent.commit,
            edits={},
            description=f"llm: no usable answer in {tries} {'try' if tries == 1 else 'tries'}",
            hypothesis=hypothesis,
            usage=usage,
            rejected=f"no usable answer in {tries} {'try' if tries == 1 else 'tries'}; the "
                     f"last: {trace.errors[-1]}",
            notes=_try_notes(trace.errors),
        )

    def _proposal(self, ctx: Context, text: str, protected: tuple[str, ...], usage: Usage,
                  earlier_errors: list[str]) -> Proposal:
        """The proposal an answer makes, or EditError saying why it cannot be used."""
        answer = parse_answer(text, known_paths={*ctx.files, *protected})
        edits = real_changes(ctx.files, apply_answer(answer, ctx.files, protected))
        if not edits:
            raise EditError("your edits change nothing (the files would stay as they are): "
                            "propose a real change")
        check_regions(ctx.files, edits)
        check_syntax(ctx.files, edits)
        if ctx.is_duplicate(edits):
            raise EditError(duplicate_message(ctx, edits))
        why = admission.problem(self.rules, ctx.files, edits)  # what the loop will check
        if why:
            raise EditError(f"your edit {why}")
        description = " ".join(answer.description.split())[:200]
        return Proposal(
            parent=ctx.incumbent.commit,
            edits=edits,
            description=description or f"llm edit: {describe_edits(ctx.files, edits)}",
            hypothesis=" ".join(answer.hypothesis.split()),
            knobs=knob_values({**ctx.files, **edits}),
            usage=usage,
            notes=_try_notes(earlier_errors),
        )

    def _follow_up(self, ctx: Context, answer: str, error: str,
                   earlier: list[str]) -> list[Message]:
        """The next request: the prompt, the unusable answer, and why. Only the last exchange
        is kept (with earlier errors named), and the prompt is rebuilt with room for it, so
        the conversation never outgrows the context window."""
        text = feedback(error)
        if earlier:
            text += "\n\nEarlier answers failed too: " + "; ".join(earlier)
        reserve = estimate_tokens(answer) + estimate_tokens(text) + 16
        try:
            _, user = build_messages(ctx, self.cfg, reserve_tokens=reserve)
            return [Message("user", user), Message("assistant", answer), Message("user", text)]
        except PromptTooLarge:
            # No room for the old answer: say what was wrong without repeating it.
            _, user = build_messages(ctx, self.cfg, reserve_tokens=estimate_tokens(text) + 16)
            return [Message("user", user + "\n\n" + text)]

    def _write_trace(self, trace: Trace) -> None:
        log.debug("llm conversation: %d answers, errors: %s", len(trace.answers), trace.errors)
        if self.trace_dir is None:
            return
        self.trace_dir.mkdir(parents=True, exist_ok=True)
        name = f"llm-{time.strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:8]}.json"
        (self.trace_dir / name).write_text(json.dumps(asdict(trace), indent=1))


# --- helpers --------------------------------------------------------------------------------


def _server_message(e: urllib.error.HTTPError) -> str:
    """The error message in an error response (OpenAI and Anthropic both nest it under
    `error.message`), else the start of the body."""
    try:
        raw = e.read().decode("utf-8", errors="replace")
    except (OSError, http.client.HTTPException):
        return e.reason if isinstance(e.reason, str) else str(e)
    try:
        data = json.loads(raw)
        err = data.get("error") if isinstance(data, dict) else None
        if isinstance(err, dict) and err.get("message"):
            return str(err["message"])
        if isinstance(err, str):
            return err
    except ValueError:
        pass
    return raw.strip()[:500] or str(e.reason)


def _retry_after(headers: Headers | None) -> float | None:
    """Retry-After in seconds; None when absent or an HTTP date (backoff decides then)."""
    value = headers.get("Retry-After") if headers is not None else None
    try:
        return float(value) if value is not None else None
    except ValueError:
        return None


def _try_notes(errors: list[str]) -> tuple[str, ...]:
    return tuple(f"answer {i} was sent back: {e}" for i, e in enumerate(errors, start=1))
