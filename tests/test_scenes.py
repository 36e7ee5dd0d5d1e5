"""The caption grammar the package ships (`ditfa_optimum.mini.grammar`) and, outside the package, the scenes drawn from
it and the faithfulness metric (training/scenes.py, which re-exports the grammar)."""

import dataclasses
import sys
import time
from collections import defaultdict
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from ditfa_optimum.mini import grammar as G

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from training import scenes as S  # noqa: E402


def scenes_for(seed: int, n: int):
    return G.sample_scenes(n, torch.Generator().manual_seed(seed))


def presence(images, scenes):
    """Per-object presence (a flat list aligned with the scenes' objects) and the scores."""
    scores, per_image = S.faithfulness(images, [S.caption(s) for s in scenes], details=True)
    return scores, [d["present"] for objects in per_image for d in objects]


def test_sampling_and_rendering_are_deterministic():
    a, b = scenes_for(0, 64), scenes_for(0, 64)
    assert a == b and a != scenes_for(1, 64)
    images = S.render(a)
    assert images.shape == (64, 3, 64, 64) and images.dtype == torch.float32
    assert images.min() >= -1 and images.max() <= 1
    assert torch.equal(images, S.render(b))
    g = torch.Generator().manual_seed(5)
    images2, captions = S.sample_batch(8, g)
    assert torch.equal(images2, S.render(scenes_for(5, 8))) and captions == [S.caption(s) for s in scenes_for(5, 8)]


def test_scenes_follow_the_grammar():
    scenes = scenes_for(2, 400)
    assert {len(s.objects) for s in scenes} == {1, 2, 3}
    assert {s.texture for s in scenes} == set(G.TEXTURES) and {s.background for s in scenes} == set(G.BACKGROUNDS)
    for s in scenes:
        assert len({o.position for o in s.objects}) == len({o.color for o in s.objects}) == len(s.objects)
        assert all(abs(d) <= G.JITTER for offset in s.offsets for d in offset)
        assert all(abs(f - 1) <= G.SIZE_JITTER + 1e-6 for f in s.scales)


def test_render_is_fast_and_draws_later_objects_on_top():
    scenes = scenes_for(3, 128)
    S.render(scenes[:2])
    start = time.perf_counter()
    S.render(scenes, device="cpu")
    assert time.perf_counter() - start < 1.0
    big, dot = S.SceneObject("square", "red", "large", "center"), S.SceneObject("circle", "blue", "small", "center")
    centre = [S.render([S.Scene(objs)])[0, :, 32, 32] for objs in ((big, dot), (dot, big))]
    assert torch.allclose(centre[0], torch.tensor(S.COLORS["blue"]) * 2 - 1)
    assert torch.allclose(centre[1], torch.tensor(S.COLORS["red"]) * 2 - 1)
    corner = S.render([S.Scene((big,), background="mid gray")])[0, :, 2, 2]  # plain background
    assert torch.allclose(corner, torch.tensor(S.BACKGROUNDS["mid gray"]) * 2 - 1)


def test_caption_round_trip_and_vocabulary():
    scene = G.Scene((G.SceneObject("circle", "red", "small", "top left"),
                     G.SceneObject("square", "blue", "large", "bottom")))
    assert G.caption(scene) == "a small red circle in the top left and a large blue square at the bottom"
    assert list(G.WORDS) == sorted(set(G.WORDS))
    for s in scenes_for(4, 300):
        text = G.caption(s)
        assert G.parse_caption(text) == list(s.objects)
        assert set(text.split()) <= set(G.WORDS) and text == text.lower()
    assert G.parse_caption("") == []


@pytest.mark.parametrize("text, match", [
    ("the small red circle in the center", r"expected the article .* got 'the'"),
    ("a huge red circle in the center", r"expected a size .* got 'huge'"),
    ("a small pink circle in the center", r"expected a colour .* got 'pink'"),
    ("a small red blob in the center", r"expected a shape .* got 'blob'"),
    ("a small red circle in the middle", r"expected a position phrase .* got 'in the middle'"),
    ("a small red circle", r"expected a position phrase .* got '<end>'"),
    ("a small red circle in the center a blue square", r"expected 'and' or the end .* got 'a'"),
    ("a small red circle in the center and", r"expected the article .* got '<end>'"),
])
def test_parse_caption_errors_name_the_offending_word(text, match):
    with pytest.raises(ValueError, match=match):
        G.parse_caption(text)


def test_ground_truth_is_faithful_for_every_attribute():
    scenes = scenes_for(5, 256)
    scores, present = presence(S.render(scenes), scenes)
    assert scores.shape == (256,) and scores.mean() >= 0.98
    rates = defaultdict(list)
    for obj, ok in zip((o for s in scenes for o in s.objects), present):
        for attribute in dataclasses.astuple(obj):
            rates[attribute].append(ok)
    assert len(rates) == len(S.SHAPES) + len(S.COLORS) + len(S.SIZES) + len(S.POSITIONS)
    assert min(sum(oks) / len(oks) for oks in rates.values()) >= 0.95


