"""Procedural shape scenes drawn as images (the miniature model's training data) and the caption-faithfulness metric.

Lives outside the package (the wheel holds the trained weights and the pipeline, not what made them): the training
script (``training/train_mini.py``), the benchmarks (``benchmarks/mini_model.py``, ``benchmarks/quality.py``) and
the tests import it as ``training.scenes`` with the repository root on ``sys.path``, as benchmarks/ does.

The grammar itself (vocabulary, scene records, `sample_scenes`, `caption`, `evaluation_captions`) is
`ditfa_optimum.mini.grammar`, re-exported here, so ``training.scenes`` is the whole scene toolkit. A scene is laid out
in the px of a 64x64 image (`IMAGE_SIZE`); `render` draws a batch of scenes as tensor operations on any device (so
training draws fresh images on the fly) at any size (``size=128`` for the 4096-token model): the same scene, geometry
scaled, shape edges anti-aliased over one output pixel, the stripe and checker textures upscaled by nearest neighbour
(64 px: exactly as before the ``size`` argument existed). `faithfulness` scores images against captions by colour,
position and size, never shape: a blurry 64x64 diffusion sample rarely draws crisp corners.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from ditfa_optimum.mini.grammar import (BACKGROUNDS, COLORS, JITTER, POSITIONS, SHAPES, SIZE_JITTER, SIZES, TEXTURES,
                                        WORDS, Scene, SceneObject, caption, evaluation_captions, parse_caption,
                                        sample_scenes)

#: the grammar's names are re-exported: training.scenes is the whole scene toolkit
__all__ = ["BACKGROUNDS", "COLORS", "JITTER", "POSITIONS", "SHAPES", "SIZE_JITTER", "SIZES", "TEXTURES", "WORDS",
           "Scene", "SceneObject", "caption", "evaluation_captions", "parse_caption", "sample_scenes",
           "IMAGE_SIZE", "CELL", "TEXTURE_CONTRAST", "COLOR_TOLERANCE", "DENSITY", "WINDOW_MARGIN",
           "CENTROID_TOLERANCE", "AREA_RANGE", "render", "sample_batch", "faithfulness", "object_changes"]

IMAGE_SIZE = 64  # the px every geometric constant of the grammar and below is in (render(..., size=s) scales by s / 64)
CELL = IMAGE_SIZE / 3  # grid cell width in px; cell centres at about 11, 32 and 53 px
TEXTURE_CONTRAST = 0.06  # textures add at most +-this to every channel

# metric thresholds (see `faithfulness`)
COLOR_TOLERANCE = 0.4  # RGB distance in [0, 1] units from the named colour
DENSITY = 4  # a matching pixel counts when at least this many of its 3x3 neighbourhood match (drops speckle)
WINDOW_MARGIN = 10.0  # px added on every side of the named cell to form the search window
CENTROID_TOLERANCE = 2.0  # px the centroid may lie outside the named cell
AREA_RANGE = (0.35, 2.5)  # accepted area as a multiple of the shape's expected area


def _cell_centre(position: str) -> tuple[float, float]:
    """(x, y) in px of the centre of a position's grid cell."""
    _, row, col = POSITIONS[position]
    return (col + 0.5) * CELL, (row + 0.5) * CELL


def _hash01(key: torch.Tensor) -> torch.Tensor:
    """Integer hash (xor-shift-multiply rounds mod 2**32) of int64 keys to [0, 1): exact, so equal on every device."""
    h = key % 2**32
    for _ in range(3):
        h = ((h ^ (h >> 16)) * 0x45D9F3B) % 2**32
    return h.float() / 2**32


