"""The ditfa artifact: a directory (or Hub repo) holding a compressed transformer, its plan and how it was made.

    ditfa_config.json          format version, package version, base model, transformer class + fingerprint, plan
                               structure, search config, calibration summary, FLOP cut, reproducibility record,
                               sha256 of every other file
    plan.safetensors           "<module>.method" (int16) / "<module>.param" (float64), [steps, heads]
    scales.safetensors         quantization scales (reserved: empty until quantized methods exist)
    reproducibility.safetensors  downsampled reference latents of a few generations ("image_<i>")
    transformer/               diffusers save_pretrained (config.json + safetensors)
    README.md                  generated model card

Nothing is pickled and loading executes nothing from the artifact: JSON is parsed, tensors come from safetensors, the
transformer class is looked up in an allowlist (the classes an adapter supports) and loaded with
``use_safetensors=True``. See docs/artifact-format.md.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import torch

from . import __version__
from .adapters import adapter_names, get_adapter
from .embedded import EMBEDDED_MODELS  # artifacts record these names as base models: no download
from .plan import CompressionPlan

logger = logging.getLogger(__name__)

ARTIFACT_FORMAT_VERSION = 1
CONFIG_NAME = "ditfa_config.json"
PLAN_FILE = "plan.safetensors"
SCALES_FILE = "scales.safetensors"
REPRO_FILE = "reproducibility.safetensors"
TRANSFORMER_DIR = "transformer"
CARD_FILE = "README.md"
REQUIRED_KEYS = ("format_version", "package_version", "base_model", "transformer", "plan", "files")
#: files whose checksum mismatch only warns: the model card is documentation, and Hub users edit it
SOFT_CHECKSUM_FILES = (CARD_FILE,)


class ArtifactError(ValueError):
    """The artifact cannot be used as it is; the message names the file, the problem and the fix."""


# ==================================================================================================== fingerprints
def fingerprint(transformer: torch.nn.Module) -> dict:
    """The transformer's structure as the plan depends on it: class, attention modules per block list, heads, head
    dim, token order, and the structural config values."""
    adapter = get_adapter(transformer)
    specs = adapter.module_specs(transformer)
    groups: dict[str, int] = {}
    for spec in specs:
        prefix = spec.name.split(".")[0]
        groups[prefix] = groups.get(prefix, 0) + 1
    return {
        "class_name": adapter.model_class,
        "attention_modules": len(specs),
        "modules_per_block_list": groups,
        "num_heads": sorted({s.num_heads for s in specs}),
        "head_dim": sorted({s.head_dim for s in specs}),
        "image_first": specs[0].image_first,
        "config": structural_config(dict(transformer.config)),
    }


def structural_config(config: dict) -> dict:
    """A transformer config without private or path-like entries, JSON-normalised (tuples become lists)."""
    return json.loads(json.dumps({k: v for k, v in config.items() if not k.startswith("_")}, default=list))


def offline_hint() -> str:
    """A note for load errors when ``HF_HUB_OFFLINE`` restricts loading to the local cache (else empty)."""
    if os.environ.get("HF_HUB_OFFLINE") in (None, "", "0"):
        return ""
    return " (HF_HUB_OFFLINE is set: only cached models load)"


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


# ==================================================================================================== writing
def write_artifact(directory: str | os.PathLike, *, transformer: torch.nn.Module, plan: CompressionPlan,
                   base_model: dict, search_config: dict | None = None, calibration: dict | None = None,
                   prompt_encoder: dict | None = None, reproducibility: tuple[dict, dict] | None = None,
                   overwrite: bool = False) -> Path:
    """Write an artifact directory atomically (a temporary sibling, renamed into place when complete).

    An existing non-empty ``directory`` is only replaced with ``overwrite=True``, and then only after the new artifact
    is complete, so a failure never leaves a half-written artifact or loses the old one.
    """
    from safetensors.torch import save_file

    directory = check_target(directory, overwrite)
    adapter = get_adapter(transformer)
    plan.validate(adapter.module_specs(transformer), model_class=adapter.model_class)
    directory.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{directory.name}.", dir=directory.parent))
    try:
        save_file(plan.state_dict(), tmp / PLAN_FILE, metadata={"format": "pt"})
        save_file({}, tmp / SCALES_FILE, metadata={"format": "pt", "contents": "reserved for quantization scales"})
        transformer.save_pretrained(tmp / TRANSFORMER_DIR, safe_serialization=True)
        repro_info = None
        if reproducibility is not None:
            repro_info, repro_tensors = reproducibility
            save_file({k: v.contiguous().cpu() for k, v in repro_tensors.items()}, tmp / REPRO_FILE,
                      metadata={"format": "pt"})
        flops = plan.flops(plan.metadata.get("search", {}).get("image_tokens", 4096),
                           plan.metadata.get("search", {}).get("text_tokens", 333),
                           plan.metadata.get("search", {}).get("cfg", False))
        config = {
            "format_version": ARTIFACT_FORMAT_VERSION,
            "package_version": __version__,
            "base_model": base_model,
            "transformer": {"class_name": type(transformer).__name__, "fingerprint": fingerprint(transformer)},
            "plan": plan.to_json_dict(),
            "search_config": search_config,
            "calibration": calibration,
            "attention_flop_cut": flops.cut,
            "prompt_encoder": prompt_encoder,
            "reproducibility": repro_info,
        }
        (tmp / CARD_FILE).write_text(model_card(config, plan))
        config["files"] = {p.relative_to(tmp).as_posix(): sha256(p) for p in sorted(tmp.rglob("*")) if p.is_file()}
        (tmp / CONFIG_NAME).write_text(json.dumps(config, indent=2) + "\n")
        if directory.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{directory.name}.old.", dir=directory.parent))
            old.rmdir()
            directory.rename(old)
            tmp.rename(directory)
            shutil.rmtree(old, ignore_errors=True)
        else:
            tmp.rename(directory)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return directory


def check_target(directory: str | os.PathLike, overwrite: bool, hint: str = "pass overwrite=True") -> Path:
    """Refuse to write an artifact over an existing non-empty path unless ``overwrite`` (``hint`` says how)."""
    directory = Path(directory)
    if directory.exists() and (not directory.is_dir() or any(directory.iterdir())) and not overwrite:
        raise ArtifactError(f"{directory} already exists and is not empty; choose a new directory or {hint} (the old "
                            "contents are replaced only once the new artifact is complete)")
    return directory


def model_card(config: dict, plan: CompressionPlan) -> str:
    base = config["base_model"].get("id") or "an unnamed pipeline"
    search = config.get("search_config") or {}
    calibration = config.get("calibration") or {}
    counts = plan.method_counts()
    total = sum(counts.values())
    shares = ", ".join(f"`{k}` {v / total:.1%}" for k, v in sorted(counts.items(), key=lambda kv: -kv[1]))
    quality = ""
    if calibration.get("predicted_mean_rse") is not None:
        quality = (f"- Predicted mean local attention error (RSE against full attention, averaged over layers, steps "
                   f"and heads): {calibration['predicted_mean_rse']:.4f} (budget per layer and step: "
                   f"{search.get('threshold')}).\n")
    hub_base = config["base_model"].get("id") if not config["base_model"].get("embedded") else None
    base_line = f"base_model: {hub_base}\n" if hub_base and hub_base.count("/") == 1 and not Path(hub_base).exists() \
        else ""
    return f"""---
