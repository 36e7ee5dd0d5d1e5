"""The trained miniature MMDiT shipped in the package: loading, generation, text encoder, training, optimizer use.

Training and scene rendering live outside the package, in training/ (imported with the repository root on sys.path,
as benchmarks/ is)."""

import logging
import sys
from pathlib import Path

import pytest
import torch

from ditfa_optimum import DiTFastAttnConfig, DiTFastAttnOptimizer, load_pipeline, remove
from ditfa_optimum.calibrate import run_pipeline
from ditfa_optimum.mini import ASSET_DIR, TRANSFORMER_CONFIG, MiniTextEncoder, mini_pipeline, new_pipeline
from ditfa_optimum.mini.grammar import WORDS, evaluation_captions

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from training.scenes import faithfulness  # noqa: E402

CAPTIONS = ["a small red circle in the top left and a large blue square at the bottom",
            "a medium green triangle in the center"]


@pytest.fixture(scope="module")
def pipe():
    return mini_pipeline()


def generate(pipe, captions, seed=0, steps=4, **kwargs):
    gens = [torch.Generator().manual_seed(seed + i) for i in range(len(captions))]
    return pipe(captions, num_inference_steps=steps, generator=gens, output_type="pt", **kwargs).images


def test_the_shipped_model_is_small_and_complete():
    files = sorted(p.relative_to(ASSET_DIR).as_posix() for p in ASSET_DIR.rglob("*") if p.is_file())
    assert "transformer/diffusion_pytorch_model.safetensors" in files and "model_index.json" in files
    assert not [f for f in files if f.endswith((".bin", ".pt", ".pkl"))]  # safetensors and JSON only
    assert sum(p.stat().st_size for p in ASSET_DIR.rglob("*") if p.is_file()) <= 20e6


def test_loads_with_the_trained_architecture(pipe):
    assert {k: pipe.transformer.config[k] for k in TRANSFORMER_CONFIG} == TRANSFORMER_CONFIG
    assert pipe.transformer.dtype == torch.float32 and not pipe.transformer.training
    assert list(pipe.text_encoder.config.vocab) == list(WORDS)


def test_generation_is_deterministic_for_a_seed(pipe):
    a, b = generate(pipe, CAPTIONS), generate(pipe, CAPTIONS)
    assert a.shape == (2, 3, 64, 64) and a.dtype == torch.float32
    assert float(a.min()) >= 0.0 and float(a.max()) <= 1.0
    assert torch.equal(a, b)
    assert not torch.equal(a, generate(pipe, CAPTIONS, seed=7))
    # a caption's image does not depend on the batch it is in
    torch.testing.assert_close(generate(pipe, CAPTIONS[1:], seed=1), a[1:], atol=1e-5, rtol=1e-5)


def test_output_types_and_no_cfg(pipe):
    raw = pipe(CAPTIONS[:1], num_inference_steps=2, generator=torch.Generator().manual_seed(0),
               output_type="latent").images
    pt = pipe(CAPTIONS[:1], num_inference_steps=2, generator=torch.Generator().manual_seed(0),
              output_type="pt").images
    torch.testing.assert_close(pt, (raw / 2 + 0.5).clamp(0, 1))
    pil = pipe(CAPTIONS[0], num_inference_steps=2, output_type="pil").images[0]
    assert pil.size == (64, 64)
    assert pipe(CAPTIONS[0], num_inference_steps=2, output_type="np").images.shape == (1, 64, 64, 3)
    no_cfg = pipe(CAPTIONS[0], num_inference_steps=2, guidance_scale=1.0, output_type="pt")
    assert not pipe.do_classifier_free_guidance and no_cfg.images.shape == (1, 3, 64, 64)


