"""The base model's transformer weights, referred to instead of copied.

An artifact stores weights only where they change (docs/artifact-format.md, "Weights"):

* ``"base"``: none. The artifact records where the base transformer's files are (``base_model.id``, the pinned
  ``revision``: a commit hash for Hub models) and the sha256 of each file (``base_model.files``); loading fetches
  exactly those files, checks every digest and refuses a mismatch.
* ``"base+delta"``: as ``"base"``, plus the tensors that differ from the base (a fused LoRA, say) in
  ``transformer_delta.safetensors``, loaded over the base.
* ``"included"``: the whole transformer under ``transformer/`` (``self_contained=True``, or a base without files to
  refer to: an in-memory pipeline, the random-weight tiny models).

Everything here is a pure function of files and tensors; `ditfa_optimum.serialization` decides which mode to write.
"""

from __future__ import annotations

import hashlib
import os
import re
from dataclasses import dataclass
from pathlib import Path

import torch

#: the files of a diffusers transformer folder an artifact pins: its config, and its safetensors weights or index
_PINNED = re.compile(r"config\.json|.*\.safetensors|.*\.safetensors\.index\.json")
_COMMIT = re.compile(r"[0-9a-f]{40}")


class BaseWeightsError(ValueError):
    """The base model's transformer files cannot be found, or are not the ones recorded."""


@dataclass(frozen=True)
class BaseFolder:
    """A base model's transformer folder on this machine: ``path`` (``<model>/transformer``), ``revision`` (the Hub
    commit hash of a cached Hub model, else None)."""

    path: Path
    revision: str | None


def hub_id_form(text: str) -> bool:
    """Whether ``text`` has the form of a Hub repo id (``user/name``: one slash, not a relative or absolute path);
    callers check separately whether a local path of that name exists, which takes precedence."""
    return text.count("/") == 1 and not text.startswith((".", "/"))


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def pinned_files(folder: Path) -> dict[str, str]:
    """``{"transformer/<name>": sha256}`` of the files of a transformer folder that loading reads. Every byte is
    hashed, each load (sha256 ran at 0.46 GB/s on one core of the 2-core CI-like machine; 4 GB for SD3-medium, 24 GB
    for FLUX.1-dev in bfloat16): a Hugging Face cache names its blobs by the sha256 the Hub sent, which nothing
    checks after the download."""
    names = sorted(p.name for p in folder.iterdir() if _PINNED.fullmatch(p.name) and p.is_file())
    return {f"transformer/{name}": sha256_file(folder / name) for name in names}


def locate(source: str | None, revision: str | None = None, *, download: bool = False) -> BaseFolder | None:
    """The transformer folder of the base model ``source`` on this machine, or None when it has no files there.

    ``source``: an embedded model name (only ``mini-mmdit`` has files: the package's), a local pipeline directory, or
    a Hub id, looked up in the Hugging Face cache at ``revision`` (default: the cached ``main``), or fetched when
    ``download`` (only ``transformer/*``; the other components come later with the pipeline)."""
    if not source:
        return None
    from .embedded import DEFAULT_MODEL, EMBEDDED_MODELS

    if source in EMBEDDED_MODELS:
        if source != DEFAULT_MODEL:
            return None  # random weights built in memory: nothing on disk to refer to
        from .mini import ASSET_DIR

        return BaseFolder(ASSET_DIR / "transformer", None)
    path = Path(source)
    try:
        if path.is_dir():
            folder = path / "transformer"
            return BaseFolder(folder, None) if (folder / "config.json").is_file() else None
    except (OSError, ValueError):
        return None
    if path.exists() or not hub_id_form(source):
        return None
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError, RepositoryNotFoundError

    snapshot = None
    # the cache first, even when downloading is allowed: a pinned commit already there needs no network (and some
    # huggingface_hub releases try the network before the cache, failing offline)
    for local_only in (True,) if not download else (True, False):
        try:
            snapshot = Path(snapshot_download(source, revision=revision, allow_patterns=["transformer/*"],
                                              local_files_only=local_only))
            break
        except (LocalEntryNotFoundError, RepositoryNotFoundError, HfHubHTTPError, OSError, ValueError):
            continue
    if snapshot is None:
        return None
    folder = snapshot / "transformer"
    if not (folder / "config.json").is_file():
        return None
    return BaseFolder(folder, snapshot.name if _COMMIT.fullmatch(snapshot.name) else revision)


