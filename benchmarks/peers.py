"""The peers: block caches users already have, swept over their own thresholds on the miniature MMDiT, measured by the
same FLOP counter (`flops.py`) and the same image metrics (`quality.image_scores`) as our plans.

    python benchmarks/peers.py --prompts 16 --out DIR        # prints a table, writes DIR/peers.json

Peers (`PEERS`: name -> settings, each swept from its documented default or typical values to aggressive ones so that
the sweep spans roughly 15% to 75% of whole-transformer FLOPs skipped on mini-mmdit at 20 steps; where a documented
default skips nothing here, the sweep starts just above it):

* ``fbcache`` -- diffusers' First Block Cache (`apply_first_block_cache`, `FirstBlockCacheConfig(threshold)`; default
  0.05, which skips nothing on mini-mmdit; the diffusers guide uses 0.2). Block 0 always runs; when the relative change
  of its residual since the last computed step is below the threshold, the remaining blocks are replaced by their
  cached residual.
  SD3 workaround: the LAST SD3 block (``context_pre_only=True``) returns ``None`` for the text stream, and FBC's tail
  hook subtracts the cached text stream from it (``TypeError``). The cache is therefore applied to the blocks without
  the last one (through a container module holding ``transformer_blocks[:-1]``, since FBC takes every block of the
  module's ``transformer_blocks``): the last block always runs, so a skipped step costs blocks 0 and N-1.
* ``magcache`` -- diffusers' MagCache (`apply_mag_cache`, `MagCacheConfig(threshold, max_skip_steps,
  retention_ratio, num_inference_steps, mag_ratios)`; defaults 0.06 / 3 / 0.2). It skips the whole block stack of a step
  (re-using the previous residual) while the error accumulated from the per-step magnitude ratios stays under the
  threshold. The ratios are model-specific: `calibrate_peers` runs diffusers' calibration mode
  (``MagCacheConfig(calibrate=True)``) on the calibration captions, reads the ratios diffusers logs at the end of each
  run ("MagCache Calibration Results: [...]", what its guide says to copy), averages them over the calibration batches
  and stores them (``calibration["magcache"]["mag_ratios"]``, also in every magcache row and in peers.json).
  SD3: works unchanged (the tail hook reads only the image stream of the last block).
* ``taylorseer`` -- diffusers' TaylorSeer (`apply_taylorseer_cache`, `TaylorSeerCacheConfig(cache_interval,
  disable_cache_before_step, max_order)`; the guide's FLUX example: 5 / 10 / 1). Default identifiers: the output of
  every block's attention module is Taylor-predicted between full steps, so only attention and its projections are
  skipped (MLPs and adaLN still run). Factors in float32 (the model's dtype) instead of the bf16 default.
* ``taylorseer-lite`` -- the same hook in its "lite" form: the transformer's ``proj_out`` output is Taylor-predicted
  and the blocks return zeros between full steps (whole-transformer skip).
  SD3 workaround: ``use_lite_mode=True`` marks every block "inactive", and the last SD3 block returns ``(None,
  hidden_states)``, which the hook cannot record (``AttributeError: 'NoneType' object has no attribute 'dtype'``).
  So the lite pattern is given explicitly: ``cache_identifiers=["proj_out"]``, ``skip_predict_identifiers`` = every
  block but the last, plus the last block's ``attn`` and ``ff`` (its only costly submodules, which return tensors).
* ``dbcache`` -- cache-dit's DBCache (`cache_dit.enable_cache` with `DBCacheConfig(Fn_compute_blocks,
  Bn_compute_blocks, residual_diff_threshold, max_warmup_steps, max_continuous_cached_steps)`; cache-dit defaults
  F8B0, 0.08, warmup 8 -- F must not exceed the 6 blocks, and 0.08 skips nothing here; its guides' fast setting F1B0,
  0.12, warmup 4-8). The first Fn blocks always run; when the relative L1 change of their residual is below the
  threshold, the middle blocks are replaced by their cached residual and the last Bn blocks run on the result.
  Custom pipeline: cache-dit knows pipelines by class name, and `MiniMMDiTPipeline` is not registered, so it is given a
  `BlockAdapter(pipe, transformer, blocks=transformer.transformer_blocks, forward_pattern=ForwardPattern.Pattern_1)`
  (what cache-dit's own StableDiffusion3 adapter declares) with ``enable_separate_cfg=False`` (CFG is batched).
  SD3 workaround: the last block returns no text stream. cache-dit 1.5.3 skips a ``None`` text residual and, on a
  cached step, keeps the text stream that entered the cached range, which is then never read (SD3 reads only the image
  stream after the last block) -- so Bn=0 works; settings with Bn=1 keep the last block computed as the auto-scaler.
* ``dbcache+taylorseer`` -- DBCache with cache-dit's TaylorSeer calibrator (`TaylorSeerCalibratorConfig(
  taylorseer_order=1)`: the cached residual is extrapolated instead of reused).
  SD3 workaround: with Bn=0 the cached range ends with the last block, which yields no text residual, and the text
  ("encoder") calibrator then fails on the first cached step (``AssertionError: State
  'transformer_blocks_Bn_residual' not found.``). With Bn=0 the settings pass ``enable_encoder_calibrator=False``
  (the text stream after the last block is never read, so nothing is lost); with Bn>=1 the calibrator's default (on).

Common ground for the diffusers hooks. `SD3Transformer2DModel` has no `CacheMixin`, so ``transformer.enable_cache``
does not exist and no pipeline of ours enters ``cache_context`` or calls ``_reset_stateful_cache``: the hook-level
``apply_*`` functions are used directly and `enable_peer` adds one small hook on the transformer that does what
diffusers' guide asks of a custom denoising loop: every transformer call runs in the context ``"cond_uncond"`` (CFG
is batched [uncond, cond] in one call) with its step index, and the stateful hooks are reset after the last of the
``steps`` calls of a generation. Hence ``steps`` must equal the pipeline's ``num_inference_steps``.

`disable_peer` removes every hook the peer added (diffusers: by name from each module's `HookRegistry`; cache-dit:
`cache_dit.disable_cache`), then drops what either left on the modules and the pipeline (an instance ``forward``, an
empty ``_diffusers_hook`` registry, cache-dit's ``_context_manager`` ...): the pipeline is stock again, bit for bit.

Installing cache-dit (1.5.3) without letting pip replace torch 2.13.0 CPU (its wheel requires ``torch>=2.7.1``,
``diffusers``, ``transformers``, ``packaging``, ``pyyaml``; every one is already in the venv)::

    .venv/bin/pip install cache-dit==1.5.3 --no-deps

``import cache_dit`` then works on CPU (at import time it needs only torch, diffusers, transformers, packaging and
yaml; its optional kernels, ray, torchao ... are imported lazily). Where all five are already installed, as in this
venv (transformers 5.24, PyYAML 6.0.4, packaging 26.4), a plain ``pip install cache-dit==1.5.3`` also leaves torch
alone (``pip install --dry-run`` finds every requirement satisfied); ``--no-deps`` makes sure of it. On the GPU machine
(torch 2.11, transformers, pyyaml, packaging present) carry its wheel with diffusers' (``pip download cache-dit==1.5.3
--no-deps``). Without cache-dit, the two cache-dit peers are skipped with a message (`peer_unavailable`).

Measured on CPU (2026-12-01, 1 thread, 4 held-out captions, 20 steps, calibration on 4 captions; whole-transformer FLOPs
skipped / PSNR vs dense): fbcache 0.12: 26.7% / 37.7 dB, 0.3: 50.0% / 20.1 dB; magcache 0.06/3/0.2: 40.0% / 39.2 dB,
0.25/5/0.1: 69.9% / 28.2 dB; taylorseer 5/10: 26.1% / 36.6 dB, 5/3: 42.4% / 29.5 dB; taylorseer-lite 2/6: 35.0% /
47.9 dB, 4/3: 64.9% / 30.7 dB; dbcache F1B0 0.12 W4: 29.1% / 48.8 dB, 0.35 W2: 62.4% / 29.8 dB; dbcache+taylorseer
the same cuts at 41.4 / 30.7 dB. A quality comparison needs more captions: run it on the GPU.
"""

