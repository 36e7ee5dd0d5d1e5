import dataclasses
import json

import pytest
import torch

from ditfa_optimum.masks import TokenLayout, arrow_mask, window_blocks
from ditfa_optimum.plan import PLAN_JSON, PLAN_TENSORS, BlockSpec, CompressionPlan, ModuleSpec
from ditfa_optimum.schema import SCHEMA_VERSION

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
    assert info["method_vocabulary"]["arrow"] == 1 and info["schema_version"] == SCHEMA_VERSION
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

    (tmp_path / PLAN_JSON).write_text(json.dumps({**info, "schema_version": 99}))
    with pytest.raises(ValueError, match="schema_version 99 is newer than this ditfa_optimum reads"):
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


# ---------------------------------------------------------------------------------------------------- block methods
BLOCKS = [BlockSpec(f"transformer_blocks.{i}", (f"transformer_blocks.{i}.attn",),
                    (f"transformer_blocks.{i}.ff",) if i < 2 else (), attn_proj_image=10, attn_proj_text=20,
                    mlp_image=30, mlp_text=40, modulation=50) for i in range(3)]


def block_plan(steps=5, **kwargs):
    """random_plan's heads, but no head cache right after a step where its block does not run."""
    plan = CompressionPlan.uniform(SPECS, num_steps=steps, method="arrow:1/8", blocks=BLOCKS,
                                   model_class="SD3Transformer2DModel", **kwargs)
    for step, name in enumerate(["compute", "block_cache", "block_taylor", "mlp_cache", "block_taylor"][:steps]):
        plan.set_block("transformer_blocks.0", step, name)
    plan.set_block("transformer_blocks.2", 3, "block_taylor")
    plan.set("transformer_blocks.1.attn", 2, 4, "cache")
    return plan


def test_block_plan_round_trip(tmp_path):
    from safetensors.torch import load_file

    plan = block_plan(metadata={"note": "blocks"})
    plan.save(tmp_path)
    tensors = load_file(tmp_path / PLAN_TENSORS)
    assert tensors["transformer_blocks.0.block_method"].dtype == torch.int16
    assert tensors["transformer_blocks.0.block_method"].tolist() == [0, 1, 2, 3, 2]
    info = json.loads((tmp_path / PLAN_JSON).read_text())
    assert info["schema_version"] == SCHEMA_VERSION and info["block_method_vocabulary"]["block_taylor"] == 2
    assert info["blocks"][0]["mlps"] == ["transformer_blocks.0.ff"] and "block_methods" not in info
    back = CompressionPlan.load(tmp_path)
    assert back == plan and back.blocks == BLOCKS
    for name in plan.block_names:
        assert torch.equal(back.block_methods[name], plan.block_methods[name])
    assert str(back.block_method("transformer_blocks.0", 3)) == "mlp_cache"
    assert back.block_counts() == {"compute": 10, "block_cache": 1, "block_taylor": 3, "mlp_cache": 1}
    assert "3 blocks: compute 67%, block_taylor 20%" in back.summary()


def test_block_entries_default_to_compute():
    plan = CompressionPlan.uniform(SPECS, num_steps=3, blocks=BLOCKS)
    assert all(plan.block_methods[b.name].tolist() == [0, 0, 0] for b in BLOCKS)
    assert not plan.skips_blocks and plan.block_counts() == {"compute": 9}
    assert plan.block_of("transformer_blocks.1.attn") == BLOCKS[1]


def test_version_1_plan_loads(tmp_path):
    """A plan written by format 1 (before blocks): JSON and tensors as that version wrote them."""
    from safetensors.torch import save_file

    ids = torch.tensor([[0, 0], [2, 1]], dtype=torch.int16)
    params = torch.tensor([[0.0, 0.0], [0.0, 0.125]], dtype=torch.float64)
    save_file({"transformer_blocks.0.attn.method": ids, "transformer_blocks.0.attn.param": params},
              tmp_path / PLAN_TENSORS, metadata={"format": "pt"})
    (tmp_path / PLAN_JSON).write_text(json.dumps({
        "format_version": 1, "model_class": "SD3Transformer2DModel", "block_size": 128, "num_steps": 2,
        "method_vocabulary": {"arrow": 1, "arrow_residual": 4, "cache": 2, "cfg_share": 3, "full": 0},
        "modules": [{"name": "transformer_blocks.0.attn", "num_heads": 2, "head_dim": 64, "image_first": True,
                     "joint": True}],
        "metadata": {"note": "v1"}}))
    plan = CompressionPlan.load(tmp_path)
    assert plan.blocks == [] and plan.block_methods == {} and not plan.skips_blocks
    assert [str(m) for m in plan.step_methods("transformer_blocks.0.attn", 1)] == ["cache", "arrow:0.125"]
    assert plan.metadata == {"note": "v1"} and plan.block_counts() == {}
    with pytest.raises(ValueError, match="records no blocks .*use plan.flops"):
        plan.transformer_flops(4096, 333)
    plan.save(tmp_path / "again")
    assert CompressionPlan.load(tmp_path / "again") == plan


