import importlib
import os

import pytest
import torch

from ditfa_optimum import apply, remove
from ditfa_optimum.calibrate import _Session, calibrate, run_pipeline
from ditfa_optimum.config import DiTFastAttnConfig
from ditfa_optimum.masks import TokenLayout
from ditfa_optimum.methods import make_method
from ditfa_optimum.optimizer import DiTFastAttnOptimizer
from ditfa_optimum.plan import CompressionPlan, ModuleSpec
from ditfa_optimum.prompts import default_prompts, held_out_prompts
from ditfa_optimum.search import search

from search_helpers import FAMILIES, tiny_setup

# the package re-exports the function `calibrate`, which shadows the module attribute of the same name
calibrate_module = importlib.import_module("ditfa_optimum.calibrate")


def _close(a, b):
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def _head_sums(x):
    return x.double().pow(2).sum(dim=(0, 2, 3))


def test_local_metric_follows_its_definition():
    """One module, two steps, driven by hand: every recorded error is mean((O' - O)^2) / var(O) of that head."""
    spec = ModuleSpec("m", num_heads=4, head_dim=8, image_first=True, joint=True)
    config = DiTFastAttnConfig(threshold=0.05, allocation="local", methods=("arrow:1/4", "cache", "cfg_share"),
                               num_inference_steps=2, block_size=8)
    session = _Session([spec], config.candidates(), config, cfg=True)
    module = session.module(spec)
    layout = TokenLayout(64, 5, True, 8)
    full_m, arrow, cfg_share = make_method("full"), make_method("arrow:1/4"), make_method("cfg_share")
    outs = []
    for step in range(2):
        session.state.set_step(step)
        q, k, v = (torch.randn(2, 4, 69, 8) for _ in range(3))
        out = module(q, k, v, num_text_tokens=5)
        full = full_m.reference(q, k, v)
        err, ref = session.err["m"][step], session.ref["m"][step]
        _close(ref, _head_sums(full - full.mean(dim=(0, 2, 3), keepdim=True)))
        if step == 0:  # full steps measure nothing else
            assert torch.isinf(err[:, 1:]).all()
            _close(out, full)
        else:
            _close(err[:, 1], _head_sums(arrow.reference(q, k, v, layout) - full))
            _close(err[:, 2], _head_sums(outs[0] - full))  # cache: the previous step's output
            _close(err[:, 3], _head_sums(cfg_share.reference(q, k, v) - full))
            # what flows on is each head's chosen method's output
            choice = session.decided["m"][step]
            expected = torch.stack([
                [full, arrow.reference(q, k, v, layout), outs[0], cfg_share.reference(q, k, v)][int(c)][:, h]
                for h, c in enumerate(choice)], dim=1)
            _close(out, expected)
            rse = (err / ref[:, None]).gather(1, choice[:, None])[:, 0]
            assert float(rse.sum()) <= config.threshold * 4 + 1e-12
        outs.append(out)


METHOD_SETS = {
    "default": None,
    "residual": ("arrow_residual:1/8", "arrow:1/4", "cache"),
}


@pytest.mark.parametrize("methods", list(METHOD_SETS), ids=list(METHOD_SETS))
@pytest.mark.parametrize("family", FAMILIES)
def test_calibration_flow_is_what_the_runtime_runs(family, methods, monkeypatch):
    """The activations the calibration lets flow are exactly what the applied plan produces."""
    changes = {"threshold": 0.2, "max_head_rse": 1e9}  # uncapped: random weights make `cache` errors large
    if METHOD_SETS[methods]:
        changes["methods"] = METHOD_SETS[methods]
    pipe, encoder, config = tiny_setup(family, **changes)
    captured = []

    def capture(*args, **kwargs):
        captured.append(run_pipeline(*args, **kwargs))
        return captured[-1]

    monkeypatch.setattr(calibrate_module, "run_pipeline", capture)
    prompts = default_prompts(2)
    stats = calibrate(pipe, config, prompts, prompt_encoder=encoder, progress=False)
    plan = search(stats, config)
    assert set(plan.method_counts()) - {"full"}, "the plan compresses nothing; the test would prove nothing"
    if methods == "residual":
        assert "arrow_residual" in plan.method_counts() and "cache" in plan.method_counts(), plan.method_counts()
    apply(pipe, plan, backend="reference")
    planned = run_pipeline(pipe, prompts, config, prompt_encoder=encoder)
    remove(pipe)
    dense = run_pipeline(pipe, prompts, config, prompt_encoder=encoder)
    flow_gap = float((planned - captured[0]).abs().max())  # float32 rounding of differently batched SDPA calls
    plan_effect = float((planned - dense).abs().max())
    assert flow_gap < 1e-4 and plan_effect > 100 * flow_gap, (flow_gap, plan_effect)