from __future__ import annotations

import argparse
import ast
import contextlib
import io
import json
import logging
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from flops import count_flops, skipped_share  # noqa: E402
from mini_model import CALIBRATION_SEED, generate, held_out_captions  # noqa: E402
from quality import image_scores  # noqa: E402

os.environ.setdefault("CACHE_DIT_LOG_LEVEL", "error")  # cache-dit logs every context at INFO

#: name -> settings, each a dict of the peer's own parameters (for mini-mmdit at 20 steps, 6 blocks); mildest first,
#: variants (a second order, Bn=1) last. The ranges in the comments are whole-transformer FLOPs skipped, measured on one
#: held-out caption (CPU, 2026-12-01); the adaptive caches (fbcache, dbcache) move a little with the captions.
PEERS: dict[str, tuple[dict, ...]] = {
    # diffusers' default 0.05 (and 0.08) skip nothing on mini-mmdit; 0.1 .. 0.5 span ~20% .. ~57%
    "fbcache": tuple(dict(threshold=t) for t in (0.1, 0.12, 0.15, 0.2, 0.3, 0.5)),
    "magcache": (  # ~15% .. ~75%
        dict(threshold=0.02, max_skip_steps=2, retention_ratio=0.2),
        dict(threshold=0.03, max_skip_steps=2, retention_ratio=0.2),
        dict(threshold=0.06, max_skip_steps=3, retention_ratio=0.2),  # diffusers' defaults
        dict(threshold=0.12, max_skip_steps=4, retention_ratio=0.2),
        dict(threshold=0.25, max_skip_steps=5, retention_ratio=0.1),
        dict(threshold=0.5, max_skip_steps=8, retention_ratio=0.1),
    ),
    "taylorseer": (  # attention only: ~16% .. ~49% (the MLPs always run)
        dict(cache_interval=2, disable_cache_before_step=10, max_order=1),
        dict(cache_interval=2, disable_cache_before_step=6, max_order=1),
        dict(cache_interval=5, disable_cache_before_step=10, max_order=1),  # the diffusers guide's example
        dict(cache_interval=3, disable_cache_before_step=5, max_order=1),
        dict(cache_interval=5, disable_cache_before_step=3, max_order=1),  # diffusers' defaults
        dict(cache_interval=8, disable_cache_before_step=3, max_order=1),
        dict(cache_interval=5, disable_cache_before_step=3, max_order=2),
    ),
    "taylorseer-lite": (  # ~15% .. ~75%
        dict(cache_interval=2, disable_cache_before_step=14, max_order=1),
        dict(cache_interval=2, disable_cache_before_step=6, max_order=1),
        dict(cache_interval=3, disable_cache_before_step=5, max_order=1),
        dict(cache_interval=4, disable_cache_before_step=3, max_order=1),
        dict(cache_interval=5, disable_cache_before_step=3, max_order=1),
        dict(cache_interval=8, disable_cache_before_step=3, max_order=1),
        dict(cache_interval=4, disable_cache_before_step=3, max_order=2),
    ),
    # cache-dit's default threshold 0.08 skips nothing on mini-mmdit; 0.09 .. 0.6 span ~17% .. ~67%
    "dbcache": (
        dict(Fn=1, Bn=0, threshold=0.09, warmup=4, max_continuous=-1),
        dict(Fn=1, Bn=0, threshold=0.12, warmup=4, max_continuous=-1),  # cache-dit's fast setting
        dict(Fn=1, Bn=0, threshold=0.2, warmup=4, max_continuous=-1),
        dict(Fn=1, Bn=0, threshold=0.35, warmup=2, max_continuous=-1),
        dict(Fn=1, Bn=0, threshold=0.6, warmup=2, max_continuous=-1),
        dict(Fn=1, Bn=1, threshold=0.2, warmup=4, max_continuous=-1),
    ),
    "dbcache+taylorseer": (
        dict(Fn=1, Bn=0, threshold=0.09, warmup=4, max_continuous=-1, order=1),
        dict(Fn=1, Bn=0, threshold=0.12, warmup=4, max_continuous=-1, order=1),
        dict(Fn=1, Bn=0, threshold=0.2, warmup=4, max_continuous=-1, order=1),
        dict(Fn=1, Bn=0, threshold=0.35, warmup=2, max_continuous=-1, order=1),
        dict(Fn=1, Bn=0, threshold=0.6, warmup=2, max_continuous=-1, order=1),
        dict(Fn=1, Bn=1, threshold=0.2, warmup=4, max_continuous=-1, order=1),
    ),
}

