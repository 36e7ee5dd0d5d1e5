"""Regression checks for users' CI: a reproducibility record saved in the artifact, and `verify_artifact`.

At save time a few prompts are generated with the plan (fixed seeds, the search's steps and resolution) and their final
latents, downsampled to at most 64 x 64, are stored in ``reproducibility.safetensors`` with summary statistics and the
device, backend, dtype, torch version and thread count that made them. `verify_artifact` regenerates them from the
artifact and compares:

* exactly (``torch.equal``) when device type, backend, dtype, torch version and CPU thread count all match;
* otherwise by PSNR against the reference (peak = the reference's value range), at least ``psnr_floor`` dB
  (default 30 dB: kernels and precisions differ in rounding, a changed plan or weight moves far more).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from .calibrate import progress_bars, run_pipeline
from .config import DiTFastAttnConfig

DEFAULT_PSNR_FLOOR = 30.0
MAX_SIDE = 64


def downsample(latents: torch.Tensor, pipeline, height: int, width: int) -> torch.Tensor:
    """Final latents as ``[B, C, h, w]`` float32, average-pooled to at most 64 x 64."""
    from .adapters import get_adapter

    latents = get_adapter(pipeline.transformer).spatial_latents(latents, height, width,
                                                                getattr(pipeline, "vae_scale_factor", 8))
    latents = latents.float()
    h, w = latents.shape[-2:]
    return F.adaptive_avg_pool2d(latents, (min(MAX_SIDE, h), min(MAX_SIDE, w))).cpu()


def environment(pipeline, backend: str) -> dict:
    param = next(pipeline.transformer.parameters())
    return {"device": param.device.type, "backend": backend, "dtype": str(param.dtype).replace("torch.", ""),
            "torch_version": torch.__version__, "num_threads": torch.get_num_threads()}


def _generate(pipeline, prompts: list[str], seeds: list[int], steps: int, height: int, width: int,
              guidance_scale, prompt_encoder, desc: str = "ditfa reference images") -> list[torch.Tensor]:
    from tqdm.auto import tqdm

    images = []
    for prompt, seed in tqdm(list(zip(prompts, seeds)), desc=desc, unit="image", leave=False):
        config = DiTFastAttnConfig(num_inference_steps=steps, height=height, width=width, seed=seed,
                                   guidance_scale=guidance_scale)
        with torch.inference_mode(), progress_bars(pipeline, False):
            latents = run_pipeline(pipeline, [prompt], config, prompt_encoder=prompt_encoder)
        images.append(downsample(latents, pipeline, height, width)[0])
    return images


def make_record(pipeline, prompts: list[str], seeds: list[int], steps: int, height: int, width: int,
                guidance_scale, prompt_encoder, backend: str) -> tuple[dict, dict[str, torch.Tensor]]:
    """Generate the reference images with the plan applied to ``pipeline``; returns (JSON record, tensors)."""
    images = _generate(pipeline, prompts, seeds, steps, height, width, guidance_scale, prompt_encoder)
    info = {"prompts": list(prompts), "seeds": list(seeds), "num_inference_steps": steps, "height": height,
            "width": width, "guidance_scale": guidance_scale, **environment(pipeline, backend), "images": []}
    tensors = {}
    for i, image in enumerate(images):
        key = f"image_{i}"
        tensors[key] = image
        info["images"].append({"key": key, "prompt": prompts[i], "seed": seeds[i], "shape": list(image.shape),
                               "mean": float(image.mean()), "std": float(image.std()), "min": float(image.min()),
                               "max": float(image.max())})
    return info, tensors


#: dtypes a reproducibility record may name (what `environment` writes for the pipelines ditfa runs)
RECORD_DTYPES = ("float32", "float16", "bfloat16")


def check_record(record: dict, where) -> None:
    """Refuse a reproducibility record whose fields `verify_artifact` would otherwise trust: a dtype that is not a
    dtype (``getattr(torch, "load")``), sizes or step counts that would allocate without bound, entries of the wrong
    type. Raises `ArtifactError` naming the field."""
    from .serialization import ArtifactError

    def refuse(key, value, expected):
        text = repr(value)
        text = text if len(text) <= 60 else text[:60] + "..."
        raise ArtifactError(f"{where}: reproducibility.{key} must be {expected}, got {text}; the record is damaged "
                            "or edited: save the artifact again (save_pretrained writes a new record)")

    def integer(key, low, high):
        value = record.get(key)
        if not isinstance(value, int) or isinstance(value, bool) or not low <= value <= high:
            refuse(key, value, f"an integer in [{low}, {high}]")

    if record.get("dtype") not in RECORD_DTYPES:
        refuse("dtype", record.get("dtype"), f"one of {list(RECORD_DTYPES)}")
    if record.get("device") not in ("cpu", "cuda"):
        refuse("device", record.get("device"), "'cpu' or 'cuda'")
    for key in ("backend", "torch_version"):  # compared with this machine's to choose exact or tolerance mode
        if not isinstance(record.get(key), str):
            refuse(key, record.get(key), "a string")
    integer("num_threads", 1, 1 << 16)
    integer("num_inference_steps", 1, 1000)
    integer("height", 8, 8192)
    integer("width", 8, 8192)
    guidance = record.get("guidance_scale")
    if guidance is not None and (not isinstance(guidance, (int, float)) or isinstance(guidance, bool)
                                 or not math.isfinite(guidance)):
        refuse("guidance_scale", guidance, "a finite number or null")
    prompts, seeds, images = record.get("prompts"), record.get("seeds"), record.get("images")
    if not isinstance(prompts, list) or not 0 < len(prompts) <= 64 or not all(isinstance(p, str) for p in prompts):
        refuse("prompts", prompts, "a list of 1 to 64 strings")
    if not isinstance(seeds, list) or len(seeds) != len(prompts) or not all(
            isinstance(x, int) and not isinstance(x, bool) and 0 <= x < 2 ** 63 for x in seeds):
        refuse("seeds", seeds, "one non-negative integer per prompt")
    if not isinstance(images, list) or len(images) != len(prompts) or not all(
            isinstance(e, dict) and isinstance(e.get("key"), str) for e in images):
        refuse("images", images, "one object with a 'key' per prompt")


def psnr(reference: torch.Tensor, other: torch.Tensor) -> float:
    mse = float(((reference.double() - other.double()) ** 2).mean())
    peak = float(reference.max() - reference.min()) or 1.0
    return math.inf if mse == 0 else 10.0 * math.log10(peak * peak / mse)


@dataclass
class VerifyRow:
    image: str
    metric: str  # "exact" or "psnr"
    value: float
    threshold: float
    ok: bool
    detail: str = ""


@dataclass
class VerifyReport:
    artifact: str
    mode: str
    rows: list[VerifyRow] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems and bool(self.rows) and all(r.ok for r in self.rows)

    def text(self) -> str:
        lines = [f"verify {self.artifact}: {'PASS' if self.ok else 'FAIL'} ({self.mode})"]
        for p in self.problems:
            lines.append(f"  problem: {p}")
        for r in self.rows:
            value = "identical" if r.metric == "exact" and r.ok else (
                f"max |diff| {r.value:.3g}" if r.metric == "exact" else f"{r.value:.2f} dB")
            need = "identical" if r.metric == "exact" else f">= {r.threshold:.1f} dB"
            lines.append(f"  {'ok  ' if r.ok else 'FAIL'} {r.image:<9} {r.metric:<5} {value:<18} (needs {need})"
                         f"{'  ' + r.detail if r.detail else ''}")
        return "\n".join(lines)


def verify_artifact(artifact, *, device: str | None = None, backend: str | None = None,
                    psnr_floor: float = DEFAULT_PSNR_FLOOR, base_model=None) -> VerifyReport:
    """Regenerate the artifact's reproducibility record and compare (see module docstring).

    Checksum mismatches do not stop the check: they are listed as problems (the report fails) and the images show
    what the change does.

    Example (in a user's pytest suite):
        >>> assert verify_artifact("my-sd3-artifact", device="cuda").ok      # doctest: +SKIP
    """
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    from .loading import load_pipeline
    from .runtime import get_backend
    from .serialization import CONFIG_NAME, REPRO_FILE, ArtifactError, read_artifact

    if not isinstance(psnr_floor, (int, float)) or isinstance(psnr_floor, bool) or not psnr_floor >= 0:
        raise ValueError(f"psnr_floor must be a number of dB >= 0 (default {DEFAULT_PSNR_FLOOR}; inf demands identical "
                         f"latents in tolerance mode too), got {psnr_floor!r}")
    art = read_artifact(artifact, strict=False)
    record = art.config.get("reproducibility")
    if not record or not (art.path / REPRO_FILE).is_file():
        report = VerifyReport(str(art.path), "no record")
        report.problems.append("the artifact holds no reproducibility record; save it again with "
                               "save_pretrained(..., reproducibility_prompts=2) (the default)")
        return report
    check_record(record, art.path)
    try:
        references = load_file(art.path / REPRO_FILE)
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:  # damaged, and its checksum recorded again
        raise ArtifactError(f"{art.path / REPRO_FILE} is not a readable safetensors file ({str(e)[:200]}); save the "
                            "artifact again") from None
    device = device or ("cuda" if record["device"] == "cuda" and torch.cuda.is_available() else "cpu")
    dtype = getattr(torch, record["dtype"])
    pipeline = load_pipeline(art, base_model, torch_dtype=dtype, device=device, backend=backend or "auto")
    backend_name = get_backend(backend, torch.device(device)).name
    here = environment(pipeline, backend_name)
    changed = [k for k in here if here[k] != record[k]]
    same = not changed
    mode = ("exact: same device, backend, dtype, torch and threads" if same else
            "tolerance: " + ", ".join(f"{k} {record[k]} -> {here[k]}" for k in changed))
    report = VerifyReport(str(art.path), mode, problems=list(art.problems))
    try:
        images = _generate(pipeline, record["prompts"], record["seeds"], record["num_inference_steps"],
                           record["height"], record["width"], record.get("guidance_scale"),
                           art.prompt_encoder(pipeline))
    except ValueError as e:  # the pipeline refuses the recorded settings (a size it cannot take, ...)
        raise ArtifactError(f"{art.path / CONFIG_NAME}: the reproducibility record's settings (steps "
                            f"{record['num_inference_steps']}, {record['height']}x{record['width']}, guidance "
                            f"{record.get('guidance_scale')}) do not run on this model: {str(e)[:300]}; the record is "
                            "damaged or edited: save the artifact again") from None
    for entry, image, prompt, seed in zip(record["images"], images, record["prompts"], record["seeds"]):
        ref = references.get(entry["key"])
        if ref is None or ref.shape != image.shape or ref.dtype != image.dtype:
            report.rows.append(VerifyRow(entry["key"], "shape", 0.0, 0.0, False,
                                         f"reference {None if ref is None else (tuple(ref.shape), ref.dtype)} vs "
                                         f"{(tuple(image.shape), image.dtype)}"))
            continue
        detail = f"prompt {prompt[:40]!r}, seed {seed}"  # the checked lists, not the entry's own copies
        if same:
            equal = torch.equal(ref, image)
            report.rows.append(VerifyRow(entry["key"], "exact", float((ref - image).abs().max()), 0.0, equal, detail))
        else:
            value = psnr(ref, image)
            report.rows.append(VerifyRow(entry["key"], "psnr", value, psnr_floor, value >= psnr_floor, detail))
    return report