def test_degraded_ground_truth_still_scores_high():
    scenes = scenes_for(6, 256)
    images, captions = S.render(scenes), [S.caption(s) for s in scenes]
    noise = 0.1 * torch.randn(images.shape, generator=torch.Generator().manual_seed(0))
    blurred = F.avg_pool2d(images, 3, 1, 1, count_include_pad=False) + noise  # diffusion samples are not crisp
    assert S.faithfulness(blurred, captions).mean() >= 0.9
    upscaled = F.interpolate(images, size=(96, 96), mode="bilinear")  # other sizes are resized to 64x64
    assert S.faithfulness(upscaled, captions).mean() >= 0.98


def test_unrelated_captions_noise_and_backgrounds_score_low():
    scenes, pool = scenes_for(7, 256), scenes_for(8, 2000)
    keys = lambda s: {(o.color, o.position) for o in s.objects}  # noqa: E731
    unrelated = [S.caption(next(p for p in pool[3 * i:] if not keys(p) & keys(s))) for i, s in enumerate(scenes)]
    assert S.faithfulness(S.render(scenes), unrelated).mean() <= 0.15
    captions = [S.caption(s) for s in scenes]
    uniform = torch.rand(256, 3, 64, 64) * 2 - 1
    gaussian = torch.randn(256, 3, 64, 64).clamp(-1, 1)
    backgrounds = S.render([dataclasses.replace(s, objects=(), offsets=(), scales=()) for s in scenes])
    for images in (uniform, gaussian, backgrounds):
        assert S.faithfulness(images, captions).mean() <= 0.1


def neighbour_cell(scene):
    """A free cell next to (sharing an edge or a corner with) the first object's cell: there always is one."""
    _, row, col = S.POSITIONS[scene.objects[0].position]
    used = {o.position for o in scene.objects}
    return next((name for name, (_, r, c) in S.POSITIONS.items()
                 if max(abs(r - row), abs(c - col)) == 1 and name not in used))


def nearest_free_colour(scene):
    """The palette colour closest to the first object's that the scene does not use (the hardest recolouring)."""
    rgb = torch.tensor(S.COLORS[scene.objects[0].color])
    free = [c for c in S.COLORS if c not in {o.color for o in scene.objects}]
    return min(free, key=lambda c: (torch.tensor(S.COLORS[c]) - rgb).norm().item())


@pytest.mark.parametrize("edit", ["shift", "recolour"])
def test_moving_or_recolouring_an_object_makes_it_fail(edit):
    scenes = scenes_for(9, 128)
    edited = []
    for s in scenes:
        first = s.objects[0]
        change = dict(position=neighbour_cell(s)) if edit == "shift" else dict(color=nearest_free_colour(s))
        edited.append(dataclasses.replace(s, objects=(dataclasses.replace(first, **change),) + s.objects[1:]))
    _, per_image = S.faithfulness(S.render(edited), [S.caption(s) for s in scenes], details=True)
    assert not any(objects[0]["present"] for objects in per_image)
    others = [d["present"] for objects in per_image for d in objects[1:]]
    assert sum(others) / len(others) >= 0.95


def test_faithfulness_details_and_edge_cases():
    scene = S.Scene((S.SceneObject("triangle", "green", "large", "right"),))
    image = S.render([scene, scene])
    scores, per_image = S.faithfulness(image, [S.caption(scene), ""], details=True)
    assert scores.tolist() == [1.0, 1.0] and per_image[1] == []
    d = per_image[0][0]
    assert d["object"] == scene.objects[0] and d["present"] and d["color_found"] and d["size_ok"] and d["position_ok"]
    assert d["expected_area"] == 200.0 and 0.7 < d["area"] / d["expected_area"] < 1.3
    assert abs(d["centroid"][0] - 53.3) < 1 and abs(d["centroid"][1] - 32 - 10 / 3) < 1  # a triangle's centroid is low
    assert d["shape_guess"] == "triangle"
    missing = S.faithfulness(image[:1], ["a small white circle in the top left"], details=True)[1][0][0]
    assert not missing["present"] and not missing["color_found"] and missing["centroid"] is None
    with pytest.raises(ValueError, match="2 images but 1 captions"):
        S.faithfulness(image, [""])


def test_evaluation_captions_are_deterministic_and_distinct():
    captions = G.evaluation_captions(50, 1234)
    assert captions == G.evaluation_captions(50, 1234) and len(set(captions)) == 50
    assert captions != G.evaluation_captions(50, 0)


def test_training_scenes_reexport_the_package_grammar():
    """One grammar: the scenes drawn for training and scored by faithfulness are the package's records."""
    for name in ("WORDS", "COLORS", "SHAPES", "SIZES", "POSITIONS", "BACKGROUNDS", "TEXTURES", "Scene", "SceneObject",
                 "sample_scenes", "caption", "parse_caption", "evaluation_captions"):
        assert getattr(S, name) is getattr(G, name), name
    assert not hasattr(G, "render") and not hasattr(G, "faithfulness") and not hasattr(G, "sample_batch")
