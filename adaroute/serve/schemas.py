"""Request bodies of the OpenAI-compatible endpoints, validated strictly (wrong types are errors, not coerced).

Parameters a client may send with their neutral value (``n: 1``, ``presence_penalty: 0``, …) are
accepted; any other value of them, and any parameter not listed, is a 400 that names it.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from adaroute.serve.errors import APIError

# Parameters the server does not implement, with the values that mean "not used".
NEUTRAL = {
    "n": (1,), "presence_penalty": (0, 0.0), "frequency_penalty": (0, 0.0), "logprobs": (None, False),
    "top_logprobs": (None, 0), "logit_bias": (None, {}), "tools": (None, []), "functions": (None, []),
    "tool_choice": (None, "none"), "function_call": (None, "none"), "parallel_tool_calls": (None,),
    "response_format": (None, {"type": "text"}), "echo": (None, False), "best_of": (None, 1), "suffix": (None,),
    "user": None, "metadata": None, "store": (None, False), "service_tier": (None, "auto", "default"),
}


class _Strict(BaseModel):
    model_config = ConfigDict(strict=True, extra="forbid")


class StreamOptions(_Strict):
    include_usage: bool = False


class ContentPart(_Strict):
    type: Literal["text"]
    text: str


class ChatMessage(_Strict):
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[ContentPart]
    name: str | None = None

    def text(self) -> str:
        return self.content if isinstance(self.content, str) else "".join(p.text for p in self.content)


class AdarouteOptions(_Strict):
    """adaroute extension, ``"adaroute": {...}`` in a request body."""

    explain: bool = False  # the response lists, per decode step, the units each layer computed


class _Generation(BaseModel):
    model_config = ConfigDict(strict=True, extra="allow")

    model: str
    max_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0.0, le=2.0)
    top_p: float | None = Field(None, gt=0.0, le=1.0)
    seed: int | None = None
    stop: str | list[str] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    arm: Literal["dense", "routed"] | None = None  # adaroute extension: which arm answers
    adaroute: AdarouteOptions | None = None

    @property
    def explain(self) -> bool:
        return self.adaroute is not None and self.adaroute.explain

    def stop_strings(self) -> list[str]:
        stops = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        if len(stops) > 4 or any(not s for s in stops):
            raise APIError(400, "stop takes at most 4 non-empty strings", param="stop", reason="bad_request")
        return stops


class ChatRequest(_Generation):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)

    def token_budget(self) -> int | None:
        return self.max_completion_tokens or self.max_tokens


class CompletionRequest(_Generation):
    prompt: str | list[str]

    def prompt_text(self) -> str:
        if isinstance(self.prompt, str):
            return self.prompt
        if len(self.prompt) != 1:
            raise APIError(400, "prompt: one prompt per request (a list of several is a batch, not supported)",
                           param="prompt", reason="bad_request")
        return self.prompt[0]

    def token_budget(self) -> int:
        return self.max_tokens or 16  # OpenAI's default for completions


def parse(model: type[_Generation], body: bytes) -> _Generation:
    """Validates a JSON body; 400 in OpenAI's shape naming the first bad field."""
    try:
        req = model.model_validate_json(body)
    except ValidationError as e:
        err = e.errors()[0]
        where = ".".join(str(p) for p in err["loc"]) or None
        message = f"{where}: {err['msg']}" if where else err["msg"]
        raise APIError(400, f"invalid request body: {message}", param=where, reason="bad_request") from None
    _reject_unsupported(req)
    return req


def _reject_unsupported(req: _Generation) -> None:
    for name, value in (req.model_extra or {}).items():
        if name not in NEUTRAL:
            raise APIError(400, f"parameter {name!r} is not supported by this server", param=name,
                           code="unsupported_parameter", reason="bad_request")
        neutral = NEUTRAL[name]
        if neutral is not None and value not in neutral:
            what = "n > 1 (several choices per request)" if name == "n" else f"{name}={value!r}"
            raise APIError(400, f"{what} is not supported by this server", param=name,
                           code="unsupported_parameter", reason="bad_request")
