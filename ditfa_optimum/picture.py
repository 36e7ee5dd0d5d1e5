"""The plan as a picture: a layers x steps heatmap coloured by attention-FLOP cut, and per-layer method shares.

Drawn with Pillow (a diffusers dependency), so no plotting library is needed.
"""

from __future__ import annotations

from .plan import PlanReport

#: viridis at five stops: cut 0 (dense) is dark blue, cut 1 (nothing computed) is yellow
_STOPS = [(68, 1, 84), (59, 82, 139), (33, 145, 140), (94, 201, 98), (253, 231, 37)]
_METHOD_COLOURS = [(90, 90, 90), (31, 119, 180), (44, 160, 44), (255, 127, 14), (214, 39, 40), (148, 103, 189),
                   (140, 86, 75), (227, 119, 194), (23, 190, 207), (188, 189, 34)]


def colour(value: float) -> tuple[int, int, int]:
    value = min(max(float(value), 0.0), 1.0) * (len(_STOPS) - 1)
    i = min(int(value), len(_STOPS) - 2)
    t = value - i
    return tuple(round(a + (b - a) * t) for a, b in zip(_STOPS[i], _STOPS[i + 1]))


def plan_picture(report: PlanReport, title: str = ""):
    """A PIL image: left, modules (rows) x steps (columns) coloured by FLOP cut; right, each module's share of heads
    per method over all steps; a colour bar and a legend."""
    from PIL import Image, ImageDraw, ImageFont

    font = ImageFont.load_default()
    M, T = report.flop_cut.shape
    cell_w = max(6, min(24, 720 // T))
    cell_h = max(6, min(18, 900 // M))
    label_w = 8 + 6 * max(len(n) for n in report.module_names)
    grid_x, grid_y = label_w, 40
    grid_w, grid_h = cell_w * T, cell_h * M
    grid_title = f"attention-FLOP cut per module and step (total {report.total_cut:.1%})"
    bar_x = grid_x + max(grid_w, int(font.getlength(grid_title))) + 30
    bar_w = 300
    width = bar_x + bar_w + 20
    legend_y = grid_y + grid_h + 40
    height = legend_y + 20 + 14 * ((len(report.method_names) + 2) // 3) + 10
    image = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(image)
    draw.text((8, 6), title or "ditfa plan", fill="black", font=font)
    draw.text((grid_x, 22), grid_title, fill="black", font=font)
    draw.text((bar_x, 22), "share of heads per method", fill="black", font=font)
    for i, name in enumerate(report.module_names):
        y = grid_y + i * cell_h
        if cell_h >= 10 or i % max(1, 10 // cell_h) == 0:
            draw.text((4, y + max(0, (cell_h - 10) // 2)), name, fill="black", font=font)
        for t in range(T):
            x = grid_x + t * cell_w
            draw.rectangle([x, y, x + cell_w - 1, y + cell_h - 1], fill=colour(report.flop_cut[i, t]))
        x = bar_x
        shares = report.share[i].mean(0)
        for k, share in enumerate(shares.tolist()):
            w = round(share * bar_w)
            if w:
                draw.rectangle([x, y, x + w - 1, y + cell_h - 2], fill=_METHOD_COLOURS[k % len(_METHOD_COLOURS)])
            x += w
    for t in range(0, T, max(1, T // 8)):
        draw.text((grid_x + t * cell_w, grid_y + grid_h + 2), str(t), fill="black", font=font)
    draw.text((grid_x, grid_y + grid_h + 14), "denoising step", fill="black", font=font)
    # colour bar
    for j in range(grid_w):
        draw.line([grid_x + j, legend_y, grid_x + j, legend_y + 8], fill=colour(j / max(1, grid_w - 1)))
    draw.text((grid_x, legend_y + 10), "cut 0%", fill="black", font=font)
    draw.text((grid_x + max(0, grid_w - 50), legend_y + 10), "100%", fill="black", font=font)
    # method legend
    for k, name in enumerate(report.method_names):
        x = bar_x + (k % 3) * 100
        y = legend_y + 14 * (k // 3)
        draw.rectangle([x, y + 1, x + 8, y + 9], fill=_METHOD_COLOURS[k % len(_METHOD_COLOURS)])
        draw.text((x + 11, y), name, fill="black", font=font)
    return image
