import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from ditfa_optimum import DiTFastAttnConfig, DiTFastAttnOptimizer, apply, get_runtime, remove, schema
from ditfa_optimum.calibrate import run_pipeline
from ditfa_optimum.loading import load_pipeline
from ditfa_optimum.serialization import ArtifactError, read_artifact, sha256
from ditfa_optimum.tiny import TinyPromptEncoder, tiny_pipeline

from search_helpers import PIXELS

SCHEMA = Path(__file__).resolve().parents[1] / "ditfa_optimum" / "schemas" / "ditfa_config.schema.json"


def make_optimizer(family):
    pipe = tiny_pipeline(family)
    pipe.set_progress_bar_config(disable=True)
    return DiTFastAttnOptimizer(pipe, prompt_encoder=TinyPromptEncoder(pipe.transformer), source=f"tiny-{family}")


def small_config(family, **changes):
    px = PIXELS[family]
    return DiTFastAttnConfig(**{**dict(threshold=0.2, allocation="local", num_inference_steps=4, height=px, width=px, block_size=16,
                                       num_prompts=2, guidance_scale=None if family == "flux" else 5.0), **changes})


@pytest.fixture(scope="module", params=["sd3", "flux"])
def saved(request, tmp_path_factory):
    family = request.param
    opt = make_optimizer(family)
    opt.optimize(small_config(family), progress=False)
    path = opt.save_pretrained(tmp_path_factory.mktemp(family) / "artifact")
    return family, opt, path


@pytest.fixture
def copy(saved, tmp_path):
    family, opt, path = saved
    return Path(shutil.copytree(path, tmp_path / "copy"))


# ------------------------------------------------------------------------------------------------ round trip
def test_round_trip_is_exact(saved):
    family, opt, path = saved
    art = read_artifact(path)
    assert art.plan == opt.plan
    for name in opt.plan.module_names:
        assert torch.equal(art.plan.methods[name], opt.plan.methods[name])
        assert torch.equal(art.plan.params[name], opt.plan.params[name])
    pipe = load_pipeline(path)
    pipe.set_progress_bar_config(disable=True)
    original = opt.pipeline.transformer.state_dict()
    loaded = pipe.transformer.state_dict()
    assert original.keys() == loaded.keys()
    assert all(torch.equal(original[k], loaded[k]) for k in original)

    config = small_config(family)
    prompts = ["a red cube on a table", "two birds"]
    encoder = art.prompt_encoder(pipe)
    assert encoder.record() == opt.prompt_encoder.record()
    apply(opt.pipeline, opt.plan)
    try:
        expected = run_pipeline(opt.pipeline, prompts, config, prompt_encoder=opt.prompt_encoder)
    finally:
        remove(opt.pipeline)
    assert torch.equal(run_pipeline(pipe, prompts, config, prompt_encoder=encoder), expected)


def test_config_matches_the_json_schema(saved):
    jsonschema = pytest.importorskip("jsonschema")
    family, opt, path = saved
    config = json.loads((path / "ditfa_config.json").read_text())
    jsonschema.validate(config, json.loads(SCHEMA.read_text()))
    assert config["transformer"]["fingerprint"]["image_first"] is (family != "flux")
    assert set(config["files"]) >= {"plan.safetensors", "scales.safetensors", "reproducibility.safetensors",
                                    "README.md", "transformer/config.json",
                                    "transformer/diffusion_pytorch_model.safetensors"}
    cut = read_artifact(path).attention_flop_cut
    assert 0 < cut < 1 and cut == opt.plan.metadata["search"]["flop_cut"]
    assert config["plan"]["metadata"]["search"]["config"] == opt.plan.metadata["search"]["config"]
    assert not list(path.rglob("*.bin")) and not list(path.rglob("*.pkl"))  # never pickle
    card = (path / "README.md").read_text()
    assert "load_pipeline" in card and f"{cut:.1%}" in card


