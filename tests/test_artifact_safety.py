"""Data loss and integrity: what saving may replace, concurrent and interrupted saves, and what loading refuses.

Artifacts here are written straight from a tiny random-weight transformer and a uniform plan (no calibration), so each
test takes about a second on two CPU cores.
"""

import copy
import json
import os
import shutil
import signal
import threading
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from ditfa_optimum import DiTFastAttnConfig, DiTFastAttnOptimizer
from ditfa_optimum.apply import uniform_plan
from ditfa_optimum.cli import main
from ditfa_optimum.loading import load_pipeline
from ditfa_optimum.serialization import ArtifactError, read_artifact, sha256, write_artifact
from ditfa_optimum.tiny import TinyPromptEncoder, tiny_pipeline, tiny_transformer

WEIGHTS = "transformer/diffusion_pytorch_model.safetensors"
INDEX = "transformer/diffusion_pytorch_model.safetensors.index.json"
BASE = {"id": "tiny-sd3", "revision": None, "embedded": True}
ENCODER = {"name": "tiny", "text_tokens": 16, "scale": 1.0}


@pytest.fixture(scope="module")
def model():
    transformer = tiny_transformer("sd3")
    return transformer, uniform_plan(transformer, num_steps=2, method="arrow:1/2", block_size=16)


def save(model, directory, **kwargs):
    transformer, plan = model
    return write_artifact(directory, transformer=transformer, plan=plan, base_model=BASE, prompt_encoder=ENCODER,
                          **kwargs)


@pytest.fixture(scope="module")
def saved(model, tmp_path_factory):
    return save(model, tmp_path_factory.mktemp("saved") / "artifact")


@pytest.fixture
def art(saved, tmp_path):
    return Path(shutil.copytree(saved, tmp_path / "art"))


def siblings(path):
    """What lies beside ``path`` besides itself: temporary, backup and lock files show here."""
    return sorted(p.name for p in path.parent.iterdir() if p.name != path.name)


def rewrite_config(path, change):
    config = json.loads((path / "ditfa_config.json").read_text())
    change(config)
    (path / "ditfa_config.json").write_text(json.dumps(config))


def relist(path, *names):
    """Record the current sha256 of ``names`` in the config (as someone editing an artifact on purpose would)."""
    rewrite_config(path, lambda c: c["files"].update({n: sha256(path / n) for n in names}))


# ------------------------------------------------------------------------------------------ 1. what overwrite replaces
def test_overwrite_replaces_only_an_artifact(model, art, tmp_path, monkeypatch, capsys):
    thesis = tmp_path / "p"
    thesis.mkdir()
    (thesis / "thesis.tex").write_text("years of work")
    with pytest.raises(ArtifactError, match=r"p is not empty and is not a ditfa artifact .*overwrite or not"):
        save(model, thesis, overwrite=True)
    assert (thesis / "thesis.tex").read_text() == "years of work" and siblings(thesis) == ["art"]

    def no_work(*args):
        raise AssertionError("optimize ran although the target cannot be written")

    monkeypatch.setattr("ditfa_optimum.cli._load_optimizer", no_work)
    assert main(["optimize", "tiny-sd3", "--out", str(thesis), "--overwrite", "--quiet", "--steps", "2"]) == 1
    assert "is not a ditfa artifact" in capsys.readouterr().err
    assert (thesis / "thesis.tex").read_text() == "years of work"

    a_file = tmp_path / "notes.txt"
    a_file.write_text("notes")
    with pytest.raises(ArtifactError, match="is a file, not a directory"):
        save(model, a_file, overwrite=True)
    assert a_file.read_text() == "notes"

    empty = tmp_path / "empty"
    empty.mkdir()
    assert read_artifact(save(model, empty)).plan == model[1]  # an empty directory is used, no overwrite needed
    (art / "plan.png").write_bytes(b"a picture the CLI adds")
    save(model, art, overwrite=True)  # an artifact is replaced, as a whole
    assert read_artifact(art).plan == model[1] and not (art / "plan.png").exists()
    assert siblings(art) == ["empty", "notes.txt", "p"]


