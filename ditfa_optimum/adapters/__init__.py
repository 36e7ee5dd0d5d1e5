"""Model-family adapters, registered by transformer class name."""

from .base import Adapter, adapter_names, get_adapter, register_adapter
from .flux import FluxAdapter
from .sd3 import SD3Adapter

__all__ = ["Adapter", "adapter_names", "get_adapter", "register_adapter", "FluxAdapter", "SD3Adapter"]
