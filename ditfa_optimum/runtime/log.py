"""Messages the runtime logs while a step runs, also from inside ``torch.compile(fullgraph=True)``.

Dynamo cannot trace a ``logging.Logger`` call: inside a compiled transformer it is a graph break, which
``fullgraph=True`` turns into an error (a generation cut short, then another started in the same compiled
transformer, failed to compile). Two ways out:

* `say`: registered by `allow_in_compiled_graphs` as a reorderable logging function, so Dynamo keeps it out of the
  graph and calls it after the graph runs. Its arguments must be constants when traced (names, reasons); a graph
  that took the branch logs on every run, as eager calls down that branch do.
* `note`: for messages that carry the step position or token counts, which Dynamo may trace as symbolic integers (it
  makes an integer that changes between calls symbolic, and cannot pass one to a logging function): logged by eager
  calls, left out inside a compiled graph.
"""

from __future__ import annotations

import logging

import torch


def say(logger_name: str, level: int, message: str, *args) -> None:
    """``logging.getLogger(logger_name).log(level, message, *args)``, in eager and compiled calls alike."""
    logging.getLogger(logger_name).log(level, message, *args)


def note(logger_name: str, level: int, message: str, *args) -> None:
    """As `say` in eager calls; nothing inside a compiled graph (see the module docstring)."""
    if not torch.compiler.is_compiling():
        logging.getLogger(logger_name).log(level, message, *args)


def allow_in_compiled_graphs() -> None:
    """Let Dynamo replay `say` after a compiled graph instead of breaking the graph (idempotent; called by `apply`,
    when diffusers has imported Dynamo already)."""
    import torch._dynamo.config

    torch._dynamo.config.reorderable_logging_functions.add(say)