# ------------------------------------------------------------------------------------------ 2. one writer at a time
def test_a_concurrent_writer_is_refused(model, tmp_path, monkeypatch):
    transformer, plan = model
    target = tmp_path / "a"
    writing, finish = threading.Event(), threading.Event()
    original = transformer.save_pretrained

    def slow(*args, **kwargs):
        writing.set()
        assert finish.wait(30)
        return original(*args, **kwargs)

    errors = []

    def first():
        try:
            save(model, target)
        except BaseException as e:  # pragma: no cover - reported below
            errors.append(e)

    monkeypatch.setattr(transformer, "save_pretrained", slow)
    thread = threading.Thread(target=first)
    thread.start()
    try:
        assert writing.wait(30)
        monkeypatch.setattr(transformer, "save_pretrained", original)  # the second writer is not slowed down
        with pytest.raises(ArtifactError, match=r"another process \(pid \d+\) is writing .*wait for it"):
            save(model, target)
    finally:
        finish.set()
        thread.join(30)
    assert not errors
    written = sha256(target / "ditfa_config.json")
    with pytest.raises(ArtifactError, match="already exists"):  # checked again once the first writer is done
        save(model, target)
    assert sha256(target / "ditfa_config.json") == written and siblings(target) == []


def test_the_target_is_checked_again_before_the_swap(model, saved, tmp_path, monkeypatch):
    transformer, _ = model
    target = tmp_path / "a"
    original = transformer.save_pretrained

    def meanwhile(*args, **kwargs):  # another program puts an artifact at the path while we write
        shutil.copytree(saved, target)
        return original(*args, **kwargs)

    monkeypatch.setattr(transformer, "save_pretrained", meanwhile)
    with pytest.raises(ArtifactError, match="already exists"):
        save(model, target)
    assert sha256(target / "ditfa_config.json") == sha256(saved / "ditfa_config.json")
    assert siblings(target) == []


def test_a_dead_writers_lock_does_not_block(model, tmp_path):
    target = tmp_path / "a"
    (tmp_path / ".a.ditfa-lock").write_text("999999999\n")  # left by a process that was killed
    save(model, target)
    assert read_artifact(target).plan == model[1]
    assert siblings(target) == []  # the lock file is cleaned up


# ------------------------------------------------------------------------------------------ 3. demo --out
def test_demo_never_writes_a_plan_into_an_artifact(model, art, tmp_path, capsys):
    demo = ["demo", "--steps", "2", "--latent-size", "8", "--block-size", "4"]
    before = sha256(art / "plan.safetensors")
    assert main([*demo, "--out", str(art)]) == 1
    assert "is a ditfa artifact" in capsys.readouterr().err
    assert sha256(art / "plan.safetensors") == before
    read_artifact(art)

    plans = tmp_path / "plans"
    model[1].save(plans)
    assert main([*demo, "--out", str(plans)]) == 1
    assert "already holds a plan (plan.json, plan.safetensors); choose another directory or pass --overwrite" in \
        capsys.readouterr().err
    assert main([*demo, "--out", str(plans), "--overwrite"]) == 0


# ------------------------------------------------------------------------------------------ 4. interrupted saves
@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")
def test_a_save_killed_between_its_renames_is_recovered(model, art):
    """SIGKILL right after the old artifact was moved aside: the next read puts it back and cleans up."""
    before = sha256(art / "ditfa_config.json")
    pid = os.fork()
    if pid == 0:  # the child: overwrite, and die between the two renames
        try:
            original = Path.rename

            def rename(self, target):
                result = original(self, target)
                if self == art:
                    os.kill(os.getpid(), signal.SIGKILL)
                return result

            Path.rename = rename
            save(model, art, overwrite=True, reproducibility=None)
        finally:
            os._exit(3)  # only reached if the kill did not happen
    for _ in range(600):  # a minute at most: a forked child could hang on a lock a thread held
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            break
        time.sleep(0.1)
    else:
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
        pytest.fail("the saving child process hung")
    assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL
    assert not art.exists()  # the window the backup covers
    assert any(".art.ditfa-old-" in name for name in siblings(art))

    assert sha256(read_artifact(art).path / "ditfa_config.json") == before  # restored by the next read
    assert siblings(art) == []  # the new artifact's temporary directory and the lock are gone too


def test_leftovers_of_dead_writers_are_removed_by_the_next_save(model, art):
    (art.parent / ".art.ditfa-tmp-999999999" / "transformer").mkdir(parents=True)
    (art.parent / ".art.ditfa-tmp-999999999" / "transformer" / "big.safetensors").write_bytes(b"0" * 1000)
    (art.parent / ".art.ditfa-old-999999999").mkdir()  # a half-removed backup: the swap had completed
    (art.parent / ".art.ditfa-lock").write_text("999999999\n")
    save(model, art, overwrite=True)
    assert siblings(art) == []


