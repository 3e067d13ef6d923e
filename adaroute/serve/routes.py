"""The OpenAI-compatible endpoints under /v1: chat and text completions (streamed or not) and models.

Every response carries an ``adaroute`` object: the arm that answered, the request's mean FFN density
over its decode steps and a units-per-token summary. SSE streams end with ``data: [DONE]``.
"""

from __future__ import annotations

import asyncio
import hmac
import json

from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse, StreamingResponse

from adaroute.runtime import SamplingConfig
from adaroute.serve.audit import key_id
from adaroute.serve.errors import APIError
from adaroute.serve.schemas import ChatRequest, CompletionRequest, parse
from adaroute.serve.service import Admission, Pending, Service

DISCONNECT_POLL_S = 0.25


def _service(request: Request) -> Service:
    return request.app.state.service


async def authorize(request: Request) -> None:
    """With API keys configured, every /v1 call needs ``Authorization: Bearer KEY`` (constant-time compare)."""
    keys = _service(request).config.api_keys
    request.state.key_id = None
    if not keys:
        return
    scheme, _, given = request.headers.get("authorization", "").partition(" ")
    match = next((k for k in keys if hmac.compare_digest(given.strip().encode(), k.encode())), None)
    if scheme.lower() != "bearer" or match is None:
        raise APIError(401, "missing or invalid API key: send Authorization: Bearer <key>", code="invalid_api_key",
                       headers={"WWW-Authenticate": "Bearer"}, reason="unauthorized")
    request.state.key_id = key_id(match)


router = APIRouter(prefix="/v1", dependencies=[Depends(authorize)])


@router.get("/models")
async def models(request: Request) -> dict:
    svc = _service(request)
    return {"object": "list", "data": [{"id": svc.model.name, "object": "model", "created": int(svc.started),
                                        "owned_by": "adaroute", "arms": list(svc.model.arms)}]}


@router.post("/chat/completions")
async def chat_completions(request: Request):
    svc = _service(request)
    req = parse(ChatRequest, await request.body())
    _check_model(svc, req.model)
    messages = [{"role": "system" if m.role == "developer" else m.role, "content": m.text()} for m in req.messages]
    try:
        ids = svc.model.chat_ids(messages)
    except Exception as e:  # a template that rejects the conversation (e.g. roles out of order)
        raise APIError(400, f"messages: the chat template rejected them: {e}", param="messages",
                       reason="bad_request") from None
    pending = svc.submit(_admission(request, req, "chat", ids, json.dumps(messages), req.token_budget()))
    return await _respond(request, req, pending, _ChatShape(pending, svc.model.name))


@router.post("/completions")
async def completions(request: Request):
    svc = _service(request)
    req = parse(CompletionRequest, await request.body())
    _check_model(svc, req.model)
    text = req.prompt_text()
    pending = svc.submit(_admission(request, req, "completions", svc.model.text_ids(text), text, req.token_budget()))
    return await _respond(request, req, pending, _CompletionShape(pending, svc.model.name))


def _check_model(svc: Service, name: str) -> None:
    if name not in svc.model_names:
        raise APIError(404, f"model {name!r} does not exist; this server serves {svc.model.name!r}", param="model",
                       code="model_not_found", reason="bad_request")


def _admission(request: Request, req, endpoint: str, ids: list[int], text: str, budget: int | None) -> Admission:
    temperature = 1.0 if req.temperature is None else req.temperature  # OpenAI's default
    sampling = SamplingConfig(temperature=temperature, top_p=1.0 if req.top_p is None else req.top_p, seed=req.seed)
    client = request.headers.get("x-adaroute-key") or (req.model_extra or {}).get("user")
    return Admission(endpoint, ids, text, budget, sampling, req.stop_strings(), req.arm, request.state.key_id,
                     client_key=client if isinstance(client, str) and client else None, explain=req.explain)


