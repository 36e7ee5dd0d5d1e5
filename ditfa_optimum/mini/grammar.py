"""The caption grammar of the miniature model: its vocabulary, scene records and the captions drawn from them.

A scene holds one to three filled shapes, each in a distinct cell of a 3x3 grid and in a distinct colour, on a
low-saturation textured background. Its caption names every object and never the background::

    a small red circle in the top left and a large blue square at the bottom

This is what the package needs at run time: `WORDS` (the text encoder's vocabulary, `mini.new_pipeline`) and
`evaluation_captions` (the pipeline's default calibration prompts). Scenes are plain Python records, sampled
deterministically from a ``torch.Generator``. The tables also say what every word looks like (RGB colours, sizes and
jitter in px of a 64x64 image, grid cells), as data only: drawing scenes (the training data) and scoring images
against captions (`faithfulness`) live outside the package, in ``training/scenes.py`` of the repository.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

#: colour name -> RGB in [0, 1]: saturated, pairwise at least 0.35 apart, every one far from the backgrounds
COLORS = {"red": (1.0, 0.1, 0.1), "green": (0.1, 0.8, 0.1), "blue": (0.15, 0.3, 1.0), "yellow": (1.0, 0.9, 0.1),
          "purple": (0.6, 0.1, 0.9), "cyan": (0.1, 0.9, 0.9), "orange": (1.0, 0.55, 0.05), "white": (0.97, 0.97, 0.97)}
#: shape name -> its area at half-extent 1 (square 2r x 2r; triangle pointing up and diamond 2r wide and 2r tall)
SHAPES = {"circle": math.pi, "square": 4.0, "triangle": 2.0, "diamond": 2.0}
#: size name -> half-extent in px (of 64); two large neighbours only touch when jittered towards each other
SIZES = {"small": 5.0, "medium": 7.5, "large": 10.0}
#: position name -> (caption phrase, grid row, grid column)
POSITIONS = {"top left": ("in the top left", 0, 0), "top": ("at the top", 0, 1),
             "top right": ("in the top right", 0, 2), "left": ("on the left", 1, 0),
             "center": ("in the center", 1, 1), "right": ("on the right", 1, 2),
             "bottom left": ("in the bottom left", 2, 0), "bottom": ("at the bottom", 2, 1),
             "bottom right": ("in the bottom right", 2, 2)}
#: background tone name -> RGB: low saturation, more than the 0.4 colour tolerance from every palette colour even with
#: the texture on top (the closest pair, textured mid gray and green, is 0.48 apart)
BACKGROUNDS = {"dark gray": (0.22, 0.22, 0.22), "slate": (0.2, 0.23, 0.3), "mid gray": (0.42, 0.42, 0.42),
               "brown gray": (0.3, 0.26, 0.22)}
TEXTURES = ("plain", "horizontal stripes", "vertical stripes", "checker", "noise")
JITTER = 3.0  # object centres move up to +-JITTER px (of 64) from their cell centre
SIZE_JITTER = 0.1  # half-extents vary by up to +-10 %
#: every word a caption can contain, sorted (the vocabulary of a word-level tokenizer)
WORDS = tuple(sorted({"a", "and", *SIZES, *COLORS, *SHAPES, *(w for p, _, _ in POSITIONS.values() for w in p.split())}))


@dataclass(frozen=True)
class SceneObject:
    """One filled shape; every field is a key of the corresponding grammar table (`SHAPES`, `COLORS`, ...)."""

    shape: str
    color: str
    size: str
    position: str


@dataclass(frozen=True)
class Scene:
    """Objects (drawn in order, later over earlier) plus everything rendering needs, so a drawing is deterministic.

    ``offsets`` are each object's centre jitter (dx, dy) in px and ``scales`` its half-extent factor (both empty: none);
    ``texture_seed`` fixes the stripe period and phase and the noise pattern.
    """

    objects: tuple[SceneObject, ...]
    offsets: tuple[tuple[float, float], ...] = ()
    scales: tuple[float, ...] = ()
    background: str = "dark gray"
    texture: str = "plain"
    texture_seed: int = 0


def sample_scenes(n: int, generator: torch.Generator) -> list[Scene]:
    """``n`` random scenes: 1-3 objects in distinct cells and colours, free shapes and sizes, random background.

    Every random number comes from ``generator`` in a fixed order, so the result depends only on its state.
    """
    g = dict(generator=generator, device=generator.device)
    counts = torch.randint(1, 4, (n,), **g).tolist()
    cells = torch.rand(n, len(POSITIONS), **g).argsort(1)[:, :3].tolist()
    colors = torch.rand(n, len(COLORS), **g).argsort(1)[:, :3].tolist()
    shapes = torch.randint(0, len(SHAPES), (n, 3), **g).tolist()
    sizes = torch.randint(0, len(SIZES), (n, 3), **g).tolist()
    offsets = ((torch.rand(n, 3, 2, **g) * 2 - 1) * JITTER).tolist()
    scales = (1 + (torch.rand(n, 3, **g) * 2 - 1) * SIZE_JITTER).tolist()
    backgrounds = torch.randint(0, len(BACKGROUNDS), (n,), **g).tolist()
    textures = torch.randint(0, len(TEXTURES), (n,), **g).tolist()
    seeds = torch.randint(0, 2**24, (n,), **g).tolist()
    shape_names, color_names, size_names, cell_names, tone_names = map(list, (SHAPES, COLORS, SIZES, POSITIONS,
                                                                             BACKGROUNDS))
    scenes = []
    for i, k in enumerate(counts):
        objects = tuple(SceneObject(shape_names[shapes[i][j]], color_names[colors[i][j]], size_names[sizes[i][j]],
                                    cell_names[cells[i][j]]) for j in range(k))
        scenes.append(Scene(objects, tuple(map(tuple, offsets[i][:k])), tuple(scales[i][:k]),
                            tone_names[backgrounds[i]], TEXTURES[textures[i]], seeds[i]))
    return scenes


def caption(scene: Scene) -> str:
    """The scene's caption: its objects as "a {size} {color} {shape} {position phrase}" joined with " and "."""
    return " and ".join(f"a {o.size} {o.color} {o.shape} {POSITIONS[o.position][0]}" for o in scene.objects)


