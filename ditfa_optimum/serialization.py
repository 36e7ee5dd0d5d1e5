"""The ditfa artifact: a directory (or Hub repo) holding a plan for a transformer, and how it was made.

    ditfa_config.json          schema version, package version, base model (id, pinned revision, sha256 of its
                               transformer files), transformer class + fingerprint + dtype + where its weights come
                               from, plan (structure, and the search's config and results in its metadata),
                               reproducibility record, sha256 of every other file
    plan.safetensors           "<module>.method" (int16) / "<module>.param" (float64), [steps, heads]
    scales.safetensors         quantization scales (empty: the 8-bit attention heads compute theirs per call, which
                               the plan records as "attention_quantization")
    reproducibility.safetensors  downsampled reference latents of a few generations ("image_<i>")
    transformer_delta.safetensors  weights "base+delta": the tensors that differ from the base model's
    transformer_fp8.safetensors    FP8 linear layers (``transformer.linears``): "<module>.weight" (float8_e4m3fn) and
                               "<module>.weight_scale" (float32, one per output row), `ditfa_optimum.fp8_linears`
    transformer/               weights "included": diffusers save_pretrained (config.json + safetensors)
    README.md                  generated model card

Weights are stored only where they change (`ditfa_optimum.base_weights`): by default the artifact refers to the base
model's transformer files, pinned by revision and sha256.

Nothing is pickled and loading executes nothing from the artifact: JSON is parsed, tensors come from safetensors, the
transformer class is looked up in an allowlist (the classes an adapter supports) and loaded with
``use_safetensors=True``; loading reads only listed, checksummed files inside the artifact (`check_files`). Saving
replaces only an artifact, one writer at a time, and never leaves the path without a complete artifact that cannot be
recovered (`write_artifact`). See docs/artifact-format.md.
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
import shutil
import signal
import threading
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

try:
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None

import torch

from . import __version__, base_weights, fp8_linears, schema
from .schema import short as _short
from .adapters import adapter_names, get_adapter
from .base_weights import sha256_file as sha256
from .embedded import EMBEDDED_MODELS  # artifacts record these names as base models: no download
from .plan import CompressionPlan

logger = logging.getLogger(__name__)

CONFIG_NAME = "ditfa_config.json"
PLAN_FILE = "plan.safetensors"
SCALES_FILE = "scales.safetensors"
REPRO_FILE = "reproducibility.safetensors"
TRANSFORMER_DIR = "transformer"
DELTA_FILE = "transformer_delta.safetensors"
LINEARS_FILE = "transformer_fp8.safetensors"
CARD_FILE = "README.md"
#: where an artifact's transformer weights come from (`ditfa_optimum.base_weights`)
WEIGHT_MODES = ("base", "base+delta", "included")
REQUIRED_KEYS = ("package_version", "base_model", "transformer", "plan", "files")
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


# ==================================================================================================== writing
def write_artifact(directory: str | os.PathLike, *, transformer: torch.nn.Module, plan: CompressionPlan,
                   base_model: dict, prompt_encoder: dict | None = None, reproducibility: tuple[dict, dict] | None = None,
                   overwrite: bool = False, self_contained: bool | None = None) -> Path:
    """Write an artifact directory; never lose an artifact, never delete anything else.

    Weights (`weights_to_store`): with ``self_contained=None`` (default) the artifact refers to the base model's
    transformer files (``base_model["id"]``: an embedded name, a directory or a cached Hub id), pinned by revision and
    sha256, and stores only the tensors that differ from them; a base without files on this machine gets the whole
    transformer, with a warning. ``True``: always the whole transformer (air-gapped use). ``False``: never; refused
    when the base has no files to refer to.

    What is guaranteed (the names are of ``NAME``, the last part of ``directory``, in its parent directory):

    * ``directory`` may be absent or an empty directory. An existing ditfa artifact (`is_artifact`) is replaced only
      with ``overwrite=True``; anything else (a file, a link, a non-empty directory that is not an artifact) is refused,
      ``overwrite`` or not (`check_target`).
    * One writer at a time: ``.NAME.ditfa-lock`` (``flock``; the kernel releases it when its process dies, so a lock
      never outlives its writer) refuses a concurrent writer. The target is checked again under the lock and right
      before the swap, so an artifact that appeared meanwhile is never silently replaced.
    * The new artifact is written completely into ``.NAME.ditfa-tmp-<pid>``, then renamed into place. Replacing an
      artifact is two renames: the old one to ``.NAME.ditfa-old-<pid>``, the new one in (a directory cannot be renamed
      onto a non-empty one). SIGTERM and SIGINT are held back between the two; a process killed there (SIGKILL) leaves
      the complete old artifact in the backup, and the next save or read of ``directory`` renames it back (`recover`)
      and removes the temporary and backup directories that writers which died left behind. Files and directory
      entries are flushed to disk (fsync) before the old artifact is removed.
    * On an exception, or SIGTERM while saving from the main thread (raised as ``SystemExit(143)`` there), the
      temporary directory is removed and the old artifact is untouched.
    """
    directory = check_target(directory, overwrite)  # quick feedback; repeated under the lock
    adapter = get_adapter(transformer)
    plan.validate(adapter.module_specs(transformer), model_class=adapter.model_class)
    weights = weights_to_store(transformer, base_model, self_contained)
    directory.parent.mkdir(parents=True, exist_ok=True)
    with _writer_lock(directory), _sigterm_raises():
        _recover_locked(directory)
        check_target(directory, overwrite)
        tmp = _sibling(directory, f"{TMP_TAG}-{os.getpid()}")
        try:
            tmp.mkdir()
            _write_contents(tmp, transformer, plan, weights, prompt_encoder, reproducibility)
            _swap_in(tmp, directory, overwrite)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    return directory


@dataclass
class StoredWeights:
    """What an artifact stores of its transformer (`WEIGHT_MODES`), and the base model record it writes."""

    mode: str
    base_model: dict
    delta: dict[str, torch.Tensor] = field(default_factory=dict)


def weights_to_store(transformer: torch.nn.Module, base_model: dict | None, self_contained: bool | None
                     ) -> StoredWeights:
    """Decide what the artifact stores of ``transformer`` (see `write_artifact`); the base record gains the pinned
    ``revision`` and the sha256 of the base's transformer ``files``."""
    base = dict(base_model or {})
    base.setdefault("files", {})
    quantized = fp8_linears.quantized_names(transformer)
    if self_contained:
        if quantized:
            raise ArtifactError("a self-contained artifact of a transformer with FP8 linear layers is not supported: "
                                "its FP8 weights are stored beside a reference to the base model's files; save "
                                "without self_contained (--self-contained), with the base model available")
        return StoredWeights("included", base)
    folder = base_weights.locate(base.get("id"), base.get("revision"))
    why = None
    if folder is None:
        why = ("the pipeline was given as an object, not loaded from a model id or directory, so there is no base "
               "model to refer to" if not base.get("id") else
               f"the base model {base.get('id')!r} has no transformer files on this machine to refer to")
    else:
        delta = base_weights.changed_tensors(transformer, folder.path,
                                             skip={f"{n}.weight" for n in quantized})
        if delta is None:
            why = f"the transformer does not have the structure of the base model's in {folder.path}"
    if why is not None:
        if quantized:
            raise ArtifactError(f"cannot save a transformer with FP8 linear layers: {why}, and its FP8 weights are "
                                "stored beside a reference to the base model's files; load the pipeline from a "
                                "model id or directory (from_pretrained) before quantizing")
        if self_contained is False:
            raise ArtifactError(f"cannot save without the transformer weights: {why}; pass self_contained=True "
                                "(--self-contained) to store them")
        logger.warning("ditfa: %s, so the artifact stores the whole transformer", why)
        return StoredWeights("included", base)
    if not base.get("embedded") and folder.revision is None:  # a local directory: found again from anywhere
        base["id"] = str(folder.path.parent.resolve())
    base.update(revision=folder.revision or base.get("revision"), files=base_weights.pinned_files(folder.path))
    return StoredWeights("base+delta" if delta else "base", base, delta)


