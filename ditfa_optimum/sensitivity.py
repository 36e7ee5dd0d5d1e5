"""How much an error injected at (attention module, denoising step, head) moves the final image: a linearised estimate.

The local metric (a head's relative squared error against full attention) says how wrong one head is at one step; it
does not say how much of that error survives to the final latents. An error at step 1 is carried and amplified by every
later step, an error at the last step lands almost as it is, and classifier-free guidance scales both. This module
measures that propagation once, on the dense model, so the search can spend one error budget over the whole trajectory.

Method (adjoint sensitivity with a Hutchinson trace estimate, all in one backward sweep):

* The pipeline runs once, dense, on a few prompts; every transformer call's inputs are recorded.
* The flow-matching Euler sampler of SD3 / SD3.5 / FLUX.1 (and the miniature model) is
  ``x[t+1] = x[t] + (sigma[t+1] - sigma[t]) * v(x[t])``, ``v`` the guided velocity
  (``v_u + s (v_c - v_u)`` when CFG is batched as [uncond, cond]).
* Draw ``z ~ N(0, I)`` shaped like one sample's final latents and walk the steps backwards: at step ``t`` the recorded
  call is re-run with autograd, and the vector-Jacobian product with ``(sigma[t+1] - sigma[t]) * lambda[t+1]`` gives
  ``lambda[t]`` (the adjoint of ``z . x_final`` w.r.t. ``x[t]``) and, at the same time, ``u = J^T z`` at the output
  of every attention head of that step (``J``: final latents w.r.t. that head's output, ``[S, D]`` per CFG half).
* ``E_z ||J^T z||^2 = ||J||_F^2``, so ``gain = ||J^T z||^2 / (S * D)`` (mean over prompts) is the expected squared
  change of the final latents per unit squared error at that head, for an error whose direction is isotropic. With
  batched CFG the gradient reaching the uncond / cond half carries the factor ``1 - s`` / ``s``; the gain is taken per
  unit of the GUIDED error ``(1 - s) e_u + s e_c`` (each half's gradient divided by its factor, the two averaged),
  because the two halves' errors are nearly the same vector and must be added before squaring, not after.
* The linear model holds late in the trajectory and fails early, where a small change flips what the image becomes
  (measured on the miniature model, benchmarks/sensitivity_check.py: caching one module at step 1 moved the image
  up to ~25,000x more than the linear prediction; most late single injections within 0.1-3x). So each step's gains are scaled by a measured factor: one more generation in which batch
  element ``i`` has every attention output at probe step ``t_i`` replaced by its previous step's output (a realistic
  error, the cheapest method's), and the measured change of its final latents is divided by the prediction; eight
  probe steps (`PROBE_STEPS`), factors between them interpolated geometrically.

A plan whose heads make guided errors ``e`` is then predicted to move the final latents by
``sum factor[t] * gain * ||e||^2``: errors of different (module, step, head) are assumed independent, so their
energies add (errors that compound over steps are measured along the plan's own trajectory by the calibration's
second pass). benchmarks/sensitivity_check.py measures how well this predicts single injections. Cost: one dense
generation and one forward and backward per step on ``num_prompts`` prompts (default 2), plus one generation of
nine copies of the first prompt.
"""

from __future__ import annotations

import inspect
import json
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from . import fp8_linears, schema
from .plan import ModuleSpec



