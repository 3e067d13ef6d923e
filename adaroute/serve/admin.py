"""Admin API of a staged rollout (mounted only with ``--admin-key``):

    GET  /admin/rollout   stage, fractions, gates, live window statistics, per-arm KPIs, recent events
    POST /admin/rollout   {"stage"?, "canary_fraction"?, "shadow_fraction"?, "reason"?} -> the new status

Every call needs ``Authorization: Bearer <admin key>`` (constant-time compare); each change is a row
of the audit log's rollout_events, with the admin key's id as the actor.
"""

from __future__ import annotations

import hmac

from fastapi import APIRouter, Depends, Request
from pydantic import BaseModel, ConfigDict, Field

from adaroute.serve.audit import key_id
from adaroute.serve.errors import APIError
from adaroute.serve.rollout_service import StagedRollout
from adaroute.serve.schemas import parse


class RolloutChange(BaseModel):
    model_config = ConfigDict(strict=True, extra="forbid")

    stage: str | None = None
    canary_fraction: float | None = Field(None, ge=0.0, le=1.0)
    shadow_fraction: float | None = Field(None, ge=0.0, le=1.0)
    reason: str | None = Field(None, max_length=500)


def admin_router(staged: StagedRollout, admin_key: str) -> APIRouter:
    expected = admin_key.encode()

    async def authorize(request: Request) -> str:
        scheme, _, given = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(given.strip().encode(), expected):
            raise APIError(401, "missing or invalid admin key: send Authorization: Bearer <admin key>",
                           code="invalid_api_key", headers={"WWW-Authenticate": "Bearer"}, reason="unauthorized")
        return "admin:" + key_id(admin_key)

    router = APIRouter(prefix="/admin")

    @router.get("/rollout")
    async def status(actor: str = Depends(authorize)) -> dict:
        return staged.rollout.status()

    @router.post("/rollout")
    async def change(request: Request, actor: str = Depends(authorize)) -> dict:
        body = parse(RolloutChange, await request.body())
        staged.rollout.set(actor, body.stage, body.canary_fraction, body.shadow_fraction, body.reason or "")
        return staged.rollout.status()

    return router