CONTEXT_HOOK = "ditfa_peers_cache_context"
CACHE_DIT_INSTALL = "pip install cache-dit==1.5.3 --no-deps"


def setting_label(setting: dict) -> str:
    """Short text for a setting: ``"threshold=0.08"``, ``"Fn=1 Bn=0 threshold=0.12 ..."``."""
    return " ".join(f"{k}={v:g}" if isinstance(v, float) else f"{k}={v}" for k, v in setting.items())


# --- registry ---------------------------------------------------------------------------------------------------------

@dataclass
class _Peer:
    enable: Callable  # (pipe, setting, steps, calibration) -> undo callable
    needs: Callable[[], None] = lambda: None  # raises ImportError when the peer's package is missing
    calibrate: Callable | None = None  # (pipe, captions, steps, guidance, batch) -> dict


_REGISTRY: dict[str, _Peer] = {}


def register_peer(name: str, *, needs: Callable[[], None] | None = None, calibrate: Callable | None = None):
    """Register ``enable(pipe, setting, steps, calibration) -> undo`` as the peer ``name``."""
    def decorator(enable):
        if name in _REGISTRY:
            raise ValueError(f"peer {name!r} is already registered")
        _REGISTRY[name] = _Peer(enable, needs or (lambda: None), calibrate)
        return enable

    return decorator