def _backgrounds(scenes: list[Scene], device, size: int = IMAGE_SIZE) -> torch.Tensor:
    """Background tone plus texture, [N, 3, size, size] in [0, 1]."""
    tone = torch.tensor([BACKGROUNDS[s.background] for s in scenes], device=device)[:, :, None, None]
    kind = torch.tensor([TEXTURES.index(s.texture) for s in scenes], device=device)[:, None, None]
    seed = torch.tensor([s.texture_seed for s in scenes], device=device)[:, None, None]
    ys, xs = torch.meshgrid(torch.arange(size, device=device), torch.arange(size, device=device), indexing="ij")
    if size != IMAGE_SIZE:  # the 64 px pixel each pixel lies in: stripes and checker upscaled by nearest neighbour
        ys, xs = ys * IMAGE_SIZE // size, xs * IMAGE_SIZE // size
    period, phase = 4 + seed % 7, seed // 7  # stripes and checker squares 4-10 px (of 64) wide
    rows, cols = (ys + phase) // period, (xs + phase) // period
    lattice = _hash01(seed[..., None] * 64 + torch.arange(25, device=device).view(1, 1, 5, 5))  # [N, 1, 5, 5]
    noise = F.interpolate(lattice * 2 - 1, size=(size, size), mode="bilinear", align_corners=True)
    pattern = torch.stack([torch.zeros_like(noise[:, 0]), 1 - 2 * (rows % 2).float(), 1 - 2 * (cols % 2).float(),
                           1 - 2 * ((rows + cols) % 2).float(), noise[:, 0]], dim=1)  # [N, textures, size, size]
    return tone + TEXTURE_CONTRAST * pattern.gather(1, kind[:, None].expand(-1, 1, size, size))


def render(scenes: list[Scene], device: str | torch.device | None = None, size: int = IMAGE_SIZE) -> torch.Tensor:
    """Images of ``scenes``, [N, 3, size, size] float32 in [-1, 1], rendered as one batch on ``device``.

    Objects are padded to three per scene with a validity mask; each shape is an approximate signed distance (px,
    negative inside) turned into a coverage with a 1 px anti-aliased edge, composited over the background in order
    (later objects over earlier ones). At another ``size`` than 64 every centre and half-extent is scaled by
    ``size / 64`` (the same scene, drawn finer); the edge stays one output pixel wide.
    """
    if not isinstance(size, int) or size <= 0:
        raise ValueError(f"size must be a positive number of pixels, got {size!r}")
    slots, rows = 3, []
    for scene in scenes:  # per object: centre x, centre y, half-extent, shape index, r, g, b, valid; padded to 3
        k = len(scene.objects)
        jitter = zip(scene.objects, scene.offsets or ((0.0, 0.0),) * k, scene.scales or (1.0,) * k)
        rows.append([(x + dx, y + dy, SIZES[o.size] * scale, list(SHAPES).index(o.shape), *COLORS[o.color], 1.0)
                     for o, (dx, dy), scale in jitter for x, y in [_cell_centre(o.position)]]
                    + [(0.0,) * 8] * (slots - k))
    params = torch.tensor(rows, device=device).view(len(scenes), slots, 8, 1, 1)
    cx, cy, radius, shape, valid, rgb = (params[:, :, k] for k in (0, 1, 2, 3, 7, slice(4, 7)))
    if size != IMAGE_SIZE:  # geometry in output px
        cx, cy, radius = (v * (size / IMAGE_SIZE) for v in (cx, cy, radius))
    grid = torch.arange(size, device=device, dtype=torch.float32) + 0.5  # pixel centres
    dx, dy = grid.view(1, 1, 1, -1) - cx, grid.view(1, 1, -1, 1) - cy  # [N, slots, 1, W], [N, slots, H, 1]
    ax, ay = dx.abs(), dy.abs()
    distance = torch.stack(torch.broadcast_tensors(  # in the order of SHAPES
        torch.sqrt(dx**2 + dy**2) - radius,  # circle
        torch.maximum(ax, ay) - radius,  # square
        torch.maximum(dy - radius, (2 * ax - dy - radius) / math.sqrt(5)),  # triangle, apex up
        (ax + ay - radius) / math.sqrt(2)), dim=2)  # diamond; all [N, slots, shapes, H, W]
    index = shape.long()[:, :, None]
    coverage = (0.5 - torch.take_along_dim(distance, index, dim=2)[:, :, 0]).clamp(0, 1) * valid  # [N, slots, H, W]
    image = _backgrounds(scenes, device, size)
    for j in range(slots):
        image = image + coverage[:, j, None] * (rgb[:, j] - image)
    return (image * 2 - 1).clamp(-1, 1)


def sample_batch(n: int, generator: torch.Generator, device: str | torch.device | None = None,
                 size: int = IMAGE_SIZE) -> tuple[torch.Tensor, list[str]]:
    """``n`` fresh scenes as (images [n, 3, size, size] in [-1, 1] on ``device``, captions).

    The scenes drawn depend only on ``generator``, not on ``size``."""
    scenes = sample_scenes(n, generator)
    return render(scenes, device, size), [caption(s) for s in scenes]