def weights_dtype(transformer: torch.nn.Module) -> str | None:
    """The dtype of the transformer's floating-point weights, as loading restores it ("bfloat16"), or None."""
    dtypes = [p.dtype for p in transformer.parameters() if p.is_floating_point()]
    return str(max(set(dtypes), key=dtypes.count)).removeprefix("torch.") if dtypes else None


def _write_contents(tmp: Path, transformer, plan: CompressionPlan, weights: StoredWeights, prompt_encoder,
                    reproducibility) -> None:
    from safetensors.torch import save_file

    save_file(plan.state_dict(), tmp / PLAN_FILE, metadata={"format": "pt"})
    # 8-bit attention heads compute their scales per call (the plan's "attention_quantization" says so): nothing to
    # store; the file stays for scales a static scheme would calibrate
    contents = ("empty: the plan's 8-bit attention heads compute their scales per call (dynamic)"
                if plan.uses_quantized_heads() else "reserved for quantization scales")
    save_file({}, tmp / SCALES_FILE, metadata={"format": "pt", "contents": contents})
    if weights.mode == "included":
        transformer.save_pretrained(tmp / TRANSFORMER_DIR, safe_serialization=True)
    elif weights.mode == "base+delta":
        save_file(weights.delta, tmp / DELTA_FILE, metadata={"format": "pt"})
    linears = fp8_linears.quantized_names(transformer)
    if linears:
        save_file(fp8_linears.state(transformer), tmp / LINEARS_FILE, metadata={"format": "pt"})
    repro_info = None
    if reproducibility is not None:
        repro_info, repro_tensors = reproducibility
        save_file({k: v.contiguous().cpu() for k, v in repro_tensors.items()}, tmp / REPRO_FILE,
                  metadata={"format": "pt"})
    config = schema.stamp({
        "package_version": __version__,
        "base_model": weights.base_model,
        "transformer": {"class_name": type(transformer).__name__, "fingerprint": fingerprint(transformer),
                        "weights": weights.mode, "dtype": weights_dtype(transformer),
                        "linears": {"quantization": "fp8", "scheme": fp8_linears.SCHEME, "modules": linears}
                        if linears else None},
        "plan": plan.to_json_dict(),
        "prompt_encoder": prompt_encoder,
        "reproducibility": repro_info,
    })
    (tmp / CARD_FILE).write_text(model_card(config, plan))
    config["files"] = {p.relative_to(tmp).as_posix(): sha256(p) for p in sorted(tmp.rglob("*")) if p.is_file()}
    (tmp / CONFIG_NAME).write_text(json.dumps(config, indent=2) + "\n")
    for path in [*tmp.rglob("*"), tmp]:  # on disk before a rename makes them the artifact
        _fsync(path)


def _fsync(path: Path) -> None:
    """Flush a file's data, or a directory's entries, to disk (POSIX; elsewhere a no-op)."""
    if os.name != "posix":  # pragma: no cover
        return
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _swap_in(new: Path, target: Path, overwrite: bool) -> None:
    """Rename the complete artifact ``new`` to ``target``, moving an artifact there aside first (see `write_artifact`).
    """
    check_target(target, overwrite)  # the last look: something may have appeared at the path while we wrote
    if not is_artifact(target):
        new.rename(target)  # absent or empty: atomic; fails if a non-empty directory appeared in the meantime
        return
    old = _sibling(target, f"{OLD_TAG}-{os.getpid()}")
    with _signals_held():
        target.rename(old)
        try:
            new.rename(target)
        except BaseException:
            old.rename(target)
            raise
    _fsync(target.parent)  # the renames on disk before the only other copy goes
    shutil.rmtree(old, ignore_errors=True)


def check_target(directory: str | os.PathLike, overwrite: bool, hint: str = "pass overwrite=True") -> Path:
    """Check that an artifact may be written to ``directory``; call it before long work (``hint`` says how to ask
    for ``overwrite``).

    Absent paths and empty directories are fine; an existing ditfa artifact only with ``overwrite``; anything else
    (a file, a symbolic link, a non-empty directory that is not an artifact) never. The nearest existing parent must
    be a directory this process can write to.

    Example:
        >>> check_target("sd3-ditfa", overwrite=False)   # doctest: +SKIP
        PosixPath('sd3-ditfa')
    """
    directory = Path(directory)
    if directory.name in ("", ".."):
        raise ArtifactError(f"{directory} names no directory of its own; give the artifact directory's path (e.g. "
                            "./sd3-ditfa)")
    try:
        if directory.is_symlink():
            raise ArtifactError(f"{directory} is a symbolic link (to {os.readlink(directory)}); an artifact is written "
                                "to a real directory: give that path, or a new one")
        if directory.exists():
            if not directory.is_dir():
                raise ArtifactError(f"{directory} exists and is a file, not a directory; choose a new or empty "
                                    "directory")
            if is_artifact(directory):
                if not overwrite:
                    raise ArtifactError(f"{directory} already exists and is not empty (a ditfa artifact); choose a new "
                                        f"directory or {hint} (the old artifact is replaced only once the new one is "
                                        "complete)")
            elif any(directory.iterdir()):
                raise ArtifactError(f"{directory} is not empty and is not a ditfa artifact (no {CONFIG_NAME} with a "
                                    "schema_version), so nothing is written there, overwrite or not: choose a new or "
                                    "empty directory")
        parent = nearest_existing_parent(directory)
        if not parent.is_dir():
            raise ArtifactError(f"cannot create {directory}: {parent} is a file, not a directory; choose another path")
        if not os.access(parent, os.W_OK | os.X_OK):
            raise ArtifactError(f"cannot write {directory}: {parent} is not writable by this user; choose a directory "
                                "you can write to")
    except OSError as e:
        raise ArtifactError(f"cannot write an artifact to {directory}: {e.strerror or e}; choose another "
                            "path") from None
    return directory


