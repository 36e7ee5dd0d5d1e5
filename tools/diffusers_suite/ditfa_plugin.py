"""A pytest plugin that runs diffusers' own transformer test suites with a ditfa plan on every model they build.

Every ``SD3Transformer2DModel`` and ``FluxTransformer2DModel`` constructed while the tests run -- directly, through
``from_config``, or loaded back by ``from_pretrained`` in the save/load tests -- gets a plan applied at the end of its
``__init__`` (``ditfa_optimum.apply``). The variant is chosen by an environment variable:

    DITFA_SUITE_PLAN=none    no plan (the baseline; the plugin only pins and reports the installed diffusers)
    DITFA_SUITE_PLAN=full    every head `full` at every step: must behave exactly like the stock model
    DITFA_SUITE_PLAN=mixed   heads mix `full`, `arrow:1/2`, `cache` and `cfg_share` (see `mixed_plan`)

Run it from the root of a diffusers source tree (its ``tests/`` are used), with the installed diffusers:

    cd /tmp/diffusers-src
    PYTHONPATH=/work/main/tools/diffusers_suite DITFA_SUITE_PLAN=mixed \\
        /work/main/.venv/bin/python -m pytest -p ditfa_plugin tests/models/transformers/test_models_transformer_sd3.py

``tools/diffusers_suite/run.sh DIFFUSERS_SRC`` runs the three variants on both suites and prints the counts.

The plugin imports diffusers when pytest loads it, before diffusers' ``tests/conftest.py`` puts the checkout's
``src/`` on ``sys.path``; so the tests run against the installed package even where the tree has a ``src/`` (checked:
without the plugin, such a ``src/`` shadows it), and the report header names the version and location.

Steps. The tests call a bare transformer, so the plan's step state follows the call's timestep (docs/runtime.md,
"Step state", source 3): a lower timestep is the next step, a higher one starts a new generation at step 0, an equal
one is another call ("branch") of the same step. diffusers' tests draw their timesteps from fixed seeds, so almost
every call lands on step 0 of a fresh or repeated generation; `NUM_STEPS` only has to exceed the longest run of
strictly falling timesteps a test makes (in these suites every planned module ran at step 0 only: see the summary),
and 8 steps are a plan a user of a bare transformer could apply. The mixed plan therefore puts `arrow` and
`cfg_share` heads at step 0 already (a `cache` head cannot run at step 0: nothing to reuse), so the suites exercise
them; its `cache` heads run only where a test calls with a falling timestep. The terminal summary counts which
(step, CFG-shared) combinations the planned attention modules actually ran.
"""

from __future__ import annotations

import functools
import os
from collections import Counter

import pytest
import torch

import diffusers  # imported when pytest loads the plugin, on purpose: the installed package, not the checkout's src/
import ditfa_optimum as dfa
from diffusers import FluxTransformer2DModel, SD3Transformer2DModel

VARIANTS = ("none", "full", "mixed")
#: steps of every plan (see the module docstring)
NUM_STEPS = 8
#: mask block size in tokens: the suites' images are tiny (FLUX: 16 image tokens), so that an arrow head keeps a real
#: band (FLUX: 2 of 4 blocks; SD3: 128 of 256) instead of falling back to full attention on a single block. (On CUDA
#: the fused kernel needs multiples of 16, so arrow calls go to its FlexAttention fallback, with one warning.)
BLOCK_SIZE = 4
#: the heads' methods in the mixed plan, cycled over the heads of all modules in order (so even FLUX's tiny model, 2
#: modules of 2 heads, runs each once); `cache` heads run `full` at step 0
MIXED_CYCLE = ("full", "arrow:1/2", "cache", "cfg_share")
#: whether a family's calls batch CFG as [uncond, cond] halves (the suites' SD3 inputs have batch 2; FLUX.1 never
#: batches CFG, so its `cfg_share` heads compute in full, as under a FLUX pipeline)
BATCHED_CFG = {"SD3Transformer2DModel": True, "FluxTransformer2DModel": False}


