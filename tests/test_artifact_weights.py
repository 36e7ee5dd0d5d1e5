"""Artifact v2 weights: the base model's transformer files referred to (pinned revision and sha256), only the tensors
that differ stored, the whole transformer on request; each round-trips exactly, and a base that is not the recorded
one is refused."""

import json
import os
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from ditfa_optimum.apply import uniform_plan
from ditfa_optimum.base_weights import locate
from ditfa_optimum.loading import load_pipeline
from ditfa_optimum.serialization import ArtifactError, read_artifact, sha256, write_artifact
from ditfa_optimum.tiny import tiny_transformer

ENCODER = {"name": "tiny", "text_tokens": 16, "scale": 1.0}
WEIGHTS = "diffusion_pytorch_model.safetensors"


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory):
    """A base model directory as diffusers writes it (only the transformer: enough for the weights)."""
    root = tmp_path_factory.mktemp("base") / "tiny-sd3-base"
    tiny_transformer("sd3", seed=3).save_pretrained(root / "transformer", safe_serialization=True)
    return root


def loaded_from(base: Path, dtype=torch.float32):
    from diffusers import SD3Transformer2DModel

    return SD3Transformer2DModel.from_pretrained(base / "transformer").to(dtype).eval()


def save(transformer, directory, base_id, **kwargs):
    plan = uniform_plan(transformer, num_steps=2, method="arrow:1/2", block_size=16)
    return write_artifact(directory, transformer=transformer, plan=plan, prompt_encoder=ENCODER,
                          base_model={"id": None if base_id is None else os.fspath(base_id), "revision": None,
                                      "embedded": False}, **kwargs)


