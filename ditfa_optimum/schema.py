"""One versioned schema for everything ditfa_optimum writes to disk.

Every JSON document the package writes carries the same counter, ``"schema_version"``:

* a plan (``plan.json``, and the ``"plan"`` entry of an artifact's ``ditfa_config.json``),
* calibration statistics (``calibration.json``) and their sensitivity (``sensitivity.json``),
* an artifact (``ditfa_config.json``),
* a search config (`DiTFastAttnConfig.to_dict`, stored inside a plan's metadata).

A reader accepts every version up to `SCHEMA_VERSION`: older documents are upgraded one version at a time by the
functions in `_UPGRADES` (pure functions on the parsed JSON), newer ones are refused with a message naming the fix.
Tensors (safetensors files) carry no version: their names are described by the JSON document beside them.

History:

1. Before one counter existed, each document had its own (still read, as version 1): plan ``"format_version"`` 1-3,
   calibration 1-2, sensitivity 1, artifact 1, config ``"version"`` 1.
2. One counter. An artifact no longer repeats what its plan records: the search config, the calibration summary and
   the attention-FLOP cut are read from the plan's ``metadata["search"]`` (`Artifact.search_config`).
3. Weights only where they change: an artifact records where its transformer's weights come from
   (``transformer.weights``: "base", "base+delta" or "included"), their dtype, and the sha256 of the base model's
   transformer files (``base_model.files``). Artifacts of versions 1 and 2 hold the whole transformer ("included").
4. FP8 linear layers: an artifact records which linear layers it stores in FP8 (``transformer.linears``, null for
   none; `ditfa_optimum.fp8_linears`). A reader of version 3 would ignore them and run the model's own linears, so the
   counter moves; artifacts of earlier versions have none.
"""

from __future__ import annotations

import reprlib

SCHEMA_VERSION = 4
KEY = "schema_version"
KINDS = ("plan", "calibration", "sensitivity", "artifact", "config")

#: version 1: the key each kind used for its own counter, and the values written under it
_LEGACY = {"plan": ("format_version", (1, 2, 3)), "calibration": ("format_version", (1, 2)),
           "sensitivity": ("format_version", (1,)), "artifact": ("format_version", (1,)),
           "config": ("version", (1,))}


def stamp(info: dict) -> dict:
    """``info`` as written: ``schema_version`` first, then the document."""
    return {KEY: SCHEMA_VERSION, **info}


def read(kind: str, info: dict, where: str, error: type[Exception] = ValueError, *,
         missing_is_current: bool = False) -> dict:
    """A copy of the parsed document ``info`` upgraded to `SCHEMA_VERSION`, without its version key.

    Raises ``error`` (naming ``where``) for a version newer than this package reads, or one that is not a version.
    A document without a version is refused, unless ``missing_is_current`` (a hand-written search config).
    """
    if kind not in KINDS:
        raise ValueError(f"unknown document kind {kind!r}; one of {KINDS}")
    if not isinstance(info, dict):
        raise error(f"{where} must hold a JSON object, got {type(info).__name__}")
    legacy_key, legacy_values = _LEGACY[kind]
    if KEY in info:
        version = info[KEY]
        if not _is_int(version) or version < 1:
            raise error(f"{where}: {KEY} must be a positive integer, got {short(version)}; the file is damaged or "
                        "edited: write it again")
        if version < 2:  # the counter starts at 2: version-1 documents carry their own key (_LEGACY)
            raise error(f"{where}: {KEY} {version} was never written (a {kind} of schema version 1 has "
                        f"{legacy_key!r} instead); the file is damaged or edited: write it again")
        if version > SCHEMA_VERSION:
            raise error(f"{where}: {KEY} {version} is newer than this ditfa_optimum reads (up to {SCHEMA_VERSION}); "
                        "upgrade ditfa-optimum (pip install -U ditfa-optimum)")
    elif legacy_key in info:
        if not _is_int(info[legacy_key]) or info[legacy_key] not in legacy_values:
            raise error(f"{where}: {legacy_key} {short(info[legacy_key])} is not a version any ditfa-optimum "
                        f"wrote ({kind} documents of schema version 1 have {legacy_values}); the file is damaged or edited: "
                        "write it again")
        version = 1
    elif missing_is_current:
        return dict(info)
    else:
        raise error(f"{where}: no {KEY}; not a ditfa-optimum {kind} document, or one damaged or edited by hand")
    info = dict(info)
    while version < SCHEMA_VERSION:
        info = _UPGRADES[version](kind, info)
        version += 1
    info.pop(KEY, None)
    return info


def _v1_to_v2(kind: str, info: dict) -> dict:
    legacy_key, _ = _LEGACY[kind]
    legacy = info.pop(legacy_key)
    if kind == "plan":
        if legacy < 2:  # before block methods
            info["blocks"], info["block_method_vocabulary"] = [], {}
        if legacy < 3:  # before skipped steps
            info["skipped_steps"] = []
    elif kind == "config":
        # configs written before these options existed were searched without them
        info.setdefault("allocation", "local")
        info.setdefault("skip_steps", False)
        info.setdefault("max_skip_run", 2)
        info.setdefault("verify_plans", 1)
    elif kind == "artifact":
        plan = info.get("plan")
        search_config = info.pop("search_config", None)
        for key in ("calibration", "attention_flop_cut"):
            info.pop(key, None)
        if isinstance(plan, dict):
            info["plan"] = plan = dict(plan)
            metadata = plan.get("metadata")
            if isinstance(metadata, dict) and isinstance(metadata.get("search"), dict) \
                    and search_config is not None and "config" not in metadata["search"]:
                plan["metadata"] = {**metadata, "search": {**metadata["search"], "config": search_config}}
    return info


def _v2_to_v3(kind: str, info: dict) -> dict:
    if kind == "artifact":
        if isinstance(info.get("transformer"), dict):
            info["transformer"] = {"weights": "included", "dtype": None, **info["transformer"]}
        if isinstance(info.get("base_model"), dict):
            info["base_model"] = {"files": {}, **info["base_model"]}
    return info


def _v3_to_v4(kind: str, info: dict) -> dict:
    if kind == "artifact" and isinstance(info.get("transformer"), dict):
        info["transformer"] = {"linears": None, **info["transformer"]}
    return info


#: upgrade functions: version N -> N + 1, applied in order
_UPGRADES = {1: _v1_to_v2, 2: _v2_to_v3, 3: _v3_to_v4}


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


_REPR = reprlib.Repr()  # keyword arguments only from Python 3.12
_REPR.maxlevel, _REPR.maxstring, _REPR.maxlong, _REPR.maxother = 3, 80, 40, 80


def short(value, limit: int = 80) -> str:
    """A value read from a file (its repr; an exception's text) for a message, shortened: names and numbers there may
    be huge, lists deeply nested."""
    text = str(value) if isinstance(value, BaseException) else _REPR.repr(value)
    return text if len(text) <= limit else text[:limit] + f"… ({len(text)} characters)"