def nearest_existing_parent(path: str | os.PathLike) -> Path:
    """The closest existing directory above ``path`` (or what exists there instead: a file makes ``path`` impossible
    to create); missing directories in between are created when writing."""
    parent = Path(path).absolute().parent
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    return parent


def is_artifact(directory: str | os.PathLike) -> bool:
    """Whether ``directory`` holds a ditfa artifact: a regular ``ditfa_config.json`` with a JSON object holding
    ``schema_version`` (``format_version`` before schema 2) and ``files`` (the marker `check_target` relies on; the contents are not validated here)."""
    config = Path(directory) / CONFIG_NAME
    try:
        if config.is_symlink() or not config.is_file():
            return False
        data = json.loads(config.read_bytes())
    except (OSError, ValueError, RecursionError):
        return False
    return isinstance(data, dict) and (schema.KEY in data or "format_version" in data) and "files" in data


def check_plan_target(directory: str | os.PathLike, overwrite: bool, hint: str = "pass overwrite=True") -> Path:
    """Check that a bare plan (``CompressionPlan.save``: plan.json + plan.safetensors) may be written to ``directory``:
    a directory that exists or can be created (not a file, nor under one), never an artifact (its plan is
    checksummed), over an existing plan only with ``overwrite``."""
    from .plan import PLAN_JSON, PLAN_TENSORS

    directory = Path(directory)
    try:
        if directory.exists() and not directory.is_dir():
            raise ArtifactError(f"{directory} exists and is a file, not a directory; choose a new or empty directory")
        parent = nearest_existing_parent(directory)
        if not parent.is_dir():
            raise ArtifactError(f"cannot create {directory}: {parent} is a file, not a directory; choose another path")
        if (directory / CONFIG_NAME).exists():
            raise ArtifactError(f"{directory} is a ditfa artifact ({CONFIG_NAME}); a plan written into it would break "
                                "its checksums, overwrite or not: choose another directory")
        existing = [name for name in (PLAN_JSON, PLAN_TENSORS) if (directory / name).exists()]
    except OSError as e:
        raise ArtifactError(f"cannot write a plan to {directory}: {e.strerror or e}; choose another path") from None
    if existing and not overwrite:
        raise ArtifactError(f"{directory} already holds a plan ({', '.join(existing)}); choose another directory or "
                            f"{hint}")
    return directory


# ------------------------------------------------------------------------------------------- one writer, leftovers
LOCK_TAG, TMP_TAG, OLD_TAG = "ditfa-lock", "ditfa-tmp", "ditfa-old"
_LEFTOVER = re.compile(rf"({TMP_TAG}|{OLD_TAG})-\d+")


def _sibling(directory: Path, tag: str) -> Path:
    return directory.parent / f".{directory.name}.{tag}"


def _try_lock(directory: Path) -> int | None:
    """Take the writer's lock of ``directory``: an open descriptor, or None while another writer holds it. Raises
    OSError where the parent cannot be written."""
    path = _sibling(directory, LOCK_TAG)
    while True:
        # O_NOFOLLOW: a link planted at the lock's name must not make us truncate its target
        fd = os.open(path, os.O_RDWR | os.O_CREAT | getattr(os, "O_NOFOLLOW", 0), 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            return None
        try:
            current = os.stat(path).st_ino == os.fstat(fd).st_ino
        except FileNotFoundError:
            current = False
        if current:  # else its previous holder removed the file between our open and flock: take the new one
            os.ftruncate(fd, 0)
            os.write(fd, f"{os.getpid()}\n".encode())
            return fd
        os.close(fd)


def _unlock(directory: Path, fd: int) -> None:
    try:
        os.unlink(_sibling(directory, LOCK_TAG))
    except FileNotFoundError:
        pass
    os.close(fd)


@contextmanager
def _writer_lock(directory: Path):
    if fcntl is None:  # pragma: no cover - Windows: no flock; concurrent writers of one directory are not detected
        yield
        return
    try:
        fd = _try_lock(directory)
    except OSError as e:
        raise ArtifactError(f"cannot write {directory}: {e.strerror or e} (the lock file "
                            f"{_sibling(directory, LOCK_TAG)}); choose a directory you can write to") from None
    if fd is None:
        try:
            owner = "pid " + _sibling(directory, LOCK_TAG).read_text().strip()
        except OSError:
            owner = "unknown pid"
        raise ArtifactError(f"another process ({owner}) is writing {directory} right now (lock "
                            f"{_sibling(directory, LOCK_TAG)}); wait for it to finish, or choose another directory")
    try:
        yield
    finally:
        _unlock(directory, fd)


def _leftovers(directory: Path) -> list[Path]:
    prefix = f".{directory.name}."
    try:
        names = os.listdir(directory.parent)
    except (OSError, ValueError):
        return []
    found = [directory.parent / n for n in names if n.startswith(prefix) and _LEFTOVER.fullmatch(n[len(prefix):])]
    return sorted(p for p in found if not p.is_symlink())  # writers make directories, never links


def recover(directory: str | os.PathLike) -> None:
    """Repair what an interrupted save of ``directory`` left beside it (see `write_artifact`): if ``directory`` is
    missing, its complete backup ``.NAME.ditfa-old-<pid>`` is renamed back; the other temporary and backup directories
    of ``directory`` are removed. Nothing happens while another process is writing it, or where nothing can be
    written. `write_artifact` and `read_artifact` call it.
    """
    directory = Path(directory)
    if fcntl is None or not _leftovers(directory):
        return
    try:
        fd = _try_lock(directory)
    except OSError:
        return  # a read-only place: leave it as it is
    if fd is None:
        return  # a live writer: its directories are not leftovers
    try:
        _recover_locked(directory)
    finally:
        _unlock(directory, fd)


def _recover_locked(directory: Path) -> None:
    """With the lock held, every temporary or backup directory of ``directory`` is stale: writers make them only
    while holding the lock, so their writer has died (whatever process has their pid now)."""
    leftovers = _leftovers(directory)
    tag_at = len(directory.name) + 2  # after ".NAME."
    backups = [p for p in leftovers if p.name[tag_at:].startswith(OLD_TAG) and _complete(p)]
    if backups and not os.path.lexists(directory):
        newest = max(backups, key=lambda p: p.stat().st_mtime)
        newest.rename(directory)
        leftovers.remove(newest)
        logger.warning("ditfa: restored %s from %s, left by a save that was interrupted while swapping it",
                       directory, newest.name)
    keep = [] if is_artifact(directory) else backups  # never remove the only complete copy
    for path in leftovers:
        if path in keep:
            logger.warning("ditfa: kept %s, a complete backup of %s (which holds no artifact)", path, directory)
        else:
            logger.warning("ditfa: removing %s, left by an interrupted save", path)
            shutil.rmtree(path, ignore_errors=True)


def _complete(directory: Path) -> bool:
    """Whether ``directory`` holds an artifact config and every file it lists (a backup is complete until its removal
    starts, which only happens once the new artifact is in place)."""
    try:
        files = json.loads((directory / CONFIG_NAME).read_bytes())["files"]
        return isinstance(files, dict) and all((directory / name).is_file() for name in files)
    except (OSError, ValueError, TypeError, KeyError, RecursionError):
        return False


@contextmanager
def _signals_held():
    """Hold SIGTERM and SIGINT back (delivered when the block ends), so no handler runs between two renames."""
    if not hasattr(signal, "pthread_sigmask"):  # pragma: no cover - Windows
        yield
        return
    held = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM, signal.SIGINT})
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, held)