def test_save_never_loses_an_artifact(saved, tmp_path, monkeypatch):
    family, opt, path = saved
    target = Path(shutil.copytree(path, tmp_path / "a"))
    with pytest.raises(ArtifactError, match="already exists and is not empty.*overwrite=True"):
        opt.save_pretrained(target)
    before = sha256(target / "ditfa_config.json")

    def broken(*args, **kwargs):
        raise RuntimeError("disk full")

    monkeypatch.setattr(opt.pipeline.transformer, "save_pretrained", broken)
    with pytest.raises(RuntimeError, match="disk full"):
        opt.save_pretrained(target, overwrite=True, reproducibility_prompts=0)
    assert sha256(target / "ditfa_config.json") == before  # the old artifact is untouched
    assert [p.name for p in tmp_path.iterdir()] == ["a"]  # and no temporary directory is left behind
    monkeypatch.undo()
    opt.save_pretrained(target, overwrite=True, reproducibility_prompts=0)
    assert read_artifact(target).config["reproducibility"] is None


# ------------------------------------------------------------------------------------------------ corruption
def _rewrite_config(path, change):
    config = json.loads((path / "ditfa_config.json").read_text())
    change(config)
    (path / "ditfa_config.json").write_text(json.dumps(config))


def _rewrite_plan(path, change):
    tensors = load_file(path / "plan.safetensors")
    change(tensors)
    save_file(tensors, path / "plan.safetensors")
    _rewrite_config(path, lambda c: c["files"].__setitem__("plan.safetensors", sha256(path / "plan.safetensors")))


def test_missing_and_non_json_config(copy):
    (copy / "ditfa_config.json").write_text("{ not json")
    with pytest.raises(ArtifactError, match="ditfa_config.json is not valid JSON"):
        read_artifact(copy)
    (copy / "ditfa_config.json").unlink()
    with pytest.raises(ArtifactError, match="has no ditfa_config.json: not a ditfa artifact"):
        read_artifact(copy)


def test_missing_file(copy):
    (copy / "plan.safetensors").unlink()
    with pytest.raises(ArtifactError, match="plan.safetensors is missing"):
        read_artifact(copy)


def test_truncated_weights_fail_the_checksum(copy):
    weights = copy / "transformer" / "diffusion_pytorch_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-100])
    with pytest.raises(ArtifactError, match="diffusion_pytorch_model.safetensors has sha256 .* truncated or edited"):
        read_artifact(copy)
    with pytest.raises(ArtifactError, match="truncated or edited"):
        load_pipeline(copy)


def test_edited_model_card_only_warns(copy, caplog):
    (copy / "README.md").write_text("my own notes")
    assert read_artifact(copy).plan is not None
    assert "README.md" in caplog.text


@pytest.mark.parametrize("key, version, words", [
    ("schema_version", 99, "schema_version 99 is newer than this ditfa_optimum reads .*upgrade ditfa-optimum"),
    ("schema_version", 0, "schema_version must be a positive integer, got 0"),
    ("schema_version", "2", "schema_version must be a positive integer, got '2'"),
    ("format_version", 2, r"format_version 2 is not a version any ditfa-optimum wrote \(artifact documents of schema "
                          r"version 1 have \(1,\)\)"),
])
def test_schema_versions(copy, key, version, words):
    def change(config):
        config.pop("schema_version")
        config[key] = version

    _rewrite_config(copy, change)
    with pytest.raises(ArtifactError, match=words):
        read_artifact(copy)


