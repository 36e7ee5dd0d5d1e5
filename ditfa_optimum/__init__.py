"""ditfa-optimum: head-wise attention compression for multimodal diffusion transformers (SD3, SD3.5, FLUX.1)."""

__version__ = "0.1.0.dev0"


def _source_checkout_kernels() -> None:
    """Installs map the repository's top-level ``kernels/`` to ``ditfa_optimum.kernels``; a bare source checkout on
    PYTHONPATH (the GPU benchmark machines) gets the same module from the same files."""
    import importlib.util
    import sys
    from pathlib import Path

    if "ditfa_optimum.kernels" in sys.modules or importlib.util.find_spec(".kernels", __name__) is not None:
        return
    init = Path(__file__).resolve().parents[1] / "kernels" / "__init__.py"
    if init.is_file():
        spec = importlib.util.spec_from_file_location(f"{__name__}.kernels", init,
                                                      submodule_search_locations=[str(init.parent)])
        module = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = module
        spec.loader.exec_module(module)


_source_checkout_kernels()

from .adapters import get_adapter, register_adapter
from .apply import apply, get_runtime, remove, reset_state, uniform_plan
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
    "__version__", "get_adapter", "register_adapter", "apply", "get_runtime", "remove", "reset_state", "uniform_plan",
    "TokenLayout", "arrow_mask", "window_blocks", "AttentionMethod", "make_method", "register_method",
    "CompressionPlan", "FlopReport", "ModuleSpec", "PlanReport", "BlockSpec", "TransformerFlopReport",
    "backend_names", "register_backend",
    "DiTFastAttnOptimizer", "DiTFastAttnConfig", "CalibrationStats", "calibrate", "search", "solve_heads",
    "load_pipeline", "Artifact", "ArtifactError", "read_artifact", "VerifyReport", "verify_artifact",
]
