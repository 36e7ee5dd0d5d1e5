"""`DiTFastAttnConfig`: everything a plan search depends on, validated, versioned, JSON round-trippable.

The config is never mutated by the code that reads it; `resolved()` returns a copy with defaults filled in.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from dataclasses import dataclass
from pathlib import Path

from . import fp8_linears, schema
from .masks import DEFAULT_BLOCK_SIZE
from .methods import Full, make_method

#: The candidates the paper searches over (arrow windows 1/8, 1/16, 1/32 of the image, output reuse across steps,
#: sharing across the CFG halves). `full` is always a candidate and is not listed.
DEFAULT_METHODS = ("arrow:1/8", "arrow:1/16", "arrow:1/32", "cache", "cfg_share")

COST_MODELS = ("flops", "measured")
#: how the error budget is spread over the compressible steps: weight of step t ~ (t - full_steps + 1) ** exponent,
#: normalised to a mean of 1, so every schedule spends the same total budget
BUDGET_SCHEDULES = {"constant": 0, "linear": 1, "quadratic": 2, "cubic": 3}
#: what a head's squared error is divided by: its own output variance (the paper's local metric) or the mean output
#: variance of the module's heads (a head whose output is small then spends less of the budget)
ERROR_NORMALIZATIONS = ("head", "module")
#: how the error budget is spent: "trajectory" (one global allocation over every module, step and head, weighted by
#: how much an error there moves the final image: `ditfa_optimum.sensitivity`) or "local" (the paper's: one integer
#: program per module and step under ``threshold``)
ALLOCATIONS = ("trajectory", "local")
#: block-level candidates the trajectory search can choose (`ditfa_optimum.methods.block_base`)
SEARCHED_BLOCK_METHODS = ("block_cache", "block_taylor")
#: what the default search aims for when no target is given: the attention-FLOP cut with the least predicted damage.
#: Measured (docs/benchmarks.md, H200): 33.9 dB PSNR on mini-mmdit (1024 image tokens) at 30%, and 33.2 dB at 45% on
#: the 4096-token model. A predicted-quality default was tried: its prediction is model-specific (latent variance,
#: VAE) and anchored by one generation only, so the default states the saving and reports the predicted quality.
DEFAULT_TARGET_CUT = 0.3
#: the file `DiTFastAttnConfig.save_pretrained` writes (an artifact's own ``ditfa_config.json`` is another file: the
#: artifact's record, which holds the search config among much else)
SEARCH_CONFIG_NAME = "ditfa_search_config.json"


@dataclass(frozen=True)
class DiTFastAttnConfig:
    """How to calibrate and search a head-wise attention plan.

    Args:
        threshold: the error budget delta: the mean, over the heads of one attention module at one step, of the
            local relative squared error ``mean((O' - O)^2) / var(O)`` of each head's method against full attention.
            0 keeps every head full; 0.05 to 0.3 are typical. The search maximises the saved cost per (module, step)
            subject to the heads' summed RSE staying <= ``threshold * num_heads``.
        methods: candidate methods besides `full` (always a candidate), as strings: ``"arrow:1/8"``, ``"cache"``,
            ``"cfg_share"``, ``"arrow_residual:1/4"`` (at most one arrow_residual fraction).
        num_inference_steps: denoising steps of the calibration runs; the plan covers exactly these steps.
        height, width: image size in pixels of the calibration runs.
        guidance_scale: CFG scale passed to the pipeline (None: the pipeline's default).
        seed: seed of the calibration latents (prompt i uses ``seed + i``) and of the default prompt choice.
        cost_model: "flops" (analytic attention FLOPs, deterministic everywhere) or "measured" (each candidate timed
            with the runtime's own backend on the calibration device, so the search optimises real time).
        num_prompts: how many built-in captions to calibrate on when no prompts are given.
        batch_size: prompts per pipeline call (CFG doubles the transformer batch). Choices are made on the first
            batch while it runs (so later layers and steps see the plan's real activations); later batches follow
            those choices and add their errors to the statistics the final search reads.
        full_steps: the first steps that run every head `full` (at least 1: step 0 has nothing to reuse).
        block_size: arrow mask block size in tokens (part of the mask definition).
        budget_schedule: how the budget is spread over the steps (`step_thresholds`): "constant" (``threshold`` at
            every step, as in the paper), "linear", "quadratic" or "cubic" (growing with the step, mean
            ``threshold``: early steps decide the composition, and their errors carry through every later step).
        error_normalization: "head" (RSE relative to the head's own output variance, as in the paper) or "module"
            (relative to the mean output variance of the module's heads, so quiet heads spend less of the budget).
        backend: attention backend used while calibrating ("auto", "reference", "flex", ...; None = auto).
        allocation: "trajectory" (default): measure how an error at each (module, step, head) reaches the final
            latents (`ditfa_optimum.sensitivity`) and choose every head's method in one global allocation that meets
            ``target_cut`` or ``target_snr_db``; "local": the paper's search, one integer program per (module, step)
            under ``threshold`` (with ``budget_schedule`` and ``error_normalization``).
        target_cut: trajectory allocation: the attention-FLOP cut to reach (0..1) with the least predicted error.
        target_snr_db: trajectory allocation: the predicted signal-to-noise ratio of the final latents (dB) to keep
            while saving the most. Neither target given: ``target_cut=DEFAULT_TARGET_CUT`` (0.3).
        max_head_rse: per-head cap on the local error (both allocations): no head takes a method whose RSE exceeds
            it at that step. The reference implementation's budget is ``sum_h RSE_h <= delta`` per layer, so each of
            its heads is capped at its delta; ``local`` here budgets ``sum_h RSE_h <= threshold * H`` (``threshold``
            = the reference's delta / H), and this cap bounds any single head.
        sensitivity_prompts: prompts (the first of the calibration prompts) of the sensitivity measurement.
        calibration_passes: trajectory allocation: 1 = measure with every head full flowing; 2 (default) = then
            measure again with the choices of the first pass's allocation flowing, so errors that compound over
            steps (a head cached twice in a row) are measured as the plan makes them; 3 = once more.
        block_methods: trajectory allocation: block-level candidates searched with the heads, per (transformer
            block, step): ``"block_cache"`` (reuse the block's residual from its last computed step) and
            ``"block_taylor"`` (extrapolate it from the last two). With block candidates the costs are whole-
            transformer FLOPs (attention, projections, MLPs) and ``target_cut`` is the share of those skipped.
        max_skip_run: the most consecutive steps a block may skip before it runs again (a residual reused or
            extrapolated over many steps drifts; diffusers' TaylorSeer and cache-dit bound this the same way);
            the same bound holds for whole skipped steps.
        skip_steps: trajectory allocation: also search whole steps where the transformer does not run
            (``step_taylor``: its output extrapolated from the last two steps where it ran), chosen jointly with
            the head (and block) methods by one dynamic program over the steps. Costs are then whole-transformer
            FLOPs and ``target_cut`` is the share of those skipped. None (default): yes with the trajectory
            allocation whenever the statistics price skipped steps (calibration measures them); True: required;
            False: never (head and block methods only).
        verify_plans: trajectory allocation: how many of the search's alternative plans for the target (see
            `TrajectoryProblem.alternatives`: head damage priced 1x / 4x / not at all, shorter skipped runs) to run on
            the sensitivity prompts at the end of calibration; the error model's choice is the plan unless another
            changes their images at least 2x less (`calibrate.SELECTION_MARGIN`), and the plan's measurement scales
            the error model. 1 = run only the error model's choice (to scale the model); 0 = run nothing.
        quantize_linears: None (default): the linear layers run in the model's dtype; ``"fp8"``: the transformer
            blocks' linear layers in FP8 through torchao (`ditfa_optimum.fp8_linears`: float8 weights with per-row
            scales, activations quantized per row at run time), converted in place before calibrating, so the plan
            is searched on the model users run, and stored in the artifact. Needs a bfloat16 pipeline, torchao and
            a GPU with FP8 tensor cores (compute capability 8.9+); refused elsewhere.

    Example:
        >>> cfg = DiTFastAttnConfig(threshold=0.1, num_inference_steps=28, height=1024, width=1024)
        >>> DiTFastAttnConfig.from_dict(cfg.to_dict()) == cfg
        True
    """

    threshold: float = 0.1
    methods: tuple[str, ...] = DEFAULT_METHODS
    num_inference_steps: int = 28
    height: int = 1024
    width: int = 1024
    guidance_scale: float | None = None
    seed: int = 0
    cost_model: str = "flops"
    num_prompts: int = 8
    batch_size: int = 8
    full_steps: int = 1
    block_size: int = DEFAULT_BLOCK_SIZE
    budget_schedule: str = "constant"
    error_normalization: str = "head"
    backend: str | None = None
    allocation: str = "trajectory"
    target_cut: float | None = None
    target_snr_db: float | None = None
    max_head_rse: float = 0.5
    sensitivity_prompts: int = 2
    calibration_passes: int = 2
    block_methods: tuple[str, ...] = ()
    max_skip_run: int = 3
    skip_steps: bool | None = None
    verify_plans: int = 6
    quantize_linears: str | None = None

    def __post_init__(self):
        if isinstance(self.methods, str) or not all(isinstance(m, str) for m in self.methods):
            raise ValueError(f"methods must be a list of method strings like ['arrow:1/8', 'cache'], "
                             f"got {self.methods!r}")
        object.__setattr__(self, "methods", tuple(self.methods))
        if isinstance(self.threshold, bool) or not isinstance(self.threshold, (int, float)) \
                or not math.isfinite(self.threshold) or self.threshold < 0:
            raise ValueError(f"threshold must be a finite number >= 0 (e.g. 0.1), got {self.threshold!r}")
        _positive_int("num_inference_steps", self.num_inference_steps)
        for name in ("height", "width"):
            _positive_int(name, getattr(self, name))
        _positive_int("num_prompts", self.num_prompts)
        _positive_int("batch_size", self.batch_size)
        _positive_int("block_size", self.block_size)
        if not isinstance(self.seed, int) or isinstance(self.seed, bool):
            raise ValueError(f"seed must be an int, got {self.seed!r}")
        if not isinstance(self.full_steps, int) or not 1 <= self.full_steps <= self.num_inference_steps:
            raise ValueError(f"full_steps must be an int in [1, num_inference_steps={self.num_inference_steps}] "
                             f"(step 0 is always full), got {self.full_steps!r}")
        if self.guidance_scale is not None and (not isinstance(self.guidance_scale, (int, float))
                                                or isinstance(self.guidance_scale, bool)
                                                or not math.isfinite(self.guidance_scale)):
            raise ValueError(f"guidance_scale must be a finite number or None, got {self.guidance_scale!r}")
        if self.budget_schedule not in BUDGET_SCHEDULES:
            raise ValueError(f"budget_schedule must be one of {sorted(BUDGET_SCHEDULES)}, got {self.budget_schedule!r}")
        if self.error_normalization not in ERROR_NORMALIZATIONS:
            raise ValueError(f"error_normalization must be one of {ERROR_NORMALIZATIONS}, got "
                             f"{self.error_normalization!r}")
        if self.allocation not in ALLOCATIONS:
            raise ValueError(f"allocation must be one of {ALLOCATIONS}, got {self.allocation!r}")
        if self.target_cut is not None and (isinstance(self.target_cut, bool)
                                            or not isinstance(self.target_cut, (int, float))
                                            or not 0 < self.target_cut < 1):
            raise ValueError(f"target_cut must be a number in (0, 1) (e.g. 0.6 for a 60% attention-FLOP cut) or "
                             f"None, got {self.target_cut!r}")
        if self.target_snr_db is not None and (isinstance(self.target_snr_db, bool)
                                               or not isinstance(self.target_snr_db, (int, float))
                                               or not math.isfinite(self.target_snr_db)):
            raise ValueError(f"target_snr_db must be a finite number of dB (e.g. 30) or None, got "
                             f"{self.target_snr_db!r}")
        if self.target_cut is not None and self.target_snr_db is not None:
            raise ValueError(f"give one target, target_cut ({self.target_cut}) or target_snr_db "
                             f"({self.target_snr_db}), not both")
        if (self.target_cut is not None or self.target_snr_db is not None) and self.allocation != "trajectory":
            raise ValueError("target_cut / target_snr_db need allocation='trajectory'; the 'local' allocation is "
                             "steered by threshold")
        if isinstance(self.max_head_rse, bool) or not isinstance(self.max_head_rse, (int, float)) \
                or not math.isfinite(self.max_head_rse) or not self.max_head_rse > 0:
            raise ValueError(f"max_head_rse must be a finite number > 0 (e.g. 0.5; 1e9 for no cap), got "
                             f"{self.max_head_rse!r}")
        _positive_int("sensitivity_prompts", self.sensitivity_prompts)
        _positive_int("max_skip_run", self.max_skip_run)
        if self.quantize_linears is not None and self.quantize_linears not in fp8_linears.QUANTIZATIONS:
            raise ValueError(f"quantize_linears must be None or one of {list(fp8_linears.QUANTIZATIONS)}, got "
                             f"{self.quantize_linears!r}")
        if not isinstance(self.verify_plans, int) or isinstance(self.verify_plans, bool) or self.verify_plans < 0:
            raise ValueError(f"verify_plans must be an int >= 0 (plans run at the end of calibration; 0 = none), "
                             f"got {self.verify_plans!r}")
        if isinstance(self.block_methods, str) or not all(isinstance(m, str) for m in self.block_methods):
            raise ValueError(f"block_methods must be a list of block method names like ['block_taylor'], got "
                             f"{self.block_methods!r}")
        object.__setattr__(self, "block_methods", tuple(dict.fromkeys(self.block_methods)))
        for name in self.block_methods:
            if name not in SEARCHED_BLOCK_METHODS:
                raise ValueError(f"block method {name!r} cannot be searched; choose from {SEARCHED_BLOCK_METHODS} "
                                 "(mlp_cache runs from a hand-made plan but is not calibrated yet)")
        if self.block_methods and self.allocation != "trajectory":
            raise ValueError("block_methods are searched by the trajectory allocation only; use "
                             "allocation='trajectory'")
        if self.block_methods and any(make_method(m).needs_residual for m in self.methods):
            raise ValueError("block_methods and arrow_residual heads cannot be searched together (an arrow_residual "
                             "head records its residual at steps its block may skip)")
        if self.skip_steps is not None and not isinstance(self.skip_steps, bool):
            raise ValueError(f"skip_steps must be True, False or None (auto), got {self.skip_steps!r}")
        if self.skip_steps and self.allocation != "trajectory":
            raise ValueError("skip_steps is searched by the trajectory allocation only; use allocation='trajectory'")
        if self.calibration_passes not in (1, 2, 3):
            raise ValueError(f"calibration_passes must be 1, 2 or 3, got {self.calibration_passes!r}")
        if self.cost_model not in COST_MODELS:
            raise ValueError(f"cost_model must be one of {COST_MODELS}, got {self.cost_model!r}")
        self.candidates()  # validates the method strings

    def candidates(self) -> list:
        """The candidate method objects, `full` first, duplicates removed, in the given order."""
        found = [Full()]
        for text in self.methods:
            try:
                method = make_method(text)
            except ValueError as e:
                raise ValueError(f"candidate method {text!r}: {e}") from None
            if method not in found:
                found.append(method)
        residuals = [m for m in found if m.needs_residual]
        if len(residuals) > 1:
            raise ValueError(f"at most one arrow_residual fraction may be a candidate (one full step records one "
                             f"residual), got {[str(m) for m in residuals]}")
        return found

    def step_thresholds(self) -> list[float]:
        """The per-head RSE budget of each step: 0 for the first ``full_steps``, then ``threshold`` times the
        schedule's weight (mean 1 over the compressible steps).

        Example:
            >>> DiTFastAttnConfig(threshold=0.1, num_inference_steps=4, budget_schedule="linear").step_thresholds()
            [0.0, 0.05, 0.1, 0.15]
        """
        exponent = BUDGET_SCHEDULES[self.budget_schedule]
        weights = [float(t - self.full_steps + 1) ** exponent for t in range(self.full_steps, self.num_inference_steps)]
        mean = sum(weights) / len(weights) if weights else 1.0
        return [0.0] * self.full_steps + [self.threshold * w / mean for w in weights]

    @property
    def measures_steps(self) -> bool:
        """Whether calibration prices skipped steps (``skip_steps`` True, or None with the trajectory allocation)."""
        return self.allocation == "trajectory" and self.skip_steps is not False

    def target(self) -> tuple[str, float]:
        """``("cut", value)`` or ``("snr_db", value)``: what the trajectory allocation aims for."""
        if self.target_cut is not None:
            return "cut", float(self.target_cut)
        if self.target_snr_db is not None:
            return "snr_db", float(self.target_snr_db)
        return "cut", DEFAULT_TARGET_CUT

    def replace(self, **changes) -> "DiTFastAttnConfig":
        return dataclasses.replace(self, **changes)

    # ---------------------------------------------------------------- JSON
    def to_dict(self) -> dict:
        """Every field, JSON-ready, with the schema version (`ditfa_optimum.schema`)."""
        out = dataclasses.asdict(self)
        out["methods"] = list(self.methods)
        out["block_methods"] = list(self.block_methods)
        return schema.stamp(out)

    @classmethod
    def from_dict(cls, data: dict) -> "DiTFastAttnConfig":
        """The config `to_dict` wrote (older schema versions are upgraded: options added since read as what those
        searches did), or a hand-written partial one without a version (missing fields get today's defaults)."""
        if not isinstance(data, dict):
            raise ValueError(f"a DiTFastAttnConfig is read from a JSON object, got {type(data).__name__}")
        data = schema.read("config", data, "DiTFastAttnConfig", missing_is_current=True)
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown DiTFastAttnConfig fields {unknown}; known: {sorted(known)}")
        for key in ("methods", "block_methods"):
            if key in data and isinstance(data[key], list):
                data[key] = tuple(data[key])
        return cls(**data)

    # ---------------------------------------------------------------- Optimum-style files
    def save_pretrained(self, save_directory: str | os.PathLike) -> Path:
        """Write the config to ``save_directory/ditfa_search_config.json`` (`SEARCH_CONFIG_NAME`; the directory is
        created), as Optimum's configurations save themselves; an existing config file there is replaced atomically,
        nothing else is touched. Returns the file's path."""
        directory = Path(save_directory)
        if directory.exists() and not directory.is_dir():
            raise ValueError(f"save_pretrained: {directory} is a file; pass a directory")
        directory.mkdir(parents=True, exist_ok=True)
        target = directory / SEARCH_CONFIG_NAME
        tmp = directory / f".{SEARCH_CONFIG_NAME}.{os.getpid()}.tmp"
        tmp.write_text(json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n")
        os.replace(tmp, target)
        return target

    @classmethod
    def from_pretrained(cls, config_path: str | os.PathLike, *, revision: str | None = None,
                        **changes) -> "DiTFastAttnConfig":
        """A config `save_pretrained` wrote, read from: its directory or the JSON file itself; an artifact (its
        directory or Hub repo id: the config of the search that made its plan); or a Hub repo id holding
        ``ditfa_search_config.json`` (``revision``: a branch, tag or commit). ``changes`` replace fields, as
        ``from_pretrained(path, target_cut=0.5)``."""
        from .serialization import CONFIG_NAME, read_artifact

        path = Path(config_path)
        if path.is_file():
            data = _read_json(path)
        elif path.is_dir() and (path / SEARCH_CONFIG_NAME).is_file():
            data = _read_json(path / SEARCH_CONFIG_NAME)
        elif path.is_dir() and not (path / CONFIG_NAME).is_file():
            raise ValueError(f"{path} holds neither {SEARCH_CONFIG_NAME} (DiTFastAttnConfig.save_pretrained) nor an "
                             f"artifact's {CONFIG_NAME}; pass the directory save_pretrained wrote to")
        elif path.exists() or _is_local_like(str(config_path)):
            data = _artifact_search_config(read_artifact(path), path)
        else:  # a Hub repo id: a saved config, else an artifact
            data = _hub_config(str(config_path), revision)
            if data is None:
                data = _artifact_search_config(read_artifact(str(config_path), revision=revision), config_path)
        return cls.from_dict(data).replace(**changes) if changes else cls.from_dict(data)


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{path} is not a JSON DiTFastAttnConfig ({e}); write it with "
                         "DiTFastAttnConfig.save_pretrained") from None


def _is_local_like(text: str) -> bool:
    return text.startswith((".", "/", "~")) or text.count("/") != 1


def _artifact_search_config(artifact, where) -> dict:
    config = artifact.search_config
    if config is None:
        raise ValueError(f"{where}: the artifact's plan was made without a search, so it records no "
                         "DiTFastAttnConfig; pass a config file or directory instead")
    return config


def _hub_config(repo_id: str, revision: str | None) -> dict | None:
    """The repo's ``ditfa_search_config.json``, or None when it has none (then it may be an artifact)."""
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import EntryNotFoundError

    try:
        return _read_json(Path(hf_hub_download(repo_id, SEARCH_CONFIG_NAME, revision=revision)))
    except EntryNotFoundError:
        return None


def _positive_int(name: str, value) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ValueError(f"{name} must be a positive int, got {value!r}")
