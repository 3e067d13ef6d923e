"""adaroute: input-adaptive sparse routing for pretrained Transformers."""

from adaroute.errors import AdarouteError

__all__ = ["AdarouteError", "adapter_for", "load_model"]
__version__ = "0.1.0"


def __getattr__(name: str):
    # The model API pulls in torch; importing it lazily keeps `import adaroute` (and the CLI's
    # argument checks) fast and free of side effects.
    if name in ("adapter_for", "load_model"):
        import adaroute.models

        return getattr(adaroute.models, name)
    raise AttributeError(f"module 'adaroute' has no attribute {name!r}")
