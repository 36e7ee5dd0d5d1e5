"""`CompressionPlan`: for every attention module, denoising step and head, one attention method and its parameter.

A plan is plain data: per module an int16 tensor of method ids and a float64 tensor of method parameters, both
``[num_steps, num_heads]``, plus the structural description of the modules it was made for (`ModuleSpec`). It never
holds module references, so it can be searched, saved and compared on a machine without the model.

On disk (`save` / `load`): ``plan.json`` (format version, method vocabulary, module specs, metadata: names and numbers,
never tensor values) and ``plan.safetensors`` (keys ``"<module name>.method"`` and ``"<module name>.param"``).
"""

from __future__ import annotations

import itertools
import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Iterable, Iterator

import torch

from .masks import DEFAULT_BLOCK_SIZE, TokenLayout
from .methods import AttentionMethod, Full, dense_flops, make_method, method_class, method_names

PLAN_FORMAT_VERSION = 1
PLAN_JSON = "plan.json"
PLAN_TENSORS = "plan.safetensors"


@dataclass(frozen=True)
class ModuleSpec:
    """Structure of one attention module, as an adapter reports it.

    Args:
        name: the module's qualified name in the transformer (``transformer_blocks.3.attn``).
        num_heads: attention heads.
        head_dim: channels per head.
        image_first: token order of its joint sequence (SD3: True, FLUX: False).
        joint: False when the module attends over image tokens only (SD3.5's second attention): no text tokens.
    """

    name: str
    num_heads: int
    head_dim: int
    image_first: bool = True
    joint: bool = True

    def layout(self, image_tokens: int, text_tokens: int, block_size: int) -> TokenLayout:
        return TokenLayout(image_tokens, text_tokens if self.joint else 0, self.image_first, block_size)


@dataclass
class FlopReport:
    """Attention FLOPs of a plan vs dense attention, per module and step (one sample; CFG halves counted)."""

    module_names: list[str]
    dense: torch.Tensor  # [M, T] float64
    planned: torch.Tensor  # [M, T] float64

    @property
    def dense_total(self) -> float:
        return float(self.dense.sum())

    @property
    def planned_total(self) -> float:
        return float(self.planned.sum())

    @property
    def cut(self) -> float:
        """Fraction of dense attention FLOPs the plan saves (0 = none, 1 = all)."""
        return 1.0 - self.planned_total / self.dense_total

    def cut_per_module(self) -> dict[str, float]:
        return {n: 1.0 - float(p.sum() / d.sum()) for n, d, p in zip(self.module_names, self.dense, self.planned)}

    def cut_per_step(self) -> torch.Tensor:
        return 1.0 - self.planned.sum(0) / self.dense.sum(0)