@pytest.mark.parametrize("family", FAMILIES)
def test_held_out_error_stays_within_the_budget(family):
    """A plan searched on calibration prompts keeps its local error budget on prompts it never saw.

    Tolerance (random-weight tiny models, 8 calibration prompts, 4 held out): the held-out mean RSE over heads,
    averaged over (module, step), is at most 1.5x the threshold, and no single (module, step) exceeds 4x.
    """
    pipe, encoder, config = tiny_setup(family, threshold=0.1, num_prompts=8, batch_size=8)
    stats = calibrate(pipe, config, default_prompts(8), prompt_encoder=encoder, progress=False)
    plan = search(stats, config)
    held_out = held_out_prompts(4, calibration_n=8)
    evaluation = calibrate(pipe, config, held_out, prompt_encoder=encoder, plan=plan, progress=False)
    measured = []
    for spec in plan.modules:
        chosen = evaluation.chosen[spec.name].long()
        rse = evaluation.rse(spec.name).gather(2, chosen[..., None])[..., 0]  # [T, H]
        measured.append(rse[config.full_steps:].mean(1))
        # the evaluation followed the plan exactly
        names = [[evaluation.candidates[int(c)] for c in row] for row in chosen]
        assert names == [[str(m) for m in plan.step_methods(spec.name, t)] for t in range(plan.num_steps)]
    measured = torch.stack(measured)
    assert float(measured.mean()) <= 1.5 * config.threshold, measured
    assert float(measured.max()) <= 4.0 * config.threshold, measured

    # and the final latents move away from dense only as much as the compression asks
    dense = run_pipeline(pipe, held_out, config, prompt_encoder=encoder)
    apply(pipe, plan)
    planned = run_pipeline(pipe, held_out, config, prompt_encoder=encoder)
    remove(pipe)
    assert float(((planned - dense) ** 2).mean() / dense.var()) < 0.25


def test_later_batches_follow_the_first_and_add_statistics():
    pipe, encoder, config = tiny_setup("sd3", batch_size=2)
    prompts = default_prompts(4)
    both = calibrate(pipe, config, prompts, prompt_encoder=encoder, progress=False)
    first = calibrate(pipe, config, prompts[:2], prompt_encoder=encoder, progress=False)
    for spec in both.modules:
        assert torch.equal(both.chosen[spec.name], first.chosen[spec.name])
        assert bool((both.ref[spec.name] > first.ref[spec.name]).all())  # the second batch added its sums
    assert both.num_prompts == 4 and both.cfg


def test_measured_cost_model_times_each_candidate():
    pipe, encoder, config = tiny_setup("sd3", cost_model="measured", num_inference_steps=3)
    stats = calibrate(pipe, config, default_prompts(2), prompt_encoder=encoder, progress=False)
    name = stats.modules[0].name
    seconds = stats.cost_seconds[name]
    full, cache = stats.candidates.index("full"), stats.candidates.index("cache")
    assert seconds[full] > 0 and seconds[cache] == 0
    plan = search(stats, config)
    assert plan.metadata["search"]["config"]["cost_model"] == "measured"
    with pytest.raises(ValueError, match="no measured costs"):
        search(calibrate(pipe, config.replace(cost_model="flops"), default_prompts(2), prompt_encoder=encoder,
                         progress=False), config)


def test_plan_evaluation_mode_with_a_hand_made_plan():
    pipe, encoder, config = tiny_setup("flux", num_inference_steps=4)
    specs = DiTFastAttnOptimizer(pipe).adapter.module_specs(pipe.transformer)
    plan = CompressionPlan.uniform(specs, 4, "arrow:1/8", block_size=config.block_size)
    stats = calibrate(pipe, config, default_prompts(2), prompt_encoder=encoder, plan=plan, progress=False)
    rse = stats.rse(specs[0].name)[1:, :, stats.candidates.index("arrow:0.125")]
    assert bool((rse > 0).all() & torch.isfinite(rse).all())
    with pytest.raises(ValueError, match="covers 4 denoising steps but the pipeline runs 6"):
        calibrate(pipe, config.replace(num_inference_steps=6), default_prompts(2), prompt_encoder=encoder,
                  plan=plan, progress=False)


