"""Calibration: one pass of the pipeline's own denoising loop that measures every candidate method on every head.

At every planned attention module and step, the calibration computes full attention ``O`` and each candidate method's
output ``O'`` for every head, and records the local metric

    RSE(head, method) = mean((O' - O)^2) / var(O)       (over batch, tokens and head channels)

as two sums (squared error, squared deviation of ``O``) so that several prompt batches add up. It then chooses one
method per head with the search's own chooser (`ditfa_optimum.search.choose_step`) and lets the CHOSEN outputs flow
on: later layers and steps see the activations the plan will really produce, and `cache` / `arrow_residual`
candidates read what the plan would have stored. The first prompt batch makes the choices; later batches follow them
and only add to the statistics.

With the trajectory allocation (the default) calibration first measures the propagation gains
(`ditfa_optimum.sensitivity`), then runs one pass with every head full flowing (the errors of every candidate against
the dense trajectory), solves the global allocation on it, and (``calibration_passes=2``) runs a second pass in which
that allocation's choices flow: the statistics the final search reads are measured along the plan's own trajectory,
so a head cached at two steps in a row is charged for reusing a reused output.

The result, `CalibrationStats`, is tensors and numbers only (no module references), savable, and what
`ditfa_optimum.search.search` reads.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import statistics
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from . import distributed, schema
from .config import DiTFastAttnConfig
from .methods import AttentionMethod, CfgShare, HeadMemory, make_method
from .plan import BlockSpec, CompressionPlan, ModuleSpec
from .runtime.backends import check_backend_name, get_backend
from .runtime.state import StepState
from .sensitivity import Sensitivity, guided_error

logger = logging.getLogger(__name__)

STATS_JSON = "calibration.json"
STATS_TENSORS = "calibration.safetensors"


@dataclass
class CalibrationStats:
    """What calibration measured, per attention module: ``[steps, heads, candidates]`` errors and per-candidate costs.

    Attributes:
        modules: the calibrated attention modules (execution order).
        candidates: candidate method strings, ``"full"`` first (e.g. ``["full", "arrow:0.125", "cache"]``).
        err: per module, ``[T, H, C]`` float64 sums of squared errors against full attention (``inf``: the candidate
            was not available there, e.g. `cache` at step 0).
        ref: per module, ``[T, H]`` float64 sums of squared deviations of the full output from its mean.
        err_guided: per module, ``[T, H, C]``: like ``err``, but of the error that reaches the guided prediction
            ``(1 - s) e_uncond + s e_cond`` (batched CFG, scale ``s``; without CFG it equals ``err``). The errors of
            the two halves are strongly correlated (the same approximation of two similar inputs), so the guided
            error, not the sum of the halves', predicts the damage (trajectory allocation only).
        chosen: per module, ``[T, H]`` int16 index of the candidate whose output flowed during calibration.
        cost_flops: per module, ``[C]`` attention FLOPs of one head for one sample under each candidate.
        cost_seconds: per module, ``[C]`` measured seconds per head (only with ``cost_model="measured"``).
        image_tokens, text_tokens, cfg: the calibration's token counts and whether CFG was batched.
    """

    modules: list[ModuleSpec]
    candidates: list[str]
    num_steps: int
    err: dict[str, torch.Tensor]
    ref: dict[str, torch.Tensor]
    chosen: dict[str, torch.Tensor]
    cost_flops: dict[str, torch.Tensor]
    cost_seconds: dict[str, torch.Tensor] = field(default_factory=dict)
    err_guided: dict[str, torch.Tensor] = field(default_factory=dict)
    #: block level (trajectory allocation with block_methods): the blocks, their candidates ("compute" first), per
    #: block ``[T, Cb]`` squared errors of the outputs (and guided), ``[T]`` residual deviations, ``[T]`` the flowed
    #: choice, ``[3]`` dense cost per row (attention, projections, MLP)
    blocks: list = field(default_factory=list)
    block_candidates: list = field(default_factory=list)
    block_err: dict[str, torch.Tensor] = field(default_factory=dict)
    block_err_guided: dict[str, torch.Tensor] = field(default_factory=dict)
    block_ref: dict[str, torch.Tensor] = field(default_factory=dict)
    block_chosen: dict[str, torch.Tensor] = field(default_factory=dict)
    block_cost: dict[str, torch.Tensor] = field(default_factory=dict)
    image_tokens: int = 0
    text_tokens: int = 0
    cfg: bool = False
    block_size: int = 128
    model_class: str | None = None
    num_prompts: int = 0
    threshold: float = 0.0
    seconds: float = 0.0
    device: str = "cpu"
    sensitivity: Sensitivity | None = None
    #: trajectory allocation: the price of damage whose choices flowed in the measuring pass (None: every head full)
    flow_lambda: float | None = None
    #: what each calibration pass measured (trajectory allocation: cut and predicted quality of its allocation)
    passes: list = field(default_factory=list)
    #: measured / predicted change of the final latents of the searched plan on the sensitivity prompts (the error
    #: model's level, checked by one generation with the plan; the search multiplies every damage by it)
    damage_scale: float = 1.0
    #: whole skipped steps (``skip_steps``): ``{"transformer": [T, T, T]}``, entry ``[a, b, e]`` the predicted damage
    #: (before ``damage_scale``) of skipping steps ``b+1 .. e`` with `step_taylor` from the outputs of steps ``a < b``
    #: (``a == b``: from step ``b`` alone); ``inf`` where not measured. Measured along the dense flow.
    step_damage: dict[str, torch.Tensor] = field(default_factory=dict)
    #: plans selected by measurement (`select_plan`), by `ditfa_optimum.search.selection_key` of the config:
    #: ``{"variant": one of TrajectoryProblem.variants, "alternatives": [every alternative run, with its predicted and
    #: measured final-latent MSE]}``; `search` with that config builds the selected variant's plan
    selections: dict = field(default_factory=dict)

    def rse(self, module: str, normalization: str = "head") -> torch.Tensor:
        """``[T, H, C]`` relative squared error (``inf`` where unavailable; 0 where full attention is constant),
        relative to each head's output variance or (``normalization="module"``) to the heads' mean."""
        return relative_error(self.err[module], self.ref[module], normalization)

    def cost(self, module: str, cost_model: str = "flops") -> torch.Tensor:
        if cost_model == "flops":
            return self.cost_flops[module]
        if module not in self.cost_seconds:
            raise ValueError("these statistics hold no measured costs; calibrate with cost_model='measured' or "
                             "search with cost_model='flops'")
        return self.cost_seconds[module]

    def saved(self, module: str, cost_model: str = "flops") -> torch.Tensor:
        """``[C]`` cost saved per head by each candidate against `full` (never negative)."""
        return saved_cost(self.cost(module, cost_model), self.candidates.index("full"))

    # ---------------------------------------------------------------- serialization
    def save(self, directory: str | os.PathLike) -> Path:
        """Write ``calibration.json`` and ``calibration.safetensors`` into ``directory``."""
        from safetensors.torch import save_file

        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        tensors = {}
        for kind in _TENSOR_KINDS:
            for name, t in getattr(self, kind).items():
                tensors[f"{name}.{kind}"] = t.contiguous()
        save_file(tensors, directory / STATS_TENSORS, metadata={"format": "pt"})
        info = {k: getattr(self, k) for k in self.__dataclass_fields__
                if k not in (*_TENSOR_KINDS, "modules", "blocks", "sensitivity")}
        info.update(modules=[asdict(s) for s in self.modules], blocks=[asdict(b) for b in self.blocks])
        (directory / STATS_JSON).write_text(json.dumps(schema.stamp(info), indent=2) + "\n")
        if self.sensitivity is not None:
            self.sensitivity.save(directory)
        else:  # an earlier save's sensitivity must not be read back with these statistics
            for name in ("sensitivity.json", "sensitivity.safetensors"):
                (directory / name).unlink(missing_ok=True)
        return directory

    @classmethod
    def load(cls, directory: str | os.PathLike) -> "CalibrationStats":
        from safetensors.torch import load_file

        directory = Path(directory)
        for name in (STATS_JSON, STATS_TENSORS):
            if not (directory / name).is_file():
                raise FileNotFoundError(f"{directory / name} does not exist; calibration statistics are saved as "
                                        f"{STATS_JSON} + {STATS_TENSORS} (CalibrationStats.save)")
        try:
            info = json.loads((directory / STATS_JSON).read_text())
        except json.JSONDecodeError as e:
            raise ValueError(f"{directory / STATS_JSON} is not valid JSON ({e})") from None
        info = schema.read("calibration", info, str(directory / STATS_JSON))
        tensors = load_file(directory / STATS_TENSORS)
        modules = [ModuleSpec(**m) for m in info.pop("modules")]
        blocks = [BlockSpec(**b) for b in info.pop("blocks", [])]
        kinds = {kind: {} for kind in _TENSOR_KINDS}
        for key, t in tensors.items():
            name, kind = key.rsplit(".", 1)
            if kind not in kinds:
                raise ValueError(f"{directory / STATS_TENSORS}: unexpected tensor {key!r}")
            kinds[kind][name] = t
        for kind in ("err", "ref", "chosen", "cost_flops"):
            missing = [s.name for s in modules if s.name not in kinds[kind]]
            if missing:
                raise ValueError(f"{directory / STATS_TENSORS} lacks {kind!r} for modules {missing[:3]}")
        sensitivity = Sensitivity.load(directory) if (directory / "sensitivity.json").is_file() else None
        return cls(modules=modules, blocks=blocks, **kinds, **info, sensitivity=sensitivity)


_TENSOR_KINDS = ("err", "ref", "chosen", "cost_flops", "cost_seconds", "err_guided", "block_err", "block_err_guided",
                 "block_ref", "block_chosen", "block_cost", "step_damage")


def relative_error(err: torch.Tensor, ref: torch.Tensor, normalization: str = "head") -> torch.Tensor:
    """``err / ref`` over the last dimension of ``err`` (candidates): ``inf`` where a candidate was unavailable, 0
    where full attention is constant and the candidate matches it. ``ref`` is ``[..., H]``; with ``normalization=
    "module"`` every head is divided by the mean over the heads instead of its own."""
    if normalization == "module":
        ref = ref.mean(-1, keepdim=True).expand_as(ref)
    ref = ref[..., None]
    return torch.where(ref > 0, err / ref.clamp_min(1e-300), torch.where(err > 0, torch.inf, 0.0))


def saved_cost(cost: torch.Tensor, full_index: int = 0) -> torch.Tensor:
    """Cost each candidate saves against `full` (never negative)."""
    return (cost[full_index] - cost).clamp_min(0.0)


# ==================================================================================================== the session
@dataclass
class _Memory:
    """What the plan would have stored for one module (all heads stacked): previous output and full - arrow."""

    previous: torch.Tensor | None = None  # [B, H, S, D]
    residual: torch.Tensor | None = None  # [B, H, S, D]
    has_residual: torch.Tensor | None = None  # [H] bool


class _Session:
    """Installed on the transformer like a `PlanRuntime` (``.state``, ``.module(spec)``) while calibration runs."""

    def __init__(self, specs: list[ModuleSpec], candidates: list[AttentionMethod], config: DiTFastAttnConfig,
                 cfg, decided: dict[str, torch.Tensor] | None = None, sensitivity: Sensitivity | None = None,
                 lam: float | None = None):
        self.specs = specs
        self.sensitivity = sensitivity
        self.lam = lam
        self.head_value: dict[tuple[str, int], float] = {}  # Lagrangian value of the flowed head choices
        self.blocks: "_BlockCalibration | None" = None
        self.candidates = candidates
        self.names = [str(m) for m in candidates]
        self.config = config
        self.step_thresholds = config.step_thresholds()
        self.backend_name = check_backend_name(config.backend)
        self.state = StepState(config.num_inference_steps, cfg=cfg)
        T, C = config.num_inference_steps, len(candidates)
        self.err = {s.name: torch.zeros(T, s.num_heads, C, dtype=torch.float64) for s in specs}
        self.err_guided = {s.name: torch.zeros(T, s.num_heads, C, dtype=torch.float64) for s in specs}
        self.ref = {s.name: torch.zeros(T, s.num_heads, dtype=torch.float64) for s in specs}
        self.calls = {s.name: torch.zeros(T, dtype=torch.int64) for s in specs}
        self.fixed = decided is not None
        self.decided = decided or {s.name: torch.full((T, s.num_heads), -1, dtype=torch.int64) for s in specs}
        self.cost_flops: dict[str, torch.Tensor] = {}
        self.cost_seconds: dict[str, torch.Tensor] = {}
        self.layouts: dict[str, object] = {}
        self.cfg_seen: bool | None = None
        self._memory: dict[tuple[str, int], _Memory] = {}
        self._timed: dict[tuple, torch.Tensor] = {}
        self.residual_index = next((i for i, m in enumerate(candidates) if m.needs_residual), None)
        self.keeps_previous = any(m.needs_previous_output for m in candidates)

    def module(self, spec: ModuleSpec) -> "_ModuleCalibration":
        return _ModuleCalibration(self, spec)

    def _accumulators(self) -> dict[str, torch.Tensor]:
        """Every tensor the calls add their measurements to, by a key naming its kind and module or block."""
        tables = {"err": self.err, "err_guided": self.err_guided, "ref": self.ref, "calls": self.calls}
        if self.blocks is not None:
            tables.update(block_err=self.blocks.err, block_err_guided=self.blocks.err_guided, block_ref=self.blocks.ref)
        return {f"{kind}/{name}": t for kind, table in tables.items() for name, t in table.items()}

    def take_batch_stats(self) -> dict[str, torch.Tensor]:
        """The sums measured since the last call (one prompt batch's), the accumulators reset to zero."""
        accumulators = self._accumulators()
        taken = {key: t.clone() for key, t in accumulators.items()}
        for t in accumulators.values():
            t.zero_()
        return taken

    def put_stats(self, total: dict[str, torch.Tensor]) -> None:
        """Set the accumulators to ``total`` (`take_batch_stats`'s keys)."""
        accumulators = self._accumulators()
        for key, value in total.items():
            accumulators[key].copy_(value)

    def decisions(self) -> dict:
        """What the first prompt batch decided and the others follow (handed from rank 0 under torchrun)."""
        return dict(decided=self.decided, head_value=self.head_value, cost_flops=self.cost_flops,
                    cost_seconds=self.cost_seconds, layouts=self.layouts, cfg_seen=self.cfg_seen,
                    block_decided=None if self.blocks is None else self.blocks.decided,
                    block_cost=None if self.blocks is None else self.blocks.cost)

    def follow(self, decisions: dict) -> None:
        self.decided, self.head_value = decisions["decided"], decisions["head_value"]
        self.cost_flops, self.cost_seconds = decisions["cost_flops"], decisions["cost_seconds"]
        self.layouts, self.cfg_seen = decisions["layouts"], decisions["cfg_seen"]
        if self.blocks is not None:
            self.blocks.decided, self.blocks.cost = decisions["block_decided"], decisions["block_cost"]

    def memory(self, module: str) -> _Memory:
        if self.state.step == 0:  # a new generation (or the next prompt batch) starts from nothing
            self._memory.pop((module, self.state.branch), None)
        return self._memory.setdefault((module, self.state.branch), _Memory())

    def guidance(self, cfg: bool) -> float | None:
        """The CFG scale of the guided error (None without batched CFG)."""
        if not cfg:
            return None
        return self.sensitivity.guidance_scale if self.sensitivity is not None else self.config.guidance_scale

    def choose(self, spec: ModuleSpec, step: int, err: torch.Tensor, ref: torch.Tensor, samples: int,
               guided: torch.Tensor) -> torch.Tensor:
        """The methods whose outputs flow at this step: the plan's (held-out evaluation), or `choose_step`'s."""
        from .search import choose_step

        decided = self.decided[spec.name][step]
        if bool((decided >= 0).all()):
            return decided
        trajectory = self.config.allocation == "trajectory"
        rse = relative_error(err, ref, "head" if trajectory else self.config.error_normalization)
        damage = None
        if trajectory and self.sensitivity is not None:
            gain = self.sensitivity.damage_gain(spec.name, step)[:, None]
            damage = (gain * torch.where(torch.isfinite(guided), guided, 0.0) / samples).numpy()
        saved = self.saved(spec.name).numpy()
        choice = torch.from_numpy(choose_step(rse.numpy(), saved, self.config, step, damage=damage, lam=self.lam))
        if damage is not None and self.lam is not None:
            rows = torch.arange(len(choice))
            self.head_value[(spec.name, step)] = float((saved[choice] - self.lam * damage[rows, choice]).sum())
        self.decided[spec.name][step] = choice
        return choice

    def block_skipped(self, module: str, step: int) -> bool:
        return self.blocks is not None and self.blocks.skipped(module, step)

    def saved(self, module: str) -> torch.Tensor:
        cost = self.cost_seconds[module] if self.config.cost_model == "measured" else self.cost_flops[module]
        return saved_cost(cost)

    def record_costs(self, spec: ModuleSpec, layout, q: torch.Tensor, cfg: bool, backend) -> None:
        if spec.name in self.cost_flops:
            if self.layouts[spec.name] != layout:
                raise ValueError(f"module {spec.name!r} saw {layout} after {self.layouts[spec.name]}: every "
                                 "calibration prompt must give the same image and text token counts")
            return
        self.layouts[spec.name] = layout
        self.cost_flops[spec.name] = torch.tensor([m.flops(layout, spec.head_dim, cfg) for m in self.candidates],
                                                  dtype=torch.float64)
        if self.config.cost_model == "measured":
            key = (layout, tuple(q.shape), q.dtype, q.device, cfg)
            if key not in self._timed:
                self._timed[key] = measure_costs(self.candidates, q, layout, cfg, backend)
            self.cost_seconds[spec.name] = self._timed[key]


class _ModuleCalibration:
    def __init__(self, session: _Session, spec: ModuleSpec):
        self.session = session
        self.runtime = session  # the FLUX processor reads runtime.state for single-stream text lengths
        self.spec = spec

    def __call__(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, num_text_tokens: int) -> torch.Tensor:
        session, spec = self.session, self.spec
        state = session.state
        B, H, S, _ = q.shape
        if H != spec.num_heads:
            raise ValueError(f"module {spec.name!r} reports {spec.num_heads} heads but attends with {H}")
        text = num_text_tokens if spec.joint else 0
        layout = spec.layout(S - text, text, session.config.block_size)
        step = state.current_step()
        cfg = state.cfg(needed=any(isinstance(m, CfgShare) for m in session.candidates))
        session.cfg_seen = cfg if session.cfg_seen is None else session.cfg_seen and cfg
        backend = get_backend(session.backend_name, q.device)
        session.record_costs(spec, layout, q, cfg, backend)
        n_blk = layout.num_image_blocks

        def attend(widths: list[int]) -> torch.Tensor:
            table = torch.tensor(widths, dtype=torch.int64)[:, None].expand(B, H).contiguous()
            return backend.attend(q, k, v, layout, table)

        full = attend([n_blk] * B)
        full32 = full.float()
        ref = ((full32 - full32.mean(dim=(0, 2, 3), keepdim=True)) ** 2).sum(dim=(0, 2, 3)).double().cpu()
        mem = session.memory(spec.name)
        C = len(session.candidates)
        err = torch.full((H, C), torch.inf, dtype=torch.float64)
        err[:, 0] = 0.0
        guided = err.clone()
        scale = session.guidance(cfg)
        outputs: list[torch.Tensor | None] = [full] + [None] * (C - 1)
        computed: dict[tuple[int, ...], torch.Tensor] = {}

        def raw(widths: list[int]) -> torch.Tensor:
            if all(w in (0, n_blk) for w in widths):
                return full  # full attention already holds every computed entry
            key = tuple(widths)
            if key not in computed:
                computed[key] = attend(widths)
            return computed[key]

        if step >= session.config.full_steps or session.fixed:
            for ci, method in enumerate(session.candidates[1:], start=1):
                available = torch.ones(H, dtype=torch.bool)
                if method.needs_previous_output and (mem.previous is None or session.block_skipped(spec.name, step - 1)):
                    continue  # nothing to reuse (the plan never caches a head whose block skipped the last step)
                if method.needs_residual:
                    if mem.residual is None:
                        continue
                    available = mem.has_residual
                out = method.finalize(raw(method.kernel_widths(layout, B, cfg)),
                                      HeadMemory(previous_output=mem.previous, residual=mem.residual), cfg)
                outputs[ci] = out
                diff = out.float() - full32
                e = (diff ** 2).sum(dim=(0, 2, 3)).double().cpu()
                err[available, ci] = e[available]
                if scale is not None:
                    e = (guided_error(diff, scale) ** 2).sum(dim=(0, 2, 3)).double().cpu()
                guided[available, ci] = e[available]

        choice = session.choose(spec, step, err, ref, samples=B // 2 if cfg else B, guided=guided)
        out = full.clone()
        for ci in choice.unique().tolist():
            if ci == 0:
                continue
            heads = choice == ci
            if outputs[ci] is None or not bool(torch.isfinite(err[heads, ci]).all()):
                raise RuntimeError(f"module {spec.name!r} step {step}: the plan's `{session.names[ci]}` heads have "
                                   "nothing to reuse here; the plan does not fit this calibration run")
            out[:, heads] = outputs[ci][:, heads]

        # what the plan would store for the next steps
        if session.keeps_previous:
            mem.previous = out
        if session.residual_index is not None:
            heads = choice == 0
            if bool(heads.any()):
                arrow = raw(session.candidates[session.residual_index].kernel_widths(layout, B, cfg))
                if mem.residual is None:
                    mem.residual = torch.zeros_like(full)
                    mem.has_residual = torch.zeros(H, dtype=torch.bool)
                mem.residual[:, heads] = (full - arrow)[:, heads]
                mem.has_residual = mem.has_residual | heads

        session.err[spec.name][step] += err
        session.err_guided[spec.name][step] += guided
        session.ref[spec.name][step] += ref
        session.calls[spec.name][step] += 1
        return out


class _BlockCalibration:
    """The calibration's block handler (`ditfa_optimum.runtime.blocks.install_blocks`): runs every block (its heads
    flow their choices), measures what each block candidate would have returned instead, and chooses between running
    the block and skipping it with the same Lagrangian price as the heads."""

    def __init__(self, session: _Session, adapter, blocks: list[BlockSpec]):
        from .methods import make_block_method

        self.session, self.adapter, self.specs = session, adapter, blocks
        self.methods = [make_block_method(n) for n in ("compute", *session.config.block_methods)]
        T, C = session.config.num_inference_steps, len(self.methods)
        self.err = {b.name: torch.zeros(T, C, dtype=torch.float64) for b in blocks}
        self.err_guided = {b.name: torch.zeros(T, C, dtype=torch.float64) for b in blocks}
        self.ref = {b.name: torch.zeros(T, dtype=torch.float64) for b in blocks}
        self.decided = {b.name: torch.full((T,), -1, dtype=torch.int64) for b in blocks}
        self.cost: dict[str, torch.Tensor] = {}
        self.block_of = {m: b.name for b in blocks for m in b.attention}
        self._memory: dict[tuple[str, int], dict] = {}

    def skipped(self, module: str, step: int) -> bool:
        block = self.block_of.get(module)
        if block is None or step < 0:
            return False
        memory = self._memory.get((block, self.session.state.branch))
        return memory is not None and step in memory["skipped"]

    def block(self, spec: BlockSpec):
        def call(module, forward, args, kwargs):
            return self._call(spec, module, forward, args, kwargs)
        return call

    def _call(self, spec: BlockSpec, module, forward, args, kwargs):
        from .methods import Streams, residual

        session, adapter = self.session, self.adapter
        state = session.state
        step = state.current_step()
        inputs = adapter.block_inputs(spec, module, args, kwargs)
        out = forward(*args, **kwargs)
        streams = adapter.block_output_streams(spec, out)
        if step == 0:
            self._memory.pop((spec.name, state.branch), None)
        memory = self._memory.setdefault((spec.name, state.branch), {"ran": [], "residuals": {}, "skipped": set()})
        r = residual(streams, inputs)
        B = inputs.image.shape[0]
        scale = session.guidance(state.cfg(needed=False) and B % 2 == 0)
        if spec.name not in self.cost:
            n_img = inputs.image.shape[1]
            n_txt = 0 if inputs.text is None else inputs.text.shape[1]
            attention = sum(float(session.cost_flops[s.name][0]) * s.num_heads
                            for s in session.specs if s.name in spec.attention)
            self.cost[spec.name] = torch.tensor([attention, spec.projection_flops(n_img, n_txt),
                                                 spec.mlp_flops(n_img, n_txt)], dtype=torch.float64)

        def parts(x: Streams):
            return [t for t in (x.image, x.text) if t is not None]

        ref = sum(float(((t.float() - t.float().mean(dim=(0, 1), keepdim=True)) ** 2).sum()) for t in parts(r))
        C = len(self.methods)
        err = torch.full((C,), torch.inf, dtype=torch.float64)
        err[0] = 0.0
        guided = err.clone()
        outputs: list = [streams] + [None] * (C - 1)
        for ci, method in enumerate(self.methods[1:], start=1):
            try:
                sources = method.sources(step, memory["ran"], [], spec.mlps)
            except ValueError:  # the block ran at no earlier step of this generation: nothing to reuse
                continue
            candidate = method.skip(inputs, step, memory["residuals"], sources)
            outputs[ci] = candidate
            diffs = [(c.float() - o.float()) for c, o in zip(parts(candidate), parts(streams))]
            err[ci] = sum(float((d ** 2).sum()) for d in diffs)
            guided[ci] = sum(float((guided_error(d, scale) ** 2).sum()) for d in diffs)

        run = 0
        while step - 1 - run in memory["skipped"]:
            run += 1
        choice = self._choose(spec, step, err, guided, ref, B // 2 if scale is not None else B,
                              may_skip=run < session.config.max_skip_run)
        self.err[spec.name][step] += err
        self.err_guided[spec.name][step] += guided
        self.ref[spec.name][step] += ref
        if choice == 0:
            memory["ran"].append(step)
            memory["residuals"][step] = r
            for old in [k for k in memory["residuals"] if k not in memory["ran"][-2:]]:
                del memory["residuals"][old]
            return out
        memory["skipped"].add(step)
        return adapter.block_output(spec, outputs[choice])

    def _choose(self, spec: BlockSpec, step: int, err, guided, ref: float, samples: int, may_skip: bool) -> int:
        session = self.session
        decided = int(self.decided[spec.name][step])
        if decided >= 0:
            return decided
        choice = 0
        sens, lam = session.sensitivity, session.lam
        if step >= session.config.full_steps and sens is not None and lam is not None and may_skip:
            compute = sum(session.head_value.get((m, step), 0.0) for m in spec.attention)
            saved = float(self.cost[spec.name].sum())
            rse = err / ref if ref > 0 else torch.where(err > 0, torch.inf, 0.0)
            best = compute
            for ci in range(1, len(self.methods)):
                if not (torch.isfinite(guided[ci]) and rse[ci] <= session.config.max_head_rse):
                    continue
                value = saved - lam * sens.block_damage_gain(spec.name, step) * float(guided[ci]) / samples
                if value > best:
                    best, choice = value, ci
        self.decided[spec.name][step] = choice
        return choice


def measure_costs(candidates: list[AttentionMethod], like: torch.Tensor, layout, cfg: bool, backend,
                  repeats: int = 7, warmup: int = 2) -> torch.Tensor:
    """Seconds per head of each candidate, timed with ``backend`` on random inputs shaped like ``like`` (median)."""
    B, H, S, D = like.shape
    q, k, v = (torch.randn(B, H, S, D, dtype=like.dtype, device=like.device) for _ in range(3))
    sync = torch.cuda.synchronize if like.device.type == "cuda" else (lambda: None)
    times, timed = [], {}
    for method in candidates:
        widths = tuple(method.kernel_widths(layout, B, cfg))
        if not any(widths):
            times.append(0.0)
            continue
        if widths not in timed:  # candidates that compute the same thing cost the same, not the same plus noise
            table = torch.tensor(widths, dtype=torch.int64)[:, None].expand(B, H).contiguous()
            samples = []
            for i in range(warmup + repeats):
                sync()
                start = time.perf_counter()
                backend.attend(q, k, v, layout, table)
                sync()
                if i >= warmup:
                    samples.append(time.perf_counter() - start)
            timed[widths] = statistics.median(samples) / (H * B)
        times.append(timed[widths])
    return torch.tensor(times, dtype=torch.float64)


# ==================================================================================================== running it
def _encode(pipeline, prompts: list[str], prompt_encoder) -> dict:
    if prompt_encoder is not None:
        return dict(prompt_encoder(prompts))
    if getattr(pipeline, "text_encoder", None) is None and getattr(pipeline, "tokenizer", None) is None:
        raise ValueError(f"the {type(pipeline).__name__} has no text encoder, so prompts cannot be encoded; pass "
                         "prompt_encoder= (a callable: list of prompts -> pipeline keyword arguments such as "
                         "prompt_embeds), e.g. ditfa_optimum.tiny.TinyPromptEncoder for the tiny models")
    return {"prompt": list(prompts)}


def pipeline_kwargs(pipeline, prompts: list[str], config: DiTFastAttnConfig, *, prompt_encoder=None,
                    first: int = 0) -> dict:
    """Keyword arguments of one pipeline call on ``prompts`` with the config's resolution, steps, guidance and
    per-prompt seeds: prompt ``i`` of the call (global index ``first + i``) draws its latents from
    ``seed + first + i``, so a prompt gets the same noise whatever batch it lands in."""
    kwargs = _encode(pipeline, prompts, prompt_encoder)
    kwargs.update(height=config.height, width=config.width, num_inference_steps=config.num_inference_steps,
                  generator=[torch.Generator().manual_seed(config.seed + first + i) for i in range(len(prompts))])
    if config.guidance_scale is not None:
        kwargs["guidance_scale"] = config.guidance_scale
    return kwargs


def run_pipeline(pipeline, prompts: list[str], config: DiTFastAttnConfig, *, prompt_encoder=None, first: int = 0):
    """One pipeline call (see `pipeline_kwargs`); returns the final latents."""
    kwargs = pipeline_kwargs(pipeline, prompts, config, prompt_encoder=prompt_encoder, first=first)
    return pipeline(**kwargs, output_type="latent").images


@contextlib.contextmanager
def progress_bars(pipeline, enabled: bool, desc: str | None = None):
    """Show (or hide) ``pipeline``'s own step progress bar for a while, labelled ``desc``; the user's setting comes
    back after."""
    old = getattr(pipeline, "_progress_bar_config", None)
    if hasattr(pipeline, "set_progress_bar_config"):
        label = {"desc": desc} if desc else {}
        pipeline.set_progress_bar_config(**{**(old or {}), "leave": False, "disable": not enabled, **label})
    try:
        yield
    finally:
        if hasattr(pipeline, "set_progress_bar_config"):
            if old is None:
                del pipeline._progress_bar_config
            else:
                pipeline._progress_bar_config = old


def calibrate(pipeline, config: DiTFastAttnConfig, prompts: list[str], *, prompt_encoder=None,
              plan: CompressionPlan | None = None, progress: bool = True) -> CalibrationStats:
    """Measure every candidate method on every head along the pipeline's own denoising loop (module docstring).

    Args:
        pipeline: a diffusers pipeline whose ``.transformer`` an adapter knows (SD3, SD3.5, FLUX, ...).
        config: steps, resolution, guidance, seed, candidate methods, allocation and its target.
        prompts: calibration captions (at least one).
        prompt_encoder: for pipelines without text encoders: ``prompts -> pipeline kwargs`` (``prompt_embeds``, ...).
        plan: instead of choosing, follow this plan and measure the error of its methods (held-out evaluation).
        progress: show progress bars.

    Returns:
        `CalibrationStats` (with the `Sensitivity` for the trajectory allocation).
    """
    from .apply import _split
    from .sensitivity import measure_sensitivity

    prompts = check_prompts(prompts)
    transformer, _ = _split(pipeline)
    if transformer is pipeline:
        raise ValueError("calibration runs a pipeline's denoising loop; pass the diffusers pipeline, not its "
                         "transformer")
    if plan is not None or config.allocation == "local":
        return _calibration_pass(pipeline, config, prompts, prompt_encoder, plan, progress)

    from .search import TrajectoryProblem

    start = time.perf_counter()
    sensitivity = distributed.from_rank0(lambda: measure_sensitivity(  # a couple of prompts: rank 0's, handed out
        pipeline, config, prompts[:config.sensitivity_prompts], prompt_encoder=prompt_encoder, seed=config.seed,
        progress=progress))
    stats = _calibration_pass(pipeline, config, prompts, prompt_encoder, None, progress, sensitivity=sensitivity,
                              desc="ditfa calibration (dense flow)", record_outputs=config.measures_steps)
    step_damage = stats.step_damage
    passes = []
    for _ in range(config.calibration_passes - 1):
        problem = TrajectoryProblem.from_stats(stats, config)
        lam, choices = problem.solve(config)
        passes.append(problem.describe(choices, lam, config))
        stats = _calibration_pass(pipeline, config, prompts, prompt_encoder, None, progress, sensitivity=sensitivity,
                                  lam=lam, desc="ditfa calibration (plan flow)")
        stats.step_damage = step_damage  # skipped steps are priced on the dense flow (see step_skip_damage)
    stats.passes = passes

    def selected():
        select_plan(pipeline, stats, config, prompts, prompt_encoder=prompt_encoder, progress=progress)
        return stats.selections, stats.damage_scale

    stats.selections, stats.damage_scale = distributed.from_rank0(selected)
    stats.seconds = time.perf_counter() - start
    return stats


#: `select_plan` replaces the error model's choice only by a plan that changes the sensitivity prompts' final latents
#: this many times less (3 dB): two prompts decide near-ties by noise. Measured on mini-mmdit-128 (H200, 2026-12-01):
#: picking the least measured change outright chose near-ties (within 3%) that lost 1.6-2.7 dB on held-out captions
#: at 40-50%; the one large difference (2.75x at 60%) gained 6.7 dB.
SELECTION_MARGIN = 2.0


def select_plan(pipeline, stats: CalibrationStats, config: DiTFastAttnConfig, prompts: list[str], *,
                prompt_encoder=None, progress: bool = False, scale: bool = True) -> dict | None:
    """Measure the search's alternative plans for ``config``'s target and keep the best (trajectory allocation).

    The error model ranks plans well but not perfectly: where plans of different kinds meet the same target (skipped
    steps alone, or with head methods; runs of two or three skipped steps) it can prefer one that changes the images
    more. This runs the first ``config.verify_plans`` of `TrajectoryProblem.alternatives` (ranked by predicted damage)
    on the sensitivity prompts (the first ``config.sensitivity_prompts`` of ``prompts``) and compares their final
    latents with the dense ones the sensitivity measurement kept. The model's choice stays unless a plan meeting the
    target changes them `SELECTION_MARGIN` times less; the selection is recorded in ``stats.selections``, so that
    ``search(stats, config)`` returns it. With ``scale``, ``stats.damage_scale`` becomes its measured / predicted
    change (the error model's level).

    Returns:
        The selection record (also stored in ``stats.selections``), or None when there is nothing to measure
        (``verify_plans=0``, no sensitivity reference, or a plan predicted to change nothing).
    """
    from tqdm.auto import tqdm

    from .apply import apply, remove
    from .search import TrajectoryProblem, search, selection_key

    reference = getattr(stats.sensitivity, "reference_final", None)
    if config.verify_plans == 0 or reference is None or config.allocation != "trajectory":
        return None
    prompts = check_prompts(prompts)[:config.sensitivity_prompts]
    key = selection_key(config)
    stats.selections.pop(key, None)
    problem = TrajectoryProblem.from_stats(stats, config)
    alternatives = problem.alternatives(config)[:config.verify_plans]
    runs = []
    for variant, _, choices in tqdm(alternatives, desc="ditfa: checking the candidate plans", unit="plan",
                                    disable=not progress or len(alternatives) < 2):
        predicted = problem.sensitivity.predicted_mse(problem.totals(choices)[1])
        record = {"variant": variant, "meets_target": problem._meets(config, choices), "predicted_mse": float(predicted)}
        if predicted > 0:
            plan = search(stats, config, variant=variant, problem=problem)  # solved by `alternatives`
            apply(pipeline, plan, backend=config.backend)
            try:
                with torch.inference_mode(), progress_bars(pipeline, False):
                    final = run_pipeline(pipeline, prompts, config, prompt_encoder=prompt_encoder).float()
            finally:
                remove(pipeline)
            record["measured_mse"] = float(((final - reference.to(final.device)) ** 2).mean())
            record["whole_cut"] = plan.metadata["search"].get("whole_cut")
            record["flop_cut"] = plan.metadata["search"]["flop_cut"]
        runs.append(record)
    measured = [r for r in runs if "measured_mse" in r]
    if not measured:
        return None
    meeting = [r for r in measured if r["meets_target"]] or measured[:1]  # never trade the target for quality
    best = meeting[0]  # the error model's choice, unless another changes the images SELECTION_MARGIN times less
    better = min(meeting, key=lambda r: r["measured_mse"])
    if better["measured_mse"] * SELECTION_MARGIN < best["measured_mse"]:
        best = better
    selection = {"variant": best["variant"], "alternatives": runs}
    stats.selections[key] = selection
    logger.info("ditfa: of %d candidate plans, %s changed the calibration images least (latent MSE %.3g, %.3g "
                "predicted)", len(runs), best["variant"], best["measured_mse"], best["predicted_mse"])
    if scale and best["measured_mse"] > 0:
        stats.damage_scale = stats.damage_scale * best["measured_mse"] / best["predicted_mse"]
    return selection


def _calibration_pass(pipeline, config: DiTFastAttnConfig, prompts: list[str], prompt_encoder,
                      plan: CompressionPlan | None, progress: bool, *, sensitivity: Sensitivity | None = None,
                      lam: float | None = None, desc: str = "ditfa calibration",
                      record_outputs: bool = False) -> CalibrationStats:
    """One pass over the prompts; choices flow from ``plan``, or from `choose_step` (price ``lam`` for the
    trajectory allocation: None = every head full). ``record_outputs``: also price whole skipped steps
    (`step_skip_damage`) from the transformer's outputs along this pass."""
    from tqdm.auto import tqdm

    from .apply import _prepare, _split, cfg_source, install, remove

    transformer, _ = _split(pipeline)
    adapter, modules = _prepare(transformer)
    specs = [spec for spec, _ in modules]
    candidates = config.candidates()
    decided = None
    if plan is not None:
        plan.validate(specs, num_steps=config.num_inference_steps, model_class=adapter.model_class)
        names = [str(m) for m in candidates]
        for spec in specs:
            for step in range(plan.num_steps):
                for m in plan.step_methods(spec.name, step):
                    if str(m) not in names:
                        names.append(str(m))
        candidates = [make_method(n) for n in names]
        decided = {s.name: torch.tensor([[names.index(str(m)) for m in plan.step_methods(s.name, t)]
                                         for t in range(config.num_inference_steps)]) for s in specs}
        if plan.block_size != config.block_size:
            config = config.replace(block_size=plan.block_size)
    session = _Session(specs, candidates, config, cfg_source(None, adapter, pipeline), decided,
                       sensitivity=sensitivity, lam=lam)
    install(transformer, adapter, modules, session)
    installed_blocks = None
    if config.block_methods and plan is None:
        from .runtime.blocks import install_blocks

        blocks = adapter.blocks(transformer)
        session.blocks = _BlockCalibration(session, adapter, [b for b, _ in blocks])
        installed_blocks = install_blocks(transformer, adapter, blocks, session.blocks)
    outputs: list[list[torch.Tensor]] = []

    def record(_module, _args, output):
        sample = (output[0] if isinstance(output, (tuple, list)) else output.sample).detach().float()
        cfg = session.state.cfg(needed=False) and sample.shape[0] % 2 == 0
        if session.state.step == 0:
            outputs.append([])
        outputs[-1].append(guided_error(sample, session.guidance(cfg)).cpu())

    recorder = transformer.register_forward_hook(record) if record_outputs else None
    start = time.perf_counter()
    rank, ranks = distributed.world()
    progress = progress and rank == 0
    per_batch: dict[int, tuple] = {}  # batch index -> (its statistics, its recorded outputs)
    try:
        batches = [(i, prompts[i:i + config.batch_size]) for i in range(0, len(prompts), config.batch_size)]

        def run(index: int, first: int, batch: list[str]) -> None:
            session.state.reset()
            outputs.clear()
            run_pipeline(pipeline, batch, config, prompt_encoder=prompt_encoder, first=first)
            per_batch[index] = (session.take_batch_stats(), list(outputs))

        with torch.inference_mode(), progress_bars(pipeline, progress):
            bar = tqdm(total=len(batches), desc=desc, unit="batch", disable=not progress)

            def first_batch() -> dict:  # it makes the flowing choices; under torchrun the other ranks follow them
                run(0, *batches[0])
                return session.decisions()

            decisions = distributed.from_rank0(first_batch)  # rank 0's failure reaches every rank
            if rank > 0:
                session.follow(decisions)
            bar.update(1)
            for index, (first, batch) in distributed.my_batches(list(enumerate(batches))):
                run(index, first, batch)
                bar.update(ranks)
            bar.close()
    finally:
        if recorder is not None:
            recorder.remove()
        if installed_blocks is not None:
            installed_blocks.remove()
        remove(transformer)
    parts = distributed.gathered(per_batch)  # every rank's batches, in batch order: the same sums on every rank
    session.put_stats(distributed.summed([stats for stats, _ in parts]))
    outputs = [batch for _, recorded in parts for batch in recorded]

    for spec in specs:
        missing = torch.nonzero(session.calls[spec.name] == 0).flatten().tolist()
        if missing:
            raise RuntimeError(f"module {spec.name!r} never ran at steps {missing[:5]}: the pipeline ran fewer than "
                               f"num_inference_steps={config.num_inference_steps} steps")
    layout = session.layouts[specs[0].name]
    stats = CalibrationStats(
        modules=specs, candidates=session.names, num_steps=config.num_inference_steps, err=session.err,
        ref=session.ref, chosen={n: c.to(torch.int16) for n, c in session.decided.items()},
        cost_flops=session.cost_flops, cost_seconds=session.cost_seconds, err_guided=session.err_guided,
        image_tokens=layout.num_image_tokens, text_tokens=_joint_text_tokens(session, specs),
        cfg=bool(session.cfg_seen), block_size=config.block_size, model_class=adapter.model_class,
        num_prompts=len(prompts), threshold=config.threshold, seconds=time.perf_counter() - start,
        device=str(next(transformer.parameters()).device), sensitivity=sensitivity, flow_lambda=lam,
        **_block_stats(session.blocks))
    if record_outputs:
        stats.step_damage = {"transformer": step_skip_damage(outputs, sensitivity, max(config.max_skip_run, 4))}
    if config.measures_steps and not stats.blocks:  # whole-step costs need every block's linear FLOPs
        stats.blocks = [b for b, _ in adapter.blocks(transformer)]
        stats.block_cost = {b.name: torch.tensor([
            sum(float(stats.cost_flops[m][0]) * stats.modules[[s.name for s in specs].index(m)].num_heads
                for m in b.attention),
            b.projection_flops(stats.image_tokens, stats.text_tokens),
            b.mlp_flops(stats.image_tokens, stats.text_tokens)], dtype=torch.float64) for b in stats.blocks}
    return stats


def step_skip_damage(outputs: list[list[torch.Tensor]], sensitivity: Sensitivity | None,
                     max_run: int) -> torch.Tensor:
    """The predicted damage of every run of skipped steps the search may choose (`CalibrationStats.step_damage`).

    For anchors ``a < b`` (or ``a == b``: one anchor) and a run of skipped steps ``b+1 .. e`` (at most ``max_run``;
    anchors at most ``max_run + 1`` apart, as a plan with that bound has them), the error of `step_taylor` at each
    skipped step ``t`` is ``extrapolate(v_a, v_b, t) - v_t`` on the guided outputs ``v`` of the dense flow. The
    errors of one run are nearly the same vector growing along the run, so they are added *before* squaring, each
    weighted by the square root of its step's output gain (`Sensitivity.output_damage_gain`)::

        damage[a, b, e] = run_factor(e - b) * mean over prompts || sum_{t=b+1..e} sqrt(gain[t]) * err[t] ||^2

    where ``run_factor`` is the measured correction for runs of that length (`Sensitivity.run_damage_factor`).

    Args:
        outputs: per prompt batch, per step, the guided transformer output ``[B, ...]`` (CPU).
        sensitivity: the propagation gains (with ``output_gain``).
        max_run: the most consecutive skipped steps.

    Returns:
        ``[T, T, T]`` float64, ``inf`` where not measured.
    """
    import math

    from .methods import step_taylor

    if sensitivity is None or not outputs:
        raise ValueError("pricing skipped steps needs the sensitivity measurement and a recorded calibration pass")
    T = len(outputs[0])
    if any(len(batch) != T for batch in outputs):
        raise RuntimeError(f"the calibration recorded {[len(b) for b in outputs]} transformer calls per batch; "
                           "skip_steps needs one call per denoising step")
    root = [math.sqrt(sensitivity.output_damage_gain(t)) for t in range(T)]
    samples = sum(batch[0].shape[0] for batch in outputs)
    damage = torch.full((T, T, T), math.inf, dtype=torch.float64)
    for b in range(T - 1):
        for a in range(max(0, b - max_run - 1), b + 1):
            total = torch.zeros(min(T - 1, b + max_run) - b, dtype=torch.float64)
            for batch in outputs:
                history = {a: batch[a], b: batch[b]}
                anchors = (b,) if a == b else (b, a)
                acc = torch.zeros_like(batch[b])
                for i, t in enumerate(range(b + 1, min(T - 1, b + max_run) + 1)):
                    acc += root[t] * (step_taylor.extrapolate(history, t, anchors) - batch[t])
                    total[i] += float(acc.double().pow(2).sum())
            lengths = torch.arange(1, total.numel() + 1)
            correction = torch.tensor([sensitivity.run_damage_factor(int(L)) for L in lengths], dtype=torch.float64)
            damage[a, b, b + 1:b + 1 + total.numel()] = total / samples * correction
    return damage


def _block_stats(blocks: "_BlockCalibration | None") -> dict:
    if blocks is None:
        return {}
    return dict(blocks=list(blocks.specs), block_candidates=[str(m) for m in blocks.methods], block_err=blocks.err,
                block_err_guided=blocks.err_guided, block_ref=blocks.ref,
                block_chosen={n: c.to(torch.int16) for n, c in blocks.decided.items()}, block_cost=blocks.cost)


def _joint_text_tokens(session: _Session, specs: list[ModuleSpec]) -> int:
    return max((session.layouts[s.name].num_text_tokens for s in specs if s.joint), default=0)


def check_prompts(prompts) -> list[str]:
    if isinstance(prompts, str):
        raise ValueError("prompts must be a list of strings, got a single string; wrap it: [prompt]")
    prompts = list(prompts) if prompts is not None else []
    if not prompts:
        raise ValueError("the calibration prompt list is empty; pass at least one prompt, or None for the built-in "
                         "captions (ditfa_optimum.prompts.CALIBRATION_PROMPTS)")
    bad = [p for p in prompts if not isinstance(p, str)]
    if bad:
        raise ValueError(f"calibration prompts must be strings, got {type(bad[0]).__name__}: {bad[0]!r}")
    return prompts