@contextmanager
def _sigterm_raises():
    """While saving, SIGTERM raises ``SystemExit(143)`` in the main thread instead of ending the process on the spot,
    so the temporary directory is removed on the way out. Only where SIGTERM has its default action."""
    if threading.current_thread() is not threading.main_thread() or \
            signal.getsignal(signal.SIGTERM) is not signal.SIG_DFL:
        yield
        return

    def handler(signum, frame):
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)


def search_summary(plan: CompressionPlan) -> dict:
    """What the search that made ``plan`` recorded in its metadata, as the artifact shows it (empty for a plan made
    without a search): its ``config`` (`DiTFastAttnConfig.to_dict`), ``attention_flop_cut`` at the searched token
    counts, ``whole_cut``, ``num_prompts``, ``calibration_seconds``, ``search_seconds`` and ``predicted_mean_rse``."""
    search = plan.metadata.get("search")
    if not isinstance(search, dict):
        return {}
    def number(value):  # read back from a file: anything else is left out
        ok = (isinstance(value, float) and math.isfinite(value)  # math.isfinite(10**400) raises OverflowError
              or isinstance(value, int) and not isinstance(value, bool) and abs(value) <= 1 << 53)
        return value if ok else None

    out = {k: number(search.get(k)) for k in ("whole_cut", "num_prompts", "calibration_seconds", "search_seconds")}
    out["config"] = search.get("config") if isinstance(search.get("config"), dict) else None
    tokens = search.get("image_tokens"), search.get("text_tokens")
    if all(isinstance(t, int) and not isinstance(t, bool) and 0 < t <= 1 << 20 for t in tokens):
        out["attention_flop_cut"] = plan.flops(*tokens, cfg=search.get("cfg") is True).cut
    predicted = search.get("predicted_rse")
    values = [v for rows in predicted.values() if isinstance(rows, list) for v in rows] \
        if isinstance(predicted, dict) else []
    numbers = [v for v in values if number(v) is not None]
    out["predicted_mean_rse"] = sum(numbers) / len(numbers) if numbers else None
    return out


