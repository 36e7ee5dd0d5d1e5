from pathlib import Path

import pytest

from ditfa_optimum import CompressionPlan
from ditfa_optimum.cli import main, run_demo
from ditfa_optimum.serialization import read_artifact, sha256

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("family", ["sd3", "sd35", "flux"])
def test_run_demo(family, tmp_path):
    result = run_demo(family, steps=3, latent_size=8, block_size=4, out=str(tmp_path), repeats=1)
    assert 0.0 < result["flop_cut"] < 1.0
    assert result["latent_rse"] > 0  # the plan really changed the computation
    assert result["backend"] == "blocked"  # the CPU default
    plan = CompressionPlan.load(tmp_path)
    assert plan.num_steps == 3 and plan.block_size == 4
    assert set(plan.method_counts()) == {"full", "arrow", "cfg_share", "cache"}


def test_demo_command(tmp_path, capsys):
    assert main(["demo", "--steps", "2", "--latent-size", "8", "--block-size", "4", "--method", "arrow:1/2",
                 "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "of dense attention FLOPs cut" in out and str(tmp_path) in out
    assert (tmp_path / "plan.safetensors").is_file()


def test_user_error_exits_1_without_traceback(capsys):
    assert main(["demo", "--steps", "2", "--latent-size", "8", "--method", "arrow:2"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("ditfa-optimum: error: arrow fraction must be in (0, 1]") and "Traceback" not in err


def test_usage_error_exits_2():
    with pytest.raises(SystemExit) as e:
        main([])
    assert e.value.code == 2


def test_optimize_command_on_the_embedded_model(tmp_path, capsys):
    out = tmp_path / "plan"
    assert main(["optimize", "--steps", "4", "--num-prompts", "2", "--threshold", "0.2", "--quiet",
                 "--out", str(out)]) == 0
    text = capsys.readouterr().out
    assert "attention FLOPs cut" in text and "pred. RSE" in text and "total" in text and "ditfa-optimum verify" in text
    plan = read_artifact(out).plan
    assert plan.num_steps == 4 and plan.metadata["search"]["threshold"] == 0.2
    assert plan.metadata["search"]["flop_cut"] > 0
    assert (out / "plan.png").is_file()
    assert main(["optimize", "--steps", "4", "--num-prompts", "2", "--quiet", "--out", str(out)]) == 1
    assert "already exists" in capsys.readouterr().err


def test_optimize_budget_options(tmp_path, capsys):
    out = tmp_path / "plan"
    assert main(["optimize", "tiny-sd3", "--steps", "4", "--num-prompts", "2", "--budget-schedule", "quadratic",
                 "--error-normalization", "module", "--no-skip-steps", "--verify-plans", "0", "--quiet",
                 "--out", str(out)]) == 0
    plan = read_artifact(out).plan
    info = plan.metadata["search"]
    assert info["config"]["skip_steps"] is False and plan.skipped_steps == []
    assert info["config"]["verify_plans"] == 0 and "selected_by_measurement" not in info
    assert info["config"]["budget_schedule"] == "quadratic" and info["config"]["error_normalization"] == "module"
    assert info["step_thresholds"][0] == 0 and info["step_thresholds"][1] < info["step_thresholds"][3]


def test_optimize_reads_a_prompts_file(tmp_path, capsys):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("# calibration captions\na red cube\n\na blue sphere on grass\n")
    assert main(["optimize", "tiny-flux", "--steps", "3", "--prompts", str(prompts), "--quiet",
                 "--out", str(tmp_path / "plan")]) == 0
    assert read_artifact(tmp_path / "plan").plan.metadata["search"]["num_prompts"] == 2
    empty = tmp_path / "empty.txt"
    empty.write_text("# nothing\n")
    assert main(["optimize", "--prompts", str(empty), "--quiet"]) == 1
    assert "holds no prompts" in capsys.readouterr().err


@pytest.mark.parametrize("args, words", [
    (["--threshold", "-1"], "threshold must be a finite number >= 0"),
    (["--method", "bogus"], "unknown attention method 'bogus'"),
    (["--prompts", "/no/such/file.txt"], "cannot read the prompts file"),
    # no FP8 GPU here, and a float32 model on one: refused before calibrating, either way
    (["--quantize-linears", "fp8"], "FP8 linear layers"),
])
def test_optimize_user_errors(args, words, capsys):
    assert main(["optimize", "--quiet", *args]) == 1
    err = capsys.readouterr().err
    assert words in err and "Traceback" not in err


@pytest.fixture(scope="module")
def artifact(tmp_path_factory):
    out = tmp_path_factory.mktemp("cli") / "artifact"
    assert main(["optimize", "--steps", "4", "--num-prompts", "2", "--threshold", "0.2", "--quiet",
                 "--out", str(out)]) == 0
    return out


def test_inspect_prints_and_draws(artifact, tmp_path, capsys):
    from PIL import Image

    png = tmp_path / "plan.png"
    assert main(["inspect", str(artifact), "--png", str(png)]) == 0
    out = capsys.readouterr().out
    assert "SD3Transformer2DModel: 6 attention modules" in out and "of dense attention FLOPs cut" in out
    assert "of the whole transformer's FLOPs skipped" in out  # the default search prices whole steps
    image = Image.open(png)
    assert image.size[0] >= 300 and image.size[1] >= 100
    colours = image.convert("RGB").getcolors(maxcolors=1 << 20)
    assert colours is not None and len(colours) > 10  # a picture, not a blank canvas


def test_generate_and_bench(artifact, tmp_path, capsys):
    from PIL import Image

    for extra in ([], ["--dense"]):
        out = tmp_path / f"image{len(extra)}.png"
        assert main(["generate", str(artifact), "a red cube", "--out", str(out), "--quiet", *extra]) == 0
        assert Image.open(out).size[0] > 0
    assert Image.open(tmp_path / "image0.png").tobytes() != Image.open(tmp_path / "image1.png").tobytes()
    assert main(["bench", str(artifact), "--repeats", "1", "--steps", "4"]) == 0
    assert "ms per step" in capsys.readouterr().out


def test_verify_passes_on_a_fresh_artifact(artifact, capsys):
    assert main(["verify", str(artifact)]) == 0
    out = capsys.readouterr().out
    assert "PASS" in out and out.count("identical") >= 2


def _self_contained_copy(artifact, target):
    from safetensors.torch import load_file

    from ditfa_optimum.serialization import read_artifact, write_artifact

    art = read_artifact(artifact)
    assert art.weights == "base"  # the embedded model's weights are referred to, not copied
    return write_artifact(target, transformer=art.load_transformer(), plan=art.plan,
                          base_model=art.config["base_model"], prompt_encoder=art.config["prompt_encoder"],
                          reproducibility=(art.config["reproducibility"], load_file(artifact / "reproducibility.safetensors")),
                          self_contained=True)


def _perturbed_copy(artifact, tmp_path, what):
    import json
    import shutil

    import torch
    from safetensors.torch import load_file, save_file

    if what == "plan":
        copy = Path(shutil.copytree(artifact, tmp_path / what))
    else:  # the CLI's artifact refers to the embedded model's weights: a self-contained copy has weights to perturb
        copy = _self_contained_copy(artifact, tmp_path / what)
    if what == "plan":
        file = copy / "plan.safetensors"
        tensors = load_file(file)
        for key in tensors:
            tensors[key][1:] = 0  # every head full (method id 0, no parameter): a valid but different plan
        save_file(tensors, file)
    else:
        file = copy / "transformer" / "diffusion_pytorch_model.safetensors"
        tensors = load_file(file)
        tensors["proj_out.weight"] = tensors["proj_out.weight"] * 1.5  # the velocity, 1.5x: a visibly worse image
        save_file(tensors, file, metadata={"format": "pt"})
    return copy


@pytest.mark.parametrize("what", ["plan", "weights"])
def test_verify_fails_on_a_perturbed_artifact(artifact, tmp_path, capsys, what):
    copy = _perturbed_copy(artifact, tmp_path, what)
    assert main(["verify", str(copy)]) == 3
    out = capsys.readouterr().out
    assert "FAIL" in out and "image_0" in out and "exact" in out
    assert "sha256" in out  # the checksum problem is reported too


def test_verify_tolerance_mode_across_environments(artifact, tmp_path, monkeypatch):
    """Another thread count (or device, backend, dtype, torch) compares by PSNR instead of bit equality."""
    import torch

    from ditfa_optimum.verify import verify_artifact

    monkeypatch.setattr(torch, "get_num_threads", lambda: 999)
    report = verify_artifact(artifact)
    assert report.ok and report.mode.startswith("tolerance: num_threads") and report.rows[0].metric == "psnr"
    bad = verify_artifact(_perturbed_copy(artifact, tmp_path, "weights"))
    assert not bad.ok and all(r.metric == "psnr" for r in bad.rows)
    assert any(not r.ok and r.value < 30 for r in bad.rows), bad.text()


@pytest.mark.parametrize("flag", [["--steps", "0"], ["--size", "0"], ["--block-size", "0"], ["--guidance", "nan"]],
                         ids=["steps", "size", "block-size", "guidance"])
def test_optimize_refuses_zero_and_nan_instead_of_using_defaults(flag, tmp_path, capsys):
    from ditfa_optimum.cli import main

    assert main(["optimize", "tiny-sd3", "--out", str(tmp_path / "a"), "--quiet", *flag]) != 0
    assert "must be" in capsys.readouterr().err  # the config's own message: the field, the value, what it needs
    assert not (tmp_path / "a").exists()


def test_bench_refuses_zero_repeats_before_loading_anything(capsys):
    from ditfa_optimum.cli import main

    assert main(["bench", "no-such-artifact", "--repeats", "0"]) != 0
    assert "--repeats must be at least 1" in capsys.readouterr().err


# ------------------------------------------------------------------ bad input found by tools/robustness.py
NO_GPU = not __import__("torch").cuda.is_available()


def _refused(argv, capsys, *words):
    """Exit 1 with one ``ditfa-optimum: error:`` line naming ``words``, and no traceback."""
    assert main(argv) == 1
    err = capsys.readouterr().err
    assert err.strip().splitlines()[-1].startswith("ditfa-optimum: error:") and "Traceback" not in err, err
    for word in words:
        assert word in err, err
    return err


BAD_INPUT = [
    (["optimize", "--method", "arrow:1/0"], ["arrow:1/0", "1/8"]),  # was ZeroDivisionError
    (["optimize", "tiny-sd3", "--device", "bogus"], ["device 'bogus' is not a torch device name"]),
    (["optimize", "tiny-sd3", "--device", "meta"], ["'meta' holds no data"]),
    (["optimize", "tiny-sd3", "--repro-prompts", "-1"], ["--repro-prompts must be >= 0", "got -1"]),
    (["optimize", "tiny-sd3", "--steps", "2", "--size", "100000"], ["height 100000 px is larger than this model",
                                                                      "at most 768 px"]),  # was minutes of allocation
    (["generate", "no-such-artifact", "a cube", "--out", "x.unknown"], ["--out 'x.unknown'", ".png"]),
    (["generate", "no-such-artifact", "a cube", "--out", "."], ["names no image format"]),
    (["inspect", "no-such-artifact", "--png", "plan.unknown"], ["--png 'plan.unknown'"]),
    (["verify", "no-such-artifact", "--psnr-floor", "nan"], ["psnr_floor must be a number of dB >= 0", "nan"]),
    (["verify", "no-such-artifact", "--psnr-floor", "-1"], ["psnr_floor must be", "-1"]),
    (["demo", "--steps", "0"], ["steps must be a positive int, got 0"]),  # was ZeroDivisionError
    (["demo", "--latent-size", "-1"], ["latent_size must be 1 to 256", "-1"]),
    (["demo", "--latent-size", "100000"], ["latent_size must be 1 to 256"]),  # was a 160 GB allocation
    (["demo", "--latent-size", "200"], ["position table covers (96 latent tokens per side)"]),
    (["demo", "--guidance", "nan"], ["guidance must be a finite number", "nan"]),
    (["demo", "--method", "arrow:1/0"], ["'1/0'"]),
]


@pytest.mark.parametrize("argv, words", BAD_INPUT, ids=[" ".join(argv) for argv, _ in BAD_INPUT])
def test_bad_input_is_refused_without_traceback(argv, words, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    _refused([*argv, *(["--out", str(tmp_path / "o"), "--quiet"] if argv[0] == "optimize" else [])], capsys, *words)
    assert not (tmp_path / "o").exists()


@pytest.mark.skipif(not NO_GPU, reason="a CUDA device is there")
def test_a_missing_cuda_device_is_named(capsys):
    _refused(["optimize", "tiny-sd3", "--device", "cuda", "--quiet"], capsys, "device 'cuda' is not available")
    _refused(["generate", "no-such-artifact", "a cube", "--device", "cuda"], capsys)  # no traceback either way


def test_check_device():
    import torch

    from ditfa_optimum.loading import check_device

    assert check_device(None) is None and check_device("cpu") == torch.device("cpu")
    for bad in ("bogus", "", "meta", "cuda:99"):
        with pytest.raises(ValueError, match="device"):
            check_device(bad)


def test_method_fraction_dividing_by_zero_is_a_value_error():
    from ditfa_optimum.methods import make_method

    with pytest.raises(ValueError, match=r"1/8, got '1/0'"):
        make_method("arrow:1/0")


def test_optimize_names_a_prompts_file_that_is_not_utf8(tmp_path, capsys):
    prompts = tmp_path / "prompts.txt"
    prompts.write_bytes(b"\xff\xfe\x00 not text")
    _refused(["optimize", "--prompts", str(prompts), "--quiet", "--out", str(tmp_path / "o")], capsys,
             "prompts.txt' is not UTF-8 text")


def test_demo_out_must_be_a_directory_that_can_be_written(tmp_path, capsys):
    demo = ["demo", "--steps", "2", "--latent-size", "4", "--block-size", "4"]
    a_file = tmp_path / "notes.txt"
    a_file.write_text("notes")
    _refused([*demo, "--out", str(a_file)], capsys, "is a file, not a directory")
    _refused([*demo, "--out", str(a_file / "plans")], capsys, "notes.txt is a file, not a directory")
    assert a_file.read_text() == "notes"
    if Path("/proc/self").is_dir():  # not even root can create a directory there
        _refused([*demo, "--out", "/proc/ditfa-plans"], capsys, "cannot write the plan to /proc/ditfa-plans")


@pytest.mark.parametrize("flag", [["--steps", "0"], ["--height", "0"], ["--width", "0"]])
@pytest.mark.parametrize("command", ["generate", "bench"])
def test_generate_and_bench_refuse_zero_instead_of_using_the_artifacts_value(artifact, command, flag, tmp_path,
                                                                             capsys):
    argv = [command, str(artifact), *(["a cube", "--out", str(tmp_path / "x.png")] if command == "generate" else
                                      ["--repeats", "1"]), *flag]
    _refused(argv, capsys, "must be a positive int, got 0")
    assert not (tmp_path / "x.png").exists()


def test_generate_image_paths(artifact, tmp_path, capsys):
    nested = tmp_path / "new" / "dir" / "x.png"  # missing parents are created, as for optimize --out
    assert main(["generate", str(artifact), "a cube", "--out", str(nested), "--quiet"]) == 0
    assert nested.is_file()
    capsys.readouterr()
    _refused(["generate", str(artifact), "a cube", "--out", str(tmp_path), "--quiet"], capsys, "names no image format")
    _refused(["generate", str(artifact), "a cube", "--out", str(tmp_path / "d.png"), "--height", "100000"], capsys,
             "height 100000 px is larger than this model takes")
    if Path("/proc/self").is_dir():  # a save that fails after the work (not even root creates files there)
        from PIL import Image

        from ditfa_optimum.cli import UserError, _save_image

        with pytest.raises(UserError, match="cannot write --out /proc/ditfa/x.png"):
            _save_image(Image.new("RGB", (4, 4)), Path("/proc/ditfa/x.png"), "--out")


def _edited_record(artifact, tmp_path, change):
    import json
    import shutil

    copy = Path(shutil.copytree(artifact, tmp_path / "edited"))
    config = json.loads((copy / "ditfa_config.json").read_text())
    change(copy, config)
    (copy / "ditfa_config.json").write_text(json.dumps(config))
    return copy


def test_verify_refuses_records_that_do_not_run(artifact, tmp_path, capsys):
    """A record edited to a size the pipeline refuses, or a reference file damaged and its checksum recorded again,
    is refused by name (was: diffusers' ValueError, SafetensorError)."""
    from ditfa_optimum.serialization import ArtifactError
    from ditfa_optimum.verify import verify_artifact

    odd = _edited_record(artifact, tmp_path / "a", lambda path, c: c["reproducibility"].update(width=63))
    with pytest.raises(ArtifactError, match=r"record's settings .*64x63.* do not run on this model"):
        verify_artifact(odd)

    def damage(path, config):
        (path / "reproducibility.safetensors").write_bytes(b"not safetensors")
        config["files"]["reproducibility.safetensors"] = sha256(path / "reproducibility.safetensors")

    with pytest.raises(ArtifactError, match="reproducibility.safetensors is not a readable safetensors file"):
        verify_artifact(_edited_record(artifact, tmp_path / "b", damage))


def test_verify_reads_only_checked_record_fields(artifact, tmp_path):
    """Entries check_record does not require (an image's own prompt and seed, the guidance) may be missing."""
    from ditfa_optimum.verify import verify_artifact

    def strip(path, config):
        record = config["reproducibility"]
        for key in ("prompts", "seeds", "images"):  # one image is enough
            record[key] = record[key][:1]
        record.pop("guidance_scale")
        for entry in record["images"]:
            entry.pop("prompt"), entry.pop("seed")

    report = verify_artifact(_edited_record(artifact, tmp_path, strip))
    assert report.rows and "prompt" in report.rows[0].detail  # it ran (guidance None: the images differ)


def test_generate_at_another_step_count_remaps_with_one_warning_or_refuses(artifact, tmp_path, capsys, caplog):
    out = tmp_path / "x.png"
    assert main(["generate", str(artifact), "a cube", "--out", str(out), "--quiet", "--steps", "3"]) == 0
    assert out.exists()
    warnings = [r.getMessage() for r in caplog.records if "runs remapped" in r.getMessage()]
    assert len(warnings) == 1 and "searched for 4 steps and runs remapped at 3" in warnings[0]
    assert "runs remapped" not in capsys.readouterr().err  # no second copy of the message from the CLI
    out.unlink()
    _refused(["generate", str(artifact), "a cube", "--out", str(out), "--steps", "3", "--strict-steps"], capsys,
             "--steps 3: the plan was searched for 4 steps and --strict-steps refuses to remap it")
    assert not out.exists()
