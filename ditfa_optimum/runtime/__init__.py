"""The runtime: backends (triton, flex, blocked, reference), dispatch, step state, the head-wise call."""

from . import blocked, flex, reference, triton_backend  # noqa: F401 - registers the backends
from .backends import backend_names, get_backend, register_backend
from .headwise import ModuleRuntime, PlanRuntime
from .state import StepState

__all__ = ["backend_names", "get_backend", "register_backend", "ModuleRuntime", "PlanRuntime", "StepState"]