def test_sigterm_while_saving_removes_the_temporary_directory(model, art, monkeypatch):
    if signal.getsignal(signal.SIGTERM) is not signal.SIG_DFL:
        pytest.skip("something else handles SIGTERM in this process")
    transformer, _ = model
    before = sha256(art / "ditfa_config.json")
    original = transformer.save_pretrained

    def terminated(*args, **kwargs):
        original(*args, **kwargs)
        if signal.getsignal(signal.SIGTERM) is signal.SIG_DFL:  # the default action would end pytest itself
            raise AssertionError("no SIGTERM handler while writing: the temporary directory would be left behind")
        os.kill(os.getpid(), signal.SIGTERM)

    monkeypatch.setattr(transformer, "save_pretrained", terminated)
    with pytest.raises(SystemExit) as exit:
        save(model, art, overwrite=True)
    assert exit.value.code == 128 + signal.SIGTERM
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # put back
    assert sha256(art / "ditfa_config.json") == before and siblings(art) == []


# ------------------------------------------------------------------------------------------ 5. checked before the work
def test_the_target_is_checked_before_calibration(tmp_path, monkeypatch, capsys):
    def no_work(*args, **kwargs):
        raise AssertionError("calibrated although the target cannot be written")

    a_file = tmp_path / "file.txt"
    a_file.write_text("")
    pipe = tiny_pipeline("sd3")
    opt = DiTFastAttnOptimizer(pipe, prompt_encoder=TinyPromptEncoder(pipe.transformer))
    monkeypatch.setattr("ditfa_optimum.optimizer.calibrate", no_work)
    with pytest.raises(ArtifactError, match=r"cannot create .*file.txt is a file, not a directory"):
        opt.optimize(DiTFastAttnConfig(num_inference_steps=2), save_dir=a_file / "out", progress=False)

    monkeypatch.setattr("ditfa_optimum.cli._load_optimizer", no_work)
    assert main(["optimize", "tiny-sd3", "--out", str(a_file / "out"), "--quiet", "--steps", "2"]) == 1
    assert "file.txt is a file, not a directory" in capsys.readouterr().err


@pytest.mark.skipif(os.name != "posix" or os.geteuid() == 0, reason="root writes anywhere")
def test_an_unwritable_parent_is_reported_up_front(model, tmp_path):
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o500)
    with pytest.raises(ArtifactError, match="not writable"):
        save(model, locked / "a")


# ------------------------------------------------------------------------------------------ 6. only listed files
def test_unlisted_weights_are_refused(model, art, capsys):
    tensors = load_file(art / WEIGHTS)
    evil = {k: torch.zeros_like(v) for k, v in tensors.items()}
    save_file(evil, art / "transformer" / "evil.safetensors", metadata={"format": "pt"})
    (art / INDEX).write_text(json.dumps({"metadata": {}, "weight_map": dict.fromkeys(evil, "evil.safetensors")}))
    with pytest.raises(ArtifactError, match=r"index.json is not listed .* no checksum covers it"):
        read_artifact(art)
    with pytest.raises(ArtifactError, match="is not listed"):
        load_pipeline(art)
    assert main(["generate", str(art), "a red cube", "--out", str(art / "x.png"), "--quiet"]) == 1
    assert "is not listed" in capsys.readouterr().err

    transformer, _ = model  # sharded weights load when the index and every shard are listed
    shutil.rmtree(art / "transformer")
    transformer.save_pretrained(art / "transformer", safe_serialization=True, max_shard_size="100KB")
    names = sorted(p.relative_to(art).as_posix() for p in (art / "transformer").iterdir())
    assert INDEX in names and len(names) > 3
    rewrite_config(art, lambda c: c["files"].pop(WEIGHTS))
    relist(art, *names)
    loaded = read_artifact(art).load_transformer()
    assert all(torch.equal(v, loaded.state_dict()[k]) for k, v in transformer.state_dict().items())


def test_weights_must_be_listed(art):
    rewrite_config(art, lambda c: c["files"].pop(WEIGHTS))
    with pytest.raises(ArtifactError, match="lists no transformer weights"):
        read_artifact(art)


