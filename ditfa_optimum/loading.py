"""`load_pipeline`: an artifact (directory or Hub repo) back to a plain diffusers pipeline that runs the plan."""

from __future__ import annotations

import os

import torch

from .apply import apply
from .serialization import EMBEDDED_MODELS, Artifact, ArtifactError, check_fingerprint, offline_hint, read_artifact


def load_pipeline(artifact: str | os.PathLike | Artifact, base_model=None, *, torch_dtype: torch.dtype | None = None,
                  device: str | torch.device | None = None, backend: str | None = "auto", revision: str | None = None,
                  token=None, num_inference_steps: int | None = None, **components):
    """Load an artifact as a diffusers pipeline whose transformer runs the plan.

    Args:
        artifact: an artifact directory, a Hub repo id (fetched through the HF cache: ``HF_HUB_OFFLINE=1`` works once
            cached), or an `Artifact` from `read_artifact`.
        base_model: where the other components (text encoders, VAE, scheduler) come from: a model id or directory, or
            a loaded pipeline whose transformer is replaced. Default: the base model the artifact records. An artifact
            that refers to the base's transformer weights (``Artifact.weights`` "base" or "base+delta", the default
            when saving) loads them from an id or directory given here, else from the recorded id at the recorded
            revision; their sha256 must be the recorded ones.
        torch_dtype: dtype of the transformer and, for ids, the whole pipeline.
        device: move the pipeline there.
        backend: attention backend of the plan runtime ("auto", "reference", "flex", ...).
        revision, token: of the artifact's Hub repo.
        num_inference_steps: the step count you will run, when it is not the plan's: the plan runs remapped
            (`ditfa_optimum.apply`; lower quality than searched). Default: the plan's count, and another is refused.
        components: passed to ``DiffusionPipeline.from_pretrained`` of the base model (e.g. ``text_encoder_3=None``),
            which loads safetensors weights only (``use_safetensors=True`` unless passed: pickled ``.bin`` weights
            are not read).

    Returns:
        The pipeline (``pipeline.ditfa_artifact`` is the `Artifact`; `ditfa_optimum.remove(pipeline)` gives dense).

    Example:
        >>> pipe = load_pipeline("me/sd3-ditfa", torch_dtype=torch.bfloat16, device="cuda")   # doctest: +SKIP
        >>> image = pipe("a lighthouse at dusk", num_inference_steps=28).images[0]          # doctest: +SKIP
    """
    check_device(device)  # before anything is read or loaded
    art = artifact if isinstance(artifact, Artifact) else read_artifact(artifact, revision=revision, token=token)
    where = base_model if isinstance(base_model, (str, os.PathLike)) else None  # also holds the base's weights
    transformer = art.load_transformer(torch_dtype, base_model=where)
    pipeline = base_pipeline(art, base_model, transformer, torch_dtype, components)
    if device is not None:
        pipeline.to(device)
    apply(pipeline, art.plan, backend=backend, num_inference_steps=num_inference_steps)
    pipeline.ditfa_artifact = art
    return pipeline


def check_device(device: str | torch.device | None) -> torch.device | None:
    """``device`` as a `torch.device` after checking that a pipeline can run there (None stays None).

    Raises ValueError naming the device and what to use instead: not a device name (``"bogus"``), ``"meta"`` (holds
    no data, nothing runs on it), or a device this machine does not have (CUDA in a CPU-only torch, ``cuda:7`` on a
    one-GPU machine, MPS off macOS).
    """
    if device is None:
        return None
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError, ValueError):
        raise ValueError(f"device {device!r} is not a torch device name; use e.g. 'cpu', 'cuda' or 'cuda:1'") \
            from None
    if dev.type == "cpu":
        return dev
    if dev.type == "meta":
        raise ValueError("device 'meta' holds no data, so a pipeline cannot run on it; use 'cpu' or 'cuda'")
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            why = "this torch is built without CUDA" if torch.version.cuda is None else "no CUDA GPU is visible"
            raise ValueError(f"device {device!r} is not available: {why} (torch {torch.__version__}); use 'cpu', or "
                             "a CUDA build of torch on a machine with an NVIDIA GPU")
        count = torch.cuda.device_count()
        if dev.index is not None and dev.index >= count:
            raise ValueError(f"device {device!r} is not available: this machine has {count} CUDA device(s), "
                             f"cuda:0 to cuda:{count - 1}")
        return dev
    module = torch.backends.mps if dev.type == "mps" else getattr(torch, dev.type, None)
    if not getattr(module, "is_available", lambda: False)():
        raise ValueError(f"device {device!r} is not available on this machine; use 'cpu' (or 'cuda' with a GPU)")
    return dev


def base_pipeline(art: Artifact, base_model, transformer: torch.nn.Module, torch_dtype, components: dict):
    """The base model's pipeline with ``transformer`` in place of its own (checked against the recorded structure)."""
    recorded = art.config["transformer"]["fingerprint"]
    if base_model is not None and not isinstance(base_model, (str, os.PathLike)):
        base_transformer = getattr(base_model, "transformer", None)
        if base_transformer is None:
            raise ArtifactError(f"base_model must be a model id, a directory or a diffusers pipeline with a "
                                f".transformer, got {type(base_model).__name__}")
        check_fingerprint(base_transformer, recorded, "the base pipeline's transformer")
        base_model.register_modules(transformer=transformer)
        return base_model

    record = art.config["base_model"] or {}
    base_id = os.fspath(base_model) if base_model is not None else record.get("id")
    if base_id is None:
        raise ArtifactError(f"{art.path} records no base model; pass base_model= (a model id, a directory or a "
                            "pipeline) for the text encoders and VAE")
    if base_id in EMBEDDED_MODELS:
        from .embedded import embedded_pipeline

        pipeline, _ = embedded_pipeline(base_id)
        check_fingerprint(pipeline.transformer, recorded, f"the embedded {base_id} transformer")
        pipeline.register_modules(transformer=transformer)
        return pipeline

    from diffusers import DiffusionPipeline

    revision = record.get("revision") if base_model is None else None
    _check_base_transformer_config(art, base_id, revision)
    kwargs = {"use_safetensors": True, **components}  # never unpickle a base component's .bin weights
    if torch_dtype is not None:
        kwargs["torch_dtype"] = torch_dtype
    try:
        return DiffusionPipeline.from_pretrained(base_id, transformer=transformer, revision=revision, **kwargs)
    except (OSError, ValueError) as e:
        raise ArtifactError(f"cannot load the base model {base_id!r}{offline_hint()}: {e}. Only safetensors weights "
                            "are loaded (use_safetensors=True). Pass base_model= (an id, a directory or a loaded "
                            "pipeline)") from e


def _check_base_transformer_config(art: Artifact, base_id: str, revision: str | None) -> None:
    """Compare the base model's transformer config (one small JSON file) with the recorded structure."""
    try:
        config = art.transformer_class.load_config(base_id, subfolder="transformer", revision=revision)
    except (OSError, ValueError):
        return  # the pipeline load below reports an unreachable base model with the full reason
    from .serialization import structural_config

    theirs = structural_config(config)
    ours = art.config["transformer"]["fingerprint"]["config"]
    keys = sorted(k for k in set(ours) & set(theirs) if ours[k] != theirs[k])
    if keys:
        raise ArtifactError(f"the base model {base_id!r} has a different transformer than the artifact was made for ("
                            + ", ".join(f"{k}: artifact {ours[k]!r} vs base {theirs[k]!r}" for k in keys[:5])
                            + "); pass the matching base_model=")