@pytest.mark.parametrize("kwargs, words", [
    (dict(prompt=CAPTIONS[0], height=63), "positive multiples of 2"),
    (dict(prompt=CAPTIONS[0], output_type="jpeg"), "output_type must be"),
    (dict(), "pass prompt"),
    (dict(prompt=[CAPTIONS[0]], negative_prompt=["", ""]), "2 negative prompts for 1 prompts"),
])
def test_pipeline_errors(pipe, kwargs, words):
    with pytest.raises(ValueError, match=words):
        pipe(num_inference_steps=1, **kwargs)


def test_the_trained_model_draws_what_the_caption_says(pipe):
    """The weights are the trained ones: held-out grammar captions come out right at the default 20 steps."""
    captions = evaluation_captions(4, seed=4321)
    images = generate(pipe, captions, steps=20)
    assert float(faithfulness(images * 2 - 1, captions).mean()) >= 0.75


def test_text_encoder_tokenizes_and_round_trips(tmp_path, caplog):
    torch.manual_seed(0)
    enc = MiniTextEncoder(vocab=["a", "red", "circle"], max_length=6, width=16, num_layers=1, num_heads=2,
                          pooled_dim=8).eval()
    ids = enc.tokenize(["a red circle", ""])
    assert ids.tolist() == [[1, 3, 4, 5, 0, 0], [1, 0, 0, 0, 0, 0]]
    with caplog.at_level(logging.WARNING):
        assert enc.tokenize(["a purple circle and a red square too long"])[0].tolist() == [1, 3, 2, 5, 2, 3]
    assert "outside its vocabulary" in caplog.text and "were cut" in caplog.text
    # word order matters: words and positions start at the same scale, so the encoder does not begin as a bag of
    # words (with nn.Embedding's N(0, 1) words the first trained model swapped which colour went where)
    assert float(enc.embed.weight.detach().std()) == pytest.approx(0.02, rel=0.3)
    assert float(enc.position.detach().std()) == pytest.approx(0.02, rel=0.3)
    with torch.no_grad():
        tokens, pooled = enc.encode(["a red circle", "circle red a"])
    assert tokens.shape == (2, 6, 16) and pooled.shape == (2, 8)
    # relative change from reversing the words: 0.02-1.3 over 100 seeds (0.0005-0.011 with N(0, 1) word embeddings)
    assert float((pooled[0] - pooled[1]).norm()) > 0.02 * float(pooled.norm(dim=1).mean())
    enc.save_pretrained(tmp_path / "enc")
    again = MiniTextEncoder.from_pretrained(tmp_path / "enc").eval()
    assert again.word_ids == enc.word_ids
    for key, value in enc.state_dict().items():
        assert torch.equal(again.state_dict()[key], value), key
    with pytest.raises(ValueError, match="distinct words"):
        MiniTextEncoder(vocab=["a", "a"])


def test_training_is_deterministic_and_saves_a_loadable_pipeline(tmp_path):
    from training.train_mini import lr_at, save, train

    kwargs = dict(steps=2, batch_size=2, device="cpu", log=lambda line: None)
    first, record = train(**kwargs)
    second, _ = train(**kwargs)
    for a, b in ((first.transformer, second.transformer), (first.text_encoder, second.text_encoder)):
        for key, value in a.state_dict().items():
            assert torch.equal(b.state_dict()[key], value), key
    # what comes back is the moving average: after 2 steps it sits between the start and the raw weights
    raw, _ = train(**kwargs, ema_decay=0.0)
    start = new_pipeline(0).transformer.state_dict()
    key = "proj_out.weight"
    ema_move = (first.transformer.state_dict()[key] - start[key]).norm()
    raw_move = (raw.transformer.state_dict()[key] - start[key]).norm()
    assert 0 < float(ema_move) < float(raw_move)
    assert record["steps"] == 2 and len(record["curve"]) == 1 and record["curve"][0]["loss"] > 0
    assert lr_at(0, 100, 1e-3, 10) == pytest.approx(1e-4) and lr_at(99, 100, 1e-3, 10) == pytest.approx(1e-4, 0.01)
    out = save(first, record, tmp_path / "model")
    loaded = mini_pipeline(out)
    half = first.transformer.to(torch.float16).state_dict()
    for key, value in loaded.transformer.state_dict().items():
        assert torch.equal(value.to(torch.float16), half[key]), key
    assert (out / "training.json").is_file()
    with pytest.raises(FileNotFoundError, match="no miniature model"):
        mini_pipeline(tmp_path / "nothing")