def parse_caption(text: str) -> list[SceneObject]:
    """The objects a grammar caption names (inverse of `caption`; "" gives []).

    Raises ValueError naming the first word (or phrase) that does not fit and what the grammar expected there. Only
    the word order is checked: repeated colours or positions parse.
    """
    words, objects, i = text.split(), [], 0
    phrases = {name: phrase.split() for name, (phrase, _, _) in POSITIONS.items()}  # no phrase starts another

    def take(options, what):
        nonlocal i
        word = words[i] if i < len(words) else "<end>"
        if word not in options:
            raise ValueError(f"bad caption {text!r}: expected {what} ({' | '.join(options)}) at word {i + 1}, "
                             f"got {word!r}")
        i += 1
        return word

    while i < len(words):
        if objects:
            take(("and",), "'and' or the end")
        take(("a",), "the article")
        size, color = take(tuple(SIZES), "a size"), take(tuple(COLORS), "a colour")
        shape = take(tuple(SHAPES), "a shape")
        position = next((name for name, p in phrases.items() if words[i: i + len(p)] == p), None)
        if position is None:
            raise ValueError(f"bad caption {text!r}: expected a position phrase "
                             f"({' | '.join(p for p, _, _ in POSITIONS.values())}) at word {i + 1}, "
                             f"got {' '.join(words[i: i + 4]) or '<end>'!r}")
        i += len(phrases[position])
        objects.append(SceneObject(shape, color, size, position))
    return objects


def evaluation_captions(n: int, seed: int) -> list[str]:
    """``n`` distinct captions of scenes drawn from a generator seeded with ``seed`` (deterministic, in drawing order).

    Conventions: training samples scenes from its own random stream, never through this function; the quality
    benchmark evaluates on ``evaluation_captions(n, 1234)`` and the calibration prompts are
    ``evaluation_captions(n, 0)``. Lists for different seeds are not made disjoint and can meet (one-object captions
    have only 864 forms): benchmarks exclude the calibration captions explicitly. A list for ``n`` is not a prefix of
    the list for a larger ``n`` (all scenes are drawn at once).
    """
    generator, found = torch.Generator().manual_seed(seed), {}
    while len(found) < n:
        found.update(dict.fromkeys(caption(s) for s in sample_scenes(n - len(found), generator)))
    return list(found)