@dataclass
class CompressionPlan:
    """Per attention module, step and head: which method runs.

    Args:
        modules: the attention modules the plan covers, in execution order.
        methods: per module name, ``[num_steps, num_heads]`` integer method ids.
        params: per module name, ``[num_steps, num_heads]`` float64 method parameters (arrow window fraction, else 0).
        block_size: the arrow mask's block size in tokens (part of the mask definition, see `ditfa_optimum.masks`).
        model_class: the transformer class the plan was made for (checked by `validate`).
        metadata: free-form JSON-able facts (search config, provenance); never needed to run the plan.

    Example:
        >>> from ditfa_optimum.plan import CompressionPlan, ModuleSpec
        >>> specs = [ModuleSpec("transformer_blocks.0.attn", num_heads=4, head_dim=8)]
        >>> plan = CompressionPlan.uniform(specs, num_steps=4, method="arrow:1/8")
        >>> str(plan.method("transformer_blocks.0.attn", step=1, head=2))
        'arrow:0.125'
    """

    modules: list[ModuleSpec]
    methods: dict[str, torch.Tensor]
    params: dict[str, torch.Tensor]
    block_size: int = DEFAULT_BLOCK_SIZE
    model_class: str | None = None
    metadata: dict = field(default_factory=dict)

    def __post_init__(self):
        self.methods = {k: torch.as_tensor(v, dtype=torch.int16).cpu() for k, v in self.methods.items()}
        self.params = {k: torch.as_tensor(v, dtype=torch.float64).cpu() for k, v in self.params.items()}
        self._check_structure()
        self._check_schedule()

    # ---------------------------------------------------------------- construction
    @classmethod
    def from_methods(cls, modules: Iterable[ModuleSpec], table: dict[str, list[list[AttentionMethod | str]]],
                     **kwargs) -> "CompressionPlan":
        """Build from ``table[module][step][head]`` = a method object or a string like ``"arrow:1/8"``."""
        modules = list(modules)
        methods, params = {}, {}
        for spec in modules:
            if spec.name not in table:
                raise ValueError(f"no methods given for attention module {spec.name!r}")
            rows = [[m if isinstance(m, AttentionMethod) else make_method(m) for m in row] for row in table[spec.name]]
            methods[spec.name] = torch.tensor([[m.method_id for m in row] for row in rows], dtype=torch.int16)
            params[spec.name] = torch.tensor([[m.param for m in row] for row in rows], dtype=torch.float64)
        return cls(modules, methods, params, **kwargs)

    @classmethod
    def uniform(cls, modules: Iterable[ModuleSpec], num_steps: int, method: AttentionMethod | str = "full",
                full_steps: int = 1, **kwargs) -> "CompressionPlan":
        """Every head of every module runs ``method``, except the first ``full_steps`` steps, which run `full`."""
        if num_steps < 1:
            raise ValueError(f"num_steps must be >= 1, got {num_steps}")
        if not 0 <= full_steps <= num_steps:
            raise ValueError(f"full_steps must be in [0, num_steps={num_steps}], got {full_steps}")
        method = method if isinstance(method, AttentionMethod) else make_method(method)
        table = {s.name: [[Full() if t < full_steps else method] * s.num_heads for t in range(num_steps)]
                 for s in modules}
        return cls.from_methods(modules, table, **kwargs)

    # ---------------------------------------------------------------- access
    @property
    def num_steps(self) -> int:
        return next(iter(self.methods.values())).shape[0]

    @property
    def module_names(self) -> list[str]:
        return [s.name for s in self.modules]

    def spec(self, module: str) -> ModuleSpec:
        for s in self.modules:
            if s.name == module:
                return s
        raise KeyError(f"the plan has no attention module {module!r}; it covers {self.module_names}")

    def method(self, module: str, step: int, head: int) -> AttentionMethod:
        mid = int(self.methods[module][step, head])
        return method_class(mid).from_param(float(self.params[module][step, head]) or None)

    def step_methods(self, module: str, step: int) -> list[AttentionMethod]:
        """The methods of every head of ``module`` at ``step``."""
        return [self.method(module, step, h) for h in range(self.spec(module).num_heads)]

    def set(self, module: str, step: int, head: int, method: AttentionMethod | str) -> None:
        """Change one entry (re-validates the schedule)."""
        method = method if isinstance(method, AttentionMethod) else make_method(method)
        old = (self.methods[module][step, head].clone(), self.params[module][step, head].clone())
        self.methods[module][step, head] = method.method_id
        self.params[module][step, head] = method.param
        try:
            self._check_schedule()
        except ValueError:
            self.methods[module][step, head], self.params[module][step, head] = old
            raise

    def method_counts(self) -> dict[str, int]:
        """How many (module, step, head) entries use each method name."""
        ids = torch.cat([m.flatten() for m in self.methods.values()])
        return {method_class(int(i)).name: int(c) for i, c in zip(*ids.unique(return_counts=True))}

    def __eq__(self, other) -> bool:
        if not isinstance(other, CompressionPlan):
            return NotImplemented
        return (self.modules == other.modules and self.block_size == other.block_size
                and self.model_class == other.model_class
                and all(torch.equal(self.methods[n], other.methods[n]) and torch.equal(self.params[n], other.params[n])
                        for n in self.module_names))

    # ---------------------------------------------------------------- validation
    def _check_structure(self) -> None:
        names = self.module_names
        if not names:
            raise ValueError("a plan needs at least one attention module")
        if len(set(names)) != len(names):
            raise ValueError(f"attention module names repeat in the plan: {names}")
        if set(self.methods) != set(names) or set(self.params) != set(names):
            raise ValueError(f"plan tensors cover modules {sorted(self.methods)} / {sorted(self.params)}, "
                             f"but the plan lists {names}")
        if self.block_size < 1:
            raise ValueError(f"block_size must be >= 1, got {self.block_size}")
        steps = None
        for spec in self.modules:
            m, p = self.methods[spec.name], self.params[spec.name]
            if m.dim() != 2 or m.shape[1] != spec.num_heads or p.shape != m.shape:
                raise ValueError(f"module {spec.name!r}: method/param tensors must be [num_steps, {spec.num_heads}] "
                                 f"(one entry per head), got {tuple(m.shape)} and {tuple(p.shape)}")
            steps = m.shape[0] if steps is None else steps
            if m.shape[0] != steps or steps < 1:
                raise ValueError(f"module {spec.name!r} has {m.shape[0]} steps, other modules have {steps}")
            for (step, head), mid, par in zip(itertools.product(range(steps), range(spec.num_heads)),
                                              m.flatten().tolist(), p.flatten().tolist()):
                where = f"module {spec.name!r} step {step} head {head}"
                try:
                    method_class(mid).from_param(par or None)
                except ValueError as e:
                    raise ValueError(f"{where}: {e}") from None

    def _check_schedule(self) -> None:
        for spec in self.modules:
            for head in range(spec.num_heads):
                last_full, residual_fraction = None, None
                for step in range(self.num_steps):
                    m = self.method(spec.name, step, head)
                    where = f"module {spec.name!r} step {step} head {head}"
                    if m.needs_previous_output and step == 0:
                        raise ValueError(f"{where}: `{m.name}` reuses the previous step's output, but step 0 has none; "
                                         "use `full` (or any computed method) at step 0")
                    if isinstance(m, Full):
                        last_full, residual_fraction = step, None
                    if m.needs_residual:
                        if last_full is None:
                            raise ValueError(f"{where}: `{m.name}` needs a `full` step of this head before it to "
                                             "record the residual; none precedes it")
                        if residual_fraction not in (None, m.param):
                            raise ValueError(f"{where}: `{m}` follows the full step {last_full} like an earlier "
                                             f"arrow_residual with fraction {residual_fraction:g}; one full step "
                                             "records one residual, so use one fraction until the next full step")
                        residual_fraction = m.param

    def validate(self, modules: Iterable[ModuleSpec], num_steps: int | None = None,
                 model_class: str | None = None) -> None:
        """Check that the plan fits a model (its attention modules) and a step count; raise one clear ValueError.

        Args:
            modules: the model's attention modules, as its adapter reports them.
            num_steps: the denoising steps the pipeline will run; the plan must cover at least that many.
            model_class: the transformer's class name.
        """
        modules = list(modules)
        if model_class and self.model_class and model_class != self.model_class:
            raise ValueError(f"the plan was made for a {self.model_class}, but the transformer is a {model_class}")
        theirs = {s.name: s for s in modules}
        missing = [n for n in self.module_names if n not in theirs]
        extra = [n for n in theirs if n not in set(self.module_names)]
        if missing or extra:
            raise ValueError(f"the plan does not match the model's attention modules: the model lacks {missing[:5]}"
                             f"{' ...' if len(missing) > 5 else ''} and the plan lacks {extra[:5]}"
                             f"{' ...' if len(extra) > 5 else ''} ({len(self.modules)} planned, {len(theirs)} in "
                             "the model); was the plan made for another model?")
        for mine in self.modules:
            other = theirs[mine.name]
            if (mine.num_heads, mine.head_dim) != (other.num_heads, other.head_dim):
                raise ValueError(f"module {mine.name!r}: the plan has {mine.num_heads} heads of dim {mine.head_dim}, "
                                 f"the model {other.num_heads} heads of dim {other.head_dim}; was the plan made for "
                                 "another model?")
            if (mine.image_first, mine.joint) != (other.image_first, other.joint):
                raise ValueError(f"module {mine.name!r}: token order/joint mismatch (plan {mine}, model {other})")
        if num_steps is not None and num_steps > self.num_steps:
            raise ValueError(f"the plan covers {self.num_steps} denoising steps but the pipeline runs {num_steps}; "
                             f"search a plan for {num_steps} steps or call the pipeline with "
                             f"num_inference_steps={self.num_steps}")

    # ---------------------------------------------------------------- cost
    def flops(self, image_tokens: int, text_tokens: int, cfg: bool = False) -> FlopReport:
        """Attention FLOPs of this plan and of dense attention at a resolution (per sample).

        Args:
            image_tokens: image tokens per sample (e.g. 4096 for SD3 at 1024x1024).
            text_tokens: text tokens per sample (e.g. 333 for SD3, 512 for FLUX.1-dev).
            cfg: whether CFG is batched, which makes `cfg_share` half price.
        """
        dense = torch.zeros(len(self.modules), self.num_steps, dtype=torch.float64)
        planned = torch.zeros_like(dense)
        for i, spec in enumerate(self.modules):
            layout = spec.layout(image_tokens, text_tokens, self.block_size)
            dense[i] = spec.num_heads * dense_flops(layout, spec.head_dim)
            for step in range(self.num_steps):
                planned[i, step] = sum(m.flops(layout, spec.head_dim, cfg) for m in self.step_methods(spec.name, step))
            for step, head, fraction in self.residual_records(spec.name):
                planned[i, step] += make_method("arrow", fraction).flops(layout, spec.head_dim, cfg)
        return FlopReport(self.module_names, dense, planned)

    # ---------------------------------------------------------------- what the runtime must keep
    def residual_records(self, module: str) -> Iterator[tuple[int, int, float]]:
        """``(step, head, fraction)``: at this full step also compute arrow(fraction) and store full - arrow."""
        spec = self.spec(module)
        for head in range(spec.num_heads):
            last_full = None
            recorded = set()
            for step in range(self.num_steps):
                m = self.method(module, step, head)
                if isinstance(m, Full):
                    last_full = step
                elif m.needs_residual and last_full not in recorded:
                    recorded.add(last_full)
                    yield last_full, head, m.param

    def output_keeps(self, module: str) -> torch.Tensor:
        """``[num_steps, num_heads]`` bool: this head's output at this step is read by the next step."""
        ids = self.methods[module]
        reads_prev = torch.zeros_like(ids, dtype=torch.bool)
        for mid in ids.unique().tolist():
            if method_class(mid).needs_previous_output:
                reads_prev |= ids == mid
        keeps = torch.zeros_like(reads_prev)
        keeps[:-1] = reads_prev[1:]
        return keeps

    # ---------------------------------------------------------------- serialization
    def to_json_dict(self) -> dict:
        return {
            "format_version": PLAN_FORMAT_VERSION,
            "model_class": self.model_class,
            "block_size": self.block_size,
            "num_steps": self.num_steps,
            "method_vocabulary": {name: method_class(name).method_id for name in method_names()},
            "modules": [asdict(s) for s in self.modules],
            "metadata": self.metadata,
        }

    def state_dict(self) -> dict[str, torch.Tensor]:
        out = {}
        for n in self.module_names:
            out[f"{n}.method"] = self.methods[n].contiguous()
            out[f"{n}.param"] = self.params[n].contiguous()
        return out

    def save(self, directory: str | os.PathLike) -> Path:
        """Write ``plan.json`` and ``plan.safetensors`` into ``directory`` (created if needed)."""
        from safetensors.torch import save_file

        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        save_file(self.state_dict(), directory / PLAN_TENSORS, metadata={"format": "pt"})
        (directory / PLAN_JSON).write_text(json.dumps(self.to_json_dict(), indent=2) + "\n")
        return directory

    @classmethod
    def from_json_and_tensors(cls, info: dict, tensors: dict[str, torch.Tensor]) -> "CompressionPlan":
        version = info.get("format_version")
        if not isinstance(version, int) or version > PLAN_FORMAT_VERSION or version < 1:
            raise ValueError(f"plan format version {version!r} is not supported by this ditfa_optimum (reads 1.."
                             f"{PLAN_FORMAT_VERSION}); upgrade ditfa_optimum")
        modules = [ModuleSpec(**m) for m in info["modules"]]
        # map the file's vocabulary onto this package's ids, so ids may be renumbered between versions
        vocab = info["method_vocabulary"]
        remap = {int(file_id): method_class(name).method_id for name, file_id in vocab.items()}
        methods, params = {}, {}
        for spec in modules:
            for key in (f"{spec.name}.method", f"{spec.name}.param"):
                if key not in tensors:
                    raise ValueError(f"plan tensors lack {key!r}; the plan file is incomplete or from another plan")
            ids = tensors[f"{spec.name}.method"]
            unknown = sorted(set(ids.unique().tolist()) - set(remap))
            if unknown:
                raise ValueError(f"module {spec.name!r}: method ids {unknown} are not in the plan's vocabulary {vocab}")
            methods[spec.name] = ids.clone().apply_(remap.__getitem__)
            params[spec.name] = tensors[f"{spec.name}.param"]
        extra = set(tensors) - {k for s in modules for k in (f"{s.name}.method", f"{s.name}.param")}
        if extra:
            raise ValueError(f"plan tensors hold keys no module of the plan names: {sorted(extra)[:5]}")
        plan = cls(modules, methods, params, block_size=int(info["block_size"]), model_class=info.get("model_class"),
                   metadata=info.get("metadata") or {})
        if plan.num_steps != info.get("num_steps", plan.num_steps):
            raise ValueError(f"plan.json says {info['num_steps']} steps, the tensors hold {plan.num_steps}")
        return plan

    @classmethod
    def load(cls, directory: str | os.PathLike) -> "CompressionPlan":
        """Read a plan written by `save`. Loading executes nothing from the files."""
        from safetensors.torch import load_file

        directory = Path(directory)
        for name in (PLAN_JSON, PLAN_TENSORS):
            if not (directory / name).is_file():
                raise FileNotFoundError(f"{directory / name} does not exist; a plan directory holds {PLAN_JSON} and "
                                        f"{PLAN_TENSORS} (written by CompressionPlan.save)")
        try:
            info = json.loads((directory / PLAN_JSON).read_text())
        except json.JSONDecodeError as e:
            raise ValueError(f"{directory / PLAN_JSON} is not valid JSON ({e})") from None
        return cls.from_json_and_tensors(info, load_file(directory / PLAN_TENSORS))

    def summary(self) -> str:
        counts = self.method_counts()
        total = sum(counts.values())
        shares = ", ".join(f"{k} {v / total:.0%}" for k, v in sorted(counts.items(), key=lambda kv: -kv[1]))
        return (f"CompressionPlan({len(self.modules)} attention modules x {self.num_steps} steps, "
                f"block {self.block_size}; {shares})")

    def __repr__(self) -> str:
        return self.summary()

    # ---------------------------------------------------------------- report
    def report(self, image_tokens: int | None = None, text_tokens: int | None = None,
               cfg: bool | None = None) -> "PlanReport":
        """Per module x step: the share of heads per method, the attention-FLOP cut, and (for searched plans) the
        predicted mean RSE. Token counts and CFG default to the search's (``metadata["search"]``)."""
        info = self.metadata.get("search", {})
        image_tokens = info.get("image_tokens") if image_tokens is None else image_tokens
        text_tokens = info.get("text_tokens") if text_tokens is None else text_tokens
        cfg = bool(info.get("cfg", False)) if cfg is None else cfg
        if image_tokens is None or text_tokens is None:
            raise ValueError("this plan does not record the token counts it was searched at; pass image_tokens= and "
                             "text_tokens=")
        pairs = sorted({(int(i), float(p)) for n in self.module_names
                        for i, p in zip(self.methods[n].flatten().tolist(), self.params[n].flatten().tolist())})
        names = [str(method_class(i).from_param(p or None)) for i, p in pairs]
        share = torch.zeros(len(self.modules), self.num_steps, len(names), dtype=torch.float64)
        for i, spec in enumerate(self.modules):
            ids, params = self.methods[spec.name].long(), self.params[spec.name]
            for k, (mid, param) in enumerate(pairs):
                share[i, :, k] = ((ids == mid) & (params == param)).double().mean(1)
        flops = self.flops(image_tokens, text_tokens, cfg)
        predicted = info.get("predicted_rse")
        predicted = None if predicted is None else torch.tensor([predicted[n] for n in self.module_names],
                                                                dtype=torch.float64)
        return PlanReport(self.module_names, names, share, 1.0 - flops.planned / flops.dense, predicted, flops.cut)


