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