def _detect(images: torch.Tensor, captions: list[str]) -> dict:
    """Each caption object looked for in its image (see `faithfulness`): a dict of tensors over the M objects of all
    captions (``owner`` [M]: its image; ``area``, ``expected`` [M]; ``centroid`` [M, 2] px of 64; ``size_ok``,
    ``position_ok``, ``present`` [M] bool) plus ``objects`` (the (image, object) pairs), ``cols`` / ``rows`` (matching
    pixel counts per column / row, [M, 64]) and ``n``."""
    if len(captions) != images.shape[0]:
        raise ValueError(f"{images.shape[0]} images but {len(captions)} captions")
    x = (images.detach().float().clamp(-1, 1) + 1) / 2
    if x.shape[-2:] != (IMAGE_SIZE, IMAGE_SIZE):
        x = F.interpolate(x, size=(IMAGE_SIZE, IMAGE_SIZE), mode="bilinear", antialias=True, align_corners=False)
    device, n = x.device, x.shape[0]
    palette = torch.tensor(list(COLORS.values()), device=device)
    distance = torch.cdist(x.flatten(2).transpose(1, 2), palette, compute_mode="donot_use_mm_for_euclid_dist")
    nearest_distance, nearest = distance.view(n, IMAGE_SIZE, IMAGE_SIZE, len(COLORS)).min(-1)  # [N, H, W] each
    objects = [(i, o) for i, text in enumerate(captions) for o in parse_caption(text)]
    owner = torch.tensor([i for i, _ in objects], dtype=torch.long, device=device)
    color = torch.tensor([list(COLORS).index(o.color) for _, o in objects], dtype=torch.long, device=device)
    corner = torch.tensor([_cell_centre(o.position) for _, o in objects], device=device).view(-1, 2) - CELL / 2
    expected = torch.tensor([SHAPES[o.shape] * SIZES[o.size] ** 2 for _, o in objects], device=device)

    match = (nearest[owner] == color[:, None, None]) & (nearest_distance[owner] < COLOR_TOLERANCE)  # [M, H, W]
    match &= F.avg_pool2d(match[:, None].float(), 3, 1, 1, divisor_override=1)[:, 0] >= DENSITY
    grid = torch.arange(IMAGE_SIZE, device=device, dtype=torch.float32) + 0.5
    inside = (grid >= corner[..., None] - WINDOW_MARGIN) & (grid <= corner[..., None] + CELL + WINDOW_MARGIN)
    mask = (match & inside[:, 1, :, None] & inside[:, 0, None, :]).float()
    cols, rows = mask.sum(1), mask.sum(2)  # [M, W], [M, H]: pixel counts per column and row
    area = cols.sum(1)
    centroid = torch.stack([cols @ grid, rows @ grid], 1) / area.clamp(min=1)[:, None]
    size_ok = (area >= AREA_RANGE[0] * expected) & (area <= AREA_RANGE[1] * expected)
    position_ok = (area > 0) & ((centroid - corner - CELL / 2).abs() <= CELL / 2 + CENTROID_TOLERANCE).all(1)
    return dict(n=n, objects=objects, owner=owner, expected=expected, cols=cols, rows=rows, area=area,
                centroid=centroid, size_ok=size_ok, position_ok=position_ok, present=size_ok & position_ok)


def _per_image_mean(values: torch.Tensor, owner: torch.Tensor, n: int, empty: float) -> torch.Tensor:
    """The mean of ``values`` [M] over each image's objects ([n]; ``empty`` for an image with none)."""
    total = torch.zeros(n, device=values.device).index_add_(0, owner, values.float())
    count = torch.zeros(n, device=values.device).index_add_(0, owner, torch.ones_like(values, dtype=torch.float32))
    return torch.where(count > 0, total / count.clamp(min=1), torch.full_like(total, empty))