def test_optimizer_calibrates_on_grammar_captions_and_the_artifact_round_trips(pipe, tmp_path):
    opt = DiTFastAttnOptimizer(pipe, source="mini-mmdit")
    config = DiTFastAttnConfig(threshold=0.1, allocation="local", num_inference_steps=3, height=64, width=64, guidance_scale=4.0,
                               block_size=32, num_prompts=2, batch_size=2)
    plan = opt.optimize(config, progress=False)
    assert plan.metadata["search"]["prompts"] == evaluation_captions(2, 0)  # the pipeline's own default prompts
    assert plan.metadata["search"]["flop_cut"] > 0
    opt.apply()
    planned = run_pipeline(pipe, CAPTIONS, config)
    remove(pipe)
    opt.save_pretrained(tmp_path / "artifact", reproducibility_prompts=1)
    loaded = load_pipeline(tmp_path / "artifact")  # the base model "mini-mmdit" comes from the package
    assert type(loaded).__name__ == "MiniMMDiTPipeline"
    assert torch.equal(run_pipeline(loaded, CAPTIONS, config), planned)


def test_optimizer_from_pretrained_takes_the_name_and_a_saved_directory(pipe, tmp_path):
    by_name = DiTFastAttnOptimizer.from_pretrained("mini-mmdit")
    assert type(by_name.pipeline).__name__ == "MiniMMDiTPipeline" and by_name.source == "mini-mmdit"
    pipe.save_pretrained(tmp_path / "copy")
    by_path = DiTFastAttnOptimizer.from_pretrained(tmp_path / "copy")
    for key, value in by_path.pipeline.transformer.state_dict().items():
        assert torch.equal(value, pipe.transformer.state_dict()[key]), key
    with pytest.raises(ValueError, match="torch_dtype only"):
        DiTFastAttnOptimizer.from_pretrained(tmp_path / "copy", variant="fp16")


def test_cli_optimizes_a_saved_miniature_model_at_its_own_resolution(pipe, tmp_path):
    from ditfa_optimum.cli import main
    from ditfa_optimum.serialization import read_artifact

    pipe.save_pretrained(tmp_path / "trained")
    assert main(["optimize", str(tmp_path / "trained"), "--steps", "2", "--num-prompts", "1", "--quiet",
                 "--repro-prompts", "0", "--out", str(tmp_path / "artifact")]) == 0
    config = read_artifact(tmp_path / "artifact").search_config
    assert (config["height"], config["block_size"], config["guidance_scale"]) == (64, 32, 4.0)
    opt = DiTFastAttnOptimizer.from_pretrained("mini-mmdit", torch_dtype=torch.float64)
    assert opt.pipeline.transformer.dtype == torch.float64 and opt.source == "mini-mmdit"


# --- the 4096-token model: scenes at 128 px, fine-tuning from the shipped weights at a new size ---------------------