# ------------------------------------------------------------------------------------------------ bad input
def test_bad_prompts_are_refused():
    pipe, encoder, config = tiny_setup("sd3")
    with pytest.raises(ValueError, match="prompt list is empty"):
        calibrate(pipe, config, [], prompt_encoder=encoder)
    with pytest.raises(ValueError, match="got a single string"):
        calibrate(pipe, config, "a cat", prompt_encoder=encoder)
    with pytest.raises(ValueError, match="must be strings"):
        calibrate(pipe, config, ["a cat", 3], prompt_encoder=encoder)
    with pytest.raises(ValueError, match="has no text encoder.*prompt_encoder="):
        calibrate(pipe, config, ["a cat"])
    with pytest.raises(ValueError, match="pass the diffusers pipeline, not its transformer"):
        calibrate(pipe.transformer, config, ["a cat"])
    opt = DiTFastAttnOptimizer(pipe, prompt_encoder=encoder)
    with pytest.raises(ValueError, match="prompt list is empty"):
        opt.optimize(config, calibration_prompts=[])
    assert pipe.transformer.attn_processors  # a failed calibration leaves the stock processors in place
    assert all(type(p).__name__ == "JointAttnProcessor2_0" for p in pipe.transformer.attn_processors.values())


def test_unknown_transformer_and_unloadable_models():
    class Pipe:
        transformer = torch.nn.Linear(2, 2)

    with pytest.raises(ValueError, match="no adapter for Linear.*supported transformers"):
        DiTFastAttnOptimizer.from_pretrained(Pipe())
    with pytest.raises(ValueError, match="expected a diffusers pipeline with a .transformer"):
        DiTFastAttnOptimizer.from_pretrained(object())


def test_offline_mode_is_respected(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path))
    with pytest.raises(ValueError, match="HF_HUB_OFFLINE is set"):
        DiTFastAttnOptimizer.from_pretrained("someone/not-a-cached-model")


def test_pipeline_directory_loads_through_from_pretrained(tmp_path):
    pipe, encoder, config = tiny_setup("sd3", num_inference_steps=3)
    pipe.save_pretrained(tmp_path / "pipe")
    none = dict.fromkeys(["vae", "text_encoder", "tokenizer", "text_encoder_2", "tokenizer_2", "text_encoder_3",
                          "tokenizer_3"])
    opt = DiTFastAttnOptimizer.from_pretrained(tmp_path / "pipe", prompt_encoder=encoder, **none)
    assert type(opt.pipeline).__name__ == "StableDiffusion3Pipeline"
    plan = opt.optimize(config, progress=False, save_dir=tmp_path / "plan")
    assert plan.metadata["search"]["base_model"] == os.fspath(tmp_path / "pipe")
    from ditfa_optimum.serialization import read_artifact

    assert read_artifact(tmp_path / "plan").plan == plan
    assert "attention FLOPs cut" in opt.summary()


def test_measured_costs_are_shared_by_identical_computations():
    from ditfa_optimum.calibrate import measure_costs
    from ditfa_optimum.runtime import get_backend

    layout = TokenLayout(64, 5, True, 16)  # 4 image blocks: arrow 1/4 and 1/8 both keep one block
    methods = [make_method(m) for m in ("full", "cfg_share", "arrow:1/4", "arrow:1/8", "cache")]
    seconds = measure_costs(methods, torch.randn(2, 2, 69, 8), layout, cfg=False,
                            backend=get_backend("reference", torch.device("cpu")), repeats=3, warmup=1)
    assert seconds[0] > 0 and seconds[1] == seconds[0]  # cfg_share without CFG computes full attention
    assert seconds[2] == seconds[3] and seconds[4] == 0


def test_trajectory_calibration_end_to_end(one_thread, tmp_path):
    """The default allocation: sensitivity, a dense-flow pass, a plan-flow pass; the search meets the default target;
    the statistics (guided errors and sensitivity included) survive save / load."""
    from ditfa_optimum.calibrate import CalibrationStats
    from ditfa_optimum.config import DEFAULT_TARGET_CUT

    pipe, encoder, config = tiny_setup("sd3", allocation="trajectory")  # the library's default allocation
    assert config.target() == ("cut", DEFAULT_TARGET_CUT) and config.calibration_passes == 2
    stats = calibrate(pipe, config, default_prompts(2), prompt_encoder=encoder, progress=False)
    sens = stats.sensitivity
    assert sens is not None and sens.num_steps == config.num_inference_steps and sens.guidance_scale == 5.0
    assert sens.num_prompts == 2
    assert len(stats.passes) == 1  # two passes: the first one's allocation flowed in the second
    assert stats.flow_lambda is not None and stats.flow_lambda == stats.passes[0]["lambda"]
    assert stats.passes[0]["target"] == {"cut": DEFAULT_TARGET_CUT}
    for spec in stats.modules:
        guided = stats.err_guided[spec.name]
        assert guided.shape == stats.err[spec.name].shape
        assert bool((guided[config.full_steps:, :, 1:] >= 0).all())
        assert bool(torch.isinf(guided[0, :, 1:]).all()) and bool((guided[:, :, 0] == 0).all())

    plan = search(stats, config)
    info = plan.metadata["search"]
    assert info["allocation"] == "trajectory" and info["target"] == {"cut": DEFAULT_TARGET_CUT}
    assert info["flop_cut"] >= DEFAULT_TARGET_CUT - 1e-9
    assert set(plan.method_counts()) - {"full"}, "the plan compresses nothing; the test would prove nothing"

    stats.save(tmp_path / "stats")
    again = CalibrationStats.load(tmp_path / "stats")
    for name, t in stats.err_guided.items():
        assert torch.equal(again.err_guided[name], t), name
    for name, g in sens.gain.items():
        assert torch.equal(again.sensitivity.gain[name], g), name
    assert again.sensitivity.step_factor == sens.step_factor
    assert again.sensitivity.guidance_scale == sens.guidance_scale
    assert again.flow_lambda == stats.flow_lambda and again.passes == stats.passes
    assert search(again, config) == plan