library_name: diffusers
tags:
- ditfa-optimum
- attention-compression
{base_line}---

# {base} with head-wise attention compression (ditfa-optimum)

This artifact holds the transformer of `{base}` ({config["transformer"]["class_name"]}) and a head-wise attention
plan found by ditfa-optimum {config["package_version"]} after DiTFastAttnV2 (arXiv 2503.22796):
for each of {len(plan.modules)} attention modules, {plan.num_steps} denoising steps and every head, one of full
attention, arrow attention (text dense, image x image in a diagonal band), reuse of the previous step's output, or
sharing across the CFG halves.

## What it saves

- Attention FLOPs cut: **{config["attention_flop_cut"]:.1%}** at {search.get("height")}x{search.get("width")},
  {plan.num_steps} steps.
- Heads per method over all (module, step, head) entries: {shares}.
{quality}- Calibration: {calibration.get("num_prompts", "?")} prompts, {calibration.get("seconds", 0):.1f} s;
  search {calibration.get("search_seconds", 0):.2f} s; threshold {search.get("threshold")}.

## How to use it

```python
from ditfa_optimum import load_pipeline

pipe = load_pipeline("<this repo or directory>")      # base components from {base}
image = pipe("a lighthouse at dusk", num_inference_steps={plan.num_steps}).images[0]
```

The plan covers exactly {plan.num_steps} denoising steps. Check it on your machine with
`ditfa-optimum verify <this repo or directory>`.

## Files

