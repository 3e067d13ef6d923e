"""`adaroute serve`: an OpenAI-compatible server for dense and routed models.

    model (ServedModel: one copy of the weights, an engine per arm)
      -> Scheduler (engine thread: continuous batching over SlotCache rows)
      -> Service (asyncio side: admission, arm choice, delivery, metrics, audit row)
      -> FastAPI app (routes.py: /v1; app.py: /health, /metrics, limits, errors)
"""
