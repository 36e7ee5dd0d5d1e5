"""`ditfa_optimum.sensitivity`: what `measure_sensitivity` returns, whether its adjoint predicts what a small error
really does to the final latents (finite differences through the pipeline), what it refuses, and save / load."""

import logging

import pytest
import torch

from ditfa_optimum.apply import _prepare, install, remove
from ditfa_optimum.calibrate import calibrate, run_pipeline
from ditfa_optimum.config import DiTFastAttnConfig
from ditfa_optimum.embedded import DEFAULTS, embedded_pipeline
from ditfa_optimum.prompts import default_prompts
from ditfa_optimum.runtime.state import StepState
from ditfa_optimum.schema import SCHEMA_VERSION
from ditfa_optimum.sensitivity import Sensitivity, measure_sensitivity

logging.getLogger("diffusers").setLevel(logging.ERROR)

pytestmark = pytest.mark.usefixtures("one_thread_module")

STEPS = 4


def setup(name: str, num_steps: int = STEPS, **changes):
    """(pipeline, prompt encoder, config) of an embedded tiny model at its default size, ``num_steps`` steps."""
    pipe, encoder = embedded_pipeline(name)
    pipe.set_progress_bar_config(disable=True)
    d = DEFAULTS[name]
    config = DiTFastAttnConfig(**{**dict(num_inference_steps=num_steps, height=d["size"], width=d["size"],
                                         block_size=d["block_size"], guidance_scale=d["guidance"]), **changes})
    return pipe, encoder, config


@pytest.fixture(scope="module", params=["tiny-sd3", "tiny-flux"])
def measured(request):
    pipe, encoder, config = setup(request.param)
    prompts = default_prompts(2)
    sens = measure_sensitivity(pipe, config, prompts, prompt_encoder=encoder, progress=False)
    return request.param, pipe, config, sens


# ------------------------------------------------------------------------------------------ (a) what it returns
def test_gains_are_finite_non_negative_per_step_and_head(measured):
    name, pipe, config, sens = measured
    _, modules = _prepare(pipe.transformer)  # also proves the probe was taken off again
    specs = [spec for spec, _ in modules]
    assert sens.modules == specs and sens.num_steps == STEPS
    assert set(sens.gain) == {s.name for s in specs}
    for spec in specs:
        gain = sens.gain[spec.name]
        assert gain.shape == (STEPS, spec.num_heads) and gain.dtype == torch.float64
        assert bool(torch.isfinite(gain).all()) and bool((gain >= 0).all())
        assert float(gain.sum()) > 0
        for t in range(STEPS):
            torch.testing.assert_close(sens.damage_gain(spec.name, t), gain[t] * sens.step_factor[t])
    assert len(sens.step_factor) == STEPS and sens.step_factor[0] == 1.0
    assert all(f > 0 and f == f and f != float("inf") for f in sens.step_factor)
    assert sens.guidance_scale == (5.0 if name == "tiny-sd3" else None)  # batched CFG only on SD3
    assert sens.final_numel > 0 and sens.final_variance > 0 and sens.pixel_scale is None
    assert sens.num_prompts == 2 and sens.seconds > 0
    assert getattr(pipe.transformer, "_ditfa_installed", None) is None


def test_quality_helpers():
    sens = Sensitivity(modules=[], num_steps=1, gain={}, final_numel=100, final_variance=2.0, pixel_scale=0.5)
    assert sens.predicted_mse(5.0) == 0.05
    assert sens.snr_db(0.02) == pytest.approx(20.0)
    assert sens.snr_db(0.0) == float("inf")
    assert sens.psnr_db(0.04) == pytest.approx(20.0)  # 0.04 * 0.5^2 = 0.01
    assert Sensitivity(modules=[], num_steps=1, gain={}, final_numel=1, final_variance=1.0).psnr_db(0.1) is None


# ------------------------------------------------------------------------------------------ (b) the adjoint
class _Noise:
    """Full attention; at ``step`` every head of module ``target`` gets Gaussian noise of ``rel`` times the head's
    output std added. ``halves`` scales the noise of the [uncond, cond] halves (same draw in both). ``squared``:
    ``[samples, H]`` squared norm of the noise one sample got per head (summed over tokens and channels)."""

    def __init__(self, num_steps, target, step, cfg, generator, halves=(1.0, 1.0), rel=1e-3):
        self.state = StepState(num_steps)
        self.target, self.step, self.cfg, self.generator, self.halves, self.rel = (target, step, cfg, generator,
                                                                                 halves, rel)
        self.squared = None

    def module(self, spec):
        def attend(q, k, v, num_text_tokens):
            out = torch.nn.functional.scaled_dot_product_attention(q, k, v)
            if spec.name != self.target or self.state.current_step() != self.step:
                return out
            n = out.shape[0] // 2 if self.cfg else out.shape[0]
            std = out.float().std(dim=(0, 2, 3))
            noise = torch.randn(out[:n].shape, generator=self.generator) * (self.rel * std)[None, :, None, None]
            self.squared = noise.double().pow(2).sum(dim=(2, 3))
            if self.cfg:
                noise = torch.cat([noise * self.halves[0], noise * self.halves[1]])
            return out + noise.to(out.dtype)

        attend.runtime = self
        return attend


