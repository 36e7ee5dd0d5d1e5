"""Evaluate the miniature MMDiT: caption faithfulness of dense generations on held-out captions, a sample grid, and
the time of one image.

    python benchmarks/mini_model.py --out docs/mini-model            # the shipped model, GPU if there is one
    python benchmarks/mini_model.py --model benchmarks/assets/mini-mmdit-128 --out docs/mini-model/128   # 4096 tokens

Images come out at the model's own size (its transformer's ``sample_size``: 64, or 128 for mini-mmdit-128);
`faithfulness` (training/scenes.py, outside the package) scores them at 64x64 (larger images are downsampled first).

Held-out captions: `evaluation_captions(n, seed=1234)` minus the default calibration captions (seed 0). Seeds: caption i draws
its noise from seed i. Writes ``mini_model.json`` and ``samples.png`` (8 captions x 4 seeds) into ``--out``.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from ditfa_optimum.mini import DEFAULTS, MiniMMDiTPipeline, mini_pipeline  # noqa: E402
from ditfa_optimum.mini.grammar import evaluation_captions  # noqa: E402
from training.scenes import faithfulness  # noqa: E402

EVAL_SEED, CALIBRATION_SEED = 1234, 0
CAPTION = "a small red circle in the top left and a large blue square at the bottom"


def held_out_captions(n: int, calibration: list[str]) -> list[str]:
    """``n`` grammar captions (seed `EVAL_SEED`, in drawing order) that are not calibration captions.

    Besides ``calibration`` it also leaves out the 64 captions of ``evaluation_captions(64, CALIBRATION_SEED)``, as
    every recorded run did, so the recorded evaluation sets stay the same. ``evaluation_captions(k, seed)`` draws all
    ``k`` scenes at once, so a shorter list is not a prefix of a longer one: hence the explicit ``calibration``.
    """
    used = set(calibration) | set(evaluation_captions(64, CALIBRATION_SEED))
    pool = [c for c in evaluation_captions(n + 64, EVAL_SEED) if c not in used]  # n + 64: the recorded draws
    if len(pool) < n:
        raise ValueError(f"only {len(pool)} held-out captions left of {n + 64}; ask for fewer")
    return pool[:n]


def generate(pipe, captions: list[str], seeds: list[int], steps: int, guidance: float, batch: int) -> torch.Tensor:
    """Images [N, 3, S, S] in [0, 1], S the model's size; caption i uses ``torch.Generator().manual_seed(seeds[i])``."""
    out = []
    for i in range(0, len(captions), batch):
        gens = [torch.Generator().manual_seed(s) for s in seeds[i: i + batch]]
        out.append(pipe(captions[i: i + batch], num_inference_steps=steps, guidance_scale=guidance, generator=gens,
                        output_type="pt").images.float().cpu())
    return torch.cat(out)


def grid_png(images: torch.Tensor, columns: int, path: Path, scale: int = 2) -> None:
    from PIL import Image

    n, _, h, w = images.shape
    rows = (n + columns - 1) // columns
    canvas = torch.ones(3, rows * (h + 2), columns * (w + 2))
    for i, img in enumerate(images):
        r, c = divmod(i, columns)
        canvas[:, r * (h + 2) + 1: r * (h + 2) + 1 + h, c * (w + 2) + 1: c * (w + 2) + 1 + w] = img
    array = (canvas.permute(1, 2, 0) * 255).round().to(torch.uint8).numpy()
    image = Image.fromarray(array)
    image.resize((image.width * scale, image.height * scale), Image.NEAREST).save(path)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None, metavar="DIR",
                        help="a saved miniature model, e.g. benchmarks/assets/mini-mmdit-128 (default: mini-mmdit, "
                             "the model in the package)")
    parser.add_argument("--out", required=True)
    parser.add_argument("--captions", type=int, default=256)
    parser.add_argument("--steps", type=int, default=DEFAULTS["num_inference_steps"])
    parser.add_argument("--guidance", type=float, default=DEFAULTS["guidance_scale"])
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--timing-only", action="store_true",
                        help="only the time of one image (median of 3), e.g. with --device cpu on an idle machine")
    args = parser.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    pipe = mini_pipeline(args.model, device=args.device)
    device = torch.cuda.get_device_name() if args.device.startswith("cuda") else platform.processor() or "cpu"
    size = pipe.transformer.config.sample_size
    model = dict(model=args.model or "mini-mmdit", size=size,
                 image_tokens=(size // pipe.transformer.config.patch_size) ** 2)

    def single_image_seconds(caption: str) -> float:
        """One image, dense, batch 1 with CFG: median of 3 runs."""
        times = []
        for _ in range(3):
            t0 = time.perf_counter()
            generate(pipe, [caption], [0], args.steps, args.guidance, 1)
            times.append(time.perf_counter() - t0)
        return sorted(times)[1]

    if args.timing_only:
        result = dict(**model, device=device, threads=torch.get_num_threads(), steps=args.steps,
                      guidance=args.guidance, torch=torch.__version__,
                      single_image_seconds=single_image_seconds(CAPTION), caption=CAPTION,
                      date=time.strftime("%Y-%m-%d"))
        (out / "timing.json").write_text(json.dumps(result, indent=1) + "\n")
        print(json.dumps(result, indent=1))
        return 0

    captions = held_out_captions(args.captions, MiniMMDiTPipeline.default_prompts(8, CALIBRATION_SEED))
    start = time.perf_counter()
    images = generate(pipe, captions, list(range(len(captions))), args.steps, args.guidance, args.batch)
    seconds = time.perf_counter() - start
    scores, details = faithfulness(images * 2 - 1, captions, details=True)
    objects = [d for per in details for d in per]
    by_count = {k: scores[[i for i, per in enumerate(details) if len(per) == k]].mean().item() for k in (1, 2, 3)}

    shown = captions[:8]
    grid = generate(pipe, [c for c in shown for _ in range(4)], [s for _ in shown for s in range(4)], args.steps,
                    args.guidance, args.batch)
    grid_png(grid, 4, out / "samples.png", scale=max(1, 128 // size))

    result = dict(
        **model, device=device, threads=torch.get_num_threads(), steps=args.steps, guidance=args.guidance,
        captions=len(captions),
        faithfulness=scores.mean().item(), faithfulness_by_objects=by_count,
        color_found=sum(d["color_found"] for d in objects) / len(objects),
        position_ok=sum(d["position_ok"] for d in objects) / len(objects),
        size_ok=sum(d["size_ok"] for d in objects) / len(objects),
        shape_guess_ok=sum(d["shape_guess"] == d["object"].shape for d in objects) / len(objects),
        batch_seconds=seconds, single_image_seconds=single_image_seconds(captions[0]), sample_captions=shown)
    (out / "mini_model.json").write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
