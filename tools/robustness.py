"""Robustness check: mutation-fuzz an artifact, and feed the CLI bad input; every input is refused clearly or accepted.

Two parts, both on the tiny random-weight SD3 model (CPU, offline, seconds each):

* **fuzz** writes a small artifact (`DiTFastAttnOptimizer.save_pretrained` of a hand-made plan with a reproducibility
  record), then for ``--minutes`` applies one random mutation at a time to a fresh copy: structured JSON mutations of
  ``ditfa_config.json`` (any entry: wrong types, huge / negative / NaN numbers, long or odd strings, deep nesting,
  missing, extra and renamed keys) and of ``transformer/config.json``; text and byte damage; safetensors header and
  tensor mutations of the plan, scales, reproducibility and weight files (with the checksum recorded again half of
  the time, as someone editing an artifact on purpose would); deleted, added, renamed and replaced files, symbolic
  links, an added sharded-weights index. Each mutated artifact goes through ``read_artifact`` and, when it is
  accepted there, through what uses it: the recorded prompt encoder, ``load_pipeline``, ``ditfa-optimum inspect
  --png``, a generation at the recorded settings (when they are small), and ``verify`` for mutations of the
  reproducibility record.
* **cli** runs ``ditfa-optimum`` over a list of bad (and a few edge-but-valid) inputs across the subcommands.

Each input is classified:

* **refused clearly**: `ArtifactError`, or a ``ValueError`` raised by ditfa_optimum's own code (a message naming the
  problem); for the CLI a non-zero exit with an error message and no traceback;
* **other exception**: anything else (type, message and where it was raised are recorded): a bug to fix;
* **accepted**: everything ran. For the fuzzer the observable result is compared with the unmutated artifact's
  (plan, weights, prompt encoder, generation settings, reproducibility record, ``inspect`` output): *harmless* when
  nothing used changed (the mutated entry is not read, or not trusted), else *changed* with what changed. For the CLI
  each input says whether accepting it is expected (a valid edge value).

Usage::

    python tools/robustness.py --minutes 4 --seed 0 --out robustness.json   # both parts, markdown tables
    python tools/robustness.py --part cli --cli-mode subprocess              # the CLI as users run it
    python tools/robustness.py --replay 123 --seed 0                         # one fuzz case, with its traceback

Exit status: 0 when no input ended in "other exception", else 1.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import datetime
import io
import json
import math
import os
import random
import shutil
import signal
import struct
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # a mutated base-model id must never reach the network (see offline)

import torch  # noqa: E402

import ditfa_optimum  # noqa: E402

PACKAGE = str(Path(ditfa_optimum.__file__).resolve().parent)  # frames here are ditfa_optimum's own code
CONFIG = "ditfa_config.json"
WEIGHTS = "transformer/diffusion_pytorch_model.safetensors"
INDEX = "transformer/diffusion_pytorch_model.safetensors.index.json"
CASE_SECONDS = 60  # one fuzz case or CLI call longer than this counts as a hang ("other exception")
PROMPT = "a red cube"


class Refused(Exception):
    """A CLI stage exited 1 with its one-line error (a clear refusal)."""


class CaseTimeout(BaseException):
    """Raised by the alarm when one input takes longer than ``CASE_SECONDS``."""


@contextlib.contextmanager
def time_limit(seconds: int):
    if not hasattr(signal, "SIGALRM"):  # pragma: no cover - Windows
        yield
        return

    def ring(signum, frame):
        raise CaseTimeout(f"no result after {seconds} s")

    old = signal.signal(signal.SIGALRM, ring)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)


@contextlib.contextmanager
def offline():
    """Hugging Face Hub access off (also where huggingface_hub was imported before ``HF_HUB_OFFLINE`` was set): a
    mutated base-model or artifact id must fail at once, not wait on the network."""
    from huggingface_hub import constants

    old_env, old_constant = os.environ.get("HF_HUB_OFFLINE"), constants.HF_HUB_OFFLINE
    os.environ["HF_HUB_OFFLINE"], constants.HF_HUB_OFFLINE = "1", True
    try:
        yield
    finally:
        constants.HF_HUB_OFFLINE = old_constant
        if old_env is None:
            os.environ.pop("HF_HUB_OFFLINE", None)
        else:
            os.environ["HF_HUB_OFFLINE"] = old_env


# ==================================================================================================== classification
def where(exc: BaseException) -> str:
    """``file:line in function`` of the innermost frame, and of the innermost ditfa_optimum frame when different."""
    frames = traceback.extract_tb(exc.__traceback__)
    if not frames:
        return "?"

    def show(f):
        name = f.filename
        for root in (PACKAGE, str(Path(PACKAGE).parent)):
            if name.startswith(root):
                name = "ditfa_optimum" + name[len(PACKAGE):] if root == PACKAGE else name[len(root) + 1:]
                break
        else:
            name = "/".join(Path(name).parts[-2:])
        return f"{name}:{f.lineno} in {f.name}"

    inner = frames[-1]
    ours = [f for f in frames if f.filename.startswith(PACKAGE)]
    text = show(inner)
    if ours and ours[-1] is not inner:
        text += f" (from {show(ours[-1])})"
    return text


def raised_by_us(exc: BaseException) -> bool:
    frames = traceback.extract_tb(exc.__traceback__)
    return bool(frames) and frames[-1].filename.startswith(PACKAGE)


def classify_exception(exc: BaseException) -> str:
    from ditfa_optimum.serialization import ArtifactError

    if isinstance(exc, (ArtifactError, Refused)) and str(exc).strip():
        return "refused"
    if type(exc) is ValueError and raised_by_us(exc) and str(exc).strip():
        return "refused"
    return "other"


def short(text, limit: int = 240) -> str:
    text = str(text).replace("\n", " | ")
    return text if len(text) <= limit else text[:limit] + f"... ({len(text)} chars)"


# ==================================================================================================== the artifact
def build_artifact(directory: Path) -> Path:
    """A small but complete artifact: a tiny SD3 transformer, a plan mixing arrow / cache / cfg_share heads and a
    block-level entry, the search record the CLI reads, the tiny prompt encoder and one reproducibility image."""
    from ditfa_optimum import DiTFastAttnConfig, DiTFastAttnOptimizer
    from ditfa_optimum.apply import uniform_plan
    from ditfa_optimum.tiny import TinyPromptEncoder, tiny_pipeline

    pipe = tiny_pipeline("sd3")
    steps = 4
    plan = uniform_plan(pipe.transformer, num_steps=steps, method="arrow:1/2", block_size=16)
    names = plan.module_names
    plan.set(names[0], 1, 0, "cfg_share")
    plan.set(names[1], 2, 1, "cache")
    plan.set(names[2], 3, 2, "arrow:1/4")
    with contextlib.suppress(ValueError, AttributeError, KeyError):
        plan.set_block(plan.block_names[3], 2, "block_cache")
    config = DiTFastAttnConfig(num_inference_steps=steps, height=64, width=64, guidance_scale=5.0, block_size=16,
                               num_prompts=1)
    plan.metadata["search"] = {"config": config.to_dict(), "image_tokens": 64, "text_tokens": 16, "cfg": True,
                               "prompts": [PROMPT], "num_prompts": 1, "flop_cut": 0.3,
                               "predicted_rse": {n: [0.0] + [0.01] * (steps - 1) for n in names},
                               "calibration_seconds": 1.0, "search_seconds": 0.1}
    opt = DiTFastAttnOptimizer(pipe, prompt_encoder=TinyPromptEncoder(pipe.transformer), source="tiny-sd3")
    opt.plan = plan
    with contextlib.redirect_stderr(io.StringIO()):
        return opt.save_pretrained(directory, reproducibility_prompts=1)


def sha256(path: Path) -> str:
    from ditfa_optimum.serialization import sha256 as digest

    return digest(path)


def load_config(path: Path) -> dict:
    return json.loads((path / CONFIG).read_text())


def save_config(path: Path, config: dict) -> None:
    (path / CONFIG).write_text(json.dumps(config))  # allow_nan: NaN and Infinity as Python's json writes them


def relist(path: Path, *names: str) -> None:
    """Record the current sha256 of ``names`` (an edit made on purpose: the checksums agree)."""
    config = load_config(path)
    files = config.get("files")
    if isinstance(files, dict):
        for name in names:
            if (path / name).is_file() and not (path / name).is_symlink():
                files[name] = sha256(path / name)
        save_config(path, config)


# ==================================================================================================== mutations
def hostile_values(rng: random.Random, original):
    """A value to put where ``original`` was: wrong types, extreme numbers, odd strings, deep nesting."""
    pool = [
        None, True, False, 0, -1, 1, 2, 3, 7, 2 ** 31, 2 ** 63, -2 ** 63, 10 ** 30, -10 ** 30, 10 ** 400,
        1e308, -1e308, 1e-320, float("nan"), float("inf"), float("-inf"), 0.5, -0.0, 1.5,
        "", " ", "x" * 100_000, "../../etc/passwd", "/etc/passwd", "a\u0000b", "\ud800", "é" * 50, "0" * 64, "f" * 64,
        "full", "arrow:1/0", "arrow:1e999", "cache", "cuda", "meta", "load", "tiny", "float16", "nan", "1e999",
        "SD3Transformer2DModel", "FluxTransformer2DModel", "transformer/config.json", "stabilityai/none",
        [], {}, [1, 2, 3], ["a"], [None], [[[[]]]], {"a": 1}, {"": None}, list(range(10_000)),
        {"__class__": "x"}, deep_list(500), deep_dict(500),
    ]
    if isinstance(original, bool):
        pool += [not original, int(original), str(original).lower()]
    elif isinstance(original, int):
        pool += [original + 1, original - 1, -original, original * 10 ** 6, str(original), float(original),
                 original + 0.5, [original]]
    elif isinstance(original, float):
        pool += [original * 2, -original, original * 1e300, str(original), int(original)]
    elif isinstance(original, str):
        pool += [original.upper(), original * 1000, original[:-1], original + "x", [original], original.encode(
            "unicode_escape").decode() + "\\", {"name": original}]
    elif isinstance(original, list):
        pool += [original[:-1], original + original[-1:] if original else [0], original[::-1], original * 100,
                 {str(i): v for i, v in enumerate(original)}, original[0] if original else None]
    elif isinstance(original, dict):
        pool += [list(original), list(original.values()), {k: None for k in original}, {**original, "extra": 1}]
    return rng.choice(pool)


def deep_list(n: int):
    value: list = []
    for _ in range(n):
        value = [value]
    return value


def deep_dict(n: int):
    value: dict = {}
    for _ in range(n):
        value = {"a": value}
    return value


def paths(node, prefix=(), limit_list: int = 4):
    """Every (path, value) in a JSON tree (long lists: their first ``limit_list`` items)."""
    yield prefix, node
    if isinstance(node, dict):
        for k, v in node.items():
            yield from paths(v, prefix + (k,), limit_list)
    elif isinstance(node, list):
        for i, v in enumerate(node[:limit_list]):
            yield from paths(v, prefix + (i,), limit_list)


def name_of(path) -> str:
    return ".".join(str(p) for p in path) or "<root>"


def mutate_json(rng: random.Random, doc, weight_top: float = 0.5):
    """One structural mutation of a parsed JSON document; returns (new document, description)."""
    doc = copy.deepcopy(doc)
    every = [p for p, _ in paths(doc) if p]
    shallow = [p for p in every if len(p) <= 2]
    path = rng.choice(shallow if shallow and rng.random() < weight_top else every)
    parent = doc
    for key in path[:-1]:
        parent = parent[key]
    key = path[-1]
    action = rng.choice(["replace", "replace", "replace", "remove", "rename", "add", "tweak"])
    if isinstance(parent, list) and action in ("rename", "add"):
        action = "replace"
    if action == "replace":
        parent[key] = value = hostile_values(rng, parent[key])
        return doc, f"{name_of(path)} = {short(repr(value), 60)}"
    if action == "tweak":  # a plausible edit: a nearby value of the same type
        old = parent[key]
        if isinstance(old, bool):
            parent[key] = not old
        elif isinstance(old, (int, float)):
            parent[key] = rng.choice([old + 1, old - 1, old * 2, -old, 0, old / 3])
        elif isinstance(old, str):
            parent[key] = rng.choice([old + "x", old[:-1], old.upper(), ""])
        elif isinstance(old, list) and old:
            parent[key] = old[:-1]
        elif isinstance(old, dict) and old:
            parent[key] = {k: v for k, v in list(old.items())[:-1]}
        else:
            parent[key] = None
        return doc, f"{name_of(path)}: {short(repr(old), 40)} -> {short(repr(parent[key]), 40)}"
    if action == "remove":
        del parent[key]
        return doc, f"remove {name_of(path)}"
    if action == "rename":
        new = rng.choice(["", "x" * 300, str(key).upper(), f"{key}_", "../" + str(key), "\u0000", "é"])
        parent[new] = parent.pop(key)
        return doc, f"rename {name_of(path)} -> {short(repr(new), 40)}"
    target = parent[key] if isinstance(parent[key], dict) else parent
    extra = rng.choice(["extra", "__proto__", "x" * 300, "files", "plan", "schema_version", "format_version"])
    target[extra] = hostile_values(rng, None)
    return doc, f"add {extra[:20]!r} to {name_of(path if target is not parent else path[:-1])}"


def mutate_text(rng: random.Random, data: bytes) -> tuple[bytes, str]:
    """Byte-level damage of a file."""
    op = rng.choice(["truncate", "flip", "insert", "empty", "garbage-tail", "zero-range", "duplicate"])
    if op == "truncate":
        n = rng.randrange(len(data) + 1)
        return data[:n], f"truncated to {n} of {len(data)} bytes"
    if op == "flip":
        out = bytearray(data)
        count = rng.choice([1, 1, 2, 8])
        for _ in range(count):
            if out:
                i = rng.randrange(len(out))
                out[i] ^= 1 << rng.randrange(8)
        return bytes(out), f"{count} bit(s) flipped"
    if op == "insert":
        i = rng.randrange(len(data) + 1)
        junk = rng.choice([b"\xff\xfe", b"\x00", b"{", b"]", b'"', b"\xef\xbb\xbf", b"NaN", b"1e999"])
        return data[:i] + junk + data[i:], f"{junk!r} inserted at byte {i}"
    if op == "empty":
        return b"", "emptied"
    if op == "garbage-tail":
        return data + os.urandom(rng.randrange(1, 64)), "random bytes appended"
    if op == "zero-range":
        i = rng.randrange(len(data) + 1)
        n = rng.randrange(1, 64)
        return data[:i] + bytes(min(n, len(data) - i)) + data[i + n:], f"{n} bytes zeroed at {i}"
    return data + data, "content doubled"


CONFIG_TEXTS = [b"", b"null", b"[]", b"{}", b"1", b'"x"', b"[" * 100_000 + b"]" * 100_000, b"1" * 10_000,
                b"\xef\xbb\xbf{}", '{"a": 1}'.encode("utf-16"), b'{"schema_version": 2, "files": {}}',
                b'{"format_version": 1, "files": {}}', b'{"schema_version": 99, "files": {}}',
                b'{"schema_version": NaN, "files": {}}', b"\xff" * 10]


def safetensors_split(data: bytes) -> tuple[dict, bytes]:
    (n,) = struct.unpack("<Q", data[:8])
    return json.loads(data[8:8 + n]), data[8 + n:]


def safetensors_join(header: dict, body: bytes) -> bytes:
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    return struct.pack("<Q", len(raw)) + raw + body


def mutate_safetensors_header(rng: random.Random, data: bytes) -> tuple[bytes, str]:
    header, body = safetensors_split(data)
    tensors = [k for k in header if k != "__metadata__"]
    op = rng.choice(["dtype", "shape", "offsets", "rename", "remove", "add", "metadata", "length"] if tensors else
                    ["add", "metadata", "length"])
    if op == "length":
        n = rng.choice([0, 1, 7, 2 ** 63, 2 ** 40, len(data)])
        return struct.pack("<Q", n) + data[8:], f"header length field = {n}"
    if op == "metadata":
        header["__metadata__"] = rng.choice([None, [], {"format": 1}, {"format": "np"}, "x", {"a": {"b": 1}}])
        return safetensors_join(header, body), f"__metadata__ = {header['__metadata__']!r}"
    if op == "add":
        name = rng.choice(["extra", "transformer_blocks.0.attn.method", "x" * 300, ""])
        header[name] = {"dtype": "I16", "shape": [1], "data_offsets": [0, 2]}
        return safetensors_join(header, body), f"tensor {name[:30]!r} added (aliasing bytes 0-2)"
    key = rng.choice(tensors)
    entry = header[key]
    if op == "dtype":
        entry["dtype"] = rng.choice(["F16", "BF16", "F32", "F64", "I8", "U8", "I32", "I64", "BOOL", "F8_E4M3", "XX"])
        what = f"{key} dtype -> {entry['dtype']}"
    elif op == "shape":
        old = entry["shape"]
        entry["shape"] = rng.choice([[], [0], [-1], [10 ** 12], old[::-1], old + [1], old[:1], [1] + old,
                                     [x * 2 for x in old]])
        what = f"{key} shape {old} -> {entry['shape']}"
    elif op == "offsets":
        a, b = entry["data_offsets"]
        entry["data_offsets"] = rng.choice([[b, a], [a, b + 2], [a - 2, b - 2], [0, 0], [-1, b], [a, 2 ** 62]])
        what = f"{key} data_offsets [{a}, {b}] -> {entry['data_offsets']}"
    elif op == "rename":
        new = rng.choice([key + "x", key.replace(".method", ".param"), key.upper(), "", key.replace("0", "9")])
        header[new] = header.pop(key)
        what = f"tensor {key} renamed {new!r}"
    else:
        del header[key]
        what = f"tensor {key} removed from the header"
    return safetensors_join(header, body), what


def mutate_tensors(rng: random.Random, tensors: dict) -> tuple[dict, str]:
    """A tensor-level edit that still makes a valid safetensors file."""
    tensors = dict(tensors)
    if not tensors or rng.random() < 0.1:
        name = rng.choice(["extra", "transformer_blocks.9.attn.method", "image_9", "scale"])
        tensors[name] = rng.choice([torch.ones(3), torch.zeros(4, 4, dtype=torch.int16), torch.tensor([])])
        return tensors, f"tensor {name} added"
    key = rng.choice(sorted(tensors))
    t = tensors[key]
    op = rng.choice(["values", "values", "dtype", "shape", "remove", "rename"])
    if op == "values":
        t = t.clone()
        flat = t.view(-1)
        if flat.numel():
            i = rng.randrange(flat.numel())
            if t.is_floating_point():
                value = rng.choice([float("nan"), float("inf"), -1.0, 0.0, 2.0, 1e-300, 1e300, 0.25, 1 / 3])
            else:
                value = rng.choice([-1, 0, 1, 2, 3, 4, 5, 6, 9, 31, 127, 32767, -32768])
            flat[i] = value if not t.is_floating_point() or t.dtype == torch.float64 else min(
                max(value, -3e38), 3e38) if math.isfinite(value) else value
            if rng.random() < 0.3:
                flat[:] = flat[i]
            what = f"{key}[{i}] = {value}" + (" (all)" if flat.eq(flat[i]).all() and flat.numel() > 1 else "")
        else:
            what = f"{key} (empty) unchanged"
        tensors[key] = t
    elif op == "dtype":
        dtype = rng.choice([torch.float32, torch.float16, torch.int64, torch.int8, torch.uint8, torch.bool,
                            torch.bfloat16, torch.int32])
        tensors[key] = t.to(dtype)
        what = f"{key} dtype {t.dtype} -> {dtype}"
    elif op == "shape":
        options = [t.reshape(-1), t[:-1] if t.dim() and t.shape[0] > 1 else t[:0], torch.cat([t, t[:1]]) if t.dim()
                   else t.reshape(1), t.unsqueeze(0), t.t().contiguous() if t.dim() == 2 else t.reshape(1, -1),
                   t[..., :-1].contiguous() if t.dim() and t.shape[-1] > 1 else t.reshape(-1)[:0]]
        new = rng.choice(options).contiguous()
        tensors[key] = new
        what = f"{key} shape {list(t.shape)} -> {list(new.shape)}"
    elif op == "remove":
        del tensors[key]
        what = f"tensor {key} removed"
    else:
        new = rng.choice([key + "x", key.replace(".method", ".param"), key.replace("0", "9"), key.upper()])
        tensors[new] = tensors.pop(key)
        what = f"tensor {key} renamed {new}"
    return tensors, what


def listed_files(path: Path) -> list[str]:
    files = load_config(path).get("files", {})
    return sorted(files) if isinstance(files, dict) else []


# --------------------------------------------------------------------------------------------- the mutators
def m_config_json(rng, art, ctx):
    doc, what = mutate_json(rng, load_config(art))
    save_config(art, doc)
    return "ditfa_config.json", "json", what


def m_config_focused(rng, art, ctx):
    """A mutation inside the parts code reads most: plan, files, transformer, prompt encoder, reproducibility."""
    config = load_config(art)
    keys = [k for k in ("plan", "files", "transformer", "prompt_encoder", "reproducibility", "base_model")
            if isinstance(config.get(k), (dict, list)) and config.get(k)]
    key = rng.choice(keys)
    sub, what = mutate_json(rng, {key: config[key]}, weight_top=0.2)
    config.pop(key)
    config.update(sub)  # the entry mutated, renamed or removed
    save_config(art, config)
    return "ditfa_config.json", "json", what


def m_config_text(rng, art, ctx):
    file = art / CONFIG
    if rng.random() < 0.4:
        data = rng.choice(CONFIG_TEXTS)
        what = f"replaced by {short(repr(data), 40)}"
    else:
        data, what = mutate_text(rng, file.read_bytes())
    file.write_bytes(data)
    return "ditfa_config.json", "bytes", what


def m_files_entry(rng, art, ctx):
    config = load_config(art)
    files = config["files"]
    name = rng.choice(sorted(files))
    op = rng.choice(["digest", "digest", "point-elsewhere", "add", "dir", "dup-case"])
    if op == "digest":
        files[name] = rng.choice([files[name].upper(), files[name][:-1], "0" * 64, "", None, 5, files[name] + "0",
                                  sha256(art / CONFIG)])
        what = f"files[{name}] = {short(repr(files[name]), 20)}"
    elif op == "point-elsewhere":
        new = rng.choice(["../" + name, "/etc/passwd", name + "/", "./" + name, name.upper(), "transformer",
                          "transformer//config.json", "a\\b", "x" * 300, "ditfa_config.json"])
        files[new] = files.pop(name)
        what = f"files entry {name} renamed {short(new, 30)}"
    elif op == "add":
        new = rng.choice(["plan.png", "extra.bin", "transformer/extra.safetensors", "sub/dir/file", INDEX])
        files[new] = files[name]
        what = f"files lists {new} (absent) with {name}'s digest"
    elif op == "dir":
        files["transformer"] = "0" * 64
        what = "files lists the directory transformer"
    else:
        files[name.upper()] = files[name]
        what = f"files lists {name.upper()} too"
    save_config(art, config)
    return "ditfa_config.json", "files", what


def m_transformer_config(rng, art, ctx):
    file = art / "transformer" / "config.json"
    doc, what = mutate_json(rng, json.loads(file.read_text()), weight_top=1.0)
    file.write_text(json.dumps(doc))
    relisted = rng.random() < 0.8
    if relisted:
        relist(art, "transformer/config.json")
    return "transformer/config.json", "json", what + (" (relisted)" if relisted else "")


def m_safetensors(rng, art, ctx):
    name = rng.choice(["plan.safetensors"] * 4 + ["scales.safetensors", "reproducibility.safetensors", WEIGHTS])
    file = art / name
    op = rng.choice(["tensors", "tensors", "tensors", "header", "bytes"])
    if op == "tensors":
        from safetensors.torch import load_file, save_file

        tensors, what = mutate_tensors(rng, {k: v.clone() for k, v in load_file(file).items()})
        save_file(tensors, file, metadata={"format": "pt"})
    elif op == "header":
        data, what = mutate_safetensors_header(rng, file.read_bytes())
        file.write_bytes(data)
    else:
        data, what = mutate_text(rng, file.read_bytes())
        file.write_bytes(data)
    relisted = rng.random() < 0.6
    if relisted:
        relist(art, name)
    return name, op, what + (" (relisted)" if relisted else "")


def m_filesystem(rng, art, ctx):
    outside = ctx["outside"]
    listed = [n for n in listed_files(art)]
    op = rng.choice(["delete", "delete-dir", "add-top", "add-transformer", "index", "rename", "symlink-copy",
                     "symlink-out", "symlink-dangling", "symlink-loop", "symlink-dir", "file-to-dir", "dir-to-file",
                     "empty", "fifo", "config-symlink"])
    name = rng.choice(listed) if listed else "plan.safetensors"
    file = art / name
    what = op
    if op == "delete":
        file.unlink()
        what = f"{name} deleted"
    elif op == "delete-dir":
        shutil.rmtree(art / "transformer")
        what = "transformer/ deleted"
    elif op == "add-top":
        new = rng.choice(["plan.png", ".gitattributes", "notes.txt", "plan.json", "pytorch_model.bin", "x" * 200])
        (art / new).write_bytes(os.urandom(64))
        what = f"unlisted top-level file {new[:30]} added"
    elif op == "add-transformer":
        new = rng.choice(["extra.safetensors", "diffusion_pytorch_model.bin", "config.json.bak",
                          "diffusion_pytorch_model.fp16.safetensors"])
        shutil.copyfile(art / WEIGHTS, art / "transformer" / new)
        relisted = rng.random() < 0.5
        if relisted:
            relist(art, f"transformer/{new}")
        what = f"transformer/{new} added" + (" (listed)" if relisted else "")
    elif op == "index":
        from safetensors.torch import load_file, save_file

        tensors = load_file(art / WEIGHTS)
        evil = {k: torch.zeros_like(v) for k, v in tensors.items()}
        save_file(evil, art / "transformer" / "evil.safetensors", metadata={"format": "pt"})
        (art / INDEX).write_text(json.dumps({"metadata": {}, "weight_map": dict.fromkeys(evil, "evil.safetensors")}))
        listed_too = rng.random() < 0.5
        if listed_too:
            relist(art, INDEX, "transformer/evil.safetensors")
        what = "sharded index + zeroed shard added" + (" (both listed)" if listed_too else "")
    elif op == "rename":
        new = rng.choice([name + ".bak", name.upper(), "moved/" + Path(name).name])
        (art / new).parent.mkdir(parents=True, exist_ok=True)
        file.rename(art / new)
        what = f"{name} renamed {new}"
    elif op == "symlink-copy":
        copy_ = outside / f"copy-{rng.randrange(10 ** 9)}"
        shutil.copyfile(file, copy_)
        file.unlink()
        file.symlink_to(copy_)
        what = f"{name} replaced by a link to an identical copy outside"
    elif op == "symlink-out":
        file.unlink()
        file.symlink_to("/etc/hostname" if Path("/etc/hostname").exists() else "/etc/passwd")
        what = f"{name} replaced by a link to a system file"
    elif op == "symlink-dangling":
        file.unlink()
        file.symlink_to(art / "no-such-file")
        what = f"{name} replaced by a dangling link"
    elif op == "symlink-loop":
        file.unlink()
        file.symlink_to(file.name)
        what = f"{name} replaced by a link to itself"
    elif op == "symlink-dir":
        moved = outside / f"transformer-{rng.randrange(10 ** 9)}"
        shutil.move(art / "transformer", moved)
        (art / "transformer").symlink_to(moved, target_is_directory=True)
        what = "transformer/ replaced by a link to an identical copy outside"
    elif op == "file-to-dir":
        file.unlink()
        file.mkdir()
        what = f"{name} replaced by a directory"
    elif op == "dir-to-file":
        shutil.rmtree(art / "transformer")
        (art / "transformer").write_bytes(b"x")
        what = "transformer/ replaced by a file"
    elif op == "empty":
        file.write_bytes(b"")
        relisted = rng.random() < 0.5
        if relisted:
            relist(art, name)
        what = f"{name} emptied" + (" (relisted)" if relisted else "")
    elif op == "fifo":
        file.unlink()
        os.mkfifo(file)
        what = f"{name} replaced by a named pipe"
    else:
        moved = outside / f"config-{rng.randrange(10 ** 9)}.json"
        shutil.copyfile(art / CONFIG, moved)
        (art / CONFIG).unlink()
        (art / CONFIG).symlink_to(moved)
        what = "ditfa_config.json replaced by a link to an identical copy outside"
    label = {"delete-dir": "transformer/", "add-transformer": "transformer/", "index": "transformer/",
             "symlink-dir": "transformer/", "dir-to-file": "transformer/", "add-top": "(new file)",
             "config-symlink": CONFIG}.get(op, name)
    return label, "filesystem", what


def m_path(rng, art, ctx):
    """The artifact argument itself: a file, nothing, a Hub-like id, a huge or odd name."""
    choice = rng.choice(["file", "missing", "hub-id", "long", "nul", "parent-link", "trailing-slash", "empty-dir"])
    if choice == "file":
        return "path", "argument", "the path of a file", art / CONFIG
    if choice == "missing":
        return "path", "argument", "a path that does not exist", art / "nope"
    if choice == "hub-id":
        return "path", "argument", "a Hub-like id, offline", "no-such-user/no-such-artifact"
    if choice == "long":
        return "path", "argument", "a 5000-character name", "x" * 5000
    if choice == "nul":
        return "path", "argument", "a name with a NUL byte", str(art) + "\0x"
    if choice == "parent-link":
        link = ctx["outside"] / f"link-{rng.randrange(10 ** 9)}"
        link.symlink_to(art, target_is_directory=True)
        return "path", "argument", "a symbolic link to the artifact directory", link
    if choice == "trailing-slash":
        return "path", "argument", "the path with a trailing slash", str(art) + "/"
    empty = ctx["outside"] / f"empty-{rng.randrange(10 ** 9)}"
    empty.mkdir()
    return "path", "argument", "an empty directory", empty


MUTATORS = [(m_config_json, 5), (m_config_focused, 6), (m_config_text, 1), (m_files_entry, 2),
            (m_transformer_config, 2), (m_safetensors, 5), (m_filesystem, 3), (m_path, 1)]


# ==================================================================================================== evaluation
class Context:
    def __init__(self, workdir: Path):
        from ditfa_optimum.tiny import tiny_pipeline

        self.workdir = workdir
        self.base = build_artifact(workdir / "base")
        self.art = workdir / "case" / "artifact"  # every case uses the same path, so outputs compare
        self.outside = workdir / "outside"
        self.png = workdir / "case-plan.png"
        self.image = workdir / "case-image.png"
        self.pipe = tiny_pipeline("sd3")
        self.fresh()
        self.skip: set[str] = set()  # stages the unmutated artifact fails: left out, and reported
        self.baseline_failures: list[dict] = []
        while True:
            stages, observed = evaluate(self, self.art, verify=lambda observed: True)
            bad = [s for s in stages if s["outcome"] != "ok"]
            if not bad:
                break
            if bad[0]["stage"] == "read_artifact":
                raise RuntimeError(f"the unmutated artifact does not even read: {bad[0]}")
            self.baseline_failures.append(bad[0])
            self.skip.add(bad[0]["stage"])
        self.reference = observed

    def fresh(self) -> None:
        for path in (self.art.parent, self.outside):
            if path.exists():
                make_removable(path)
                shutil.rmtree(path)
        self.outside.mkdir(parents=True)
        shutil.copytree(self.base, self.art, symlinks=True)

    def __getitem__(self, key):
        return getattr(self, key)


def make_removable(path: Path) -> None:
    for p in [path, *path.rglob("*")]:
        with contextlib.suppress(OSError):
            if p.is_fifo():
                p.unlink()


def call_cli(argv: list[str]) -> tuple[int, str, str]:
    """``ditfa-optimum ARGV`` in this process: exit code, stdout, stderr. Exceptions escape (a traceback)."""
    from ditfa_optimum.cli import main

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = main(argv)
        except SystemExit as e:  # argparse usage errors
            code = e.code if isinstance(e.code, int) else 1
    return code, out.getvalue(), err.getvalue()


def settings_of(art) -> dict | None:
    """Steps, size and guidance ``generate`` and ``bench`` would use for this artifact (None where the CLI does not
    expose how it picks them)."""
    from ditfa_optimum import cli

    if not hasattr(cli, "_settings"):
        return None
    args = argparse.Namespace(steps=None, height=None, width=None, guidance=None)
    s = cli._settings(art, args, 0)
    return {"steps": s.num_inference_steps, "height": s.height, "width": s.width, "guidance": s.guidance_scale}


def evaluate(ctx, target, verify) -> tuple[list[dict], dict]:
    """Run ``target`` through each stage; a stage's outcome is ok, refused or other. Stops at the first that is not
    ok. ``verify(observed)`` says whether to run ``verify`` last (it takes longest). Returns the stages and what was
    observed (for comparison with the unmutated artifact)."""
    from safetensors.torch import load_file

    from ditfa_optimum.loading import load_pipeline
    from ditfa_optimum.serialization import read_artifact

    stages, observed, state = [], {}, {}

    def stage(name, fn):
        try:
            with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
                fn()
        except CaseTimeout as e:
            stages.append({"stage": name, "outcome": "other", "type": "Timeout", "message": str(e), "where": ""})
            return False
        except RecursionError as e:
            stages.append({"stage": name, "outcome": "other", "type": "RecursionError", "message": short(e),
                           "where": where(e)})
            return False
        except Exception as e:  # noqa: BLE001 - classifying is the point
            stages.append({"stage": name, "outcome": classify_exception(e), "type": type(e).__name__,
                           "message": short(e), "where": where(e)})
            return False
        stages.append({"stage": name, "outcome": "ok"})
        return True

    def read():
        state["art"] = art = read_artifact(target)
        observed["plan"] = art.plan
        observed["base_model"] = (art.config.get("base_model") or {}).get("id")
        observed["problems"] = list(art.problems)

    def encoder():
        enc = state["art"].prompt_encoder(ctx.pipe)
        observed["prompt_encoder"] = None if enc is None else (enc.text_tokens, enc.scale)

    def load():
        state["pipe"] = pipe = load_pipeline(state["art"], backend="auto")
        observed["weights"] = {k: v.clone() for k, v in pipe.transformer.state_dict().items()}

    def cli_stage(argv):
        code, out, err = call_cli(argv)
        last = (err.strip().splitlines() or [""])[-1]
        if code == 1 and last.startswith("ditfa-optimum: error:"):
            raise Refused(short(last, 300))
        if code != 0:
            raise RuntimeError(f"{argv[0]} exited {code}: {short(err, 300)}")
        return out

    def inspect():
        observed["inspect"] = cli_stage(["inspect", str(target), "--png", str(ctx.png)])

    def generate():
        settings = settings_of(state["art"])
        observed["settings"] = settings
        if settings is None:
            return
        small = settings["steps"] <= 8 and settings["height"] * settings["width"] <= 128 * 128
        tokens = (observed.get("prompt_encoder") or (16,))[0]
        if not small or tokens > 64:
            observed["generated"] = "not run: settings too large for the fuzzer"
            return
        cli_stage(["generate", str(target), PROMPT, "--out", str(ctx.image), "--quiet"])  # as users run it
        from PIL import Image

        with Image.open(ctx.image) as image:
            observed["generated"] = image.tobytes()

    def record():
        art = state["art"]
        record = art.config.get("reproducibility")  # what verify reads of it (check_record and the comparison)
        keys = ("prompts", "seeds", "num_inference_steps", "height", "width", "guidance_scale", "device", "backend",
                "dtype", "torch_version", "num_threads")
        observed["record"] = None if not isinstance(record, dict) else json.dumps(
            {**{k: record.get(k) for k in keys}, "images": [e.get("key") if isinstance(e, dict) else e for e in
                                                            record.get("images")] if isinstance(
                record.get("images"), list) else record.get("images")},
            sort_keys=True, default=str)
        file = art.path / "reproducibility.safetensors"
        try:  # only verify reads the file (and refuses it when damaged): here it is just observed
            observed["record_tensors"] = {k: v.clone() for k, v in load_file(file).items()} if file.is_file() \
                else None
        except Exception as e:  # noqa: BLE001
            observed["record_tensors"] = f"unreadable: {type(e).__name__}"

    def verify_():
        from ditfa_optimum.verify import verify_artifact

        report = verify_artifact(target)
        observed["verify"] = (report.ok, report.mode, [r.ok for r in report.rows], len(report.problems))

    order = [("read_artifact", read), ("prompt_encoder", encoder), ("load_pipeline", load), ("inspect", inspect),
             ("generate", generate), ("record", record), ("verify", verify_)]
    for name, fn in order:
        if name in getattr(ctx, "skip", ()):
            continue
        if name == "verify" and not verify(observed):
            break
        if not stage(name, fn):
            break
    return stages, observed


def same(a, b) -> bool:
    if isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor):
        if a.shape != b.shape or a.dtype != b.dtype:
            return False
        return torch.equal(a.nan_to_num(), b.nan_to_num()) if a.is_floating_point() else torch.equal(a, b)
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b))
    try:
        return bool(a == b)
    except Exception:  # noqa: BLE001
        return False


def changes(reference: dict, observed: dict) -> list[str]:
    return sorted(k for k in reference if k in observed and not same(reference[k], observed[k]))


def run_case(ctx, seed: int, index: int) -> dict:
    rng = random.Random(f"{seed}:{index}")
    ctx.fresh()
    mutators, weights = zip(*MUTATORS)
    mutator = rng.choices(mutators, weights)[0]
    start = time.perf_counter()
    try:
        with time_limit(CASE_SECONDS):
            result = mutator(rng, ctx.art, ctx)
    except Exception as e:  # a mutation that does not apply (e.g. nothing to rename): not an input
        return {"case": index, "mutator": mutator.__name__, "skipped": f"{type(e).__name__}: {short(e, 100)}"}
    target_file, kind, what = result[:3]
    target = result[3] if len(result) > 3 else ctx.art
    touches_record = "reproducibility" in what or target_file == "reproducibility.safetensors"
    def verify(observed):  # a changed result, or a changed record: does verify notice?
        return touches_record or bool(changes(ctx.reference, observed))

    with time_limit(CASE_SECONDS):
        stages, observed = evaluate(ctx, target, verify)
    last = stages[-1]
    outcome = {"ok": "accepted", "refused": "refused", "other": "other"}[last["outcome"]]
    case = {"case": index, "file": target_file, "kind": kind, "mutation": short(what, 200), "outcome": outcome,
            "stage": last["stage"], "seconds": round(time.perf_counter() - start, 3)}
    if outcome != "accepted":
        case.update(type=last["type"], message=last["message"], where=last["where"])
    else:
        changed = changes(ctx.reference, observed)
        # harmless: nothing observable changed; display: only what inspect prints (recorded names, versions, search
        # numbers); changed: what runs (plan, weights, prompt encoder, settings) or the verify record
        case["accepted"] = "harmless" if not changed else "display" if set(changed) == {"inspect"} else "changed"
        if case["accepted"] == "changed":
            case["changed"] = [c for c in changed if c != "verify"]
            if "verify" in observed:
                case["verify"] = "PASS" if observed["verify"][0] else "FAIL"
        if observed.get("generated") == "not run: settings too large for the fuzzer":
            case["note"] = f"settings {observed.get('settings')} too large to generate here"
    return case


def fuzz(minutes: float, seed: int, max_cases: int | None = None, log=print) -> dict:
    """Mutate and evaluate for ``minutes`` (or ``max_cases`` mutations); returns the counts and every case."""
    with tempfile.TemporaryDirectory(prefix="ditfa-fuzz-") as tmp, offline():
        start = time.perf_counter()
        ctx = Context(Path(tmp))
        log(f"fuzz: base artifact written and checked in {time.perf_counter() - start:.1f} s; fuzzing for "
            f"{minutes} min (seed {seed})")
        for failure in ctx.baseline_failures:
            log(f"  WARNING: the unmutated artifact fails stage {failure['stage']} ({failure['type']}: "
                f"{failure['message']} at {failure['where']}); that stage is left out")
        cases, index, begin = [], 0, time.perf_counter()
        while time.perf_counter() - begin < minutes * 60 and (max_cases is None or index < max_cases):
            case = run_case(ctx, seed, index)
            index += 1
            if "skipped" in case:
                continue
            cases.append(case)
            if case["outcome"] == "other":
                log(f"  other exception in case {case['case']} ({case['file']}: {case['mutation'][:80]}): "
                    f"{case['type']} at {case['where']} [{case['stage']}]")
        ctx.fresh()
    result = summarize(cases, time.perf_counter() - begin)
    result["baseline_failures"] = ctx.baseline_failures
    return result


def replay(seed: int, index: int) -> None:
    """Re-run one fuzz case and print every stage, with the full traceback of an exception."""
    global classify_exception
    with tempfile.TemporaryDirectory(prefix="ditfa-fuzz-") as tmp, offline():
        ctx = Context(Path(tmp))
        original = classify_exception

        def loud(exc):
            traceback.print_exception(exc)
            return original(exc)

        classify_exception = loud
        case = run_case(ctx, seed, index)
        print(json.dumps(case, indent=2))


def summarize(cases: list[dict], seconds: float) -> dict:
    counts = {k: sum(c["outcome"] == k for c in cases) for k in ("refused", "other", "accepted")}
    verdicts = {k: sum(c.get("accepted") == k for c in cases) for k in ("harmless", "display", "changed")}
    caught = sum(c.get("verify") == "FAIL" for c in cases if c.get("accepted") == "changed")
    by_file: dict[str, dict] = {}
    for c in cases:
        row = by_file.setdefault(c["file"], {"tried": 0, "refused": 0, "other": 0, "accepted": 0})
        row["tried"] += 1
        row[c["outcome"]] += 1
    accepted_kinds: dict[str, int] = {}
    for c in cases:
        if c["outcome"] == "accepted":
            key = f"{c['file']} [{c['kind']}] {c['accepted']}" + (f": {', '.join(c['changed'])}" if c.get("changed")
                                                                  else "")
            if c.get("verify"):
                key += f" (verify {c['verify']})"
            accepted_kinds[key] = accepted_kinds.get(key, 0) + 1
    return {"tried": len(cases), **counts, **{f"accepted_{k}": v for k, v in verdicts.items()},
            "changed_caught_by_verify": caught, "seconds": round(seconds, 1), "by_file": by_file,
            "accepted_kinds": accepted_kinds,
            "other_cases": [c for c in cases if c["outcome"] == "other"],
            "accepted_cases": [c for c in cases if c["outcome"] == "accepted"], "cases": cases}


# ==================================================================================================== the CLI
def cli_cases(art: Path, plan_dir: Path, tmp: Path) -> list[tuple[str, list[str], str]]:
    """(name, argv, expectation): "refuse", or "accept: why accepting is right"."""
    counter = iter(range(10 ** 6))

    def out():
        return str(tmp / f"out-{next(counter)}")

    opt = ["optimize", "tiny-sd3", "--steps", "2", "--size", "32", "--num-prompts", "1", "--verify-plans", "0",
           "--calibration-passes", "1", "--repro-prompts", "0", "--no-picture", "--quiet"]
    a = str(art)
    gen = ["generate", a, PROMPT, "--quiet"]
    demo = ["demo", "--steps", "2", "--latent-size", "4", "--block-size", "4"]
    a_file = tmp / "a-file.txt"
    a_file.write_text("not a directory\n")
    binary = tmp / "binary.txt"
    binary.write_bytes(b"\xff\xfe\x00garbage")
    empty_dir = tmp / "empty-dir"
    empty_dir.mkdir(exist_ok=True)
    no_record = tmp / "no-record"
    shutil.copytree(art, no_record)
    config = load_config(no_record)
    config["reproducibility"] = None
    config["files"].pop("reproducibility.safetensors", None)
    (no_record / "reproducibility.safetensors").unlink()
    save_config(no_record, config)
    unwritable = "/proc/ditfa-robustness/x.png"  # not even root can create files in /proc
    R = "refuse"
    return [
        # ------------------------------------------------------------------ optimize
        ("optimize --method arrow:1/0", [*opt, "--method", "arrow:1/0", "--out", out()], R),
        ("optimize --method arrow:0", [*opt, "--method", "arrow:0", "--out", out()], R),
        ("optimize --method arrow:2", [*opt, "--method", "arrow:2", "--out", out()], R),
        ("optimize --method arrow:-1/4", [*opt, "--method", "arrow:-1/4", "--out", out()], R),
        ("optimize --method arrow:nan", [*opt, "--method", "arrow:nan", "--out", out()], R),
        ("optimize --method arrow:1e999", [*opt, "--method", "arrow:1e999", "--out", out()], R),
        ("optimize --method bogus", [*opt, "--method", "bogus", "--out", out()], R),
        ("optimize --method ''", [*opt, "--method", "", "--out", out()], R),
        ("optimize --guidance inf", [*opt, "--guidance", "inf", "--out", out()], R),
        ("optimize --guidance nan", [*opt, "--guidance", "nan", "--out", out()], R),
        ("optimize --guidance -1", [*opt, "--guidance", "-1", "--out", out()],
         "accept: a scale <= 1 turns CFG off in diffusers; a negative one is valid arithmetic"),
        ("optimize --steps 0", [*opt, "--steps", "0", "--out", out()], R),
        ("optimize --steps -3", [*opt, "--steps", "-3", "--out", out()], R),
        ("optimize --size 0", [*opt, "--size", "0", "--out", out()], R),
        ("optimize --size 100000", [*opt, "--size", "100000", "--out", out()], R),
        ("optimize --size 7", [*opt, "--size", "7", "--out", out()], R),
        ("optimize --height 0", [*opt, "--height", "0", "--out", out()], R),
        ("optimize --width -8", [*opt, "--width", "-8", "--out", out()], R),
        ("optimize --block-size 0", [*opt, "--block-size", "0", "--out", out()], R),
        ("optimize --block-size -16", [*opt, "--block-size", "-16", "--out", out()], R),
        ("optimize --threshold -1", [*opt, "--threshold", "-1", "--out", out()], R),
        ("optimize --threshold nan", [*opt, "--threshold", "nan", "--out", out()], R),
        ("optimize --threshold inf", [*opt, "--allocation", "local", "--threshold", "inf", "--out", out()], R),
        ("optimize --target-cut 1.5", [*opt, "--target-cut", "1.5", "--out", out()], R),
        ("optimize --target-cut -0.1", [*opt, "--target-cut", "-0.1", "--out", out()], R),
        ("optimize --target-cut nan", [*opt, "--target-cut", "nan", "--out", out()], R),
        ("optimize --target-snr nan", [*opt, "--target-snr", "nan", "--out", out()], R),
        ("optimize --target-cut with --target-snr", [*opt, "--target-cut", "0.3", "--target-snr", "20", "--out",
                                                     out()], R),
        ("optimize --max-head-rse -1", [*opt, "--max-head-rse", "-1", "--out", out()], R),
        ("optimize --num-prompts 0", [*opt, "--num-prompts", "0", "--out", out()], R),
        ("optimize --num-prompts 100000", [*opt, "--num-prompts", "100000", "--out", out()], R),
        ("optimize --batch-size 0", [*opt, "--batch-size", "0", "--out", out()], R),
        ("optimize --verify-plans -1", [*opt, "--verify-plans", "-1", "--out", out()], R),
        ("optimize --repro-prompts -1", [*opt, "--repro-prompts", "-1", "--out", out()], R),
        ("optimize --calibration-passes 9", [*opt, "--calibration-passes", "9", "--out", out()], R),
        ("optimize --steps abc", [*opt, "--steps", "abc", "--out", out()], R),
        ("optimize --device bogus", [*opt, "--device", "bogus", "--out", out()], R),
        ("optimize --device cuda (none here)" if not torch.cuda.is_available() else "optimize --device cuda:99",
         [*opt, "--device", "cuda" if not torch.cuda.is_available() else "cuda:99", "--out", out()], R),
        ("optimize --device meta", [*opt, "--device", "meta", "--out", out()], R),
        ("optimize --backend bogus", [*opt, "--backend", "bogus", "--out", out()], R),
        ("optimize --prompts missing file", [*opt, "--prompts", str(tmp / "none.txt"), "--out", out()], R),
        ("optimize --prompts a directory", [*opt, "--prompts", str(empty_dir), "--out", out()], R),
        ("optimize --prompts binary file", [*opt, "--prompts", str(binary), "--out", out()], R),
        ("optimize model missing path", ["optimize", str(tmp / "no-model"), "--quiet", "--out", out()], R),
        ("optimize model unknown Hub id (offline)", ["optimize", "no-such-user/no-such-model", "--quiet", "--out",
                                                     out()], R),
        ("optimize --out under a file", [*opt, "--out", str(a_file / "x")], R),
        ("optimize --out unwritable", [*opt, "--out", str(Path(unwritable).parent)], R),
        ("optimize --out ''", [*opt, "--out", ""], R),
        ("optimize --out an existing artifact", [*opt, "--out", a], R),
        ("optimize --out missing/dir/x (parents created)", [*opt, "--out", str(tmp / "missing" / "dir" / "x")],
         "accept: a new directory's parents are created, as mkdir -p would"),
        ("optimize --seed -1", [*opt, "--seed", "-1", "--out", out()],
         "accept: any integer seeds torch.Generator"),
        # ------------------------------------------------------------------ generate
        ("generate --out missing/dir/x.png", [*gen, "--out", str(tmp / "missing2" / "dir" / "x.png")],
         "accept: missing parent directories are created, as for optimize --out and demo --out"),
        ("generate --out unwritable", [*gen, "--out", unwritable], R),
        ("generate --out a directory", [*gen, "--out", str(empty_dir)], R),
        ("generate --out x.unknown-extension", [*gen, "--out", str(tmp / "x.unknown")], R),
        ("generate --steps 0", [*gen, "--steps", "0", "--out", out() + ".png"], R),
        ("generate --steps -1", [*gen, "--steps", "-1", "--out", out() + ".png"], R),
        ("generate --steps 3 (plan has 4)", [*gen, "--steps", "3", "--out", out() + ".png"],
         "accept: the plan runs remapped to 3 steps, with a note on stderr (--strict-steps refuses)"),
        ("generate --steps 3 --strict-steps", [*gen, "--steps", "3", "--strict-steps", "--out", out() + ".png"], R),
        ("generate --height 0", [*gen, "--height", "0", "--out", out() + ".png"], R),
        ("generate --width 7", [*gen, "--width", "7", "--out", out() + ".png"], R),
        ("generate --height 100000", [*gen, "--height", "100000", "--out", out() + ".png"], R),
        ("generate --guidance inf", [*gen, "--guidance", "inf", "--out", out() + ".png"], R),
        ("generate --guidance nan", [*gen, "--guidance", "nan", "--out", out() + ".png"], R),
        ("generate --device bogus", [*gen, "--device", "bogus", "--out", out() + ".png"], R),
        ("generate --device meta", [*gen, "--device", "meta", "--out", out() + ".png"], R),
        ("generate --device cuda (none here)" if not torch.cuda.is_available() else "generate --device cuda:99",
         [*gen, "--device", "cuda" if not torch.cuda.is_available() else "cuda:99", "--out", out() + ".png"], R),
        ("generate --backend bogus", [*gen, "--backend", "bogus", "--out", out() + ".png"], R),
        ("generate --base-model missing path", [*gen, "--base-model", str(tmp / "no-base"), "--out",
                                                out() + ".png"], R),
        ("generate artifact missing", ["generate", str(tmp / "none"), PROMPT, "--out", out() + ".png"], R),
        ("generate artifact is a file", ["generate", str(a_file), PROMPT, "--out", out() + ".png"], R),
        ("generate artifact is an empty dir", ["generate", str(empty_dir), PROMPT, "--out", out() + ".png"], R),
        ("generate artifact is a bare plan", ["generate", str(plan_dir), PROMPT, "--out", out() + ".png"], R),
        ("generate artifact name too long", ["generate", "x" * 5000, PROMPT, "--out", out() + ".png"], R),
        ("generate empty prompt", ["generate", a, "", "--quiet", "--out", out() + ".png"],
         "accept: an empty prompt is a valid (unconditional) prompt"),
        ("generate --dtype bfloat16", [*gen, "--dtype", "bfloat16", "--out", out() + ".png"],
         "accept: a supported dtype"),
        # ------------------------------------------------------------------ inspect
        ("inspect --png missing/dir/x.png", ["inspect", a, "--png", str(tmp / "missing3" / "dir" / "x.png")],
         "accept: missing parent directories are created"),
        ("inspect --png unwritable", ["inspect", a, "--png", unwritable], R),
        ("inspect --png a directory", ["inspect", a, "--png", str(empty_dir)], R),
        ("inspect --png x.unknown-extension", ["inspect", a, "--png", str(tmp / "plan.unknown")], R),
        ("inspect artifact missing", ["inspect", str(tmp / "none")], R),
        ("inspect artifact is a bare plan", ["inspect", str(plan_dir)], R),
        ("inspect artifact is a Hub-like id (offline)", ["inspect", "no-such-user/no-such-artifact"], R),
        # ------------------------------------------------------------------ bench
        ("bench --repeats 0", ["bench", a, "--repeats", "0"], R),
        ("bench --repeats -1", ["bench", a, "--repeats", "-1"], R),
        ("bench --steps 0", ["bench", a, "--repeats", "1", "--steps", "0"], R),
        ("bench --guidance nan", ["bench", a, "--repeats", "1", "--guidance", "nan"], R),
        ("bench --device bogus", ["bench", a, "--repeats", "1", "--device", "bogus"], R),
        ("bench --height 100000", ["bench", a, "--repeats", "1", "--height", "100000"], R),
        # ------------------------------------------------------------------ verify
        ("verify --psnr-floor nan", ["verify", a, "--psnr-floor", "nan"], R),
        ("verify --psnr-floor inf", ["verify", a, "--psnr-floor", "inf"],
         "accept: an infinite floor demands identical latents in tolerance mode too"),
        ("verify --psnr-floor -1", ["verify", a, "--psnr-floor", "-1"], R),
        ("verify --device bogus", ["verify", a, "--device", "bogus"], R),
        ("verify --device meta", ["verify", a, "--device", "meta"], R),
        ("verify --backend bogus", ["verify", a, "--backend", "bogus"], R),
        ("verify artifact missing", ["verify", str(tmp / "none")], R),
        ("verify artifact without a record", ["verify", str(no_record)], R),
        # ------------------------------------------------------------------ demo
        ("demo --steps 0", [*demo, "--steps", "0"], R),
        ("demo --steps -1", [*demo, "--steps", "-1"], R),
        ("demo --latent-size 0", [*demo, "--latent-size", "0"], R),
        ("demo --latent-size -1", [*demo, "--latent-size", "-1"], R),
        ("demo --latent-size 100000", [*demo, "--latent-size", "100000"], R),
        ("demo --block-size 0", [*demo, "--block-size", "0"], R),
        ("demo --block-size -4", [*demo, "--block-size", "-4"], R),
        ("demo --method arrow:1/0", [*demo, "--method", "arrow:1/0"], R),
        ("demo --method bogus", [*demo, "--method", "bogus"], R),
        ("demo --guidance nan", [*demo, "--guidance", "nan"], R),
        ("demo --guidance inf", [*demo, "--guidance", "inf"], R),
        ("demo --backend bogus", [*demo, "--backend", "bogus"], R),
        ("demo --family bogus", [*demo, "--family", "bogus"], R),
        ("demo --out a file", [*demo, "--out", str(a_file)], R),
        ("demo --out an artifact", [*demo, "--out", a], R),
        ("demo --out unwritable", [*demo, "--out", str(Path(unwritable).parent)], R),
        ("demo --seed -1", [*demo, "--seed", "-1"], "accept: any integer seeds torch.Generator"),
        ("demo --steps 1", [*demo, "--steps", "1"], "accept: one step is a valid (all-full) plan"),
        # ------------------------------------------------------------------ no such things
        ("push (no such subcommand)", ["push", a], R),
        ("no arguments", [], R),
        ("unknown option", ["inspect", a, "--bogus"], R),
    ]


def run_cli_case(argv: list[str], mode: str, timeout: int) -> dict:
    start = time.perf_counter()
    if mode == "subprocess":
        try:
            proc = subprocess.run([sys.executable, "-m", "ditfa_optimum.cli", *argv], capture_output=True, text=True,
                                  timeout=timeout, env={**os.environ, "TQDM_DISABLE": "1"},
                                  cwd=str(Path(__file__).resolve().parents[1]))
            code, out, err, exc = proc.returncode, proc.stdout, proc.stderr, None
        except subprocess.TimeoutExpired:
            code, out, err, exc = None, "", "", f"Timeout: no exit after {timeout} s"
    else:
        try:
            with time_limit(timeout):
                code, out, err = call_cli(argv)
            exc = None
        except CaseTimeout as e:
            code, out, err, exc = None, "", "", f"Timeout: {e}"
        except BaseException as e:  # noqa: BLE001 - what would be a traceback
            code, out, err = None, "", ""
            exc = f"{type(e).__name__}: {short(e, 200)} at {where(e)}"
    seconds = round(time.perf_counter() - start, 2)
    lines = [line for line in err.splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("ditfa-optimum: error:")]
    if exc is None and "Traceback (most recent call last)" in err:
        tail = [line for line in lines if line and not line.startswith(" ")]
        exc = tail[-1] if tail else "traceback"
    if exc is not None:
        outcome = "other"
    elif code == 0:
        outcome = "accepted"
    elif errors or (code == 2 and lines and lines[-1].startswith("ditfa-optimum")) or code == 3:
        outcome = "refused"
    else:
        outcome = "other"
        exc = f"exit {code} without an error message: {short(err, 200)}"
    row = {"exit": code, "outcome": outcome, "seconds": seconds}
    if exc:
        row["exception"] = exc
    message = (errors or lines[-1:] or [""])[0] if outcome == "refused" else ""
    if code == 3:
        message = "FAIL report (exit 3): " + short(out.strip().splitlines()[0] if out.strip() else "", 120)
    if message:
        row["message"] = short(message, 300)
    return row


def cli(mode: str = "inprocess", timeout: int = CASE_SECONDS, only: list[str] | None = None, log=print) -> dict:
    """Run the CLI over `cli_cases` (those whose name holds a word of ``only``); returns the counts and every row."""
    with tempfile.TemporaryDirectory(prefix="ditfa-cli-") as tmp, offline():
        tmp = Path(tmp)
        art = build_artifact(tmp / "artifact")
        from ditfa_optimum.apply import uniform_plan
        from ditfa_optimum.tiny import tiny_transformer

        uniform_plan(tiny_transformer("sd3"), num_steps=2, method="arrow:1/2", block_size=16).save(tmp / "plan")
        cases = cli_cases(art, tmp / "plan", tmp)
        if only:
            cases = [c for c in cases if any(word in c[0] for word in only)]
        rows, begin = [], time.perf_counter()
        for name, argv, expect in cases:
            row = {"input": name, "argv": [short(a, 80) for a in argv], "expect": expect,
                   **run_cli_case(argv, mode, timeout)}
            row["as_expected"] = (row["outcome"] == "refused") == (expect == "refuse") and row["outcome"] != "other"
            rows.append(row)
            if row["outcome"] == "other" or not row["as_expected"]:
                log(f"  {name}: {row['outcome']} (exit {row['exit']}) {row.get('exception', '')}")
    counts = {k: sum(r["outcome"] == k for r in rows) for k in ("refused", "other", "accepted")}
    return {"tried": len(rows), **counts, "unexpected": sum(not r["as_expected"] for r in rows), "mode": mode,
            "seconds": round(time.perf_counter() - begin, 1), "rows": rows}


# ==================================================================================================== report
def markdown(result: dict) -> str:
    lines = ["| part | tried | refused clearly | other exception | accepted |", "|---|---:|---:|---:|---:|"]
    if "fuzz" in result:
        f = result["fuzz"]
        lines.append(f"| fuzzer ({f['seconds'] / 60:.1f} min) | {f['tried']} | {f['refused']} | {f['other']} | "
                     f"{f['accepted']} ({f['accepted_harmless']} harmless, {f['accepted_display']} display only, "
                     f"{f['accepted_changed']} changed, {f['changed_caught_by_verify']} of them failing verify) |")
    if "cli" in result:
        c = result["cli"]
        lines.append(f"| CLI ({c['mode']}) | {c['tried']} | {c['refused']} | {c['other']} | {c['accepted']} |")
    if "fuzz" in result:
        lines += ["", "| fuzzed file | tried | refused | other | accepted |", "|---|---:|---:|---:|---:|"]
        for name, row in sorted(result["fuzz"]["by_file"].items()):
            lines.append(f"| {name} | {row['tried']} | {row['refused']} | {row['other']} | {row['accepted']} |")
        if result["fuzz"]["accepted_kinds"]:
            lines += ["", "| accepted mutations (file [kind] verdict: what changed) | count |", "|---|---:|"]
            for key, n in sorted(result["fuzz"]["accepted_kinds"].items(), key=lambda kv: -kv[1]):
                lines.append(f"| {key} | {n} |")
        for c in result["fuzz"]["other_cases"][:40]:
            lines.append(f"- case {c['case']}: {c['file']} {c['mutation'][:100]} -> {c['type']}: "
                         f"{c['message'][:120]} at {c['where']} [{c['stage']}]")
    if "cli" in result:
        lines += ["", "| CLI input | exit | outcome | note |", "|---|---:|---|---|"]
        for r in result["cli"]["rows"]:
            note = r.get("exception") or r.get("message", "")
            if r["outcome"] == "accepted":
                note = r["expect"] if r["expect"] != "refuse" else "ACCEPTED although it should be refused"
            lines.append(f"| `{r['input']}` | {r['exit']} | {r['outcome']} | {short(note, 140).replace('|', '/')} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--minutes", type=float, default=4.0, help="fuzzing time (default 4)")
    parser.add_argument("--max-cases", type=int, default=None, help="stop the fuzzer after this many mutations")
    parser.add_argument("--seed", type=int, default=0, help="fuzzer seed; case N of seed S is reproducible")
    parser.add_argument("--part", choices=["all", "fuzz", "cli"], default="all")
    parser.add_argument("--cli-mode", choices=["inprocess", "subprocess"], default="inprocess",
                        help="run the CLI in this process (fast) or as `python -m ditfa_optimum.cli` (as users do; "
                             "about 5 s of imports per input)")
    parser.add_argument("--cli-only", action="append", metavar="WORD", help="only CLI inputs whose name holds WORD")
    parser.add_argument("--replay", type=int, metavar="N", help="re-run fuzz case N of --seed, with tracebacks")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1: tiny models)")
    parser.add_argument("--out", help="write the full result as JSON here")
    args = parser.parse_args(argv)
    os.environ.setdefault("TQDM_DISABLE", "1")  # also for --cli-mode subprocess
    torch.set_num_threads(args.threads)
    import logging
    import warnings

    logging.disable(logging.WARNING)  # mutated artifacts make diffusers and ditfa warn on every case
    warnings.filterwarnings("ignore")
    if args.replay is not None:
        replay(args.seed, args.replay)
        return 0
    result = {"date": datetime.date.today().isoformat(), "command": " ".join(["python", *sys.argv]),
              "seed": args.seed, "torch": torch.__version__}
    if args.part in ("all", "fuzz"):
        result["fuzz"] = fuzz(args.minutes, args.seed, args.max_cases, log=lambda m: print(m, file=sys.stderr))
    if args.part in ("all", "cli"):
        result["cli"] = cli(args.cli_mode, only=args.cli_only, log=lambda m: print(m, file=sys.stderr))
    print(markdown(result))
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=1, default=str) + "\n")
    return 1 if any(result[p]["other"] for p in ("fuzz", "cli") if p in result) else 0


if __name__ == "__main__":
    sys.exit(main())