def variant() -> str:
    name = os.environ.get("DITFA_SUITE_PLAN", "none").strip().lower()
    if name not in VARIANTS:
        raise pytest.UsageError(f"DITFA_SUITE_PLAN={name!r} is not a plan variant; use one of {', '.join(VARIANTS)}")
    return name


def mixed_plan(model: torch.nn.Module) -> dfa.CompressionPlan:
    """Every head of ``model`` runs one of `MIXED_CYCLE` at every step (``cache`` heads run `full` at step 0)."""
    plan = dfa.uniform_plan(model, num_steps=NUM_STEPS, method="full", block_size=BLOCK_SIZE)
    heads = [(spec.name, head) for spec in plan.modules for head in range(spec.num_heads)]
    for n, (module, head) in enumerate(heads):
        method = MIXED_CYCLE[n % len(MIXED_CYCLE)]
        for step in range(NUM_STEPS):
            if method != "full" and not (method == "cache" and step == 0):
                plan.set(module, step, head, method)
    return plan


def make_plan(model: torch.nn.Module, name: str) -> dfa.CompressionPlan:
    if name == "full":
        return dfa.uniform_plan(model, num_steps=NUM_STEPS, method="full", block_size=BLOCK_SIZE)
    return mixed_plan(model)


class _Stats:
    """What the plugin did: models planned per class, and per (step, CFG shared) how many planned attention modules
    ran at least once so."""

    def __init__(self):
        self.models = Counter()
        self.calls = Counter()
        self._pending = []  # module runtimes of the models built by the running test

    def planned(self, model: torch.nn.Module) -> None:
        self.models[type(model).__name__] += 1
        self._pending += [m.processor.runtime for _, m in dfa.get_adapter(model).attention_modules(model)]

    def collect(self) -> None:
        """Read what each module runtime computed from its memo of band widths (one entry per (step, layout, batch,
        cfg) it ran eagerly; calls inside ``torch.compile`` are not memoised, so not counted)."""
        for module_runtime in self._pending:
            for step, cfg in {(step, cfg) for step, _layout, _batch, cfg in module_runtime._widths}:
                self.calls[(step, cfg)] += 1
        self._pending.clear()


STATS = _Stats()


def _plan_every_new(cls: type, name: str) -> None:
    """Wrap ``cls.__init__`` so each new instance gets a plan. ``functools.wraps`` keeps the signature diffusers'
    ``ConfigMixin`` reads from ``__init__``."""
    original = cls.__init__

    @functools.wraps(original)
    def __init__(self, *args, **kwargs):
        original(self, *args, **kwargs)
        if type(self) is cls:  # only these classes: a subclass's own __init__ has not finished here
            dfa.apply(self, make_plan(self, name), cfg=BATCHED_CFG[cls.__name__] if name == "mixed" else None)
            STATS.planned(self)

    cls.__init__ = __init__


def pytest_configure(config):
    name = variant()
    config._ditfa_plan = name
    if name != "none":
        for cls in (SD3Transformer2DModel, FluxTransformer2DModel):
            _plan_every_new(cls, name)


def pytest_report_header(config):
    return (f"ditfa plan: {config._ditfa_plan} (steps {NUM_STEPS}, block size {BLOCK_SIZE}); "
            f"diffusers {diffusers.__version__} from {os.path.dirname(diffusers.__file__)}")


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_teardown(item):
    yield
    STATS.collect()


def pytest_terminal_summary(terminalreporter, config):
    name = config._ditfa_plan
    if name == "none":
        terminalreporter.write_line("ditfa: no plan applied (DITFA_SUITE_PLAN=none)")
        return
    STATS.collect()
    models = ", ".join(f"{k}: {v}" for k, v in sorted(STATS.models.items())) or "none"
    calls = ", ".join(f"step {step}{' cfg-shared' if cfg else ''}: {n}"
                      for (step, cfg), n in sorted(STATS.calls.items()))
    terminalreporter.write_line(f"ditfa: plan {name!r} applied to {sum(STATS.models.values())} models ({models})")
    terminalreporter.write_line(f"ditfa: planned attention modules that ran, by step: {calls or 'none'}")