`ditfa_config.json` (format version {config["format_version"]}, checksums of every file), `plan.safetensors`,
`scales.safetensors`, `reproducibility.safetensors`, `transformer/`. No pickle; loading executes no code from here.
"""


# ==================================================================================================== reading
@dataclass
class Artifact:
    """A validated artifact on disk. ``transformer`` is loaded on demand (`load_transformer`)."""

    path: Path
    config: dict
    plan: CompressionPlan
    scales: dict[str, torch.Tensor] = field(default_factory=dict)
    problems: list[str] = field(default_factory=list)  # checksum mismatches when loaded with strict=False

    @property
    def transformer_class(self):
        name = self.config["transformer"]["class_name"]
        if name not in adapter_names():
            raise ArtifactError(f"{self.path / CONFIG_NAME}: transformer class {name!r} is not one ditfa_optimum "
                                f"supports ({adapter_names()}); the artifact is from a newer version or not ours")
        import diffusers

        cls = getattr(diffusers, name, None)
        if cls is None:
            raise ArtifactError(f"this diffusers ({diffusers.__version__}) has no {name}; upgrade diffusers")
        return cls

    def load_transformer(self, torch_dtype: torch.dtype | None = None) -> torch.nn.Module:
        kwargs = {} if torch_dtype is None else {"torch_dtype": torch_dtype}
        try:
            transformer = self.transformer_class.from_pretrained(self.path / TRANSFORMER_DIR, use_safetensors=True,
                                                                 low_cpu_mem_usage=False, **kwargs)
        except (OSError, ValueError, RuntimeError) as e:
            raise ArtifactError(f"{self.path / TRANSFORMER_DIR} does not load as a "
                                f"{self.config['transformer']['class_name']}: {e}") from None
        check_fingerprint(transformer, self.config["transformer"]["fingerprint"],
                          f"the transformer in {self.path / TRANSFORMER_DIR}")
        self.plan.validate(get_adapter(transformer).module_specs(transformer),
                           model_class=self.config["transformer"]["class_name"])
        return transformer.eval()

    def prompt_encoder(self, pipeline):
        """The stand-in prompt encoder recorded for pipelines without text encoders (None when not needed)."""
        record = self.config.get("prompt_encoder")
        if not record:
            return None
        if record.get("name") != "tiny":
            raise ArtifactError(f"{self.path / CONFIG_NAME}: unknown prompt encoder {record.get('name')!r}")
        from .tiny import TinyPromptEncoder

        return TinyPromptEncoder(pipeline.transformer, text_tokens=int(record["text_tokens"]),
                                 scale=float(record.get("scale", 1.0)))


def check_fingerprint(transformer: torch.nn.Module, recorded: dict, what: str) -> None:
    actual = fingerprint(transformer)
    if actual != recorded:
        diff = sorted(k for k in set(actual) | set(recorded) if actual.get(k) != recorded.get(k))
        detail = ", ".join(f"{k}: recorded {recorded.get(k)!r} vs {actual.get(k)!r}" for k in diff
                           if k != "config")
        if "config" in diff:
            a, r = actual.get("config", {}), recorded.get("config", {})
            keys = sorted(k for k in set(a) | set(r) if a.get(k) != r.get(k))
            detail = (detail + "; " if detail else "") + ", ".join(
                f"config.{k}: recorded {r.get(k)!r} vs {a.get(k)!r}" for k in keys[:5])
        raise ArtifactError(f"{what} does not match the artifact's recorded structure ({detail}); the artifact was "
                            "made for another model")


def resolve(path_or_repo: str | os.PathLike, revision: str | None = None, token=None) -> Path:
    """A local artifact directory, or a Hub repo id fetched with `snapshot_download` (HF cache; offline-safe)."""
    path = Path(path_or_repo)
    if path.is_dir():
        return path
    text = os.fspath(path_or_repo)
    if path.exists() or text.startswith((".", "/")) or text.count("/") != 1:
        raise ArtifactError(f"{text!r} is neither an artifact directory nor a Hub repo id (user/name)")
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError, RepositoryNotFoundError

    try:
        return Path(snapshot_download(text, revision=revision, token=token))
    except LocalEntryNotFoundError as e:
        raise ArtifactError(f"the Hub artifact {text!r} is not in the local Hugging Face cache and the Hub cannot be "
                            f"reached (HF_HUB_OFFLINE={os.environ.get('HF_HUB_OFFLINE', '')!r}): {e}") from None
    except (RepositoryNotFoundError, HfHubHTTPError) as e:
        raise ArtifactError(f"cannot fetch the Hub artifact {text!r}: {e}") from None


def read_artifact(path_or_repo: str | os.PathLike, *, strict: bool = True, revision: str | None = None,
                  token=None) -> Artifact:
    """Read and validate an artifact (without loading the transformer weights).

    Args:
        strict: raise on a checksum mismatch; with False, mismatches are listed in ``Artifact.problems`` (used by
            `verify_artifact`, which then shows what the change does to the images).
    """
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = resolve(path_or_repo, revision=revision, token=token)
    config_path = path / CONFIG_NAME
    if not config_path.is_file():
        raise ArtifactError(f"{path} has no {CONFIG_NAME}: not a ditfa artifact (made by "
                            "DiTFastAttnOptimizer.save_pretrained), or an incomplete copy")
    try:
        config = json.loads(config_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ArtifactError(f"{config_path} is not valid JSON ({e}); the file is damaged: download or save the "
                            "artifact again") from None
    if not isinstance(config, dict):
        raise ArtifactError(f"{config_path} must hold a JSON object, got {type(config).__name__}")
    config = upgrade(config, config_path)
    missing = [k for k in REQUIRED_KEYS if k not in config]
    if missing:
        raise ArtifactError(f"{config_path} lacks {missing}; the file is incomplete or edited by hand")

    transformer = config["transformer"]
    if not isinstance(transformer, dict) or transformer.get("class_name") not in adapter_names():
        name = transformer.get("class_name") if isinstance(transformer, dict) else transformer
        raise ArtifactError(f"{config_path}: transformer class {name!r} is not one ditfa_optimum supports "
                            f"({adapter_names()}); the artifact is from a newer version or not a ditfa artifact")

    problems = []
    files = config["files"]
    if not isinstance(files, dict):
        raise ArtifactError(f"{config_path}: 'files' must map file names to sha256 digests")
    for name in (PLAN_FILE, SCALES_FILE, f"{TRANSFORMER_DIR}/config.json"):
        if name not in files:
            raise ArtifactError(f"{config_path} does not list {name}; the artifact is incomplete")
    for name, digest in files.items():
        file = path / name
        if Path(name).is_absolute() or ".." in Path(name).parts:
            raise ArtifactError(f"{config_path} lists a file outside the artifact: {name!r}")
        if not file.is_file():
            raise ArtifactError(f"{file} is missing; the artifact is incomplete (re-download it, or save it again)")
        actual = sha256(file)
        if actual != digest:
            message = (f"{file} has sha256 {actual[:12]}…, but {CONFIG_NAME} records {str(digest)[:12]}…: the file "
                       "was truncated or edited after saving; re-download it, or save the artifact again")
            if name in SOFT_CHECKSUM_FILES:
                logger.warning("ditfa: %s (documentation only; loading goes on)", message)
            elif strict:
                raise ArtifactError(message)
            else:
                problems.append(message)

    try:
        tensors = load_file(path / PLAN_FILE)
        scales = load_file(path / SCALES_FILE)
    except (SafetensorError, OSError) as e:
        raise ArtifactError(f"{path / PLAN_FILE} or {SCALES_FILE} is not a readable safetensors file ({e})") from None
    try:
        plan = CompressionPlan.from_json_and_tensors(config["plan"], tensors)
    except (ValueError, KeyError, TypeError) as e:
        raise ArtifactError(f"{path / PLAN_FILE}: {e}") from None
    if plan.model_class and plan.model_class != config["transformer"].get("class_name"):
        raise ArtifactError(f"{config_path}: the plan is for a {plan.model_class} but the transformer is a "
                            f"{config['transformer'].get('class_name')}")
    return Artifact(path, config, plan, scales, problems)


#: upgrade functions: version N -> N + 1, applied in order. Version 1 is the first; a future version 2 adds
#: ``_UPGRADES[1] = _v1_to_v2`` and a stored v1 fixture test.
_UPGRADES: dict[int, callable] = {}


def upgrade(config: dict, where: Path) -> dict:
    version = config.get("format_version")
    if not isinstance(version, int) or isinstance(version, bool):
        raise ArtifactError(f"{where}: format_version must be an integer, got {version!r}")
    if version > ARTIFACT_FORMAT_VERSION:
        raise ArtifactError(f"{where}: artifact format version {version} is newer than this ditfa_optimum "
                            f"{__version__} reads (up to {ARTIFACT_FORMAT_VERSION}); upgrade ditfa-optimum")
    while version < ARTIFACT_FORMAT_VERSION:
        if version not in _UPGRADES:
            raise ArtifactError(f"{where}: artifact format version {version} is unknown (this ditfa_optimum reads "
                                f"versions {sorted(_UPGRADES) + [ARTIFACT_FORMAT_VERSION]})")
        config = _UPGRADES[version](dict(config))
        version = config["format_version"]
    return config