def peer_unavailable(name: str) -> str | None:
    """None when the peer ``name`` can run here, else why not (e.g. cache-dit is not installed)."""
    if name not in _REGISTRY:
        raise ValueError(f"unknown peer {name!r}; choose one of {sorted(_REGISTRY)}")
    try:
        _REGISTRY[name].needs()
    except ImportError as e:
        return str(e)
    return None


@dataclass
class PeerHandle:
    """What `enable_peer` returns; pass it to `disable_peer`."""

    name: str
    setting: dict
    steps: int
    _undo: Callable[[], None] = field(repr=False)
    _snapshot: "_Snapshot" = field(repr=False)
    active: bool = True


def enable_peer(pipe, name: str, setting: dict, *, steps: int, calibration: dict | None = None) -> PeerHandle:
    """Install the peer ``name`` with ``setting`` on ``pipe`` (its transformer, and for cache-dit the pipeline).

    Args:
        pipe: a pipeline with an SD3-style transformer (``pipe.transformer.transformer_blocks``).
        name: a key of `PEERS`.
        setting: the peer's parameters (see `PEERS`).
        steps: the ``num_inference_steps`` the pipeline will be called with (the hooks' step bookkeeping).
        calibration: `calibrate_peers` output; magcache needs ``calibration["magcache"]["mag_ratios"]``.

    Returns:
        a `PeerHandle` for `disable_peer`.

    Example:
        >>> handle = enable_peer(pipe, "fbcache", dict(threshold=0.12), steps=20)      # doctest: +SKIP
        >>> images = generate(pipe, captions, seeds, 20, 4.0, 8)                        # doctest: +SKIP
        >>> disable_peer(pipe, handle)                                                  # doctest: +SKIP
    """
    reason = peer_unavailable(name)
    if reason is not None:
        raise RuntimeError(f"peer {name!r} cannot run here: {reason}")
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    snapshot = _Snapshot.take(pipe)
    try:
        undo = _REGISTRY[name].enable(pipe, dict(setting), steps, calibration or {})
    except BaseException:
        snapshot.restore(pipe)
        raise
    return PeerHandle(name, dict(setting), steps, undo, snapshot)


def disable_peer(pipe, handle: PeerHandle) -> None:
    """Remove the peer of ``handle``: afterwards ``pipe`` computes exactly what it computed before `enable_peer`."""
    if not handle.active:
        raise RuntimeError(f"peer {handle.name!r} is already disabled")
    try:
        handle._undo()
    finally:
        handle._snapshot.restore(pipe)
        handle.active = False


def calibrate_peers(pipe, captions: list[str], steps: int, guidance: float, batch: int,
                    peers: list[str] | None = None) -> dict:
    """Run every calibration the peers need (magcache: its magnitude ratios) on ``captions``; {peer: data}."""
    out = {}
    for name in peers if peers is not None else list(_REGISTRY):
        peer = _REGISTRY[name]
        if peer.calibrate is not None and peer_unavailable(name) is None:
            out[name] = peer.calibrate(pipe, captions, steps, guidance, batch)
    return out


class _Snapshot:
    """The instance attributes of the pipeline and every transformer module, and the pipeline class's ``__call__``."""

    def __init__(self, pipe, modules: dict[int, tuple[nn.Module, dict]]):
        self.pipe_keys = set(vars(pipe))
        self.class_attrs = dict(vars(type(pipe)))  # cache-dit wraps the pipeline CLASS's __call__
        self.modules = modules

    @classmethod
    def take(cls, pipe) -> "_Snapshot":
        return cls(pipe, {id(m): (m, dict(vars(m))) for m in pipe.transformer.modules()})

    def restore(self, pipe) -> None:
        for key in set(vars(pipe)) - self.pipe_keys:
            delattr(pipe, key)
        cls = type(pipe)
        for key in set(vars(cls)) - set(self.class_attrs):
            delattr(cls, key)
        if vars(cls).get("__call__") is not self.class_attrs.get("__call__"):
            cls.__call__ = self.class_attrs["__call__"]
        for module, before in self.modules.values():
            for key in set(vars(module)) - set(before):
                delattr(module, key)
            for key in ("forward",):
                if key in before and vars(module)[key] is not before[key]:
                    setattr(module, key, before[key])