def dense_final(pipe, encoder, config, prompts):
    with torch.no_grad():
        return run_pipeline(pipe, prompts, config, prompt_encoder=encoder).double()


def finite_difference(pipe, encoder, config, prompts, dense, sens, target, step, generator, halves=(1.0, 1.0),
                      draws=2):
    """(measured mean squared change of one sample's final latents against ``dense``, the same for
    ``sum_h gain * ||e_h||^2``), each averaged over ``draws`` noise draws and the prompts."""
    adapter, modules = _prepare(pipe.transformer)
    measured = predicted = 0.0
    for _ in range(draws):
        noise = _Noise(config.num_inference_steps, target, step, sens.guidance_scale is not None, generator, halves)
        install(pipe.transformer, adapter, modules, noise)
        try:
            with torch.no_grad():
                final = run_pipeline(pipe, prompts, config, prompt_encoder=encoder).double()
        finally:
            remove(pipe.transformer)
        measured += float((final - dense).flatten(1).pow(2).sum(1).mean()) / draws
        predicted += float((sens.gain[target][step][None] * noise.squared).sum(1).mean()) / draws
    return measured, predicted


def test_adjoint_matches_finite_differences_without_cfg():
    """No CFG (guidance 1): a tiny error injected into every head of one module at one step moves the final latents
    by ``sum_h gain[t, h] * ||e_h||^2`` (the expectation over isotropic errors). 8 prompts give 8 Hutchinson probes
    and 16 noise draws per point; measured spread of the ratio on this model: 0.8-1.3."""
    pipe, encoder, config = setup("tiny-sd3", guidance_scale=1.0)
    prompts = default_prompts(8)
    sens = measure_sensitivity(pipe, config, prompts, prompt_encoder=encoder, progress=False, seed=0)
    assert sens.guidance_scale is None
    generator = torch.Generator().manual_seed(0)
    dense = dense_final(pipe, encoder, config, prompts)
    for target in (sens.modules[0].name, sens.modules[-1].name):
        for step in range(1, STEPS):
            measured, predicted = finite_difference(pipe, encoder, config, prompts, dense, sens, target, step,
                                                    generator)
            assert predicted > 0
            assert 0.5 < measured / predicted < 2.0, (target, step, measured, predicted)


@pytest.fixture(scope="module")
def sd3_cfg():
    pipe, encoder, config = setup("tiny-sd3")
    prompts = default_prompts(8)
    sens = measure_sensitivity(pipe, config, prompts, prompt_encoder=encoder, progress=False, seed=0)
    assert sens.guidance_scale == 5.0
    return pipe, encoder, config, prompts, sens, dense_final(pipe, encoder, config, prompts)


def test_adjoint_per_cfg_half(sd3_cfg):
    """Batched CFG: the gain is the mean over the two halves of each half's squared Jacobian divided by its CFG factor
    (``(1 - s)^2``, ``s^2``). Noise in one half only checks each half's share: (measured uncond / (1 - s)^2 +
    measured cond / s^2) / 2 = gain * ||e||^2."""
    pipe, encoder, config, prompts, sens, dense = sd3_cfg
    s = sens.guidance_scale
    generator = torch.Generator().manual_seed(1)
    for target in (sens.modules[0].name, sens.modules[-1].name):
        for step in (1, STEPS - 1):
            mu, pu = finite_difference(pipe, encoder, config, prompts, dense, sens, target, step, generator,
                                       (1.0, 0.0))
            mc, pc = finite_difference(pipe, encoder, config, prompts, dense, sens, target, step, generator,
                                       (0.0, 1.0))
            ratio = (mu / (1 - s) ** 2 + mc / s ** 2) / (pu + pc)
            assert 0.5 < ratio < 2.0, (target, step, ratio)


@pytest.mark.xfail(strict=True, reason=(
    "the CFG normalisation assumes the two halves' Jacobians agree after dividing by 1 - s and s; on tiny-sd3 (s=5) "
    "an error shared by both halves moves the final latents 15-60x more than gain * ||e||^2 (the halves' "
    "contributions add nearly independently instead of cancelling to the guided error). ||g_u + g_c||^2 / (S D) "
    "(the gradient of a shared error) predicts it within 0.6-1.1x"))
