"""Hub round trip with huggingface_hub's own seams: its HTTP client factory (a mock transport answers the Hub API)
and its cache layout (HF_HUB_OFFLINE=1 loads from a populated cache). Our code is not mocked."""

import base64
import importlib
import json
import shutil

import pytest
import torch

import huggingface_hub
from huggingface_hub import constants

from ditfa_optimum.loading import load_pipeline
from ditfa_optimum.serialization import ArtifactError, read_artifact

from test_artifact import make_optimizer, small_config

if not hasattr(huggingface_hub, "set_client_factory"):  # the minimum-versions run (huggingface_hub 0.34)
    pytest.skip("these tests mock the Hub through huggingface_hub.set_client_factory (huggingface_hub >= 1.0)",
                allow_module_level=True)
try:
    httpx = importlib.import_module("httpx2")  # huggingface_hub >= 2
except ImportError:  # pragma: no cover - huggingface_hub 1.x
    httpx = importlib.import_module("httpx")


@pytest.fixture(scope="module")
def optimizer():
    opt = make_optimizer("sd3")
    opt.optimize(small_config("sd3"), progress=False)
    return opt


@pytest.fixture
def fake_hub():
    """Answers create_repo, preupload (every file inline) and commit; records what was committed."""
    seen = {"requests": [], "files": {}}

    def handler(request):
        seen["requests"].append((request.method, request.url.path))
        path = request.url.path
        if path == "/api/repos/create":
            seen["create"] = json.loads(request.content)
            return httpx.Response(200, json={"url": "https://huggingface.co/me/sd3-ditfa", "name": "me/sd3-ditfa"})
        if path == "/api/validate-yaml":
            seen["card_yaml"] = json.loads(request.content)
            return httpx.Response(200, json={"errors": [], "warnings": []})
        if "/preupload/" in path:
            files = json.loads(request.content)["files"]
            return httpx.Response(200, json={"files": [{"path": f["path"], "uploadMode": "regular",
                                                        "shouldIgnore": False} for f in files]})
        if "/commit/" in path:
            for line in request.content.decode().splitlines():
                entry = json.loads(line)
                if entry.get("key") == "file":
                    seen["files"][entry["value"]["path"]] = base64.b64decode(entry["value"]["content"])
                elif entry.get("key") == "header":
                    seen["summary"] = entry["value"]["summary"]
            return httpx.Response(200, json={"commitUrl": "https://huggingface.co/me/sd3-ditfa/commit/" + "a" * 40,
                                             "commitOid": "a" * 40, "pullRequestUrl": None})
        return httpx.Response(404, json={"error": f"not mocked: {request.method} {path}"})

    huggingface_hub.set_client_factory(lambda: httpx.Client(transport=httpx.MockTransport(handler)))
    yield seen
    huggingface_hub.set_client_factory(huggingface_hub.utils._http.default_client_factory)


def test_push_to_hub_uploads_the_whole_artifact(optimizer, fake_hub, tmp_path):
    info = optimizer.push_to_hub("me/sd3-ditfa", private=True, token="hf_fake_token", commit_message="ditfa test")
    assert "commit" in str(info)
    create = fake_hub["create"]
    assert create["name"] == "sd3-ditfa" and create["organization"] == "me"
    assert create.get("private") is True or create.get("visibility") == "private"  # huggingface_hub 1.x / 2.x
    assert fake_hub["summary"] == "ditfa test"
    files = fake_hub["files"]
    config = json.loads(files["ditfa_config.json"])
    assert set(files) == set(config["files"]) | {"ditfa_config.json"}
    # what arrived is a valid artifact: write it out and load it
    for name, data in files.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_bytes(data)
    assert read_artifact(tmp_path).plan == optimizer.plan


def test_cli_push_uploads_a_checked_artifact(optimizer, fake_hub, tmp_path, monkeypatch, capsys):
    from ditfa_optimum.cli import main

    monkeypatch.setenv("HF_TOKEN", "hf_fake_token")
    saved = optimizer.save_pretrained(tmp_path / "art")
    assert main(["push", str(saved), "me/sd3-ditfa", "--private", "--message", "from the CLI"]) == 0
    assert "pushed" in capsys.readouterr().out and fake_hub["summary"] == "from the CLI"
    assert set(fake_hub["files"]) == set(json.loads((saved / "ditfa_config.json").read_text())["files"]) | {
        "ditfa_config.json"}
    card = fake_hub["files"]["README.md"].decode()
    assert "library_name: ditfa-optimum" in card and "pip install ditfa-optimum" in card
    # a damaged artifact is never uploaded; nor is a path that is not one, or a bad repo id
    fake_hub["files"].clear()
    (saved / "plan.safetensors").write_bytes(b"damaged")
    for argv, words in [([str(saved), "me/x"], "plan.safetensors has sha256"),
                        ([str(tmp_path / "nothing"), "me/x"], "is not an artifact directory"),
                        ([str(saved), "no-slash"], "must be a Hub repo id")]:
        assert main(["push", *argv]) == 1
        assert words in capsys.readouterr().err
    assert fake_hub["files"] == {}


def test_load_pipeline_from_the_hf_cache_offline(optimizer, tmp_path, monkeypatch):
    artifact = optimizer.save_pretrained(tmp_path / "artifact")
    cache = tmp_path / "hub-cache"
    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = cache / "models--me--sd3-ditfa"
    shutil.copytree(artifact, repo / "snapshots" / commit)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))

    pipe = load_pipeline("me/sd3-ditfa")
    assert pipe.ditfa_artifact.plan == optimizer.plan
    ours = optimizer.pipeline.transformer.state_dict()
    assert all(torch.equal(v, pipe.transformer.state_dict()[k]) for k, v in ours.items())
    with pytest.raises(ArtifactError, match="not in the local Hugging Face cache .*HF_HUB_OFFLINE='1'"):
        load_pipeline("me/not-cached")