#: fingerprints of render(sample_scenes(24, seed 0)) at 64 px as drawn before `render` took a size (all five
#: textures): per image and channel the pixel sum, and per image the sums weighted by column and by row. Sums with
#: a tolerance, not a hash of the bytes: CPUs differ in the last bit of a few pixels (an AMD EPYC machine drew
#: other bytes than the machine the hash was recorded on, from the same code)
RENDER_64_CHANNEL_SUMS = [
    -1655.421, -1815.888, -1881.521, -2206.532, -2111.413, -1716.859, -221.676, -796.938,
    -746.633, -1873.735, -2128.269, -2411.085, -467.733, -673.528, -755.382, -1623.455,
    -1928.561, -2168.322, -2174.571, -2161.487, -2100.427, -1993.049, -2106.085, -2382.758,
    -2228.995, -1964.305, -1659.366, -2259.204, -2304.673, -2231.922, -2071.244, -1981.942,
    -1423.099, -2125.861, -2169.984, -2246.030, -726.763, -653.505, -653.505, -1619.591,
    -2027.128, -2208.981, -1420.953, -1995.671, -2029.637, -2048.107, -1734.271, -1644.151,
    -373.696, -614.929, -882.965, -2518.024, -1773.716, -1245.598, -1201.781, -1943.568,
    -1798.665, -1652.080, -1962.867, -2224.752, -2382.491, -1693.833, -1700.449, -567.138,
    -683.175, -671.114, -2068.545, -1864.528, -2023.725, -428.849, -373.964, -906.126,
]
RENDER_64_COLUMN_SUMS = [
    -167594.027, -185016.199, -54788.665, -210845.901, -58399.916, -179574.486,
    -192248.536, -197825.818, -178632.035, -212082.121, -162812.065, -205854.836,
    -58690.644, -187738.046, -175961.195, -175502.725, -64111.251, -156810.193,
    -142588.220, -184153.841, -183872.711, -61675.974, -179265.390, -52544.858,
]
RENDER_64_ROW_SUMS = [
    -165097.798, -195714.646, -57798.414, -187791.013, -59223.928, -178332.362,
    -204536.787, -194589.210, -180396.003, -215689.951, -170829.852, -208883.579,
    -64831.056, -184633.514, -179791.545, -157538.253, -54793.030, -191119.880,
    -158398.910, -183200.850, -194584.299, -59901.250, -195121.902, -53528.415,
]


def test_scenes_at_64_px_are_unchanged():
    from training.scenes import render, sample_batch, sample_scenes

    scenes = sample_scenes(24, torch.Generator().manual_seed(0))
    images = render(scenes)
    drawn = images.double()
    columns = torch.arange(64, dtype=torch.float64)
    torch.testing.assert_close(drawn.sum(dim=(2, 3)).flatten(),
                               torch.tensor(RENDER_64_CHANNEL_SUMS, dtype=torch.float64), rtol=0, atol=1e-2)
    torch.testing.assert_close((drawn * columns).sum(dim=(1, 2, 3)), torch.tensor(RENDER_64_COLUMN_SUMS,
                               dtype=torch.float64), rtol=0, atol=1e-1)
    torch.testing.assert_close((drawn * columns[:, None]).sum(dim=(1, 2, 3)), torch.tensor(RENDER_64_ROW_SUMS,
                               dtype=torch.float64), rtol=0, atol=1e-1)
    assert torch.equal(render(scenes, size=64), images)
    a, captions_a = sample_batch(4, torch.Generator().manual_seed(5))
    b, captions_b = sample_batch(4, torch.Generator().manual_seed(5), size=64)
    assert torch.equal(a, b) and captions_a == captions_b


def test_scenes_at_128_px_are_the_same_scenes_drawn_finer_and_score_faithful():
    import torch.nn.functional as F

    from training.scenes import caption, render, sample_batch, sample_scenes

    scenes = sample_scenes(48, torch.Generator().manual_seed(1))
    captions = [caption(s) for s in scenes]
    small, large = render(scenes), render(scenes, size=128)
    assert large.shape == (48, 3, 128, 128) and float(large.min()) >= -1 and float(large.max()) <= 1
    # downsampled, the 128 px drawing is the 64 px one up to anti-aliased edges
    down = F.interpolate(large, size=(64, 64), mode="bilinear", antialias=True, align_corners=False)
    assert float((down - small).abs().mean()) < 0.02
    # faithfulness works at 128 px: ground truth scores 1, other scenes' captions and a blank image (almost) 0
    assert float(faithfulness(large, captions).min()) == 1.0
    assert float(faithfulness(large, captions[1:] + captions[:1]).mean()) < 0.1
    assert float(faithfulness(torch.zeros(2, 3, 128, 128), captions[:2]).max()) == 0.0
    # the scenes drawn depend on the generator only, not on the size
    images, batch_captions = sample_batch(3, torch.Generator().manual_seed(2), size=128)
    assert images.shape == (3, 3, 128, 128)
    assert batch_captions == sample_batch(3, torch.Generator().manual_seed(2))[1]
    with pytest.raises(ValueError, match="positive number of pixels"):
        render(scenes[:1], size=0)


