"""The models that ship inside the package and run offline: the trained miniature MMDiT and the tiny random-weight
transformers (tests, demos). Names are what the CLI and an artifact's ``base_model.id`` use.

* ``mini-mmdit``: the trained miniature SD3-architecture model (`ditfa_optimum.mini`), the default model.
* ``tiny-sd3``, ``tiny-sd35``, ``tiny-flux``: random weights in real diffusers pipelines, no text encoders (prompts go
  through `ditfa_optimum.tiny.TinyPromptEncoder`).
"""

from __future__ import annotations

DEFAULT_MODEL = "mini-mmdit"
TINY_FAMILIES = {"tiny-sd3": "sd3", "tiny-sd35": "sd35", "tiny-flux": "flux"}
EMBEDDED_MODELS = (DEFAULT_MODEL, *TINY_FAMILIES)

#: calibration defaults per embedded model: resolution in pixels, steps, mask block size, CFG scale
_TINY = dict(steps=8, size=128, block_size=16, guidance=5.0)  # 256 image tokens: seconds on two CPU cores
DEFAULTS = {
    "mini-mmdit": dict(steps=20, size=64, block_size=32, guidance=4.0),  # as trained: 1024 image tokens
    "tiny-sd3": _TINY, "tiny-sd35": _TINY,
    "tiny-flux": {**_TINY, "size": 256, "guidance": None},  # FLUX: 16 px per token side, no batched CFG
}


def check_name(name: str) -> str:
    if name not in EMBEDDED_MODELS:
        raise ValueError(f"unknown embedded model {name!r}; choose one of {', '.join(EMBEDDED_MODELS)}")
    return name


def defaults_for(model: str) -> dict | None:
    """Calibration defaults for ``model``: an embedded name, or a directory holding a saved miniature model (e.g. one
    trained with ``training/train_mini.py``: its own image size, e.g. 128 px and block 64 for mini-mmdit-128); None
    for anything else."""
    if model in DEFAULTS:
        return DEFAULTS[model]
    from .mini import is_mini_pipeline_dir, saved_defaults

    return saved_defaults(model) if is_mini_pipeline_dir(model) else None


def embedded_pipeline(name: str, device=None, torch_dtype=None):
    """``(pipeline, prompt_encoder)`` of the embedded model ``name`` (``prompt_encoder`` is None when the pipeline
    encodes prompts itself), in ``torch_dtype`` (default float32) on ``device``."""
    import torch

    check_name(name)
    dtype = torch_dtype or torch.float32
    if name == DEFAULT_MODEL:
        from .mini import mini_pipeline

        return mini_pipeline(torch_dtype=dtype, device=device), None
    from .tiny import TinyPromptEncoder, tiny_pipeline

    pipe = tiny_pipeline(TINY_FAMILIES[name], dtype=dtype)
    if device is not None:
        pipe.to(device)
    return pipe, TinyPromptEncoder(pipe.transformer)