@dataclass
class Sensitivity:
    """Per attention module: ``[T, H]`` gain of each head at each step (see module docstring).

    Attributes:
        gain: per module, ``[T, H]`` float64: expected squared change of one sample's final latents per unit squared
            error (summed over the head's tokens, channels and CFG halves) at that head's attention output.
        final_numel: elements of one sample's final latents (MSE = squared change / final_numel).
        final_variance: variance of the dense final latents (for a signal-to-noise ratio).
        pixel_scale: pixels = latents * pixel_scale + offset for pipelines without a VAE (the miniature model: 0.5);
            None when the latents are decoded by a VAE (quality is then predicted in latent space only).
        num_prompts, seconds: what the measurement cost.
    """

    modules: list[ModuleSpec]
    num_steps: int
    gain: dict[str, torch.Tensor]
    final_numel: int
    final_variance: float
    pixel_scale: float | None = None
    num_prompts: int = 0
    seconds: float = 0.0
    method: str = "adjoint (vector-Jacobian products through the Euler sampler), Hutchinson trace estimate"
    block_gain: dict[str, torch.Tensor] = field(default_factory=dict)
    #: the CFG scale the gains are normalised to (None: no batched CFG)
    guidance_scale: float | None = None
    #: per step: measured / linearly predicted change of the final latents for a cache-everything injection
    step_factor: list = field(default_factory=list)
    #: ``[T]``: expected squared change of one sample's final latents per unit guided squared error of the
    #: transformer's output (the velocity) at each step: ``(sigma[t+1] - sigma[t])^2 * ||lambda[t+1]||^2 / numel``
    output_gain: torch.Tensor | None = None
    #: per step: measured / linearly predicted change of the final latents when that one step is skipped
    #: (`step_taylor`); empty when step skips are not searched
    output_factor: list = field(default_factory=list)
    #: per run length L >= 2 (as a string, JSON keys): measured / predicted change for L consecutive skipped steps,
    #: beyond what the single-step factors explain (`_output_factors`); 1.0 where not measured
    run_factor: dict = field(default_factory=dict)

    def run_damage_factor(self, length: int) -> float:
        """The measured correction of a run of ``length`` skipped steps (1.0 for single steps and unmeasured runs)."""
        if length < 2 or not self.run_factor:
            return 1.0
        known = [k for k in sorted(int(k) for k in self.run_factor) if k <= length]  # the longest measured <= it
        return float(self.run_factor[str(known[-1])]) if known else 1.0

    def output_damage_gain(self, step: int) -> float:
        """Predicted squared change of the final latents per unit guided squared error of the velocity at ``step``."""
        if self.output_gain is None:
            raise ValueError("this sensitivity holds no output gains (measured by an older ditfa_optimum); calibrate "
                             "again to search step skips")
        factors = self.output_factor or self.step_factor
        factor = factors[step] if factors else 1.0
        return float(self.output_gain[step]) * factor

    def block_damage_gain(self, block: str, step: int) -> float:
        """Predicted squared change of the final latents per unit guided squared error of a block's outputs."""
        factor = self.step_factor[step] if self.step_factor else 1.0
        return float(self.block_gain[block][step]) * factor

    def damage_gain(self, module: str, step: int) -> torch.Tensor:
        """``[H]``: predicted squared change of the final latents per unit guided squared error at ``step``."""
        factor = self.step_factor[step] if self.step_factor else 1.0
        return self.gain[module][step] * factor

    def predicted_mse(self, squared_change: float) -> float:
        """Mean squared error per element of the final latents for a predicted squared change of one sample."""
        return squared_change / self.final_numel

    def snr_db(self, mse: float) -> float:
        """Signal-to-noise ratio of the final latents in dB (inf for no error)."""
        import math

        return math.inf if mse <= 0 else 10 * math.log10(self.final_variance / mse)

    def psnr_db(self, mse: float) -> float | None:
        """PSNR of the images ([0, 1] pixels, peak 1) for pixel-space pipelines; None when a VAE decodes."""
        import math

        if self.pixel_scale is None:
            return None
        return math.inf if mse <= 0 else 10 * math.log10(1.0 / (mse * self.pixel_scale ** 2))

    # ---------------------------------------------------------------- serialization (part of CalibrationStats)
    def tensors(self) -> dict[str, torch.Tensor]:
        out = {f"{name}.gain": g.contiguous() for name, g in self.gain.items()}
        out.update({f"{name}.block_gain": g.contiguous() for name, g in self.block_gain.items()})
        if self.output_gain is not None:
            out["output_gain"] = self.output_gain.contiguous()
        return out

    def info(self) -> dict:
        info = {k: v for k, v in asdict(self).items() if k not in ("gain", "block_gain", "modules", "output_gain")}
        return schema.stamp(info)

    @classmethod
    def from_parts(cls, modules: list[ModuleSpec], info: dict, tensors: dict[str, torch.Tensor]) -> "Sensitivity":
        info = schema.read("sensitivity", info, "sensitivity.json")
        gain = {k[:-len(".gain")]: t for k, t in tensors.items() if k.endswith(".gain")}
        block = {k[:-len(".block_gain")]: t for k, t in tensors.items() if k.endswith(".block_gain")}
        missing = [s.name for s in modules if s.name not in gain]
        if missing:
            raise ValueError(f"the sensitivity lacks gains for modules {missing[:3]}")
        return cls(modules=modules, gain=gain, block_gain=block, output_gain=tensors.get("output_gain"), **info)

    def save(self, directory: str | os.PathLike) -> Path:
        from safetensors.torch import save_file

        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        save_file(self.tensors(), directory / "sensitivity.safetensors", metadata={"format": "pt"})
        info = self.info()
        info["modules"] = [asdict(s) for s in self.modules]
        (directory / "sensitivity.json").write_text(json.dumps(info, indent=2) + "\n")
        return directory

    @classmethod
    def load(cls, directory: str | os.PathLike) -> "Sensitivity":
        from safetensors.torch import load_file

        directory = Path(directory)
        info = json.loads((directory / "sensitivity.json").read_text())
        modules = [ModuleSpec(**m) for m in info.pop("modules")]
        return cls.from_parts(modules, info, load_file(directory / "sensitivity.safetensors"))


