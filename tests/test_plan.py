import json

import pytest
import torch

from ditfa_optimum.masks import TokenLayout, arrow_mask, window_blocks
from ditfa_optimum.plan import PLAN_JSON, PLAN_TENSORS, CompressionPlan, ModuleSpec

SPECS = [ModuleSpec(f"transformer_blocks.{i}.attn", num_heads=6, head_dim=64) for i in range(3)]
METHODS = ["full", "arrow:1/8", "arrow:1/16", "cache", "cfg_share", "arrow_residual:1/4"]


def random_plan(specs=SPECS, steps=5, block_size=128):
    """A valid random plan: step 0 full; arrow_residual only after a full step with one fraction."""
    table = {}
    for spec in specs:
        rows = [["full"] * spec.num_heads]
        for _ in range(1, steps):
            rows.append([METHODS[int(i)] for i in torch.randint(0, len(METHODS), (spec.num_heads,))])
        table[spec.name] = rows
    return CompressionPlan.from_methods(specs, table, block_size=block_size, model_class="SD3Transformer2DModel",
                                        metadata={"note": "random"})


def test_round_trip(tmp_path):
    plan = random_plan()
    plan.save(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([PLAN_JSON, PLAN_TENSORS])
    back = CompressionPlan.load(tmp_path)
    assert back == plan and back.metadata == {"note": "random"}
    for name in plan.module_names:
        assert torch.equal(back.methods[name], plan.methods[name])
        assert torch.equal(back.params[name], plan.params[name])
    assert back.method("transformer_blocks.1.attn", 0, 3) == plan.method("transformer_blocks.1.attn", 0, 3)


def test_json_holds_names_not_tensor_values(tmp_path):
    random_plan().save(tmp_path)
    info = json.loads((tmp_path / PLAN_JSON).read_text())
    assert info["method_vocabulary"]["arrow"] == 1 and info["format_version"] == 1
    assert "methods" not in info and "params" not in info


def test_uniform_arrow_flop_cut_matches_mask_nonzeros():
    # SD3 at 1024^2: 4096 image tokens (32 blocks of 128) + 333 text tokens; arrow 1/8 keeps 4 blocks per image row
    plan = CompressionPlan.uniform(SPECS, num_steps=3, method="arrow:1/8", full_steps=0)
    report = plan.flops(image_tokens=4096, text_tokens=333)
    layout = TokenLayout(4096, 333, image_first=True)
    kept = int(arrow_mask(layout, window_blocks(1 / 8, 32)).sum())
    assert report.cut == pytest.approx(1 - kept / layout.seq_len ** 2, rel=1e-12)
    assert all(c == pytest.approx(report.cut) for c in report.cut_per_module().values())
    # the first step full: that step saves nothing
    plan = CompressionPlan.uniform(SPECS, num_steps=3, method="arrow:1/8", full_steps=1)
    per_step = plan.flops(4096, 333).cut_per_step()
    assert per_step[0] == 0 and per_step[1] == pytest.approx(1 - kept / layout.seq_len ** 2)


def test_flops_count_cfg_share_and_residual_recording():
    spec = ModuleSpec("m", num_heads=2, head_dim=8)
    plan = CompressionPlan.from_methods([spec], {"m": [["full", "full"], ["cfg_share", "arrow_residual:1/2"]]},
                                        block_size=4)
    layout = TokenLayout(32, 4, block_size=4)
    dense = 4 * 8 * layout.seq_len ** 2
    arrow = 4 * 8 * int(arrow_mask(layout, 4).sum())
    rep = plan.flops(32, 4, cfg=True)
    # step 0: two full heads + the arrow that records head 1's residual; step 1: half a head + an arrow
    assert rep.planned[0].tolist() == [2 * dense + arrow, dense / 2 + arrow]
    assert plan.flops(32, 4, cfg=False).planned[0, 1] == dense + arrow


def test_method_counts_and_summary():
    plan = CompressionPlan.uniform(SPECS, num_steps=4, method="cache")
    assert plan.method_counts() == {"full": 18, "cache": 54}
    assert "cache 75%" in plan.summary()


@pytest.mark.parametrize("table,match", [
    ([["cache"] * 6], "step 0 head 0: `cache` reuses the previous step's output"),
    ([["arrow:1/8"] * 6, ["arrow_residual:1/8"] * 6], "step 1 head 0: `arrow_residual` needs a `full` step"),
    ([["full"] * 6, ["arrow_residual:1/8"] * 6, ["arrow_residual:1/4"] * 6], "one fraction until the next full"),
    ([["full"] * 5], r"must be \[num_steps, 6\]"),
    ([["full"] * 6, ["bogus"] * 6], "unknown attention method 'bogus'"),
    ([["full"] * 6, ["arrow:0"] * 6], r"fraction must be in \(0, 1\]"),
    ([["full"] * 6, ["arrow:1.25"] * 6], r"fraction must be in \(0, 1\]"),
])
def test_bad_plans(table, match):
    spec = ModuleSpec("blocks.0.attn", num_heads=6, head_dim=8)
    with pytest.raises(ValueError, match=match):
        CompressionPlan.from_methods([spec], {spec.name: table})


def test_bad_tensor_entries_name_the_place():
    spec = ModuleSpec("blocks.0.attn", num_heads=3, head_dim=8)
    methods = torch.zeros(2, 3, dtype=torch.int16)
    methods[1, 2] = 1  # arrow with parameter 0
    with pytest.raises(ValueError, match="module 'blocks.0.attn' step 1 head 2: .*needs its window fraction"):
        CompressionPlan([spec], {spec.name: methods}, {spec.name: torch.zeros(2, 3)})
    methods[1, 2] = 99
    with pytest.raises(ValueError, match="step 1 head 2: unknown attention method 99"):
        CompressionPlan([spec], {spec.name: methods}, {spec.name: torch.zeros(2, 3)})


def test_set_revalidates_and_rolls_back():
    plan = CompressionPlan.uniform(SPECS[:1], num_steps=3)
    plan.set(SPECS[0].name, 2, 1, "cache")
    assert str(plan.method(SPECS[0].name, 2, 1)) == "cache"
    with pytest.raises(ValueError, match="step 0 head 1"):
        plan.set(SPECS[0].name, 0, 1, "cache")
    assert str(plan.method(SPECS[0].name, 0, 1)) == "full"


@pytest.mark.parametrize("change,match", [
    (lambda s: s[:-1], r"the model lacks \['transformer_blocks.2.attn'\] and the plan lacks \[\]"),
    (lambda s: s + [ModuleSpec("transformer_blocks.3.attn", 6, 64)], "model lacks"),
    (lambda s: [ModuleSpec(x.name, 8, 64) for x in s], "the plan has 6 heads of dim 64, the model 8 heads"),
    (lambda s: [ModuleSpec(x.name, 6, 128) for x in s], "6 heads of dim 128"),
])
def test_validate_against_a_model(change, match):
    plan = random_plan()
    with pytest.raises(ValueError, match=match):
        plan.validate(change(list(SPECS)))


def test_validate_steps_and_class():
    plan = random_plan(steps=5)
    plan.validate(SPECS, num_steps=5)
    plan.validate(SPECS, num_steps=3)
    with pytest.raises(ValueError, match="covers 5 denoising steps but the pipeline runs 8"):
        plan.validate(SPECS, num_steps=8)
    with pytest.raises(ValueError, match="made for a SD3Transformer2DModel, but the transformer is a Flux"):
        plan.validate(SPECS, model_class="FluxTransformer2DModel")


def test_load_rejects_damaged_files(tmp_path):
    from safetensors.torch import load_file, save_file

    plan = random_plan()
    plan.save(tmp_path)
    info = json.loads((tmp_path / PLAN_JSON).read_text())

    (tmp_path / PLAN_JSON).write_text(json.dumps({**info, "format_version": 99}))
    with pytest.raises(ValueError, match="format version 99 is not supported"):
        CompressionPlan.load(tmp_path)
    (tmp_path / PLAN_JSON).write_text("{not json")
    with pytest.raises(ValueError, match="is not valid JSON"):
        CompressionPlan.load(tmp_path)
    (tmp_path / PLAN_JSON).write_text(json.dumps(info))

    tensors = load_file(tmp_path / PLAN_TENSORS)
    bad = dict(tensors)
    bad["transformer_blocks.0.attn.method"] = bad["transformer_blocks.0.attn.method"].clone().fill_(42)
    save_file(bad, tmp_path / PLAN_TENSORS)
    with pytest.raises(ValueError, match=r"method ids \[42\] are not in the plan's vocabulary"):
        CompressionPlan.load(tmp_path)
    del bad["transformer_blocks.0.attn.method"]
    save_file(bad, tmp_path / PLAN_TENSORS)
    with pytest.raises(ValueError, match="lack 'transformer_blocks.0.attn.method'"):
        CompressionPlan.load(tmp_path)
    (tmp_path / PLAN_TENSORS).unlink()
    with pytest.raises(FileNotFoundError, match="plan.safetensors does not exist"):
        CompressionPlan.load(tmp_path)