def as_schema_1(config: dict) -> dict:
    """``ditfa_config.json`` as ditfa-optimum wrote it before one schema version (artifact format 1, plan format 3,
    config version 1): the search config, calibration summary and FLOP cut repeated at the top."""
    plan = {k: v for k, v in config["plan"].items() if k != "schema_version"}
    search = dict(plan["metadata"]["search"])
    search_config = {k: v for k, v in search["config"].items() if k != "schema_version"}
    search_config["version"] = 1
    search["config"] = search_config
    plan = {"format_version": 3, **plan, "metadata": {**plan["metadata"], "search": search}}
    legacy = {k: v for k, v in config.items() if k != "schema_version"}
    return {"format_version": 1, **legacy, "plan": plan, "search_config": search_config,
            "calibration": {"num_prompts": search["num_prompts"], "seconds": 1.0, "predicted_mean_rse": 0.01},
            "attention_flop_cut": search["flop_cut"]}


def test_artifacts_of_schema_1_still_load(saved, copy):
    family, opt, path = saved
    def to_schema_1(config):
        legacy = as_schema_1(config)
        config.clear()
        config.update(legacy)

    _rewrite_config(copy, to_schema_1)
    old, new = read_artifact(copy), read_artifact(path)
    assert old.plan == new.plan and old.search_config["version"] == 1
    assert (old.schema_version, new.schema_version) == (1, schema.SCHEMA_VERSION)
    assert old.attention_flop_cut == new.attention_flop_cut
    assert not {"search_config", "calibration", "attention_flop_cut", "format_version"} & set(old.config)
    assert DiTFastAttnConfig.from_dict(old.search_config) == DiTFastAttnConfig.from_dict(new.search_config)
    pipe = load_pipeline(copy)
    assert get_runtime(pipe) is not None


def test_unknown_transformer_class(copy):
    _rewrite_config(copy, lambda c: c["transformer"].__setitem__("class_name", "EvilModel"))
    with pytest.raises(ArtifactError, match="'EvilModel' is not one ditfa_optimum supports"):
        read_artifact(copy)


def test_fingerprint_mismatch(copy):
    _rewrite_config(copy, lambda c: c["transformer"]["fingerprint"].__setitem__("attention_modules", 99))
    with pytest.raises(ArtifactError, match="attention_modules: recorded 99 vs .*made for another model"):
        load_pipeline(copy)


def test_base_model_that_does_not_match(saved, copy):
    family = saved[0]
    other = tiny_pipeline("flux" if family != "flux" else "sd3")
    with pytest.raises(ArtifactError, match="the base pipeline's transformer does not match"):
        load_pipeline(copy, base_model=other)


def test_plan_tensor_with_wrong_shape(copy):
    def change(t):
        key = next(k for k in t if k.endswith(".method"))
        t[key] = t[key][:, :1].contiguous()

    _rewrite_plan(copy, change)
    with pytest.raises(ArtifactError, match=r"plan.safetensors: module .* must be \[num_steps, \d+\]"):
        read_artifact(copy)


def test_unknown_method_id(copy):
    def change(t):
        key = next(k for k in t if k.endswith(".method"))
        t[key][-1, 0] = 99

    _rewrite_plan(copy, change)
    with pytest.raises(ArtifactError, match=r"method ids \[99\] are not in the plan's vocabulary"):
        read_artifact(copy)


def test_files_outside_the_artifact_are_refused(copy):
    _rewrite_config(copy, lambda c: c["files"].__setitem__("../../etc/passwd", "0" * 64))
    with pytest.raises(ArtifactError, match="lists a file outside the artifact"):
        read_artifact(copy)


def test_not_an_artifact_or_repo(tmp_path):
    with pytest.raises(ArtifactError, match="neither an artifact directory nor a Hub repo id"):
        read_artifact(tmp_path / "nowhere")


def test_base_model_directory_with_another_transformer(saved, copy, tmp_path):
    family = saved[0]
    other = tiny_pipeline(family, num_layers=2) if family != "flux" else tiny_pipeline(family, num_single_layers=2)
    other.save_pretrained(tmp_path / "other-base")
    with pytest.raises(ArtifactError, match="base model .* has a different transformer .*pass the matching base_model"):
        load_pipeline(copy, base_model=tmp_path / "other-base")