async def _respond(request: Request, req, pending: Pending, shape):
    if req.stream:
        usage = req.stream_options is not None and req.stream_options.include_usage
        return StreamingResponse(_sse(pending, shape, usage), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache"})
    collect = asyncio.ensure_future(_collect(pending))
    while not collect.done():
        await asyncio.wait([collect], timeout=DISCONNECT_POLL_S)
        if not collect.done() and await request.is_disconnected():
            pending.stop_early("cancelled")
    return JSONResponse(shape.whole(collect.result()))


async def _collect(pending: Pending) -> str:
    return "".join([piece async for piece in pending.pieces()])


async def _sse(pending: Pending, shape, usage: bool):
    try:
        for chunk in shape.opening():
            yield _event(chunk)
        async for piece in pending.pieces():
            yield _event(shape.chunk(piece))
        yield _event(shape.closing())
        if usage:
            yield _event(shape.usage_chunk())
        yield "data: [DONE]\n\n"
    finally:  # the client went away (or the server is stopping): free the row, log it as cancelled
        pending.stop_early("cancelled")


def _event(payload: dict) -> str:
    return f"data: {json.dumps(payload, separators=(',', ':'))}\n\n"


class _Shape:
    """The parts of a response every endpoint shares."""

    object_whole = object_chunk = prefix = ""

    def __init__(self, pending: Pending, model: str):
        self.p, self.model = pending, model
        self.id, self.created = f"{self.prefix}-{pending.req.id}", int(pending.created)

    def _base(self, obj: str, choices: list) -> dict:
        return {"id": self.id, "object": obj, "created": self.created, "model": self.model, "choices": choices}

    def usage(self) -> dict:
        prompt, completion = len(self.p.adm.prompt_ids), self.p.completion_tokens()
        return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}

    def extension(self) -> dict:
        fin = self.p.finished
        out = {"arm": self.p.arm, "ffn_density": round(fin.density, 4),
               "units_per_token": {k: round(v, 2) for k, v in fin.units_per_token.items()}}
        if fin.steps is not None:
            out["explain"] = self._explain(fin)
        return out

    def _explain(self, fin) -> dict:
        """Per decode step: its input token and the units each layer computed (the first token comes
        from the prefill, which runs dense, so step i reads the i-th generated token)."""
        decode = self.p.service.model.tokenizer.decode
        return {"units_of": int(fin.units_per_token["of"]),
                "steps": [{"token": decode([token]), "units": units} for token, units in fin.steps]}

    def whole(self, text: str) -> dict:
        body = self._base(self.object_whole, [self._choice(text, self.p.reason)])
        return {**body, "usage": self.usage(), "adaroute": self.extension()}

    def usage_chunk(self) -> dict:
        return {**self._base(self.object_chunk, []), "usage": self.usage()}

    def closing(self) -> dict:
        return {**self._base(self.object_chunk, [self._delta("", self.p.reason)]),
                "adaroute": self.extension()}

    def chunk(self, piece: str) -> dict:
        return self._base(self.object_chunk, [self._delta(piece, None)])


class _ChatShape(_Shape):
    object_whole, object_chunk, prefix = "chat.completion", "chat.completion.chunk", "chatcmpl"

    def opening(self) -> list[dict]:
        return [self._base(self.object_chunk, [{"index": 0, "delta": {"role": "assistant", "content": ""},
                                                "finish_reason": None, "logprobs": None}])]

    def _choice(self, text: str, reason: str) -> dict:
        return {"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": reason,
                "logprobs": None}

    def _delta(self, piece: str, reason: str | None) -> dict:
        return {"index": 0, "delta": {"content": piece} if piece or reason is None else {}, "finish_reason": reason,
                "logprobs": None}


class _CompletionShape(_Shape):
    object_whole = object_chunk = "text_completion"
    prefix = "cmpl"

    def opening(self) -> list[dict]:
        return []

    def _choice(self, text: str, reason: str) -> dict:
        return {"index": 0, "text": text, "finish_reason": reason, "logprobs": None}

    def _delta(self, piece: str, reason: str | None) -> dict:
        return self._choice(piece, reason)