@dataclass
class PlanReport:
    """What a plan does where, as data (the CLI draws it).

    Attributes:
        module_names: rows.
        method_names: the methods the plan uses, with their parameters (``"arrow:0.125"``), by method id.
        share: ``[M, T, K]`` fraction of the module's heads running method ``k`` at step ``t``.
        flop_cut: ``[M, T]`` attention-FLOP cut of the module at the step (0 = dense).
        predicted_rse: ``[M, T]`` the search's predicted mean RSE over heads, or None for hand-made plans.
        total_cut: the whole plan's attention-FLOP cut.
    """

    module_names: list[str]
    method_names: list[str]
    share: torch.Tensor
    flop_cut: torch.Tensor
    predicted_rse: torch.Tensor | None
    total_cut: float

    def table(self) -> str:
        """A text table: per module, its FLOP cut and the share of each method over all steps."""
        width = max(len(n) for n in self.module_names)
        cols = [max(10, len(n)) for n in self.method_names]
        head = f"{'module':<{width}}  {'cut':>6}  " + "  ".join(f"{n:>{c}}" for n, c in zip(self.method_names, cols))
        if self.predicted_rse is not None:
            head += f"  {'pred. RSE':>9}"
        lines = [head, "-" * len(head)]
        for i, name in enumerate(self.module_names):
            row = f"{name:<{width}}  {float(self.flop_cut[i].mean()):>6.1%}  "
            row += "  ".join(f"{float(self.share[i, :, k].mean()):>{c}.1%}" for k, c in enumerate(cols))
            if self.predicted_rse is not None:
                row += f"  {float(self.predicted_rse[i].mean()):>9.4f}"
            lines.append(row)
        lines.append(f"{'total':<{width}}  {self.total_cut:>6.1%}")
        return "\n".join(lines)