# ------------------------------------------------------------------------------------------ 7. missing tensors
@pytest.mark.parametrize("change, words", [
    (lambda t: t.pop("proj_out.weight"), r"missing tensors proj_out\.weight"),
    (lambda t: t.__setitem__("extra.weight", torch.ones(3)), r"unexpected tensors extra\.weight"),
], ids=["missing", "unexpected"])
def test_weights_must_hold_exactly_the_models_tensors(art, change, words):
    tensors = load_file(art / WEIGHTS)
    change(tensors)
    save_file(tensors, art / WEIGHTS, metadata={"format": "pt"})
    relist(art, WEIGHTS)
    with pytest.raises(ArtifactError, match=words + ".*download or save the artifact again"):
        load_pipeline(art)


# ------------------------------------------------------------------------------------------ 8. symbolic links
def test_symlinks_are_refused(art, tmp_path):
    outside = tmp_path / "outside"
    outside.mkdir()
    shutil.move(art / "plan.safetensors", outside / "plan.safetensors")
    (art / "plan.safetensors").symlink_to(outside / "plan.safetensors")  # same bytes: the checksum still matches
    with pytest.raises(ArtifactError, match=r"plan.safetensors is a symbolic link .*regular files only"):
        read_artifact(art)
    (art / "plan.safetensors").unlink()
    shutil.move(outside / "plan.safetensors", art / "plan.safetensors")
    shutil.move(art / "transformer", outside / "transformer")
    (art / "transformer").symlink_to(outside / "transformer", target_is_directory=True)
    with pytest.raises(ArtifactError, match="transformer is a symbolic link"):
        load_pipeline(art)


def test_the_hf_cache_links_into_blobs_still_load(saved, tmp_path):
    """A Hub download is a snapshot of links into the repo's blobs/: those stay inside the repo and load."""
    repo = tmp_path / "models--me--art"
    snapshot = repo / "snapshots" / ("0" * 40)
    (repo / "blobs").mkdir(parents=True)
    for file in sorted(p for p in saved.rglob("*") if p.is_file()):
        blob = repo / "blobs" / sha256(file)
        shutil.copyfile(file, blob)
        link = snapshot / file.relative_to(saved)
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(os.path.relpath(blob, link.parent))
    assert read_artifact(snapshot).plan is not None
    (snapshot / "scales.safetensors").unlink()
    (snapshot / "scales.safetensors").symlink_to(saved / "scales.safetensors")  # a link out of the repo is not
    with pytest.raises(ArtifactError, match="scales.safetensors is a symbolic link"):
        read_artifact(snapshot)


# ------------------------------------------------------------------------------------------ 9. base components
def test_the_base_pipeline_loads_safetensors_only(art, tmp_path):
    from diffusers import AutoencoderKL

    base = tiny_pipeline("sd3")
    base.register_modules(vae=AutoencoderKL(block_out_channels=(8,), layers_per_block=1, norm_num_groups=8,
                                            down_block_types=("DownEncoderBlock2D",),
                                            up_block_types=("UpDecoderBlock2D",), sample_size=32))
    base.save_pretrained(tmp_path / "base", safe_serialization=False)  # a pickled vae/diffusion_pytorch_model.bin
    assert (tmp_path / "base" / "vae" / "diffusion_pytorch_model.bin").is_file()
    none = dict.fromkeys(["text_encoder", "text_encoder_2", "text_encoder_3", "tokenizer", "tokenizer_2",
                          "tokenizer_3"])
    with pytest.raises(ArtifactError, match=r"diffusion_pytorch_model.safetensors.*Only safetensors weights"):
        load_pipeline(art, base_model=tmp_path / "base", **none)
    assert load_pipeline(art).transformer is not None  # the embedded tiny base still loads


# ------------------------------------------------------------------------------------------ 10. torch_dtype
def test_torch_dtype_is_honoured(art):
    pipe = load_pipeline(art, torch_dtype=torch.float16)
    assert {p.dtype for p in pipe.transformer.parameters()} == {torch.float16}
    assert {p.dtype for p in read_artifact(art).load_transformer().parameters()} == {torch.float32}


# ------------------------------------------------------------------------------------------ malformed configs
DEEP = "[" * 100_000 + "]" * 100_000


@pytest.mark.parametrize("change", [
    lambda c: c.__setitem__("plan", ["not", "an", "object"]),
    lambda c: c["plan"].__setitem__("block_size", 1e400),  # JSON Infinity
    lambda c: c["plan"].__setitem__("metadata", [1]),
    lambda c: c["files"].__setitem__("x" * 5000, "0" * 64),
    lambda c: c.__setitem__("base_model", [1]),
    lambda c: c["transformer"].__setitem__("fingerprint", []),
    lambda c: c.__setitem__("prompt_encoder", [1]),
    lambda c: c.__setitem__("prompt_encoder", {"name": "tiny", "text_tokens": 10 ** 100}),
    lambda c: c.__setitem__("prompt_encoder", {"name": "tiny", "text_tokens": 16, "scale": float("nan")}),
], ids=["plan-list", "infinite-block-size", "metadata-list", "long-name", "base-list", "fingerprint-list",
        "encoder-list", "huge-text-tokens", "nan-scale"])