def test_object_changes_measure_how_far_objects_moved():
    """The continuous companion of faithfulness: 0 for the same images, the shift for moved objects, a cell's width
    for vanished ones; the shapes' area change alongside."""
    from training.scenes import CELL, object_changes, render, sample_scenes
    from training.scenes import caption as caption_of

    scenes = sample_scenes(16, torch.Generator().manual_seed(3))
    captions = [caption_of(s) for s in scenes]
    images = render(scenes)
    same = object_changes(images, images.clone(), captions)
    assert same["position_px"].shape == (16,) and float(same["position_px"].abs().max()) == 0.0
    assert float(same["area"].abs().max()) == 0.0
    shifted = object_changes(torch.roll(images, 2, dims=-1), images, captions)  # every object 2 px to the right
    named = torch.tensor([bool(c) for c in captions])
    assert torch.allclose(shifted["position_px"][named], torch.full((int(named.sum()),), 2.0), atol=0.3)
    blank = torch.zeros_like(images)  # a grey image: nothing of any named colour
    gone = object_changes(blank, images, captions)
    assert torch.allclose(gone["position_px"][named], torch.full((int(named.sum()),), CELL))
    assert float(gone["area"][named].min()) > 0.3
    # the metric is symmetric in which image is the reference, and checks shapes
    back = object_changes(images, torch.roll(images, 2, dims=-1), captions)
    assert torch.allclose(back["position_px"], shifted["position_px"])
    with pytest.raises(ValueError, match="differ in shape"):
        object_changes(images[:2], images, captions)


def test_fine_tuning_starts_from_the_shipped_weights_with_a_new_position_table(pipe):
    from diffusers.models.embeddings import get_2d_sincos_pos_embed

    from training.train_mini import train

    start, record = train(init=ASSET_DIR, size=128, steps=0, batch_size=2, device="cpu", log=lambda line: None)
    config = start.transformer.config
    assert (config.sample_size, config.pos_embed_max_size, config.patch_size) == (128, 64, 2)
    assert {k: config[k] for k in TRANSFORMER_CONFIG if k not in ("sample_size", "pos_embed_max_size")} == \
        {k: v for k, v in TRANSFORMER_CONFIG.items() if k not in ("sample_size", "pos_embed_max_size")}
    table = start.transformer.state_dict()["pos_embed.pos_embed"]
    assert table.shape == (1, 4096, 192)  # 64 x 64 patch positions
    assert torch.equal(table[0], get_2d_sincos_pos_embed(192, 64, base_size=64, output_type="pt").float())  # fixed, not learned
    assert "pos_embed.pos_embed" not in dict(start.transformer.named_parameters())
    # integer coordinates 0..63: the 64 px model's 32 x 32 table (stored in fp16) is its top-left corner
    old = pipe.transformer.state_dict()["pos_embed.pos_embed"].view(32, 32, 192)
    torch.testing.assert_close(table.view(64, 64, 192)[:32, :32], old, atol=1e-3, rtol=0)
    # everything else is the shipped weights, untouched
    shipped = pipe.transformer.state_dict()
    for key, value in start.transformer.state_dict().items():
        if key != "pos_embed.pos_embed":
            assert torch.equal(value, shipped[key]), key
    for key, value in start.text_encoder.state_dict().items():
        assert torch.equal(value, pipe.text_encoder.state_dict()[key]), key
    assert record["steps"] == 0 and record["size"] == 128 and record["image_tokens"] == 4096
    assert record["init"] == str(ASSET_DIR) and len(record["init_transformer_sha256"]) == 64
    assert record["defaults"] == dict(height=128, width=128, num_inference_steps=20, guidance_scale=4.0, block_size=64)