def guided_error(error: torch.Tensor, scale: float | None) -> torch.Tensor:
    """What an error of the transformer's batch rows adds to the guided prediction: ``(1 - s) e_uncond + s e_cond`` for
    a batch of [uncond, cond] halves (CFG scale ``s``); the error itself without batched CFG (``scale`` None)."""
    if scale is None:
        return error
    uncond, cond = error.chunk(2)
    return (1 - scale) * uncond + scale * cond


def _per_guided_unit(per_row: torch.Tensor, scale: float | None) -> torch.Tensor:
    """Per-row squared gradient norms made per unit of guided error: each CFG half divided by its factor squared
    (a half whose factor is 0 carries none of it and is dropped)."""
    if scale is None:
        return per_row
    return torch.cat([h / w ** 2 for h, w in zip(per_row.chunk(2), (1 - scale, scale)) if w != 0])


# ==================================================================================================== measuring it
class _Recorder:
    """Forward pre-hook on the transformer: keeps a detached copy of every call's arguments."""

    def __init__(self, transformer: torch.nn.Module):
        self.signature = inspect.signature(transformer.forward)
        self.calls: list[inspect.BoundArguments] = []
        self.handle = transformer.register_forward_pre_hook(self, with_kwargs=True)

    def __call__(self, _module, args, kwargs):
        bound = self.signature.bind_partial(*args, **kwargs)
        bound.arguments = {k: _detached(v) for k, v in bound.arguments.items()}
        self.calls.append(bound)