# --- diffusers hooks --------------------------------------------------------------------------------------------------

def _diffusers_context(name: str, step: int, steps: int):
    from diffusers.hooks import hooks as diffusers_hooks

    cls = getattr(diffusers_hooks, "CacheContext", None)
    return name if cls is None else cls(name=name, step_index=step, num_inference_steps=steps)


def _state_managers(transformer: nn.Module) -> list:
    """The StateManagers of every stateful diffusers hook under ``transformer`` (shared ones once)."""
    from diffusers.hooks.hooks import StateManager

    found = {}
    for module in transformer.modules():
        registry = getattr(module, "_diffusers_hook", None)
        if registry is None:
            continue
        for hook in registry.hooks.values():
            if getattr(hook, "_is_stateful", False):
                for value in vars(hook).values():
                    if isinstance(value, StateManager):
                        found[id(value)] = value
    return list(found.values())


def _context_hook_class():
    from diffusers.hooks import ModelHook
    from diffusers.hooks.hooks import HookRegistry

    class PipelineCacheContext(ModelHook):
        """What diffusers asks of a custom denoising loop, for a pipeline that cannot: every transformer call runs in
        the context "cond_uncond" (CFG batched) with its step index; the stateful hooks are reset after the last of
        ``steps`` calls (one generation)."""

        def __init__(self, managers: list, steps: int):
            super().__init__()
            self.managers, self.steps, self.step = managers, steps, 0

        def pre_forward(self, module, *args, **kwargs):
            context = _diffusers_context("cond_uncond", self.step, self.steps)
            for manager in self.managers:
                manager.set_context(context)
            return args, kwargs

        def post_forward(self, module, output):
            self.step += 1
            if self.step == self.steps:
                self.step = 0
                HookRegistry.check_if_exists_or_initialize(module).reset_stateful_hooks(recurse=True)
            return output

    return PipelineCacheContext


def _with_diffusers_hooks(pipe, steps: int, apply: Callable[[nn.Module], None]) -> Callable[[], None]:
    """Apply diffusers cache hooks with ``apply(transformer)``, add the context hook; returns the undo."""
    from diffusers.hooks.hooks import HookRegistry

    transformer = pipe.transformer
    before = {id(m): set(m._diffusers_hook.hooks) if hasattr(m, "_diffusers_hook") else set()
              for m in transformer.modules()}
    apply(transformer)
    registry = HookRegistry.check_if_exists_or_initialize(transformer)
    registry.register_hook(_context_hook_class()(_state_managers(transformer), steps), CONTEXT_HOOK)

    def undo():
        for module in transformer.modules():
            registry = getattr(module, "_diffusers_hook", None)
            if registry is None:
                continue
            for name in reversed(list(registry.hooks)):
                if name not in before.get(id(module), set()):
                    registry.remove_hook(name, recurse=False)

    return undo


def _sd3_blocks_with_text_output(transformer: nn.Module) -> nn.ModuleList:
    """The blocks that return both streams: all but a last ``context_pre_only`` block (SD3's last block)."""
    blocks = transformer.transformer_blocks
    return blocks[:-1] if getattr(blocks[-1], "context_pre_only", False) else blocks


@register_peer("fbcache")
def _enable_fbcache(pipe, setting: dict, steps: int, calibration: dict):
    from diffusers.hooks import FirstBlockCacheConfig, apply_first_block_cache

    config = FirstBlockCacheConfig(threshold=float(setting["threshold"]))

    def apply(transformer):
        cached = nn.Module()  # FBC hooks every block of a module's `transformer_blocks`: hand it all but the last
        cached.transformer_blocks = _sd3_blocks_with_text_output(transformer)
        apply_first_block_cache(cached, config)

    return _with_diffusers_hooks(pipe, steps, apply)