def model_card(config: dict, plan: CompressionPlan) -> str:
    """The artifact's README.md: Hub metadata (huggingface_hub's `ModelCardData`: library, base model and relation,
    licence, tags) and what the plan saves, how to install and load it, and which files hold what."""
    from huggingface_hub import ModelCard, ModelCardData

    record = config["base_model"] or {}
    base = record.get("id") or "an unnamed pipeline"
    weights = config["transformer"]["weights"]
    summary = search_summary(plan)
    search = summary.get("config") or {}
    counts = plan.method_counts()
    total = sum(counts.values())
    shares = ", ".join(f"`{k}` {v / total:.1%}" for k, v in sorted(counts.items(), key=lambda kv: -kv[1]))
    quality = ""
    if summary.get("predicted_mean_rse") is not None:
        quality = (f"- Predicted mean local attention error (RSE against full attention, averaged over layers, steps "
                   f"and heads): {summary['predicted_mean_rse']:.4f}.\n")
    skipped = (f"- Denoising steps where the transformer does not run (its output extrapolated from the last two "
               f"steps where it ran, `step_taylor`): {plan.skipped_steps}.\n") if plan.skipped_steps else ""
    cut, whole = summary.get("attention_flop_cut"), summary.get("whole_cut")
    saving = "" if cut is None else (
        f"- Attention FLOPs cut: **{cut:.1%}** at {search.get('height')}x{search.get('width')}, {plan.num_steps} steps"
        + (f"; whole-transformer FLOPs skipped: **{whole:.1%}**" if isinstance(whole, float) else "") + ".\n")
    calibration = "" if not search else (
        f"- Calibration: {summary.get('num_prompts') or '?'} prompts, {summary.get('calibration_seconds') or 0:.1f} s; "
        f"search {summary.get('search_seconds') or 0:.2f} s ({search.get('allocation')} allocation).\n")
    on_hub = bool(record.get("id")) and not record.get("embedded") and base_weights.hub_id_form(record["id"]) \
        and not Path(record["id"]).exists()
    data = ModelCardData(library_name="ditfa-optimum", license="other",
                         tags=["ditfa-optimum", "attention-compression", "diffusers"],
                         base_model=record["id"] if on_hub else None,
                         base_model_relation="adapter" if on_hub and weights != "included" else None)
    revision = f" at revision `{record['revision']}`" if record.get("revision") else ""
    if weights == "included":
        holds = (f"the transformer of `{base}` ({config['transformer']['class_name']}) with its weights, and a plan for "
                 "it")
        licence = (f"This artifact holds a copy of the weights of `{base}`: that model's licence applies to them; "
                   "check it before you publish or use them.")
    else:
        holds = (f"a plan for the transformer of `{base}`{revision} ({config['transformer']['class_name']}); the "
                 "weights are the base model's own, loaded from it and checked against the sha256 recorded here"
                 + (", with the tensors that differ from them" if weights == "base+delta" else ""))
        licence = (f"The weights are `{base}`'s and stay there: its licence applies to using them (accept it on the "
                   f"base model's page if it is gated).")
    prompts = (plan.metadata.get("search") or {}).get("prompts")
    example = prompts[0] if isinstance(prompts, list) and prompts and isinstance(prompts[0], str) \
        and len(prompts[0]) < 200 and '"' not in prompts[0] and "\\" not in prompts[0] else "a lighthouse at dusk"
    files = ["`ditfa_config.json` (schema version {}, checksums of every file)".format(config[schema.KEY]),
             "`plan.safetensors`", "`scales.safetensors`", "`reproducibility.safetensors`"]
    files += {"included": ["`transformer/`"], "base+delta": [f"`{DELTA_FILE}`"], "base": []}[weights]
    body = f"""
# {base} with head-wise attention compression (ditfa-optimum)

This artifact holds {holds}, found by ditfa-optimum {config["package_version"]} after DiTFastAttnV2
(arXiv 2503.22796): for each of {len(plan.modules)} attention modules, {plan.num_steps} denoising steps and every head,
one of full attention, arrow attention (text dense, image x image in a diagonal band), reuse of the previous step's
output, or sharing across the CFG halves.

## What it saves

{saving}{skipped}- Heads per method over all (module, step, head) entries: {shares}.
{quality}{calibration}
## How to use it

```bash
pip install ditfa-optimum
```

```python
from ditfa_optimum import load_pipeline

pipe = load_pipeline("<this repo or directory>")      # base components from {base}
image = pipe("{example}", num_inference_steps={plan.num_steps}).images[0]
```

It loads with `ditfa_optimum.load_pipeline`, not `DiffusionPipeline.from_pretrained`: the plan needs its runtime. The
plan covers exactly {plan.num_steps} denoising steps. Check it on your machine with
`ditfa-optimum verify <this repo or directory>`.

## Licence

{licence}

## Files

{", ".join(files)}. No pickle; loading executes no code from here.
"""
    return str(ModelCard(f"---\n{data.to_yaml()}\n---\n{body}"))


def push_artifact(folder: str | os.PathLike, repo_id: str, *, private: bool | None = None, token=None,
                  commit_message: str = "Upload ditfa-optimum artifact"):
    """Upload a saved artifact directory as the Hub model repo ``repo_id`` (created if missing), after checking it
    reads back (`read_artifact`): a damaged artifact is never published, nor one that refers to weights in a local
    directory (unusable anywhere else). Returns the `CommitInfo`."""
    from huggingface_hub import HfApi

    art = read_artifact(folder)
    base = art.config["base_model"] or {}
    if art.weights != "included" and not base.get("embedded") and (
            not base.get("id") or not base_weights.hub_id_form(base["id"])):
        raise ArtifactError(f"{art.path} refers to base weights in the local directory {base.get('id')!r}, which "
                            "nobody who downloads it has; save it with self_contained=True (--self-contained; mind "
                            "the base model's licence), or optimize a model loaded from the Hub")
    api = HfApi(token=token)
    api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
    return api.upload_folder(repo_id=repo_id, folder_path=art.path, commit_message=commit_message, repo_type="model")