def same_weights(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def test_an_unchanged_transformer_is_referred_to_not_copied(base_dir, tmp_path):
    transformer = loaded_from(base_dir)
    path = save(transformer, tmp_path / "art", base_dir)
    art = read_artifact(path)
    assert art.weights == "base" and not (path / "transformer").exists()
    config = json.loads((path / "ditfa_config.json").read_text())
    assert config["base_model"]["files"] == {f"transformer/{n}": sha256(base_dir / "transformer" / n)
                                             for n in ("config.json", WEIGHTS)}
    assert config["transformer"]["dtype"] == "float32"
    size = sum(p.stat().st_size for p in path.rglob("*") if p.is_file())
    assert size < (base_dir / "transformer" / WEIGHTS).stat().st_size  # the plan is smaller than the weights
    assert same_weights(art.load_transformer(), transformer)


def test_a_base_loaded_in_another_dtype_is_still_unchanged(base_dir, tmp_path):
    transformer = loaded_from(base_dir, torch.float16)
    art = read_artifact(save(transformer, tmp_path / "art", base_dir))
    assert art.weights == "base" and art.config["transformer"]["dtype"] == "float16"
    loaded = art.load_transformer()  # the recorded dtype by default
    assert {p.dtype for p in loaded.parameters()} == {torch.float16} and same_weights(loaded, transformer)


def test_changed_tensors_are_stored_and_loaded_over_the_base(base_dir, tmp_path):
    transformer = loaded_from(base_dir)
    with torch.no_grad():  # as a fused LoRA would: two linear layers change
        transformer.transformer_blocks[0].attn.to_q.weight.add_(0.01)
        transformer.proj_out.bias.mul_(2)
    path = save(transformer, tmp_path / "art", base_dir)
    art = read_artifact(path)
    assert art.weights == "base+delta"
    assert sorted(load_file(path / "transformer_delta.safetensors")) == [
        "proj_out.bias", "transformer_blocks.0.attn.to_q.weight"]
    assert same_weights(art.load_transformer(), transformer)
    assert not same_weights(art.load_transformer(), loaded_from(base_dir))
    jsonschema = pytest.importorskip("jsonschema")
    schema = json.loads((Path(__file__).resolve().parents[1] / "ditfa_optimum" / "schemas" /
                         "ditfa_config.schema.json").read_text())
    jsonschema.validate(json.loads((path / "ditfa_config.json").read_text()), schema)


def test_a_modified_base_file_is_refused(base_dir, tmp_path):
    copy = Path(shutil.copytree(base_dir, tmp_path / "base"))
    art = read_artifact(save(loaded_from(copy), tmp_path / "art", copy))
    weights = copy / "transformer" / WEIGHTS
    data = bytearray(weights.read_bytes())
    data[-5] ^= 1  # one bit of one weight
    weights.write_bytes(bytes(data))
    with pytest.raises(ArtifactError, match=r"diffusion_pytorch_model.safetensors has sha256 .* another revision or "
                                            r"was modified"):
        art.load_transformer()
    weights.unlink()
    with pytest.raises(ArtifactError, match="is missing"):
        art.load_transformer()
    shutil.rmtree(copy)
    with pytest.raises(ArtifactError, match="holds no transformer weights: it refers to the base model .* cannot be "
                                            "found"):
        art.load_transformer()


def test_the_base_may_be_given_elsewhere_but_must_be_the_same(base_dir, tmp_path):
    transformer = loaded_from(base_dir)
    art = read_artifact(save(transformer, tmp_path / "art", base_dir))
    copy = shutil.copytree(base_dir, tmp_path / "air-gapped-copy")
    assert same_weights(art.load_transformer(base_model=copy), transformer)
    other = tmp_path / "other"
    tiny_transformer("sd3", seed=4).save_pretrained(other / "transformer", safe_serialization=True)
    with pytest.raises(ArtifactError, match="another revision or was modified"):
        art.load_transformer(base_model=other)
    extra = Path(shutil.copytree(base_dir, tmp_path / "extra"))
    shutil.copyfile(extra / "transformer" / WEIGHTS, extra / "transformer" / "more.safetensors")
    with pytest.raises(ArtifactError, match="does not record .*more.safetensors"):
        art.load_transformer(base_model=extra)


def test_self_contained_copies_and_an_object_base_cannot_be_referred_to(base_dir, tmp_path, caplog):
    transformer = loaded_from(base_dir)
    path = save(transformer, tmp_path / "full", base_dir, self_contained=True)
    assert read_artifact(path).weights == "included" and (path / "transformer" / WEIGHTS).is_file()
    shutil.rmtree(base_dir / ".." / "nothing", ignore_errors=True)
    with caplog.at_level("WARNING"):
        path = save(transformer, tmp_path / "object", None)  # no base id: the whole transformer, with a warning
    assert read_artifact(path).weights == "included" and "no base model to refer to" in caplog.text
    with pytest.raises(ArtifactError, match="cannot save without the transformer weights: .* self_contained=True"):
        save(transformer, tmp_path / "never", None, self_contained=False)
    assert not (tmp_path / "never").exists()
    other = tiny_transformer("sd3", num_layers=1)  # another structure than the base's: the whole transformer
    path = save(other, tmp_path / "other", base_dir)
    assert read_artifact(path).weights == "included"


def test_a_base_reference_loads_as_a_pipeline(base_dir, tmp_path):
    """load_pipeline with the other components from a pipeline object; the transformer from the pinned base files."""
    from ditfa_optimum.tiny import tiny_pipeline

    transformer = loaded_from(base_dir)
    art = save(transformer, tmp_path / "art", base_dir)
    pipe = load_pipeline(art, base_model=tiny_pipeline("sd3", seed=3))
    assert same_weights(pipe.transformer, transformer)


def test_a_hub_base_is_pinned_to_its_revision(base_dir, tmp_path, monkeypatch):
    """A base loaded from the Hub cache: the commit is recorded, and loading takes that commit, not the newer main."""
    cache = tmp_path / "hub"
    repo = cache / "models--someone--tiny"
    commits = {"a" * 40: base_dir}
    newer = tmp_path / "newer"
    tiny_transformer("sd3", seed=5).save_pretrained(newer / "transformer", safe_serialization=True)
    commits["b" * 40] = newer
    for commit, source in commits.items():
        for file in (source / "transformer").iterdir():
            blob = repo / "blobs" / sha256(file)
            blob.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(file, blob)
            link = repo / "snapshots" / commit / "transformer" / file.name
            link.parent.mkdir(parents=True, exist_ok=True)
            link.symlink_to(os.path.relpath(blob, link.parent))
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("a" * 40)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_CACHE", str(cache))
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", True)

    found = locate("someone/tiny")
    assert found is not None and found.revision == "a" * 40
    transformer = loaded_from(base_dir)
    art = read_artifact(save(transformer, tmp_path / "art", "someone/tiny"))
    assert art.config["base_model"]["revision"] == "a" * 40 and art.weights == "base"
    (repo / "refs" / "main").write_text("b" * 40)  # the Hub's main moved on: the artifact still loads its commit
    assert same_weights(art.load_transformer(), transformer)
    with pytest.raises(ArtifactError, match="another revision or was modified"):
        art.load_transformer(base_model=repo / "snapshots" / ("b" * 40))


def test_an_artifact_of_schema_version_2_still_loads():
    """tests/fixtures/artifact-schema-2: written by the code before weights could be referred to (the commit is in
    its plan's metadata): it holds the whole transformer and loads as it did."""
    art = read_artifact(Path(__file__).parent / "fixtures" / "artifact-schema-2")
    assert art.schema_version == 2 and art.weights == "included" and art.plan.num_steps == 2
    assert art.config["base_model"]["files"] == {} and art.config["transformer"]["dtype"] is None
    loaded = art.load_transformer()
    # the fixture's own tensors (regenerating the model from its seed depends on the torch release's initialisers)
    stored = load_file(art.path / "transformer" / WEIGHTS)
    state = loaded.state_dict()
    # schema 2 recorded no dtype: the float16 file loads in diffusers' default float32, as it did then
    assert all(t.dtype == torch.float32 for t in state.values())
    assert state.keys() == stored.keys() and all(torch.equal(state[k], stored[k].float()) for k in stored)


@pytest.mark.parametrize("field, value, words", [
    (("transformer", "weights"), "bogus", "transformer.weights must be one of"),
    (("transformer", "weights"), None, "transformer.weights must be one of"),
    (("transformer", "dtype"), "int8", "transformer.dtype must be null or one of"),
    (("base_model", "files"), [], "base_model.files must be an object"),
    (("base_model", "files"), {"transformer/config.json": "0" * 63}, "base_model.files must be an object"),
    (("base_model", "files"), {"../x": "0" * 64}, "base_model.files must be an object"),
    (("base_model", "files"), {"transformer/a/b": "0" * 64}, "base_model.files must be an object"),
    (("base_model", "files"), {}, "base_model.files must be the base's transformer files"),
])
def test_malformed_weight_records_are_refused_by_name(base_dir, tmp_path, field, value, words):
    path = save(loaded_from(base_dir), tmp_path / "art", base_dir)
    config = json.loads((path / "ditfa_config.json").read_text())
    config[field[0]][field[1]] = value
    (path / "ditfa_config.json").write_text(json.dumps(config))
    with pytest.raises(ArtifactError, match=words):
        read_artifact(path)


def test_an_unlisted_or_missing_delta_file_is_refused(base_dir, tmp_path):
    transformer = loaded_from(base_dir)
    with torch.no_grad():
        transformer.proj_out.bias.mul_(2)
    path = save(transformer, tmp_path / "art", base_dir)
    config = json.loads((path / "ditfa_config.json").read_text())
    del config["files"]["transformer_delta.safetensors"]
    (path / "ditfa_config.json").write_text(json.dumps(config))
    with pytest.raises(ArtifactError, match="does not list transformer_delta.safetensors"):
        read_artifact(path)
    config["transformer"]["weights"] = "base"  # claims no delta, but the file lies there unlisted
    (path / "ditfa_config.json").write_text(json.dumps(config))
    with pytest.raises(ArtifactError, match="transformer_delta.safetensors is not listed"):
        read_artifact(path)


def test_a_relative_base_directory_is_recorded_absolute(base_dir, tmp_path, monkeypatch):
    monkeypatch.chdir(base_dir.parent)
    path = save(loaded_from(base_dir), tmp_path / "art", base_dir.name)  # "tiny-sd3-base", relative to here
    monkeypatch.chdir(tmp_path)
    art = read_artifact(path)
    assert art.config["base_model"]["id"] == str(base_dir.resolve())
    assert same_weights(art.load_transformer(), loaded_from(base_dir))


def test_an_artifact_referring_to_a_local_directory_is_not_pushed(base_dir, tmp_path):
    from ditfa_optimum.serialization import push_artifact

    path = save(loaded_from(base_dir), tmp_path / "art", base_dir)
    with pytest.raises(ArtifactError, match="refers to base weights in the local directory .* self_contained=True"):
        push_artifact(path, "me/x", token="hf_fake")  # refused before any network call