def _magcache_config(setting: dict, steps: int, calibration: dict):
    from diffusers.hooks import MagCacheConfig

    ratios = (calibration.get("magcache") or {}).get("mag_ratios")
    if ratios is None:
        raise ValueError("magcache needs calibration['magcache']['mag_ratios']: run calibrate_peers first")
    return MagCacheConfig(threshold=float(setting["threshold"]), max_skip_steps=int(setting["max_skip_steps"]),
                          retention_ratio=float(setting["retention_ratio"]), num_inference_steps=steps,
                          mag_ratios=list(ratios))


class _RecordRatios(logging.Handler):
    """Collects the ratio lists diffusers' MagCache logs at the end of each calibration run."""

    PREFIX = "MagCache Calibration Results:"

    def __init__(self):
        super().__init__(logging.INFO)
        self.runs: list[list[float]] = []

    def emit(self, record):
        message = record.getMessage()
        if message.startswith(self.PREFIX):
            self.runs.append([float(x) for x in ast.literal_eval(message[len(self.PREFIX):].strip())])


def _calibrate_magcache(pipe, captions: list[str], steps: int, guidance: float, batch: int) -> dict:
    """diffusers' documented calibration: ``MagCacheConfig(calibrate=True)``, full runs, the logged ratios."""
    from diffusers.hooks import MagCacheConfig, apply_mag_cache

    config = MagCacheConfig(calibrate=True, num_inference_steps=steps)
    snapshot = _Snapshot.take(pipe)
    undo = _with_diffusers_hooks(pipe, steps, lambda t: apply_mag_cache(t, config))
    logger = logging.getLogger("diffusers.hooks.mag_cache")
    handler, level, propagate = _RecordRatios(), logger.level, logger.propagate
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    logger.propagate = False  # the ratios are returned, not logged
    try:
        with contextlib.redirect_stdout(io.StringIO()):  # it also prints the ratios
            generate(pipe, captions, list(range(len(captions))), steps, guidance, batch)
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)
        logger.propagate = propagate
        undo()
        snapshot.restore(pipe)
    if not handler.runs or any(len(r) != steps for r in handler.runs):
        raise RuntimeError(f"MagCache calibration logged {[len(r) for r in handler.runs]} ratio lists; expected one "
                           f"of {steps} per calibration batch")
    ratios = torch.tensor(handler.runs, dtype=torch.float64).mean(0)
    return dict(mag_ratios=[round(float(r), 5) for r in ratios], captions=len(captions), steps=steps,
                batches=len(handler.runs))


@register_peer("magcache", calibrate=_calibrate_magcache)
def _enable_magcache(pipe, setting: dict, steps: int, calibration: dict):
    from diffusers.hooks import apply_mag_cache

    config = _magcache_config(setting, steps, calibration)
    return _with_diffusers_hooks(pipe, steps, lambda t: apply_mag_cache(t, config))


def _taylorseer_config(setting: dict, lite: bool, transformer: nn.Module):
    from diffusers.hooks import TaylorSeerCacheConfig

    kwargs = dict(cache_interval=int(setting["cache_interval"]),
                  disable_cache_before_step=int(setting["disable_cache_before_step"]),
                  max_order=int(setting.get("max_order", 1)), taylor_factors_dtype=transformer.dtype)
    if lite:  # use_lite_mode's pattern, minus the last SD3 block (its None text output cannot be recorded)
        blocks = transformer.transformer_blocks
        last = len(blocks) - 1
        skipped = [rf"transformer_blocks\.{i}" for i in range(len(_sd3_blocks_with_text_output(transformer)))]
        if len(skipped) == last:
            skipped.append(rf"transformer_blocks\.{last}\.(attn|attn2|ff|ff_context)")
        kwargs.update(cache_identifiers=[r"proj_out"], skip_predict_identifiers=skipped)
    return TaylorSeerCacheConfig(**kwargs)


@register_peer("taylorseer")
def _enable_taylorseer(pipe, setting: dict, steps: int, calibration: dict):
    from diffusers.hooks import apply_taylorseer_cache

    config = _taylorseer_config(setting, False, pipe.transformer)
    return _with_diffusers_hooks(pipe, steps, lambda t: apply_taylorseer_cache(t, config))


@register_peer("taylorseer-lite")
def _enable_taylorseer_lite(pipe, setting: dict, steps: int, calibration: dict):
    from diffusers.hooks import apply_taylorseer_cache

    config = _taylorseer_config(setting, True, pipe.transformer)
    return _with_diffusers_hooks(pipe, steps, lambda t: apply_taylorseer_cache(t, config))


# --- cache-dit --------------------------------------------------------------------------------------------------------

