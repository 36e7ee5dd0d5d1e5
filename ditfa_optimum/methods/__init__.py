"""Attention methods, one file each, registered by name and stable integer id.

``full`` (0), ``arrow`` (1, window fraction), ``cache`` (2), ``cfg_share`` (3), ``arrow_residual`` (4, fraction).
"""

from .base import (
    AttentionMethod,
    HeadMemory,
    dense_flops,
    make_method,
    method_class,
    method_names,
    register_method,
)
from .full import Full
from .arrow import Arrow
from .cache import Cache
from .cfg_share import CfgShare
from .arrow_residual import ArrowResidual

__all__ = [
    "AttentionMethod", "HeadMemory", "dense_flops", "make_method", "method_class", "method_names", "register_method",
    "Full", "Arrow", "Cache", "CfgShare", "ArrowResidual",
]