def test_fine_tuning_at_128_px_for_two_steps_saves_a_loadable_128_px_model(pipe, tmp_path):
    """The slowest test of the file: two 4096-token training steps (about 10-25 s on two CPU cores)."""
    from ditfa_optimum.embedded import defaults_for
    from training.train_mini import save, train

    tuned, record = train(init=ASSET_DIR, size=128, steps=2, batch_size=2, device="cpu", log=lambda line: None)
    assert record["steps"] == 2 and record["batch_size"] == 2 and record["curve"][0]["loss"] > 0
    state, shipped = tuned.transformer.state_dict(), pipe.transformer.state_dict()
    assert not torch.equal(state["proj_out.weight"], shipped["proj_out.weight"])  # trained
    table = state["pos_embed.pos_embed"]
    assert table.shape == (1, 4096, 192) and torch.equal(table, tuned.transformer.pos_embed.pos_embed)

    out = save(tuned, record, tmp_path / "mini-mmdit-128")
    assert sum(p.stat().st_size for p in out.rglob("*") if p.is_file()) <= 20e6
    loaded = mini_pipeline(out)
    assert loaded.transformer.config.sample_size == 128 and loaded.transformer.config.pos_embed_max_size == 64
    half = tuned.transformer.to(torch.float16).state_dict()
    for key, value in loaded.transformer.state_dict().items():
        assert torch.equal(value.to(torch.float16), half[key]), key
    # it generates 128 x 128 by default (checked without running it: the expected noise shape is in the error)
    with pytest.raises(ValueError, match=r"\(1, 3, 128, 128\)"):
        loaded(CAPTIONS[0], num_inference_steps=1, latents=torch.zeros(1, 3, 64, 64))
    assert defaults_for(str(out)) == dict(steps=20, size=128, block_size=64, guidance=4.0)
    assert defaults_for(str(ASSET_DIR)) == dict(steps=20, size=64, block_size=32, guidance=4.0)


def test_minutes_fixes_the_step_count_inside_the_warm_up_so_steps_repeat_the_run(monkeypatch):
    import training.train_mini as trainer

    monkeypatch.setattr(trainer, "PROBE", (1, 2))  # time step 2 instead of steps 11-30
    kwargs = dict(batch_size=1, device="cpu", log=lambda line: None)
    _, record = trainer.train(minutes=1e-6, warmup=2, **kwargs)
    assert record["steps"] == record["planned_steps"] == 2 and record["minutes"] == 1e-6
    assert record["probe_steps_per_second"] > 0 and record["size"] == 64 and record["init"] is None
    # the timed steps are warm-up steps, whose learning rates do not depend on the step count: --steps N repeats it
    for planned in (None, 30, 2000):
        assert [trainer.lr_at(s, planned, 3e-4, 200) for s in range(30)] == [3e-4 * (s + 1) / 200 for s in range(30)]
    with pytest.raises(ValueError, match="warmup >= 2"):
        trainer.train(minutes=1.0, warmup=1, **kwargs)


def test_pipeline_takes_diffusers_step_callbacks():
    """Code written for SD3 pipelines (callback_on_step_end) runs on the offline default model."""
    import torch

    from ditfa_optimum.mini import mini_pipeline

    pipe = mini_pipeline()
    seen = []

    def callback(p, step, timestep, tensors):
        seen.append((step, tuple(tensors["latents"].shape)))
        return {"latents": tensors["latents"] * 0} if step == 1 else tensors

    out = pipe(["a small red circle in the top left"], num_inference_steps=2, guidance_scale=1.0,
               generator=torch.Generator().manual_seed(0), output_type="latent", callback_on_step_end=callback)
    assert [s for s, _ in seen] == [0, 1] and seen[0][1] == (1, 3, 64, 64)
    assert torch.equal(out.images, torch.zeros_like(out.images))  # the returned latents were used