def _needs_cache_dit() -> None:
    try:
        import cache_dit  # noqa: F401
    except ImportError as e:
        raise ImportError(f"cache-dit is not installed ({e}); install it with `{CACHE_DIT_INSTALL}`") from e


def _enable_dbcache(pipe, setting: dict, steps: int, taylorseer: bool):
    import cache_dit

    adapter = cache_dit.BlockAdapter(pipe=pipe, transformer=pipe.transformer,
                                     blocks=pipe.transformer.transformer_blocks,
                                     forward_pattern=cache_dit.ForwardPattern.Pattern_1, check_forward_pattern=True,
                                     has_separate_cfg=False)
    config = cache_dit.DBCacheConfig(Fn_compute_blocks=int(setting["Fn"]), Bn_compute_blocks=int(setting["Bn"]),
                                     residual_diff_threshold=float(setting["threshold"]),
                                     max_warmup_steps=int(setting["warmup"]),
                                     max_continuous_cached_steps=int(setting.get("max_continuous", -1)),
                                     max_cached_steps=int(setting.get("max_cached", -1)),
                                     enable_separate_cfg=False, num_inference_steps=steps)
    calibrator = None
    if taylorseer:  # the text-stream calibrator only where a cached text residual exists (SD3: Bn >= 1)
        text_residual = int(setting["Bn"]) >= 1 or len(_sd3_blocks_with_text_output(pipe.transformer)) == len(
            pipe.transformer.transformer_blocks)
        calibrator = cache_dit.TaylorSeerCalibratorConfig(taylorseer_order=int(setting.get("order", 1)),
                                                          enable_encoder_calibrator=text_residual)
    adapter = cache_dit.enable_cache(adapter, cache_config=config, calibrator_config=calibrator)
    return lambda: cache_dit.disable_cache(adapter)


@register_peer("dbcache", needs=_needs_cache_dit)
def _enable_dbcache_plain(pipe, setting: dict, steps: int, calibration: dict):
    return _enable_dbcache(pipe, setting, steps, taylorseer=False)


@register_peer("dbcache+taylorseer", needs=_needs_cache_dit)
def _enable_dbcache_taylorseer(pipe, setting: dict, steps: int, calibration: dict):
    return _enable_dbcache(pipe, setting, steps, taylorseer=True)


# --- the sweep --------------------------------------------------------------------------------------------------------

def run_peer_sweep(pipe, captions: list[str], seeds: list[int], dense_images: torch.Tensor,
                   calibration_captions: list[str], steps: int, guidance: float, batch: int,
                   device: str | torch.device | None = None, peers: dict[str, tuple[dict, ...]] | None = None,
                   calibration: dict | None = None, log: Callable[[str], None] | None = print) -> list[dict]:
    """Every peer over its settings: images, whole-transformer FLOPs skipped, PSNR and SSIM against ``dense_images``.

    Args:
        pipe: the pipeline (moved to ``device`` when one is given).
        captions, seeds: the evaluation set (caption i uses seed i); ``dense_images`` are its dense images.
        calibration_captions: what the peers that need a calibration (magcache) calibrate on.
        steps, guidance, batch: as in `mini_model.generate`.
        peers: name -> settings (default `PEERS`); unavailable peers are skipped with a message.
        calibration: a `calibrate_peers` result to reuse (default: computed here).
        log: where progress lines go (None: silent).

    Returns:
        rows ``dict(curve, setting, whole_cut, psnr, psnr_min, ssim, faithfulness, drift_px, area_change,
        flops_per_image, dense_flops_per_image, attention_cut, seconds)``; magcache rows also carry their
        ``mag_ratios``.

    The dense FLOPs are counted on a dense run of the first caption (dense FLOPs per image do not depend on the caption
    or the batch).
    """
    log = log or (lambda _: None)
    if device is not None:
        pipe.to(device)
    peers = dict(PEERS if peers is None else peers)
    for name in list(peers):
        reason = peer_unavailable(name)
        if reason is not None:
            log(f"skipping {name}: {reason}")
            del peers[name]
    if calibration is None:
        start = time.perf_counter()
        calibration = calibrate_peers(pipe, calibration_captions, steps, guidance, batch, list(peers))
        if calibration:
            log(f"calibrated {', '.join(calibration)} on {len(calibration_captions)} captions in "
                f"{time.perf_counter() - start:.1f} s")
    with count_flops(pipe.transformer) as dense:
        generate(pipe, captions[:1], seeds[:1], steps, guidance, 1)
    dense_per_image = dense.per_image(1)
    rows = []
    for name, settings in peers.items():
        for setting in settings:
            handle = enable_peer(pipe, name, setting, steps=steps, calibration=calibration)
            start = time.perf_counter()
            try:
                with count_flops(pipe.transformer) as counted:
                    images = generate(pipe, captions, seeds, steps, guidance, batch)
            finally:
                disable_peer(pipe, handle)
            row = dict(curve=name, setting=setting_label(setting), whole_cut=skipped_share(
                counted.per_image(len(captions)), dense_per_image), **image_scores(dense_images, images, captions),
                flops_per_image=counted.per_image(len(captions)),
                dense_flops_per_image=dense_per_image,
                attention_cut=skipped_share(counted.attention / len(captions), dense.attention),
                seconds=time.perf_counter() - start, params=dict(setting))
            if name in calibration and "mag_ratios" in calibration[name]:
                row["mag_ratios"] = calibration[name]["mag_ratios"]
            rows.append(row)
            log(f"{name:20s} {row['setting']:48s} whole cut {row['whole_cut']:6.1%}  PSNR {row['psnr']:6.2f} dB  "
                f"SSIM {row['ssim']:.4f}  drift {row['drift_px']:.2f} px  ({row['seconds']:.0f} s)")
    return rows