def test_malformed_fields_end_in_artifact_error(art, change):
    rewrite_config(art, change)
    with pytest.raises(ArtifactError):
        read_artifact(art).prompt_encoder(tiny_pipeline("sd3"))


@pytest.mark.parametrize("text", [DEEP, "1" * 10_000, '{"format_version": 1, "files": ' + DEEP + "}"],
                         ids=["deep", "too-many-digits", "deep-inside"])
def test_malformed_json_ends_in_artifact_error(art, text):
    (art / "ditfa_config.json").write_text(text)
    with pytest.raises(ArtifactError, match="not valid JSON"):
        read_artifact(art)


hypothesis = pytest.importorskip("hypothesis")
st = hypothesis.strategies

JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers(-10 ** 30, 10 ** 30) | st.floats() | st.text(max_size=20)
    | st.sampled_from(["x" * 3000, "../etc/passwd", "/abs", "a\u0000b", "0" * 64, "full", "transformer/x"]),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner, max_size=3),
    max_leaves=8)


@st.composite
def mutations(draw, config):
    """A copy of ``config`` with one entry somewhere inside it replaced, removed or renamed."""
    config = copy.deepcopy(config)
    parent, key, node = None, None, config
    while isinstance(node, (dict, list)) and node and (parent is None or draw(st.booleans())):
        parent, key = node, draw(st.sampled_from(list(node) if isinstance(node, dict) else range(len(node))))
        node = parent[key]
    action = draw(st.sampled_from(["replace", "remove", "rename"]))
    if action == "replace" or isinstance(parent, list):
        parent[key] = draw(JSON_VALUES)
    elif action == "remove":
        del parent[key]
    else:
        parent[draw(st.text(max_size=300))] = parent.pop(key)
    return config


@pytest.fixture(scope="module")
def fuzzed(saved, tmp_path_factory):
    return Path(shutil.copytree(saved, tmp_path_factory.mktemp("fuzz") / "art"))


def test_read_artifact_raises_only_artifact_error_on_mutated_configs(fuzzed):
    valid = json.loads((fuzzed / "ditfa_config.json").read_text())
    pipe = tiny_pipeline("sd3")

    @hypothesis.settings(max_examples=150, deadline=None, database=None,
                         suppress_health_check=list(hypothesis.HealthCheck))
    @hypothesis.given(st.data())
    def check(data):
        (fuzzed / "ditfa_config.json").write_text(json.dumps(data.draw(mutations(valid))))
        try:
            read_artifact(fuzzed).prompt_encoder(pipe)
        except ArtifactError:
            pass

    check()


RECORD = {"prompts": ["a", "b"], "seeds": [0, 1], "num_inference_steps": 8, "height": 128, "width": 128,
          "guidance_scale": 5.0, "device": "cpu", "backend": "blocked", "dtype": "float32", "torch_version": "2",
          "num_threads": 2, "images": [{"key": "image_0"}, {"key": "image_1"}]}


@pytest.mark.parametrize("key,value", [
    ("dtype", "load"), ("dtype", 5), ("device", "meta"), ("num_inference_steps", 0), ("num_inference_steps", True),
    ("height", 10 ** 6), ("width", 1.5), ("guidance_scale", float("inf")), ("prompts", "ab"), ("prompts", []),
    ("seeds", [0]), ("seeds", [0, -1]), ("images", [{"key": "image_0"}]), ("images", [1, 2]),
    ("backend", None), ("torch_version", 2), ("num_threads", 0), ("num_threads", "2"),  # compared by verify
])
def test_verify_refuses_a_tampered_reproducibility_record(key, value):
    """verify trusts nothing in the record: `getattr(torch, "load")` as a dtype or a 10^6-pixel side is refused."""
    from ditfa_optimum.verify import check_record

    check_record(dict(RECORD), "art")  # the record as written passes
    with pytest.raises(ArtifactError, match=rf"reproducibility\.{key} must be"):
        check_record({**RECORD, key: value}, "art")