def _cache_after_skip(plan):
    plan.block_methods["transformer_blocks.1"][1] = 1
    plan.methods["transformer_blocks.1.attn"][2, 3] = 2


def _residual_in_skipped_step(plan):
    plan.block_methods["transformer_blocks.1"][2] = 1
    plan.methods["transformer_blocks.1.attn"][2, 0] = 0
    plan.methods["transformer_blocks.1.attn"][3, 0] = 4
    plan.params["transformer_blocks.1.attn"][3, 0] = 0.25


@pytest.mark.parametrize("change,match", [
    (lambda p: p.block_methods["transformer_blocks.0"].__setitem__(0, 1),
     "block 'transformer_blocks.0' step 0: `block_cache`, but step 0 must be `compute`"),
    (lambda p: p.block_methods["transformer_blocks.0"].__setitem__(0, 3), "step 0 must be `compute`"),
    (lambda p: p.block_methods["transformer_blocks.2"].__setitem__(2, 3),
     "block 'transformer_blocks.2' step 2: `mlp_cache` .* no separately callable MLP"),
    (_cache_after_skip, "module 'transformer_blocks.1.attn' step 2 head 3: `cache` reuses the head's output of step 1, "
                        "but its block 'transformer_blocks.1' does not run at step 1 \\(`block_cache`\\); compute the "
                        "head at step 2 or run the block at step 1"),
    (_residual_in_skipped_step, "module 'transformer_blocks.1.attn' step 2 head 0: this `full` step records the "
                                "residual .* does not run at step 2"),
    (lambda p: p.block_methods["transformer_blocks.1"].__setitem__(1, 9),
     "block 'transformer_blocks.1' step 1: unknown block method 9"),
    (lambda p: p.block_methods.__setitem__("transformer_blocks.1", torch.zeros(4)),
     r"block 'transformer_blocks.1': its block method tensor must be \[num_steps=5\], got \(4,\)"),
    (lambda p: p.block_methods.__setitem__("transformer_blocks.9", torch.zeros(5)),
     r"block methods are given for \['transformer_blocks.9'\], which are not among the plan's blocks"),
    (lambda p: p.blocks.__setitem__(2, BlockSpec("transformer_blocks.2", ())),
     r"attention modules \['transformer_blocks.2.attn'\] belong to none of the plan's blocks"),
    (lambda p: p.blocks.__setitem__(2, BlockSpec("transformer_blocks.2", ("transformer_blocks.1.attn",))),
     "'transformer_blocks.1.attn' is listed by two blocks"),
    (lambda p: p.blocks.__setitem__(2, BlockSpec("transformer_blocks.2", ("transformer_blocks.2.attn", "x.attn"))),
     "block 'transformer_blocks.2' lists attention module 'x.attn', which the plan does not cover"),
    (lambda p: p.blocks.append(BLOCKS[0]), "block names repeat"),
])
def test_bad_block_plans(change, match):
    plan = CompressionPlan.uniform(SPECS, num_steps=5, blocks=BLOCKS)
    parts = dict(modules=plan.modules, methods=plan.methods, params=plan.params, blocks=list(plan.blocks),
                 block_methods=plan.block_methods)
    change(plan)
    with pytest.raises(ValueError, match=match):
        CompressionPlan(**{**parts, "blocks": plan.blocks, "block_methods": plan.block_methods})


def test_bad_block_spec_numbers():
    with pytest.raises(ValueError, match="block 'b': mlp_image must be an integer number of FLOPs >= 0, got -1"):
        BlockSpec("b", ("b.attn",), mlp_image=-1)