def table(rows: list[dict]) -> str:
    """A markdown table of sweep rows."""
    lines = ["| peer | setting | whole-transformer FLOPs skipped | PSNR (dB) | SSIM |", "|---|---|---|---|---|"]
    lines += [f"| {r['curve']} | {r['setting']} | {r['whole_cut']:.1%} | {r['psnr']:.2f} | {r['ssim']:.3f} |"
              for r in rows]
    return "\n".join(lines)


def main(argv=None) -> int:
    from ditfa_optimum.mini import DEFAULTS, MiniMMDiTPipeline, mini_pipeline

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None, help="miniature pipeline directory (default: the shipped mini-mmdit)")
    parser.add_argument("--out", required=True, help="directory for peers.json")
    parser.add_argument("--prompts", type=int, default=16, help="held-out evaluation captions")
    parser.add_argument("--calibration-prompts", type=int, default=8, help="calibration captions (magcache)")
    parser.add_argument("--peers", nargs="+", default=list(PEERS), choices=list(PEERS))
    parser.add_argument("--settings", type=int, default=None, help="only the first N settings of each peer")
    parser.add_argument("--steps", type=int, default=DEFAULTS["num_inference_steps"])
    parser.add_argument("--guidance", type=float, default=DEFAULTS["guidance_scale"])
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    pipe = mini_pipeline(args.model, device=args.device)
    calibration_captions = MiniMMDiTPipeline.default_prompts(args.calibration_prompts, CALIBRATION_SEED)
    captions = held_out_captions(args.prompts, calibration_captions)
    seeds = list(range(len(captions)))
    start = time.perf_counter()
    dense = generate(pipe, captions, seeds, args.steps, args.guidance, args.batch)
    print(f"dense: {len(captions)} images in {time.perf_counter() - start:.1f} s", flush=True)
    peers = {name: PEERS[name][: args.settings] for name in args.peers}
    calibration = calibrate_peers(pipe, calibration_captions, args.steps, args.guidance, args.batch,
                                  [n for n in peers if peer_unavailable(n) is None])
    rows = run_peer_sweep(pipe, captions, seeds, dense, calibration_captions, args.steps, args.guidance, args.batch,
                          peers=peers, calibration=calibration, log=lambda line: print(line, flush=True))
    device = torch.cuda.get_device_name() if args.device.startswith("cuda") else "cpu"
    result = dict(meta=dict(date=time.strftime("%Y-%m-%d"), device=device, torch=torch.__version__,
                            command="python benchmarks/peers.py " + " ".join(sys.argv[1:] if argv is None else argv)),
                  steps=args.steps, guidance=args.guidance, evaluation_prompts=len(captions),
                  calibration_prompts=calibration_captions, calibration=calibration,
                  unavailable={n: peer_unavailable(n) for n in args.peers if peer_unavailable(n) is not None},
                  rows=rows)
    (out / "peers.json").write_text(json.dumps(result, indent=1) + "\n")
    print()
    print(table(rows))
    return 0


__all__ = ["PEERS", "PeerHandle", "calibrate_peers", "disable_peer", "enable_peer", "peer_unavailable",
           "register_peer", "run_peer_sweep", "setting_label", "table"]

if __name__ == "__main__":
    raise SystemExit(main())
