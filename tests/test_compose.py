"""A plan and another step cache on the same transformer: refused clearly, whichever comes first."""

import pytest
import torch

from ditfa_optimum import apply, remove, uniform_plan
from ditfa_optimum.apply import foreign_caches
from ditfa_optimum.embedded import DEFAULTS, embedded_pipeline

hooks = pytest.importorskip("diffusers.hooks")


def _first_block_cache(transformer):
    hooks.apply_first_block_cache(transformer, hooks.FirstBlockCacheConfig(threshold=0.2))


def _taylorseer(transformer):
    hooks.apply_taylorseer_cache(transformer, hooks.TaylorSeerCacheConfig(cache_interval=2))


@pytest.fixture(scope="module")
def flux():
    return embedded_pipeline("tiny-flux")


def _run(pipe, encoder, steps):
    d = DEFAULTS["tiny-flux"]
    return pipe(**dict(encoder(["a red square"])), num_inference_steps=steps, height=d["size"], width=d["size"],
                output_type="latent").images


@pytest.mark.parametrize("enable", [_first_block_cache, _taylorseer], ids=["fbcache", "taylorseer"])
def test_cache_enabled_after_apply_is_refused_at_the_next_call(flux, enable):
    pipe, encoder = flux
    plan = uniform_plan(pipe, 4, "cache", full_steps=1)
    apply(pipe, plan)
    try:
        enable(pipe.transformer)
        assert foreign_caches(pipe.transformer.modules())
        with pytest.raises(ValueError, match="skips transformer blocks across steps"):
            _run(pipe, encoder, 4)
    finally:
        remove(pipe)
        hooks.HookRegistry.check_if_exists_or_initialize(pipe.transformer)  # diffusers' own removal follows
        for module in pipe.transformer.modules():
            registry = getattr(module, "_diffusers_hook", None)
            for name in list(getattr(registry, "hooks", {})):
                registry.remove_hook(name, recurse=False)
    assert not foreign_caches(pipe.transformer.modules())


def test_cache_enabled_before_apply_is_refused_at_apply(flux):
    pipe, _ = flux
    _first_block_cache(pipe.transformer)
    try:
        with pytest.raises(ValueError, match="fbc_"):
            apply(pipe, uniform_plan(pipe, 4, "cache", full_steps=1))
    finally:
        for module in pipe.transformer.modules():
            registry = getattr(module, "_diffusers_hook", None)
            for name in list(getattr(registry, "hooks", {})):
                registry.remove_hook(name, recurse=False)


def test_cache_dit_marker_is_recognised():
    module = torch.nn.Linear(2, 2)
    module._is_cached = True
    assert foreign_caches([module]) == ["cache-dit (enable_cache)"]
