"""ditfa-optimum: head-wise attention compression for multimodal diffusion transformers (SD3, SD3.5, FLUX.1)."""

__version__ = "0.1.0.dev0"

from .adapters import get_adapter, register_adapter
from .apply import apply, compile_blocks, get_runtime, remove, reset_state, uniform_plan, use_cuda_graphs
from .calibrate import CalibrationStats, calibrate
from .config import DiTFastAttnConfig
from .masks import TokenLayout, arrow_mask, window_blocks
from .methods import AttentionMethod, make_method, register_method
from .loading import load_pipeline
from .optimizer import DiTFastAttnOptimizer
from .plan import BlockSpec, CompressionPlan, FlopReport, ModuleSpec, PlanReport, TransformerFlopReport
from .runtime import backend_names, register_backend
from .search import search, solve_heads
from .serialization import Artifact, ArtifactError, read_artifact
from .verify import VerifyReport, verify_artifact

__all__ = [
    "__version__", "get_adapter", "register_adapter", "apply", "compile_blocks", "get_runtime", "remove", "reset_state", "uniform_plan",
    "use_cuda_graphs",
    "TokenLayout", "arrow_mask", "window_blocks", "AttentionMethod", "make_method", "register_method",
    "CompressionPlan", "FlopReport", "ModuleSpec", "PlanReport", "BlockSpec", "TransformerFlopReport",
    "backend_names", "register_backend",
    "DiTFastAttnOptimizer", "DiTFastAttnConfig", "CalibrationStats", "calibrate", "search", "solve_heads",
    "load_pipeline", "Artifact", "ArtifactError", "read_artifact", "VerifyReport", "verify_artifact",
]