def check_pinned(folder: BaseFolder, recorded: dict[str, str], where: str) -> None:
    """Refuse a base transformer folder whose files are not the recorded ones (missing, extra weights, or another
    sha256), naming the file and the fix."""
    actual = pinned_files(folder.path)
    for name, want in sorted(recorded.items()):
        have = actual.get(name)
        if have is None:
            raise BaseWeightsError(f"{where}: {folder.path.parent / name} is missing; the artifact refers to the base "
                                   "model's transformer files as they were when it was made")
        if have != want:
            raise BaseWeightsError(
                f"{where}: {folder.path.parent / name} has sha256 {have[:12]}…, but the artifact was made with "
                f"{want[:12]}…: the base model at that location is another revision or was modified. Load the "
                "recorded revision, or pass base_model= a copy of it (or save the artifact with "
                "self_contained=True)")
    extra = sorted(set(actual) - set(recorded) - {"transformer/config.json"})
    if extra:
        raise BaseWeightsError(f"{where}: {folder.path} holds weight files the artifact does not record ({', '.join(extra)}), "
                               "which diffusers would read: the base model there is another revision")


def changed_tensors(transformer: torch.nn.Module, folder: Path, skip: set[str] = frozenset()
                    ) -> dict[str, torch.Tensor] | None:
    """The tensors of ``transformer`` (its ``state_dict``) that differ from the base weights in ``folder``, compared
    after casting the file's tensor to the model's dtype (a base loaded in bfloat16 from float32 files is unchanged);
    None when the names or shapes differ (not this transformer's base). Names in ``skip`` (FP8 weights, stored apart)
    are only checked for presence and shape."""
    from safetensors import safe_open
    from tqdm.auto import tqdm

    state = transformer.state_dict()
    files = sorted(p for p in folder.iterdir() if p.name.endswith(".safetensors") and p.is_file())
    if not files:
        return None
    seen, changed = set(), {}
    size = sum(t.numel() * t.element_size() for t in state.values())
    with tqdm(total=len(state), desc="ditfa: comparing with the base weights", unit="tensor",
              disable=size < 1 << 30) as bar:  # a bar for large models only (FLUX.1-dev: 24 GB read once)
        for file in files:
            with safe_open(file, framework="pt", device="cpu") as f:
                for name in f.keys():
                    bar.update()
                    mine = state.get(name)
                    if mine is None:
                        return None
                    if tuple(f.get_slice(name).get_shape()) != tuple(mine.shape):
                        return None
                    seen.add(name)
                    if name in skip:
                        continue
                    theirs = f.get_tensor(name)
                    if not torch.equal(theirs.to(mine.dtype), mine.detach().cpu()):
                        changed[name] = mine.detach().cpu().contiguous()
    return changed if seen == set(state) else None


def apply_delta(transformer: torch.nn.Module, delta: dict[str, torch.Tensor], where: str) -> None:
    """Copy the changed tensors ``delta`` over ``transformer``'s (each by name, same shape, cast to its dtype)."""
    state = transformer.state_dict()
    for name, tensor in delta.items():
        if name not in state:
            raise BaseWeightsError(f"{where}: {name!r} is not a tensor of the base transformer; the file belongs to "
                                   "another model: download or save the artifact again")
        if tuple(tensor.shape) != tuple(state[name].shape):
            raise BaseWeightsError(f"{where}: {name!r} has shape {tuple(tensor.shape)}, the base transformer's is "
                                   f"{tuple(state[name].shape)}; download or save the artifact again")
    with torch.no_grad():
        for name, tensor in delta.items():
            state[name].copy_(tensor.to(state[name].dtype))