def test_optimizer_uses_the_embedded_models_own_defaults():
    """`optimize()` with no config calibrates the embedded model at its own resolution and steps, as the CLI does."""
    from ditfa_optimum import DiTFastAttnOptimizer
    from ditfa_optimum.embedded import DEFAULTS

    opt = DiTFastAttnOptimizer.from_pretrained("tiny-sd3")
    config = opt.default_config()
    d = DEFAULTS["tiny-sd3"]
    assert (config.height, config.num_inference_steps, config.block_size, config.guidance_scale) == (
        d["size"], d["steps"], d["block_size"], d["guidance"])
    assert config.allocation == "trajectory"


def test_block_methods_are_calibrated_and_searched_with_the_heads(one_thread, tmp_path):
    """Block candidates: measured per (block, step), chosen by the same Lagrangian, a valid plan that runs, cuts whole-
    transformer FLOPs as asked, and statistics that survive save / load."""
    from ditfa_optimum.calibrate import CalibrationStats

    pipe, encoder, config = tiny_setup("sd3", allocation="trajectory", max_head_rse=1e9,
                                       block_methods=("block_cache", "block_taylor"), target_cut=0.6)
    stats = calibrate(pipe, config, default_prompts(2), prompt_encoder=encoder, progress=False)
    names = [b.name for b in stats.blocks]
    assert names and stats.block_candidates == ["compute", "block_cache", "block_taylor"]
    for b in names:
        assert stats.block_err[b].shape == (config.num_inference_steps, 3)
        assert bool(torch.isinf(stats.block_err[b][0, 1:]).all())  # nothing to reuse at step 0
        assert bool(torch.isfinite(stats.block_err[b][2:, 1:]).all()) and bool((stats.block_ref[b] > 0).all())
        assert float(stats.block_cost[b].sum()) > 0
    plan = search(stats, config)
    info = plan.metadata["search"]
    assert plan.skips_blocks and info["whole_cut"] >= 0.6 - 1e-9
    for b in names:  # never longer skipped runs than max_skip_run
        run = 0
        for t in range(plan.num_steps):
            run = run + 1 if plan.block_method(b, t).name != "compute" else 0
            assert run <= config.max_skip_run
    apply(pipe, plan, backend="reference")  # validates: no `cache` head right after a skipped step
    try:
        out = run_pipeline(pipe, default_prompts(2), config, prompt_encoder=encoder)
    finally:
        remove(pipe)
    assert out.isfinite().all()
    stats.save(tmp_path)
    again = CalibrationStats.load(tmp_path)
    assert again.blocks == stats.blocks and all(torch.equal(again.block_err[b], stats.block_err[b]) for b in names)
    assert search(again, config) == plan


def test_progress_bars_label_the_pipeline_bar_and_give_the_users_setting_back():
    from ditfa_optimum.calibrate import progress_bars

    class Pipe:
        def set_progress_bar_config(self, **kwargs):
            self._progress_bar_config = kwargs

    pipe = Pipe()
    pipe.set_progress_bar_config(desc="mine", ncols=80)
    with progress_bars(pipe, True, "ditfa run factors (skipped steps)"):
        assert pipe._progress_bar_config == {"desc": "ditfa run factors (skipped steps)", "ncols": 80, "leave": False,
                                             "disable": False}
    assert pipe._progress_bar_config == {"desc": "mine", "ncols": 80}
    bare = Pipe()
    with progress_bars(bare, False):
        assert bare._progress_bar_config == {"leave": False, "disable": True}
    assert not hasattr(bare, "_progress_bar_config")