def faithfulness(images: torch.Tensor, captions: list[str], details: bool = False
                 ) -> torch.Tensor | tuple[torch.Tensor, list[list[dict]]]:
    """The fraction of each caption's objects present in its image: a float tensor [N] in [0, 1] (empty caption: 1).

    ``images`` are [N, 3, H, W] in [-1, 1]; any other size than 64x64 (the 128 px model's images, say) is first
    resized to 64x64 (bilinear, antialiased), so every threshold below is in px of 64 and a scene scores the same at
    every resolution it is rendered at. A pixel has colour c when c is its nearest
    palette colour and lies within `COLOR_TOLERANCE` of it (generous: samples come out blurred and desaturated), and at
    least `DENSITY` of its 3x3 neighbourhood has c too (so noise speckle never adds up to an object). An object is
    present when, within its cell widened by `WINDOW_MARGIN` px, the pixels of its colour cover `AREA_RANGE` times the
    expected area of its shape and size, and their centroid lies in its cell (give or take `CENTROID_TOLERANCE` px).
    Shape is not scored. The window is wide on purpose: a shape in a neighbouring cell then shows mostly whole, so its
    centroid falls outside the named cell rather than a clipped sliver of it passing for the object.

    With ``details`` it returns ``(scores, per_image)``, ``per_image[i]`` a list of one dict per caption object with
    ``object, present, color_found, size_ok, position_ok, area, expected_area, centroid`` (x, y px, or None) and
    ``shape_guess`` (from the fill ratio of the bounding box and the centroid's drop; a hint, not a measurement).
    """
    d = _detect(images, captions)
    n, objects, owner, expected, cols, rows, area, centroid, size_ok, position_ok, present = (
        d[k] for k in ("n", "objects", "owner", "expected", "cols", "rows", "area", "centroid", "size_ok",
                       "position_ok", "present"))
    scores = _per_image_mean(present, owner, n, empty=1.0)
    if not details:
        return scores

    cols, rows = (cols > 0).float(), (rows > 0).float()  # occupied columns and rows
    x0, y0 = cols.argmax(1), rows.argmax(1)
    width, height = IMAGE_SIZE - cols.flip(1).argmax(1) - x0, IMAGE_SIZE - rows.flip(1).argmax(1) - y0
    fill = area / (width * height).clamp(min=1)
    drop = (centroid[:, 1] - y0 - height / 2) / height.clamp(min=1)  # triangles have their centroid low in the box
    per_image = [[] for _ in range(n)]
    stats = zip(objects, present.tolist(), size_ok.tolist(), position_ok.tolist(), area.tolist(), expected.tolist(),
                centroid.tolist(), fill.tolist(), drop.tolist())
    for (i, obj), ok, size, pos, a, e, c, f, d in stats:
        guess = "triangle" if d > 0.06 else "square" if f > 0.9 else "circle" if f > 0.64 else "diamond"
        per_image[i].append(dict(object=obj, present=bool(ok), color_found=a > 0, size_ok=size, position_ok=pos,
                                 area=a, expected_area=e, centroid=tuple(c) if a else None,
                                 shape_guess=guess if a else None))
    return scores, per_image


def object_changes(images: torch.Tensor, reference: torch.Tensor, captions: list[str]) -> dict[str, torch.Tensor]:
    """How far each image's caption objects moved and changed size against ``reference`` (the same captions and
    seeds generated another way, e.g. dense): ``{"position_px": [N], "area": [N]}``, each a mean over the caption's
    objects (0 for an empty caption).

    Both images are searched as `faithfulness` does. ``position_px``: the distance between the object's centroids,
    in px of 64; an object found (any pixels of its colour in its window) in one image and not the other counts
    `CELL` px (it vanished or appeared: as bad as moving a whole cell), one found in neither counts 0. ``area``: the
    change of its area as a fraction of the shape's expected area (found in one only: its area over the expected).
    Faithfulness is a pass/fail count that most plans pass whole; these are continuous, so they rank plans whose
    objects all stay recognisable by how much the picture's content moved."""
    if images.shape != reference.shape:
        raise ValueError(f"images {tuple(images.shape)} and reference {tuple(reference.shape)} differ in shape")
    a, b = _detect(images, captions), _detect(reference, captions)
    found_a, found_b = a["area"] > 0, b["area"] > 0
    distance = (a["centroid"] - b["centroid"]).norm(dim=1)
    position = torch.where(found_a & found_b, distance, torch.where(found_a ^ found_b, CELL, 0.0))
    area = (a["area"] - b["area"]).abs() / a["expected"]
    n, owner = a["n"], a["owner"]
    return dict(position_px=_per_image_mean(position, owner, n, empty=0.0),
                area=_per_image_mean(area, owner, n, empty=0.0))
