"""adaroute: input-adaptive sparse routing for pretrained Transformers."""

from adaroute.errors import AdarouteError
from adaroute.models import adapter_for, load_model

__all__ = ["AdarouteError", "adapter_for", "load_model"]
__version__ = "0.1.0"