# ==================================================================================================== reading
@dataclass
class Artifact:
    """A validated artifact on disk. ``transformer`` is loaded on demand (`load_transformer`)."""

    path: Path
    config: dict
    plan: CompressionPlan
    scales: dict[str, torch.Tensor] = field(default_factory=dict)
    problems: list[str] = field(default_factory=list)  # checksum mismatches when loaded with strict=False
    schema_version: int = schema.SCHEMA_VERSION  # the file's (``config`` is upgraded to the current one)

    @property
    def search_config(self) -> dict | None:
        """The `DiTFastAttnConfig.to_dict` of the search that made the plan (None for a plan made without one)."""
        return search_summary(self.plan).get("config")

    @property
    def attention_flop_cut(self) -> float | None:
        """The plan's attention-FLOP cut at the searched token counts (None for a plan made without a search)."""
        return search_summary(self.plan).get("attention_flop_cut")

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

    @property
    def weights(self) -> str:
        """Where the transformer's weights come from: one of `WEIGHT_MODES`."""
        return self.config["transformer"]["weights"]

    def base_folder(self, base_model: str | os.PathLike | None = None) -> "base_weights.BaseFolder":
        """The base model's transformer folder, its files checked against the recorded sha256 (weights "base" and
        "base+delta"). ``base_model``: another place holding the same files (a directory or Hub id; default: the
        recorded id at the recorded revision, fetched from the Hub when not cached)."""
        record = self.config["base_model"] or {}
        source = os.fspath(base_model) if base_model is not None else record.get("id")
        revision = record.get("revision") if base_model is None else None
        folder = base_weights.locate(source, revision, download=True)
        if folder is None:
            raise ArtifactError(
                f"{self.path} holds no transformer weights: it refers to the base model {record.get('id')!r}"
                f"{f' at revision {revision}' if revision else ''}, whose transformer files cannot be found"
                f"{'' if base_model is None else f' at {source!r}'}{offline_hint()}. Make them available (download "
                "the base model, or pass base_model= a directory holding it)")
        try:
            base_weights.check_pinned(folder, record["files"], f"the base model of {self.path}")
        except base_weights.BaseWeightsError as e:
            raise ArtifactError(str(e)) from None
        return folder

    def load_transformer(self, torch_dtype: torch.dtype | None = None,
                         base_model: str | os.PathLike | None = None) -> torch.nn.Module:
        """The transformer, in ``torch_dtype`` (default: the recorded dtype). Its tensors must be exactly the class's:
        a missing, unexpected or misshapen one is refused by name (never left uninitialised). Weights "base" and
        "base+delta" load the base model's pinned files (`base_folder`; ``base_model``: where else to find them).
        FP8 linear layers (``transformer.linears``) need a GPU that runs them (`fp8_linears.check_available`) and
        load in bfloat16."""
        name = self.config["transformer"]["class_name"]
        if self.linears:
            try:
                fp8_linears.check_available()
            except fp8_linears.Fp8Unavailable as e:
                raise ArtifactError(f"{self.path} has FP8 linear layers, which cannot load here: {e}") from None
            if torch_dtype not in (None, torch.bfloat16):
                raise ArtifactError(f"{self.path} has FP8 linear layers, which run in bfloat16; got torch_dtype="
                                    f"{torch_dtype}: leave it unset or pass torch.bfloat16")
        if torch_dtype is None and self.weights != "included":
            torch_dtype = DTYPES.get(self.config["transformer"].get("dtype"))
        kwargs = {} if torch_dtype is None else {"torch_dtype": torch_dtype}
        weights = self.path / TRANSFORMER_DIR if self.weights == "included" else self.base_folder(base_model).path
        self._check_transformer_config(weights / "config.json")  # diffusers builds the model from it: check first
        try:
            transformer, info = self.transformer_class.from_pretrained(
                weights, use_safetensors=True, low_cpu_mem_usage=False, output_loading_info=True, **kwargs)
        except (OSError, ValueError, RuntimeError, TypeError, AttributeError, KeyError, IndexError, OverflowError,
                ZeroDivisionError) as e:  # a config value of the wrong type fails anywhere inside diffusers or torch
            raise ArtifactError(f"{weights} does not load as a {name}: {_short(e, 300)} ({type(e).__name__})") \
                from None
        kinds = {"missing": "missing_keys", "unexpected": "unexpected_keys", "misshapen": "mismatched_keys"}
        wrong = {what: sorted(k if isinstance(k, str) else k[0] for k in info[key])  # mismatched: (name, shapes)
                 for what, key in kinds.items() if info.get(key)}
        if wrong:
            detail = "; ".join(f"{what} tensors {', '.join(keys[:5])}{', …' if len(keys) > 5 else ''}"
                               for what, keys in wrong.items())
            raise ArtifactError(f"{weights}: the weights do not fit a {name} ({detail}); the file was edited or "
                                "belongs to another model: download or save the artifact again")
        keep = tuple(getattr(transformer, "_keep_in_fp32_modules", None) or ())
        dtypes = sorted({str(p.dtype) for n, p in transformer.named_parameters()
                         if p.is_floating_point() and not any(k in n for k in keep)})
        if torch_dtype is None and len(dtypes) > 1:  # a forward pass would fail on the first mixed matmul
            raise ArtifactError(f"{weights}: the weights mix dtypes ({', '.join(dtypes)}); the file was edited: "
                                "download or save the artifact again (or pass torch_dtype=)")
        if torch_dtype is not None:  # diffusers 0.42 without low_cpu_mem_usage keeps the file's dtype
            transformer = transformer.to(torch_dtype)
        if self.weights == "base+delta":
            self._apply_delta(transformer)
        if self.linears:
            self._load_linears(transformer)
        check_fingerprint(transformer, self.config["transformer"]["fingerprint"], f"the transformer in {weights}")
        self.plan.validate(get_adapter(transformer).module_specs(transformer),
                           model_class=self.config["transformer"]["class_name"])
        return transformer.eval()

    @property
    def linears(self) -> list[str]:
        """The linear layers stored in FP8 (`fp8_linears`; empty: all in the model's dtype)."""
        return list((self.config["transformer"].get("linears") or {}).get("modules", []))

    def _tensors(self, name: str) -> dict[str, torch.Tensor]:
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        file = self.path / name
        try:
            return load_file(file)
        except (SafetensorError, OSError, ValueError, RuntimeError) as e:
            raise ArtifactError(f"{file} is not a readable safetensors file ({_short(e, 200)}); download or save "
                                "the artifact again") from None

    def _apply_delta(self, transformer: torch.nn.Module) -> None:
        try:
            base_weights.apply_delta(transformer, self._tensors(DELTA_FILE), str(self.path / DELTA_FILE))
        except base_weights.BaseWeightsError as e:
            raise ArtifactError(str(e)) from None

    def _load_linears(self, transformer: torch.nn.Module) -> None:
        try:
            fp8_linears.load(transformer, self.linears, self._tensors(LINEARS_FILE), str(self.path / LINEARS_FILE))
        except (ValueError, fp8_linears.Fp8Unavailable) as e:
            raise ArtifactError(str(e)) from None

    def _check_transformer_config(self, file: Path) -> None:
        """The transformer's ``config.json`` must hold the structure ``ditfa_config.json`` records (its fingerprint):
        diffusers builds the model from it, so a layer count of 2**63 would allocate without bound and a string where
        a size goes would fail inside torch. Checked before anything is built."""
        try:
            config = json.loads(file.read_bytes())
        except (OSError, ValueError, RecursionError) as e:
            raise ArtifactError(f"{file} is not readable JSON ({_short(e, 200)}); download or save the artifact "
                                "again") from None
        recorded = self.config["transformer"]["fingerprint"].get("config")
        if not isinstance(config, dict) or not isinstance(recorded, dict):
            raise ArtifactError(f"{file} or the recorded fingerprint config is not a JSON object; download or save "
                                "the artifact again")
        ours = structural_config(config)
        keys = sorted(k for k in set(ours) | set(recorded) if ours.get(k) != recorded.get(k))
        if keys:
            raise ArtifactError(f"{file} does not match the structure {CONFIG_NAME} records (" + ", ".join(
                f"{_short(k, 40)}: recorded {_short(recorded.get(k), 40)} vs {_short(ours.get(k), 40)}"
                for k in keys[:5]) + "); the file was edited: download or save the artifact again")

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
            a, r = actual.get("config", {}), recorded.get("config")
            r = r if isinstance(r, dict) else {}  # read from a file: check_fields checks the type first
            keys = sorted(k for k in set(a) | set(r) if a.get(k) != r.get(k))
            detail = (detail + "; " if detail else "") + ", ".join(
                f"config.{k}: recorded {r.get(k)!r} vs {a.get(k)!r}" for k in keys[:5])
        raise ArtifactError(f"{what} does not match the artifact's recorded structure ({detail}); the artifact was "
                            "made for another model")