def test_set_block_and_set_revalidate_and_roll_back():
    plan = CompressionPlan.uniform(SPECS, num_steps=4, blocks=BLOCKS)
    plan.set_block("transformer_blocks.0", 1, "block_cache")
    with pytest.raises(ValueError, match="step 0 must be `compute`"):
        plan.set_block("transformer_blocks.0", 0, "block_taylor")
    assert str(plan.block_method("transformer_blocks.0", 0)) == "compute"
    with pytest.raises(ValueError, match="head 1: `cache` reuses the head's output of step 1, but its block"):
        plan.set("transformer_blocks.0.attn", 2, 1, "cache")  # a head rule that depends on the block
    assert str(plan.method("transformer_blocks.0.attn", 2, 1)) == "full"
    plan.set("transformer_blocks.0.attn", 3, 1, "cache")  # block 0 ran at step 2: fine
    with pytest.raises(ValueError, match="step 3 head 1: `cache` .* does not run at step 2"):
        plan.set_block("transformer_blocks.0", 2, "block_cache")
    assert str(plan.block_method("transformer_blocks.0", 2)) == "compute"
    with pytest.raises(KeyError, match="the plan has no block 'nope'"):
        plan.set_block("nope", 1, "block_cache")
    with pytest.raises(ValueError, match="unknown block method 'later'"):
        plan.set_block("transformer_blocks.0", 1, "later")


def test_head_outputs_are_kept_only_for_blocks_that_run():
    plan = CompressionPlan.uniform(SPECS, num_steps=4, method="cache", blocks=BLOCKS)
    assert plan.output_keeps("transformer_blocks.0.attn")[:3].all()
    plan.set_block("transformer_blocks.0", 3, "block_cache")  # step 3's cache heads never run: step 2 keeps nothing
    assert plan.output_keeps("transformer_blocks.0.attn")[:3].tolist() == [[True] * 6, [True] * 6, [False] * 6]


def test_validate_against_model_blocks():
    plan = block_plan()
    plan.validate(SPECS, blocks=BLOCKS)
    plan.validate(SPECS, blocks=[dataclasses.replace(b, mlp_text=1) for b in BLOCKS])  # FLOP counts: informative
    with pytest.raises(ValueError, match=r"the model lacks \['transformer_blocks.2'\] and the plan lacks \[\]"):
        plan.validate(SPECS, blocks=BLOCKS[:2])
    other = [dataclasses.replace(b, mlps=()) for b in BLOCKS]
    with pytest.raises(ValueError, match=r"block 'transformer_blocks.0': the plan has attention modules .* and MLPs "
                                         r"\['transformer_blocks.0.ff'\], the model .* and \[\]"):
        plan.validate(SPECS, blocks=other)
    CompressionPlan.uniform(SPECS, num_steps=2).validate(SPECS, blocks=BLOCKS)  # a plan without blocks fits any


def test_load_rejects_damaged_block_entries(tmp_path):
    from safetensors.torch import load_file, save_file

    block_plan().save(tmp_path)
    tensors = {k: v.clone() for k, v in load_file(tmp_path / PLAN_TENSORS).items()}  # the file is rewritten below
    bad = dict(tensors)
    bad["transformer_blocks.1.block_method"] = bad["transformer_blocks.1.block_method"].clone().fill_(42)
    save_file(bad, tmp_path / PLAN_TENSORS)
    with pytest.raises(ValueError, match=r"block 'transformer_blocks.1': block method ids \[42\] are not in"):
        CompressionPlan.load(tmp_path)
    del bad["transformer_blocks.1.block_method"]
    save_file(bad, tmp_path / PLAN_TENSORS)
    with pytest.raises(ValueError, match="lack 'transformer_blocks.1.block_method'"):
        CompressionPlan.load(tmp_path)
    save_file({**tensors, "transformer_blocks.7.block_method": torch.zeros(5, dtype=torch.int16)},
              tmp_path / PLAN_TENSORS)
    with pytest.raises(ValueError, match=r"keys no module or block of the plan names: \['transformer_blocks.7"):
        CompressionPlan.load(tmp_path)


def _linear(i, o):
    return 2 * i * o