def test_adjoint_matches_finite_differences_with_cfg(sd3_cfg):
    """Batched CFG, the same noise in both halves: the guided error (1 - s) e + s e is the noise itself, so the
    prediction is ``sum_h gain[t, h] * ||e_h||^2`` as without CFG."""
    pipe, encoder, config, prompts, sens, dense = sd3_cfg
    generator = torch.Generator().manual_seed(2)
    for target in (sens.modules[0].name, sens.modules[-1].name):
        for step in (1, STEPS - 1):
            measured, predicted = finite_difference(pipe, encoder, config, prompts, dense, sens, target, step,
                                                    generator)
            assert 0.5 < measured / predicted < 2.0, (target, step, measured, predicted)


# ------------------------------------------------------------------------------------------ (c) refusals
def test_other_samplers_are_refused():
    from diffusers import FlowMatchEulerDiscreteScheduler, FlowMatchHeunDiscreteScheduler

    pipe, encoder, config = setup("tiny-sd3")
    euler = pipe.scheduler
    pipe.scheduler = FlowMatchHeunDiscreteScheduler()
    with pytest.raises(ValueError, match=r"FlowMatchHeunDiscreteScheduler.*allocation='local'"):
        measure_sensitivity(pipe, config, ["a cat"], prompt_encoder=encoder, progress=False)
    with pytest.raises(ValueError, match="allocation='local'"):  # calibrate's default (trajectory) says the same
        calibrate(pipe, config, ["a cat"], prompt_encoder=encoder, progress=False)
    pipe.scheduler = FlowMatchEulerDiscreteScheduler(stochastic_sampling=True)
    with pytest.raises(ValueError, match="deterministic.*allocation='local'"):
        measure_sensitivity(pipe, config, ["a cat"], prompt_encoder=encoder, progress=False)
    pipe.scheduler = euler
    assert getattr(pipe.transformer, "_ditfa_installed", None) is None  # nothing left installed


# ------------------------------------------------------------------------------------------ (d) save / load
def test_save_load_round_trip(measured, tmp_path):
    _, _, _, sens = measured
    sens.save(tmp_path / "s")
    again = Sensitivity.load(tmp_path / "s")
    assert again.modules == sens.modules and set(again.gain) == set(sens.gain)
    for name, gain in sens.gain.items():
        assert torch.equal(again.gain[name], gain)
    for key in ("num_steps", "final_numel", "final_variance", "pixel_scale", "num_prompts", "seconds", "method",
                "guidance_scale", "step_factor"):
        assert getattr(again, key) == getattr(sens, key), key
    assert again.block_gain == {}
    for t in range(sens.num_steps):
        assert torch.equal(again.damage_gain(sens.modules[0].name, t), sens.damage_gain(sens.modules[0].name, t))


def test_save_load_keeps_block_gains_and_refuses_broken_files(tmp_path):
    import json

    from ditfa_optimum.plan import ModuleSpec

    specs = [ModuleSpec("a.attn", 2, 8), ModuleSpec("b.attn", 3, 8)]
    sens = Sensitivity(modules=specs, num_steps=3, gain={s.name: torch.rand(3, s.num_heads, dtype=torch.float64)
                                                          for s in specs},
                       final_numel=64, final_variance=0.7, pixel_scale=0.5, guidance_scale=4.0,
                       step_factor=[1.0, 2.5, 0.75], block_gain={"a": torch.rand(3, dtype=torch.float64)})
    sens.save(tmp_path / "s")
    again = Sensitivity.load(tmp_path / "s")
    assert torch.equal(again.block_gain["a"], sens.block_gain["a"]) and set(again.block_gain) == {"a"}
    assert all(torch.equal(again.gain[k], v) for k, v in sens.gain.items())
    assert again.step_factor == [1.0, 2.5, 0.75] and again.pixel_scale == 0.5

    info = json.loads((tmp_path / "s" / "sensitivity.json").read_text())
    assert info["schema_version"] == SCHEMA_VERSION
    (tmp_path / "s" / "sensitivity.json").write_text(json.dumps({**info, "schema_version": 99}))
    with pytest.raises(ValueError, match="schema_version 99 is newer than this ditfa_optimum reads"):
        Sensitivity.load(tmp_path / "s")
    info["modules"].append({"name": "c.attn", "num_heads": 2, "head_dim": 8})
    (tmp_path / "s" / "sensitivity.json").write_text(json.dumps(info))
    with pytest.raises(ValueError, match="lacks gains for modules.*c.attn"):
        Sensitivity.load(tmp_path / "s")