def resolve(path_or_repo: str | os.PathLike, revision: str | None = None, token=None) -> Path:
    """A local artifact directory, or a Hub repo id fetched with `snapshot_download` (HF cache; offline-safe)."""
    path = Path(path_or_repo)
    text = os.fspath(path_or_repo)
    try:
        if path.is_dir():
            return path
        exists = path.exists()
    except (OSError, ValueError) as e:  # a name too long, a NUL byte, no permission
        raise ArtifactError(f"{_short(text)} is not a readable directory ({_short(e, 200)})") from None
    if exists or not base_weights.hub_id_form(text):
        raise ArtifactError(f"{_short(text)} is neither an artifact directory nor a Hub repo id (user/name)")
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

    Every problem raises `ArtifactError`. Refused whatever ``strict`` says: a malformed ``ditfa_config.json``; a
    listed name outside the artifact; a symbolic link inside it (except the Hugging Face cache's own links into its
    ``blobs/``); a file under ``transformer/`` that is not listed (diffusers would read it unchecked: a sharded index
    replaces the listed weights); a config that lists no transformer weights. A local directory is first repaired
    from an interrupted save (`recover`).

    Args:
        strict: raise on a checksum mismatch; with False, mismatches are listed in ``Artifact.problems`` (used by
            `verify_artifact`, which then shows what the change does to the images).
    """
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    recover(path_or_repo)
    path = resolve(path_or_repo, revision=revision, token=token)
    config_path = path / CONFIG_NAME
    try:
        if not config_path.is_file():
            raise ArtifactError(f"{path} has no {CONFIG_NAME}: not a ditfa artifact (made by "
                                "DiTFastAttnOptimizer.save_pretrained), or an incomplete copy")
        text = config_path.read_bytes()
    except OSError as e:
        raise ArtifactError(f"cannot read {config_path}: {e.strerror or e}") from None
    try:
        config = json.loads(text)
    except (ValueError, RecursionError) as e:  # JSONDecodeError, UnicodeDecodeError, too many digits; deep nesting
        raise ArtifactError(f"{config_path} is not valid JSON ({_short(e, 200)}); the file is damaged: download or "
                            "save the artifact again") from None
    if not isinstance(config, dict):
        raise ArtifactError(f"{config_path} must hold a JSON object, got {type(config).__name__}")
    written = config.get(schema.KEY, 1)  # 1: the per-document counters of schema 1 (validated by schema.read)
    config = schema.read("artifact", config, str(config_path), ArtifactError)
    missing = [k for k in REQUIRED_KEYS if k not in config]
    if missing:
        raise ArtifactError(f"{config_path} lacks {missing}; the file is incomplete or edited by hand")
    check_fields(config, config_path)

    problems = []
    files = config["files"]
    check_files(path, files, config_path, config["transformer"]["weights"],
                bool(config["transformer"].get("linears")))
    for name, digest in files.items():
        file = path / name
        try:
            actual = sha256(file)
        except OSError as e:
            raise ArtifactError(f"cannot read {file}: {e.strerror or e}") from None
        if actual != digest:
            message = (f"{file} has sha256 {actual[:12]}…, but {CONFIG_NAME} records {digest[:12]}…: the file "
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
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise ArtifactError(f"{path / PLAN_FILE} or {SCALES_FILE} is not a readable safetensors file "
                            f"({_short(e, 200)})") from None
    try:
        plan = CompressionPlan.from_json_and_tensors(config["plan"], tensors)
    except (ValueError, KeyError, TypeError, AttributeError, IndexError, OverflowError, RecursionError,
            NotImplementedError, RuntimeError) as e:  # a malformed "plan" entry, in whatever way it fails
        raise ArtifactError(f"{config_path} 'plan' or {path / PLAN_FILE}: {_short(e, 300)} ({type(e).__name__}); "
                            "the artifact is damaged or edited: download or save it again") from None
    if plan.model_class and plan.model_class != config["transformer"]["class_name"]:
        raise ArtifactError(f"{config_path}: the plan is for a {_short(plan.model_class)} but the transformer is a "
                            f"{config['transformer']['class_name']}")
    return Artifact(path, config, plan, scales, problems, schema_version=written)


#: the dtypes an artifact's transformer may record (loading restores it)
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
#: JSON types each top-level entry may hold (NoneType: null); checked before anything reads them
FIELD_TYPES = {"package_version": (str,), "base_model": (dict, type(None)), "transformer": (dict,), "plan": (dict,),
               "files": (dict,), "prompt_encoder": (dict, type(None)),
               "reproducibility": (dict, type(None))}


def check_fields(config: dict, where: Path) -> None:
    """Refuse entries of the wrong JSON type, before code that trusts them (``.get`` on a list, ``int`` of a huge or
    infinite number) fails with something other than `ArtifactError`."""
    def refuse(key, value, expected):
        raise ArtifactError(f"{where}: {key} must be {expected}, got {_short(value)}; the file is damaged or edited: "
                            "download or save the artifact again")

    for key, types in FIELD_TYPES.items():
        if key in config and (not isinstance(config[key], types) or isinstance(config[key], bool)):
            refuse(key, config[key], " or ".join("null" if t is type(None) else t.__name__ for t in types))
    transformer = config["transformer"]
    name = transformer.get("class_name")
    if not isinstance(name, str) or name not in adapter_names():
        raise ArtifactError(f"{where}: transformer class {_short(name)} is not one ditfa_optimum supports "
                            f"({adapter_names()}); the artifact is from a newer version or not a ditfa artifact")
    if not isinstance(transformer.get("fingerprint"), dict):
        refuse("transformer.fingerprint", transformer.get("fingerprint"), "an object")
    if not isinstance(transformer["fingerprint"].get("config"), dict):
        refuse("transformer.fingerprint.config", transformer["fingerprint"].get("config"), "an object")
    for key in ("id", "revision"):
        value = (config["base_model"] or {}).get(key)
        if not isinstance(value, (str, type(None))):
            refuse(f"base_model.{key}", value, "a string or null")
    if transformer.get("weights") not in WEIGHT_MODES:
        refuse("transformer.weights", transformer.get("weights"), f"one of {WEIGHT_MODES}")
    if transformer.get("dtype") not in (None, *DTYPES):
        refuse("transformer.dtype", transformer.get("dtype"), f"null or one of {sorted(DTYPES)}")
    linears = transformer.get("linears")
    if linears is not None and not (
            isinstance(linears, dict) and linears.get("quantization") in fp8_linears.QUANTIZATIONS
            and isinstance(linears.get("modules"), list) and 0 < len(linears["modules"]) <= 1 << 16
            and all(isinstance(m, str) and 0 < len(m) <= 256 for m in linears["modules"])
            and len(set(linears["modules"])) == len(linears["modules"])):
        refuse("transformer.linears", linears,
               f'null or {{"quantization": one of {list(fp8_linears.QUANTIZATIONS)}, "modules": [distinct names]}}')
    if linears is not None and transformer["weights"] == "included":
        refuse("transformer.linears", linears, "null with weights 'included' (FP8 weights refer to a base model)")
    if linears is not None and transformer.get("dtype") != "bfloat16":
        refuse("transformer.dtype", transformer.get("dtype"), "bfloat16 with FP8 linear layers")
    pinned = (config["base_model"] or {}).get("files", {})
    if not isinstance(pinned, dict) or not all(
            isinstance(k, str) and k.startswith(f"{TRANSFORMER_DIR}/") and k.count("/") == 1
            and isinstance(v, str) and _DIGEST.fullmatch(v) for k, v in pinned.items()):
        refuse("base_model.files", pinned, 'an object of "transformer/<file name>": sha256 digest')
    if transformer["weights"] != "included" and not pinned:
        refuse("base_model.files", pinned, f"the base's transformer files (weights {transformer['weights']!r})")
    if not isinstance(config["plan"].get("metadata"), (dict, type(None))):
        refuse("plan.metadata", config["plan"].get("metadata"), "an object")
    encoder = config.get("prompt_encoder")
    if encoder:
        tokens, scale = encoder.get("text_tokens"), encoder.get("scale", 1.0)
        if not isinstance(encoder.get("name"), str):
            refuse("prompt_encoder.name", encoder.get("name"), "a string")
        if not isinstance(tokens, int) or isinstance(tokens, bool) or not 0 < tokens <= 1 << 16:
            refuse("prompt_encoder.text_tokens", tokens, "an integer in [1, 65536]")
        if not isinstance(scale, (int, float)) or isinstance(scale, bool) or not -1e6 <= scale <= 1e6:  # NaN too
            refuse("prompt_encoder.scale", scale, "a number in [-1e6, 1e6]")


#: what diffusers reads as the transformer's weights: one file, or an index and its shards
WEIGHTS_NAMES = (f"{TRANSFORMER_DIR}/diffusion_pytorch_model.safetensors",
                 f"{TRANSFORMER_DIR}/diffusion_pytorch_model.safetensors.index.json")
_DIGEST = re.compile(r"[0-9a-f]{64}")


def check_files(path: Path, files: dict, where: Path, mode: str = "included", linears: bool = False) -> None:
    """Make sure loading reads only listed, checksummed files that lie inside the artifact.

    Refuses: names that are not plain relative paths inside the artifact, or not sha256 digests; symbolic links
    (except those of a Hugging Face cache snapshot into its ``blobs/``); unlisted files under ``transformer/`` or
    unlisted files ditfa reads (``reproducibility.safetensors``, ``transformer_delta.safetensors``); a config that does
    not list the plan, the scales and the weights its ``mode`` needs (`WEIGHT_MODES`); listed files that are missing.
    """
    for name, digest in files.items():
        parts = name.split("/")
        if not name or name.startswith("/") or "\\" in name or "\0" in name or ".." in parts or "" in parts:
            raise ArtifactError(f"{where} lists a file outside the artifact: {_short(name)}")
        if len(name) > 1024 or any(len(part.encode()) > 255 for part in parts):
            raise ArtifactError(f"{where} lists a file name too long to be one of an artifact's: {_short(name)}")
        if not isinstance(digest, str) or not _DIGEST.fullmatch(digest):
            raise ArtifactError(f"{where}: files[{_short(name)}] must be a sha256 digest (64 hex digits), got "
                                f"{_short(digest)}; the file is damaged or edited: download or save the artifact again")
    required = [PLAN_FILE, SCALES_FILE]
    required += {"included": [f"{TRANSFORMER_DIR}/config.json"], "base+delta": [DELTA_FILE], "base": []}[mode]
    required += [LINEARS_FILE] if linears else []
    for name in required:
        if name not in files:
            raise ArtifactError(f"{where} does not list {name}; the artifact is incomplete")
    if mode == "included" and not any(name in files for name in WEIGHTS_NAMES):
        raise ArtifactError(f"{where} lists no transformer weights ({' or '.join(WEIGHTS_NAMES)}), so no checksum "
                            "would cover them; the artifact is incomplete or edited: download or save it again")

    try:
        root = path.resolve()
        blobs = _hf_cache_blobs(root)
        for folder, dirs, names in os.walk(root):  # does not enter linked directories
            for entry in dirs + names:
                file = Path(folder) / entry
                if file.is_symlink() and (blobs is None or not _inside(file.resolve(), blobs)):
                    raise ArtifactError(f"{path / file.relative_to(root)} is a symbolic link (to "
                                        f"{_short(os.readlink(file))}); an artifact holds regular files only, a link "
                                        "could point anywhere: replace it with a copy of the file (cp -L), or save "
                                        "the artifact again")
            inside_weights = _inside(Path(folder), root / TRANSFORMER_DIR)
            for entry in names:
                name = (Path(folder) / entry).relative_to(root).as_posix()
                if (inside_weights or name in (REPRO_FILE, DELTA_FILE, LINEARS_FILE)) and name not in files:
                    raise ArtifactError(f"{path / name} is not listed in {where.name} 'files', so no checksum covers "
                                        "it, yet loading would read it (diffusers prefers a sharded index over the "
                                        "listed weights): remove it, or save the artifact again")
        for name in files:
            file = path / name
            if not _inside(file.resolve(), blobs if file.is_symlink() else root):
                raise ArtifactError(f"{where} lists {_short(name)}, which resolves outside the artifact")
            if not file.is_file():
                raise ArtifactError(f"{file} is missing; the artifact is incomplete (re-download it, or save it "
                                    "again)")
    except (OSError, RuntimeError) as e:  # unreadable entries; RuntimeError: a symlink loop (Python < 3.13)
        raise ArtifactError(f"cannot check the files of {path}: {_short(e, 200)}") from None


def _inside(path: Path, root: Path | None) -> bool:
    return root is not None and (path == root or root in path.parents)


def _hf_cache_blobs(snapshot: Path) -> Path | None:
    """``<repo>/blobs`` when ``snapshot`` is a Hugging Face cache snapshot (``<repo>/snapshots/<commit>``), whose
    files are links there; else None."""
    repo = snapshot.parents[1] if len(snapshot.parents) > 1 else None
    if repo is None or snapshot.parent.name != "snapshots" or not (repo / "blobs").is_dir():
        return None
    return repo / "blobs"
