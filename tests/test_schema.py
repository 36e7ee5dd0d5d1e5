"""One schema version for every document on disk (`ditfa_optimum.schema`)."""

import json

import pytest
import torch

from ditfa_optimum import schema
from ditfa_optimum.calibrate import STATS_JSON, CalibrationStats
from ditfa_optimum.config import DiTFastAttnConfig
from ditfa_optimum.plan import PLAN_JSON, CompressionPlan, ModuleSpec
from ditfa_optimum.serialization import ArtifactError

from search_helpers import synthetic_stats

SPECS = [ModuleSpec("transformer_blocks.0.attn", 2, 8, True, True)]


def test_every_kind_writes_the_same_version(tmp_path):
    plan = CompressionPlan.uniform(SPECS, num_steps=3)
    plan.save(tmp_path / "plan")
    stats = synthetic_stats()
    stats.save(tmp_path / "stats")
    written = [json.loads((tmp_path / "plan" / PLAN_JSON).read_text()),
               json.loads((tmp_path / "stats" / STATS_JSON).read_text()), DiTFastAttnConfig().to_dict()]
    if stats.sensitivity is not None:
        written.append(json.loads((tmp_path / "stats" / "sensitivity.json").read_text()))
    for info in written:
        assert info["schema_version"] == schema.SCHEMA_VERSION
        assert not {"format_version", "version"} & set(info)


@pytest.mark.parametrize("kind, key, versions", [("plan", "format_version", (1, 2, 3)),
                                                 ("calibration", "format_version", (1, 2)),
                                                 ("sensitivity", "format_version", (1,)),
                                                 ("artifact", "format_version", (1,)),
                                                 ("config", "version", (1,))])
def test_the_per_kind_counters_of_version_1_are_read(kind, key, versions):
    for version in versions:
        out = schema.read(kind, {key: version, "x": 1}, "doc.json")
        assert out["x"] == 1 and key not in out and "schema_version" not in out
    with pytest.raises(ValueError, match=f"doc.json: {key} 7 is not a version any ditfa-optimum wrote"):
        schema.read(kind, {key: 7}, "doc.json")
    with pytest.raises(ValueError, match=f"{key} True is not a version"):
        schema.read(kind, {key: True}, "doc.json")


@pytest.mark.parametrize("value, words", [(schema.SCHEMA_VERSION + 1,
                                           f"{schema.SCHEMA_VERSION + 1} is newer than this ditfa_optimum reads "
                                           f".up to {schema.SCHEMA_VERSION}.; upgrade ditfa-optimum"),
                                          (0, "must be a positive integer, got 0"),
                                          (1, "1 was never written .a artifact of schema version 1 has "
                                              "'format_version' instead."),
                                          (1.0, "must be a positive integer, got 1.0"),
                                          (None, "must be a positive integer, got None")])
def test_versions_that_cannot_be_read_are_refused_by_name(value, words):
    with pytest.raises(ArtifactError, match=f"ditfa_config.json: schema_version {words}"):
        schema.read("artifact", {"schema_version": value}, "ditfa_config.json", ArtifactError)


def test_a_document_without_a_version_is_refused_unless_hand_written():
    with pytest.raises(ValueError, match="plan.json: no schema_version; not a ditfa-optimum plan document"):
        schema.read("plan", {"modules": []}, "plan.json")
    with pytest.raises(ValueError, match="must hold a JSON object, got list"):
        schema.read("plan", [], "plan.json")
    assert schema.read("config", {"threshold": 0.2}, "config", missing_is_current=True) == {"threshold": 0.2}
    assert DiTFastAttnConfig.from_dict({"threshold": 0.2}).allocation == "trajectory"  # today's defaults


def test_reading_never_changes_the_callers_document():
    legacy = {"format_version": 1, "search_config": {"seed": 3}, "calibration": {}, "attention_flop_cut": 0.5,
              "plan": {"metadata": {"search": {"num_prompts": 2}}}}
    before = json.dumps(legacy, sort_keys=True)
    out = schema.read("artifact", legacy, "ditfa_config.json")
    assert json.dumps(legacy, sort_keys=True) == before
    # the artifact's repeated fields go; the search config lands in the plan's metadata when only the top had it
    assert set(out) == {"plan"} and out["plan"]["metadata"]["search"] == {"num_prompts": 2, "config": {"seed": 3}}


def test_artifacts_before_version_3_hold_the_whole_transformer():
    out = schema.read("artifact", {"schema_version": 2, "transformer": {"class_name": "X"},
                                   "base_model": {"id": "a/b"}}, "ditfa_config.json")
    assert out["transformer"] == {"class_name": "X", "weights": "included", "dtype": None, "linears": None}
    assert out["base_model"] == {"id": "a/b", "files": {}}


def test_artifacts_before_version_4_have_no_fp8_linears():
    out = schema.read("artifact", {"schema_version": 3, "transformer": {"class_name": "X", "weights": "base",
                                                                        "dtype": "bfloat16"}}, "ditfa_config.json")
    assert out["transformer"] == {"class_name": "X", "weights": "base", "dtype": "bfloat16", "linears": None}


def test_plans_of_version_1_drop_what_their_format_did_not_have():
    out = schema.read("plan", {"format_version": 1, "blocks": [{"name": "x"}], "skipped_steps": [2]}, "plan.json")
    assert out["blocks"] == [] and out["block_method_vocabulary"] == {} and out["skipped_steps"] == []
    out = schema.read("plan", {"format_version": 3, "skipped_steps": [2]}, "plan.json")
    assert out["skipped_steps"] == [2]


def test_statistics_of_calibration_format_2_load(tmp_path):
    stats = synthetic_stats()
    stats.save(tmp_path)
    info = json.loads((tmp_path / STATS_JSON).read_text())
    del info["schema_version"]
    (tmp_path / STATS_JSON).write_text(json.dumps({"format_version": 2, **info}))
    old = CalibrationStats.load(tmp_path)
    assert all(torch.equal(old.err[s.name], stats.err[s.name]) for s in stats.modules)
    newer = schema.SCHEMA_VERSION + 1
    (tmp_path / STATS_JSON).write_text(json.dumps({"schema_version": newer, **info}))
    with pytest.raises(ValueError, match=f"schema_version {newer} is newer"):
        CalibrationStats.load(tmp_path)