@pytest.mark.parametrize("cfg", [False, True])
def test_transformer_flops_by_hand_on_tiny_sd3(cfg):
    from ditfa_optimum.apply import uniform_plan
    from ditfa_optimum.tiny import TINY_CONFIGS, tiny_transformer

    model = tiny_transformer("sd3")
    conf = TINY_CONFIGS["sd3"]
    d, heads, hd, layers = 32, conf["num_attention_heads"], conf["attention_head_dim"], conf["num_layers"]
    n_img, n_txt, steps = 120, 7, 3
    S = n_img + n_txt
    plan = uniform_plan(model, num_steps=steps, block_size=4)
    plan.set("transformer_blocks.0.attn", 1, 0, "arrow:1/2")
    plan.set("transformer_blocks.0.attn", 2, 1, "cfg_share")
    plan.set_block("transformer_blocks.1", 1, "block_cache")
    plan.set_block("transformer_blocks.1", 2, "mlp_cache")
    plan.set_block("transformer_blocks.3", 2, "block_taylor")
    rep = plan.transformer_flops(n_img, n_txt, cfg=cfg)

    attn = heads * 4 * hd * S * S  # QK^T and PV of every head, 2 FLOPs per multiply-add
    mlp = n_img * (_linear(d, 4 * d) + _linear(4 * d, d)), n_txt * (_linear(d, 4 * d) + _linear(4 * d, d))
    proj = (n_img + n_txt) * 4 * _linear(d, d) + 2 * _linear(d, 6 * d)  # q, k, v, out per stream; AdaLN-Zero x 2
    # the last block: no text output projection, no text MLP, continuous AdaLN (shift, scale) for the text
    last_proj = n_img * 4 * _linear(d, d) + n_txt * 3 * _linear(d, d) + _linear(d, 6 * d) + _linear(d, 2 * d)
    dense = [attn + proj + sum(mlp)] * (layers - 1) + [attn + last_proj + mlp[0]]
    assert rep.block_names == [f"transformer_blocks.{i}" for i in range(layers)]
    assert rep.dense.tolist() == [[x] * steps for x in dense]

    layout = TokenLayout(n_img, n_txt, block_size=4)
    arrow = 4 * hd * int(arrow_mask(layout, window_blocks(1 / 2, layout.num_image_blocks)).sum())
    half = 4 * hd * S * S / 2 if cfg else 4 * hd * S * S
    planned = torch.tensor([[x] * steps for x in dense], dtype=torch.float64)
    planned[0, 1] += arrow - 4 * hd * S * S
    planned[0, 2] += half - 4 * hd * S * S
    planned[1, 1] = 0.0  # block_cache: nothing runs
    planned[1, 2] = attn + proj  # mlp_cache: no MLP
    planned[3, 2] = 0.0
    assert torch.equal(rep.planned, planned)
    assert rep.cut == pytest.approx(1 - planned.sum().item() / (steps * sum(dense)), rel=1e-12)
    assert rep.cut_per_block()["transformer_blocks.2"] == 0.0
    assert rep.cut_per_step()[0] == 0.0

    table = plan.report(n_img, n_txt, cfg).table()
    assert "transformer_blocks.1   " in table and ".CM" in table and "..T" in table and "total (blocks)" in table


def test_transformer_flops_by_hand_on_tiny_flux():
    from ditfa_optimum.apply import uniform_plan
    from ditfa_optimum.tiny import tiny_transformer

    model = tiny_transformer("flux")  # one double-stream and one single-stream block; 2 heads of 16
    d, n_img, n_txt = 32, 64, 5
    S = n_img + n_txt
    plan = uniform_plan(model, num_steps=2, block_size=4)
    plan.set_block("single_transformer_blocks.0", 1, "block_cache")
    rep = plan.transformer_flops(n_img, n_txt)
    attn = 2 * 4 * 16 * S * S
    double = attn + S * (4 * _linear(d, d) + _linear(d, 4 * d) + _linear(4 * d, d)) + 2 * _linear(d, 6 * d)
    # single: q, k, v on every token; proj_mlp; proj_out over [attn | mlp]; AdaLN-Zero-single (shift, scale, gate)
    single = attn + S * (3 * _linear(d, d) + _linear(d, 4 * d) + _linear(5 * d, d)) + _linear(d, 3 * d)
    assert rep.dense.tolist() == [[double, double], [single, single]]
    assert rep.planned.tolist() == [[double, double], [single, 0.0]]
    with pytest.raises(ValueError, match="no separately callable MLP"):
        plan.set_block("single_transformer_blocks.0", 1, "mlp_cache")


@pytest.mark.parametrize("predicted", ["x", {"nope": [1.0]}, None])
def test_report_leaves_out_a_damaged_predicted_rse_and_refuses_damaged_token_counts(predicted):
    """The report reads display-only metadata: a damaged predicted RSE is left out, not trusted; token counts that are
    not counts (an edited artifact) are refused with a clear error instead of used."""
    plan = random_plan()
    plan.metadata["search"] = {"image_tokens": 256, "text_tokens": 16, "cfg": True, "predicted_rse": predicted}
    report = plan.report()
    assert report.predicted_rse is None and "pred. RSE" not in report.table()
    good = {n: [0.1] * plan.num_steps for n in plan.module_names}
    plan.metadata["search"]["predicted_rse"] = good
    assert plan.report().predicted_rse.shape == (len(plan.modules), plan.num_steps)
    for bad in (10 ** 15, -1, "256", 2.5, True):
        plan.metadata["search"]["image_tokens"] = bad
        with pytest.raises(ValueError, match="image_tokens must be a token count"):
            plan.report()
