"""Attention methods, one file each, registered by name and stable integer id.

``full`` (0), ``arrow`` (1, window fraction), ``cache`` (2), ``cfg_share`` (3), ``arrow_residual`` (4, fraction),
``full_int8`` (5) and ``arrow_int8`` (6, fraction): Q.K^T in INT8 (`ditfa_optimum.fp8_attention`).

Block methods (per transformer block and step; their own registry and ids): ``compute`` (0), ``block_cache`` (1),
``block_taylor`` (2), ``mlp_cache`` (3).

Step methods (a whole denoising step without running the transformer): ``step_taylor`` (`step_taylor.py`).
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
from .full_int8 import FullInt8
from .arrow_int8 import ArrowInt8
from .block_base import (
    BlockMemory,
    BlockMethod,
    MemoryRef,
    Streams,
    add_residual,
    block_method_class,
    block_method_names,
    make_block_method,
    register_block_method,
    residual,
)
from .block_compute import Compute
from .block_cache import BlockCache
from .block_taylor import BlockTaylor
from .mlp_cache import MlpCache
from . import step_taylor

__all__ = [
    "AttentionMethod", "HeadMemory", "dense_flops", "make_method", "method_class", "method_names", "register_method",
    "Full", "Arrow", "Cache", "CfgShare", "ArrowResidual", "FullInt8", "ArrowInt8",
    "BlockMemory", "BlockMethod", "MemoryRef", "Streams", "add_residual", "block_method_class", "block_method_names",
    "make_block_method", "register_block_method", "residual", "Compute", "BlockCache", "BlockTaylor", "MlpCache",
]
