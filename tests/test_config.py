import json

import pytest

from ditfa_optimum.config import BUDGET_SCHEDULES, DEFAULT_METHODS, DiTFastAttnConfig


def test_defaults_and_candidates():
    cfg = DiTFastAttnConfig()
    names = [str(m) for m in cfg.candidates()]
    assert names[0] == "full" and len(names) == 1 + len(DEFAULT_METHODS)
    assert "cache" in names and "cfg_share" in names


def test_json_round_trip():
    cfg = DiTFastAttnConfig(threshold=0.2, methods=("arrow:1/4", "cache"), num_inference_steps=12, height=512,
                            width=768, guidance_scale=4.5, seed=3, cost_model="measured", batch_size=2)
    again = DiTFastAttnConfig.from_dict(json.loads(json.dumps(cfg.to_dict())))
    assert again == cfg and again.methods == ("arrow:1/4", "cache")


def test_duplicate_candidates_collapse():
    cfg = DiTFastAttnConfig(methods=("arrow:1/8", "arrow:0.125", "full"))
    assert [str(m) for m in cfg.candidates()] == ["full", "arrow:0.125"]


@pytest.mark.parametrize("changes, words", [
    (dict(threshold=-0.1), "threshold must be a finite number >= 0"),
    (dict(threshold=float("nan")), "threshold"),
    (dict(threshold="0.1"), "threshold"),
    (dict(methods=("arrow:1/8", "bogus")), "unknown attention method 'bogus'"),
    (dict(methods="cache"), "list of method strings"),
    (dict(methods=("arrow:2",)), "arrow fraction must be in (0, 1]"),
    (dict(methods=("arrow_residual:1/4", "arrow_residual:1/8")), "at most one arrow_residual"),
    (dict(num_inference_steps=0), "num_inference_steps must be a positive int"),
    (dict(height=100.5), "height"),
    (dict(full_steps=0), "full_steps"),
    (dict(num_inference_steps=4, full_steps=5), "full_steps"),
    (dict(cost_model="latency"), "cost_model must be one of"),
    (dict(batch_size=0), "batch_size"),
    (dict(budget_schedule="cosine"), "budget_schedule must be one of"),
    (dict(error_normalization="layer"), "error_normalization must be one of"),
    (dict(verify_plans=-1), "verify_plans must be an int >= 0"),
    (dict(verify_plans=True), "verify_plans must be an int >= 0"),
], ids=lambda v: str(v)[:40] if isinstance(v, dict) else None)
def test_bad_values_name_the_field_and_value(changes, words):
    with pytest.raises(ValueError, match=words.replace("(", r"\(").replace(")", r"\)")):
        DiTFastAttnConfig(**changes)


def test_from_dict_rejects_unknown_fields():
    with pytest.raises(ValueError, match="unknown DiTFastAttnConfig fields"):
        DiTFastAttnConfig.from_dict({"threshold": 0.1, "thresold": 0.2})


def test_config_is_not_mutated_by_replace():
    cfg = DiTFastAttnConfig(threshold=0.1)
    other = cfg.replace(threshold=0.3)
    assert cfg.threshold == 0.1 and other.threshold == 0.3


@pytest.mark.parametrize("schedule", sorted(BUDGET_SCHEDULES))
def test_step_thresholds_spend_the_same_total_budget(schedule):
    config = DiTFastAttnConfig(threshold=0.1, num_inference_steps=10, full_steps=2, budget_schedule=schedule)
    steps = config.step_thresholds()
    assert len(steps) == 10 and steps[:2] == [0.0, 0.0]
    assert sum(steps[2:]) / 8 == pytest.approx(0.1)
    assert all(b >= a for a, b in zip(steps[2:], steps[3:]))  # never less budget for a later step
    assert (steps[2] == steps[-1]) == (schedule == "constant")


def test_configs_saved_before_the_budget_options_read_as_the_paper_settings():
    old = DiTFastAttnConfig(threshold=0.2).to_dict()
    del old["budget_schedule"], old["error_normalization"]
    config = DiTFastAttnConfig.from_dict(old)
    assert (config.budget_schedule, config.error_normalization, config.threshold) == ("constant", "head", 0.2)


def test_save_pretrained_and_from_pretrained_round_trip(tmp_path):
    """Optimum-style files: a directory or the JSON file itself, fields replaced by keywords, a resave replacing the
    file atomically and touching nothing else."""
    from ditfa_optimum.config import SEARCH_CONFIG_NAME

    config = DiTFastAttnConfig(target_cut=0.45, methods=("arrow:1/8", "cache"), num_inference_steps=12, seed=3)
    path = config.save_pretrained(tmp_path / "cfg")
    assert path == tmp_path / "cfg" / SEARCH_CONFIG_NAME
    assert DiTFastAttnConfig.from_pretrained(tmp_path / "cfg") == config
    assert DiTFastAttnConfig.from_pretrained(path) == config
    assert DiTFastAttnConfig.from_pretrained(str(tmp_path / "cfg"), target_cut=0.6) == config.replace(target_cut=0.6)
    (tmp_path / "cfg" / "notes.txt").write_text("mine")
    config.replace(seed=4).save_pretrained(tmp_path / "cfg")
    assert DiTFastAttnConfig.from_pretrained(tmp_path / "cfg").seed == 4
    assert sorted(p.name for p in (tmp_path / "cfg").iterdir()) == [SEARCH_CONFIG_NAME, "notes.txt"]


def test_from_pretrained_refuses_what_holds_no_config(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="holds neither ditfa_search_config.json"):
        DiTFastAttnConfig.from_pretrained(tmp_path / "empty")
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(ValueError, match="is not a JSON DiTFastAttnConfig"):
        DiTFastAttnConfig.from_pretrained(tmp_path / "bad.json")
    (tmp_path / "file").write_text("x")
    with pytest.raises(ValueError, match="is a file; pass a directory"):
        DiTFastAttnConfig().save_pretrained(tmp_path / "file")


def test_from_pretrained_reads_the_search_config_of_an_artifact(tmp_path):
    from pathlib import Path

    from ditfa_optimum import DiTFastAttnOptimizer
    from ditfa_optimum.apply import uniform_plan

    opt = DiTFastAttnOptimizer.from_pretrained("mini-mmdit")
    config = opt.default_config().replace(num_inference_steps=4, target_cut=0.5)
    opt.plan = uniform_plan(opt.pipeline.transformer, num_steps=4, method="cache", full_steps=1, block_size=32)
    opt.plan.metadata["search"] = {"config": config.to_dict()}
    art = opt.save_pretrained(tmp_path / "art", reproducibility_prompts=0)
    assert DiTFastAttnConfig.from_pretrained(art) == config
    fixture = Path(__file__).parent / "fixtures" / "artifact-schema-2"  # a plan made without a search
    with pytest.raises(ValueError, match="made without a search"):
        DiTFastAttnConfig.from_pretrained(fixture)


def test_from_pretrained_reads_a_hub_repo(tmp_path, monkeypatch):
    import huggingface_hub

    saved = DiTFastAttnConfig(target_cut=0.4).save_pretrained(tmp_path / "hub")
    asked = []

    def download(repo_id, filename, revision=None, **kwargs):
        asked.append((repo_id, filename, revision))
        return str(saved)

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", download)
    assert DiTFastAttnConfig.from_pretrained("someone/ditfa-config", revision="v1").target_cut == 0.4
    assert asked == [("someone/ditfa-config", "ditfa_search_config.json", "v1")]