def _detached(value):
    if isinstance(value, torch.Tensor):
        return value.detach().clone()
    if isinstance(value, dict):
        return {k: _detached(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_detached(v) for v in value)
    return value


class _ProbeModule:
    """Full attention (differentiable) whose output's gradient is kept per head."""

    def __init__(self, probe: "_Probe", spec: ModuleSpec):
        self.runtime = probe  # the FLUX processor reads runtime.state for single-stream text lengths
        self.probe = probe
        self.spec = spec

    def __call__(self, q, k, v, num_text_tokens):
        out = torch.nn.functional.scaled_dot_product_attention(q, k, v)
        if out.requires_grad:
            name = self.spec.name

            def keep(grad):
                self.probe.grads[name] = grad.detach()

            out.register_hook(keep)
        return out


class _Probe:
    def __init__(self, num_steps: int):
        from .runtime.state import StepState

        self.state = StepState(num_steps + 1)
        self.grads: dict[str, torch.Tensor] = {}

    def module(self, spec: ModuleSpec) -> _ProbeModule:
        return _ProbeModule(self, spec)


def _block_grad_hook(adapter, spec, grads: dict):
    """Forward hook on a block: keep the gradients reaching its output streams."""
    def hook(module, args, output):
        streams = adapter.block_output_streams(spec, output)
        for tensor in (streams.image, streams.text):
            if tensor is not None and tensor.requires_grad:
                tensor.register_hook(lambda g: grads.setdefault(spec.name, []).append(g.detach()))
    return hook


def _output(result) -> torch.Tensor:
    if isinstance(result, (tuple, list)):
        return result[0]
    return result.sample


def _guidance(pipeline) -> float:
    for name in ("guidance_scale", "_guidance_scale"):
        value = getattr(pipeline, name, None)
        if isinstance(value, (int, float)):
            return float(value)
    raise ValueError(f"cannot read the CFG scale of {type(pipeline).__name__} (no guidance_scale attribute)")


def measure_sensitivity(pipeline, config, prompts: list[str], *, prompt_encoder=None, seed: int = 0,
                        progress: bool = True) -> Sensitivity:
    """Measure the propagation gain of every attention head at every step (see the module docstring).

    Args:
        pipeline: a diffusers pipeline with a flow-matching Euler scheduler (SD3, SD3.5, FLUX.1, the miniature model).
        config: a `DiTFastAttnConfig` (steps, resolution, guidance, seed).
        prompts: the prompts to measure on (2 are enough: the estimate averages over heads' many elements).
        prompt_encoder: for pipelines without text encoders (the tiny test models).
        seed: seed of the Hutchinson probe vectors.

    Returns:
        `Sensitivity`.
    """
    from tqdm.auto import tqdm

    from .apply import _prepare, _split, install, remove
    from .calibrate import pipeline_kwargs, progress_bars

    start = time.perf_counter()
    transformer, _ = _split(pipeline)
    scheduler = getattr(pipeline, "scheduler", None)
    if type(scheduler).__name__ != "FlowMatchEulerDiscreteScheduler" \
            or getattr(scheduler.config, "stochastic_sampling", False):
        raise ValueError(f"the trajectory-aware search needs the flow-matching Euler sampler of SD3 / FLUX "
                         f"(FlowMatchEulerDiscreteScheduler, deterministic); this pipeline uses "
                         f"{type(scheduler).__name__}. Use DiTFastAttnConfig(allocation='local') instead")
    adapter, modules = _prepare(transformer)
    specs = [spec for spec, _ in modules]
    T = config.num_inference_steps

    # 1. one dense generation, recording every transformer call
    recorder = _Recorder(transformer)
    try:
        with torch.no_grad(), progress_bars(pipeline, False):
            kwargs = pipeline_kwargs(pipeline, prompts, config, prompt_encoder=prompt_encoder)
            final = pipeline(**kwargs, output_type="latent").images
    finally:
        recorder.handle.remove()
    if len(recorder.calls) != T:
        raise ValueError(f"the pipeline called the transformer {len(recorder.calls)} times for {T} steps; the "
                         "trajectory-aware search supports one call per step (batched CFG or none). Use "
                         "DiTFastAttnConfig(allocation='local') for this pipeline")
    cfg = bool(adapter.batched_cfg(pipeline))
    scale = _guidance(pipeline) if cfg else 1.0
    sigmas = scheduler.sigmas.detach().double().cpu()
    if sigmas.numel() < T + 1:
        raise ValueError(f"the scheduler holds {sigmas.numel()} sigmas for {T} steps")

    # 2. one backward sweep through the steps (block outputs too, when block methods are searched)
    probe = _Probe(T)
    install(transformer, adapter, modules, probe)
    gain = {s.name: torch.zeros(T, s.num_heads, dtype=torch.float64) for s in specs}
    blocks = adapter.blocks(transformer) if getattr(config, "block_methods", ()) else []
    block_gain = {b.name: torch.zeros(T, dtype=torch.float64) for b, _ in blocks}
    output_gain = torch.zeros(T, dtype=torch.float64)
    block_grads: dict[str, list] = {}
    handles = [module.register_forward_hook(_block_grad_hook(adapter, spec, block_grads)) for spec, module in blocks]
    generator = torch.Generator().manual_seed(seed)
    lam = None
    try:
        for t in tqdm(range(T - 1, -1, -1), desc="ditfa sensitivity", unit="step", disable=not progress):
            bound = recorder.calls[t]
            hidden = bound.arguments["hidden_states"]
            n = hidden.shape[0] // 2 if cfg else hidden.shape[0]
            if lam is None:
                lam = torch.randn(hidden[:n].shape, generator=generator, dtype=torch.float32).to(hidden.device)
            x = hidden[:n].detach().float().requires_grad_(True)
            model_in = torch.cat([x, x]) if cfg else x
            args = dict(bound.arguments)
            args["hidden_states"] = model_in.to(hidden.dtype)
            probe.grads.clear()
            block_grads.clear()
            with torch.enable_grad(), fp8_linears.differentiable(transformer):
                out = _output(transformer(**args)).float()
                v = out[:n] + scale * (out[n:] - out[:n]) if cfg else out
                step = float(sigmas[t + 1] - sigmas[t])
                # lam is the adjoint of x[t+1]: a velocity error e at step t moves x[t+1] by step * e
                output_gain[t] = step ** 2 * float(lam.double().pow(2).flatten(1).sum(1).mean()) / lam[0].numel()
                (grad_x,) = torch.autograd.grad((v * lam).sum() * step, x, allow_unused=False)
            for spec in specs:
                g = probe.grads.get(spec.name)
                if g is None:
                    raise RuntimeError(f"module {spec.name!r} received no gradient at step {t}")
                # g: [B (x2 with CFG), H, S, D]; per unit of the guided error: each half / its factor, averaged
                per = g.double().pow(2).sum(dim=(2, 3)) / (g.shape[2] * g.shape[3])
                gain[spec.name][t] = _per_guided_unit(per, scale if cfg else None).mean(0).cpu()
            for spec, _ in blocks:
                grads = block_grads.get(spec.name, [])
                if not grads:
                    raise RuntimeError(f"block {spec.name!r} received no gradient at step {t}")
                # per row: squared norm over both streams / their elements; per unit of guided error with CFG
                per = sum(g.double().pow(2).flatten(1).sum(1) for g in grads) / sum(g[0].numel() for g in grads)
                block_gain[spec.name][t] = float(_per_guided_unit(per, scale if cfg else None).mean())
            lam = (lam + grad_x.detach()).detach()
    finally:
        for handle in handles:
            handle.remove()
        remove(transformer)
    final = final.float()
    pixel = getattr(pipeline, "latent_pixel_scale", None)
    sens = Sensitivity(modules=specs, num_steps=T, gain=gain, final_numel=int(final[0].numel()),
                       final_variance=float(final.var()), pixel_scale=pixel, num_prompts=len(prompts),
                       guidance_scale=scale if cfg else None, block_gain=block_gain, output_gain=output_gain)
    sens.reference_final = final.detach()  # not saved: the calibration's closing check compares a plan with it
    sens.step_factor = _step_factors(pipeline, transformer, adapter, modules, config, prompts[0], sens, cfg,
                                     prompt_encoder, progress)
    if getattr(config, "measures_steps", False):
        sens.output_factor = _output_factors(pipeline, transformer, config, prompts, sens, cfg, prompt_encoder,
                                             progress)
        sens.run_factor = _run_factors(pipeline, transformer, config, prompts[0], sens, cfg, prompt_encoder,
                                       progress)
    sens.seconds = time.perf_counter() - start
    return sens


#: steps (of 20; scaled to the step count) where the step factor is measured; factors between are interpolated
PROBE_STEPS = (1, 2, 3, 5, 8, 12, 16, 19)


def probe_steps(num_steps: int) -> list[int]:
    """The steps whose factor is measured (each a batch element of one generation): `PROBE_STEPS` scaled."""
    if num_steps <= len(PROBE_STEPS) + 1:
        return list(range(1, num_steps))
    return sorted({min(num_steps - 1, max(1, round(t * (num_steps - 1) / 19))) for t in PROBE_STEPS})


class _Injector:
    """Full attention everywhere; at probe step ``steps[i]`` batch element ``i + 1`` (both CFG halves) gets every
    head's output of the previous step instead, and element 0 (untouched) records the predicted change."""

    def __init__(self, num_steps: int, steps: list[int], cfg: bool, sens: Sensitivity):
        from .runtime.state import StepState

        self.state = StepState(num_steps)
        self.steps, self.cfg, self.sens = steps, cfg, sens
        self.copies = len(steps) + 1
        self.previous: dict[str, torch.Tensor] = {}
        self.predicted = torch.zeros(num_steps, dtype=torch.float64)

    def module(self, spec: ModuleSpec):
        def attend(q, k, v, num_text_tokens):
            out = torch.nn.functional.scaled_dot_product_attention(q, k, v)
            step = self.state.current_step()
            prev = self.previous.get(spec.name)
            self.previous[spec.name] = out.clone()
            if step not in self.steps or prev is None:
                return out
            element = self.steps.index(step) + 1
            rows = [element, self.copies + element] if self.cfg else [element]
            guided = guided_error((prev - out).float(), self.sens.guidance_scale)[0]  # of the untouched element 0
            gain = self.sens.gain[spec.name][step].to(guided.device)
            self.predicted[step] += float((gain * guided.double().pow(2).sum(dim=(1, 2))).sum())
            out[rows] = prev[rows]
            return out

        attend.runtime = self  # the FLUX processor reads runtime.state for single-stream text lengths
        return attend


def _step_factors(pipeline, transformer, adapter, modules, config, prompt: str, sens: Sensitivity, cfg: bool,
                  prompt_encoder, progress: bool) -> list[float]:
    """Measured / predicted change of the final latents per step: measured at `probe_steps`, interpolated
    geometrically between them (1.0 for step 0, which is never compressed)."""
    from .apply import install, remove
    from .calibrate import pipeline_kwargs, progress_bars

    T = config.num_inference_steps
    steps = probe_steps(T)
    if not steps:
        return [1.0] * T
    injector = _Injector(T, steps, cfg, sens)
    install(transformer, adapter, modules, injector)
    try:
        with torch.no_grad(), progress_bars(pipeline, progress, "ditfa step factors (heads)"):
            kwargs = pipeline_kwargs(pipeline, [prompt] * injector.copies, config, prompt_encoder=prompt_encoder)
            kwargs["generator"] = [torch.Generator().manual_seed(config.seed) for _ in range(injector.copies)]
            final = pipeline(**kwargs, output_type="latent").images.float()
    finally:
        remove(transformer)
    return _factors(final, injector.predicted, steps, T)


def _factors(final: torch.Tensor, predicted: torch.Tensor, steps: list[int], T: int) -> list[float]:
    """Measured (batch element ``i + 1`` against element 0) / predicted change per probe step, interpolated
    geometrically between probe steps (1.0 for step 0)."""
    import math

    measured = (final - final[:1]).flatten(1).pow(2).sum(1).double().cpu()
    logs = {}
    for i, t in enumerate(steps):
        p = float(predicted[t])
        if p > 0 and float(measured[i + 1]) > 0:
            logs[t] = math.log(float(measured[i + 1]) / p)
    if not logs:
        return [1.0] * T
    known = sorted(logs)
    factors = [1.0]
    for t in range(1, T):
        lo = max([k for k in known if k <= t], default=known[0])
        hi = min([k for k in known if k >= t], default=known[-1])
        w = 0.0 if hi == lo else (t - lo) / (hi - lo)
        factors.append(math.exp((1 - w) * logs[lo] + w * logs[hi]))
    return factors


def _output_factors(pipeline, transformer, config, prompts: list[str], sens: Sensitivity, cfg: bool, prompt_encoder,
                    progress: bool) -> list[float]:
    """Like `_step_factors`, for whole skipped steps, on each of ``prompts`` (geometric mean over them: one prompt's
    nonlinearity at one step is noisy): in the group of copies of a prompt, copy ``i + 1`` skips probe step ``t_i``
    (`step_taylor`, from its own last two outputs) and copy 0 runs dense and records the predicted change."""
    import math

    from .methods import step_taylor

    T = config.num_inference_steps
    steps = probe_steps(T)
    if not steps:
        return [1.0] * T
    copies = len(steps) + 1
    n = copies * len(prompts)
    history: dict[int, torch.Tensor] = {}
    predicted = torch.zeros(len(prompts), T, dtype=torch.float64)
    calls = []

    def hook(_module, _args, output):
        t = len(calls)
        calls.append(t)
        sample = output[0] if isinstance(output, (tuple, list)) else output.sample
        history[t] = sample.detach().clone()
        if t not in steps:
            return None
        anchors = step_taylor.sources(t, list(range(t)))
        guess = step_taylor.extrapolate(history, t, anchors)
        sample = sample.clone()
        for g in range(len(prompts)):
            first = g * copies
            element = first + steps.index(t) + 1
            rows = [element, n + element] if cfg else [element]
            halves = [first, n + first] if cfg else [first]
            err = (guess[halves] - history[t][halves]).float()
            guided = guided_error(err, sens.guidance_scale) if cfg else err
            predicted[g, t] = float(sens.output_gain[t]) * float(guided.double().pow(2).sum())
            sample[rows] = guess[rows].to(sample.dtype)
        history[t] = sample.detach().clone()
        return (sample, *output[1:]) if isinstance(output, (tuple, list)) else type(output)(sample=sample)

    final = _hooked_generation(pipeline, transformer, config, prompts, copies, hook, prompt_encoder, progress,
                               "ditfa step factors (skipped steps)")
    per_prompt = [_factors(final[g * copies:(g + 1) * copies], predicted[g], steps, T) for g in range(len(prompts))]
    return [math.exp(sum(math.log(f[t]) for f in per_prompt) / len(per_prompt)) for t in range(T)]


#: run lengths whose correction `_run_factors` measures, each at `RUN_PROBES` positions (fractions of the steps)
RUN_LENGTHS = (2, 3, 4)
RUN_PROBES = (0.3, 0.55, 0.8)


def _run_factors(pipeline, transformer, config, prompt: str, sens: Sensitivity, cfg: bool, prompt_encoder,
                 progress: bool) -> dict:
    """Measured / predicted change of the final latents for runs of consecutive skipped steps, per run length.

    The prediction of a run (`ditfa_optimum.calibrate.step_skip_damage`) adds its steps' errors before squaring,
    with the single-step factors (`output_factor`) in the gains. Whether the errors of a run really add that
    coherently (or the sampler damps them) is measured here: one generation of copies of one prompt, copy ``i``
    skipping one run (its anchors the two steps before it) at `RUN_PROBES` positions for every length in
    `RUN_LENGTHS`; per length, the geometric mean of measured / predicted over the positions."""
    import math

    from .methods import step_taylor

    T = config.num_inference_steps
    runs = sorted({(L, min(T - L, max(2, round(p * T)))) for L in RUN_LENGTHS for p in RUN_PROBES if T - L >= 2})
    if not runs:
        return {}
    copies = len(runs) + 1
    history: dict[int, torch.Tensor] = {}
    accumulated = [None] * len(runs)
    predicted = [0.0] * len(runs)
    calls = []
    factors = sens.output_factor or [1.0] * T

    def hook(_module, _args, output):
        t = len(calls)
        calls.append(t)
        sample = (output[0] if isinstance(output, (tuple, list)) else output.sample).clone()
        dense = sample.detach().clone()
        for i, (L, start) in enumerate(runs):
            if not start <= t < start + L:
                continue
            anchors = (start - 1, start - 2)
            guess = step_taylor.extrapolate(history, t, anchors)
            halves = [0, copies] if cfg else [0]
            err = (guess[halves] - dense[halves]).float()
            guided = guided_error(err, sens.guidance_scale) if cfg else err
            term = math.sqrt(float(sens.output_gain[t]) * factors[t]) * guided.double()
            accumulated[i] = term if accumulated[i] is None else accumulated[i] + term
            predicted[i] = float(accumulated[i].pow(2).sum())
            rows = [i + 1, copies + i + 1] if cfg else [i + 1]
            sample[rows] = guess[rows].to(sample.dtype)
        history[t] = dense  # anchors are computed steps: every copy's skipped run starts after them
        return (sample, *output[1:]) if isinstance(output, (tuple, list)) else type(output)(sample=sample)

    final = _hooked_generation(pipeline, transformer, config, [prompt], copies, hook, prompt_encoder, progress,
                               "ditfa run factors (skipped steps)")
    measured = (final - final[:1]).flatten(1).pow(2).sum(1).double().cpu()
    logs: dict[int, list] = {}
    for i, (L, _) in enumerate(runs):
        if predicted[i] > 0 and float(measured[i + 1]) > 0:
            logs.setdefault(L, []).append(math.log(float(measured[i + 1]) / predicted[i]))
    return {str(L): math.exp(sum(v) / len(v)) for L, v in sorted(logs.items())}


def _hooked_generation(pipeline, transformer, config, prompts: list[str], copies: int, hook, prompt_encoder,
                       progress: bool, desc: str) -> torch.Tensor:
    """One generation of ``copies`` copies of each prompt (copies of prompt ``g`` seeded ``config.seed + g``) with
    ``hook`` as a forward hook on the transformer; returns the final latents (float32)."""
    from .calibrate import pipeline_kwargs, progress_bars

    handle = transformer.register_forward_hook(hook)
    try:
        with torch.no_grad(), progress_bars(pipeline, progress, desc):
            kwargs = pipeline_kwargs(pipeline, [p for p in prompts for _ in range(copies)], config,
                                     prompt_encoder=prompt_encoder)
            kwargs["generator"] = [torch.Generator().manual_seed(config.seed + g) for g in range(len(prompts))
                                   for _ in range(copies)]
            return pipeline(**kwargs, output_type="latent").images.float()
    finally:
        handle.remove()
