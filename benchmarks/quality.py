"""Compression quality on the trained miniature MMDiT: attention-FLOP cut against image fidelity and faithfulness.

    python benchmarks/quality.py --out docs/benchmarks          # ~3 min on one H100; on CPU use --prompts 16

One calibration (the default config of ``ditfa-optimum optimize``: 8 grammar captions, 20 steps, CFG 4, block 32),
then three strategies built from the same statistics, each evaluated on held-out captions (disjoint from the
calibration captions, fixed seeds) against the dense model's images:

* head-wise: the product, `search` over a threshold sweep, for budget schedules (constant: the paper's; linear,
  quadratic and cubic give later steps more budget) and error normalizations (per head: the paper's; per module);
  every variant is searched on the one calibration (whose choices flowed with the default settings);
* layer-wise: one method per (module, step), the DiTFastAttn v1 style, `search(granularity="layer")`, same sweep;
* uniform: one method for every head of every module from a start step on (arrow 1/8, arrow 1/32, cache), the start
  step swept to vary the cut.

Per plan: attention-FLOP cut, PSNR and SSIM of the images against dense (mean over images), faithfulness of the
compressed images and the dense ones. Writes ``quality.json``, ``quality.png`` (cut vs PSNR, one curve per strategy)
and prints a markdown table for docs/benchmarks.md. Also prints the attention structure of the model: per layer, the
share of (step, head) entries whose arrow-1/8 RSE is below 0.05.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from mini_model import generate, held_out_captions  # noqa: E402

from ditfa_optimum import DiTFastAttnConfig, apply, remove  # noqa: E402
from ditfa_optimum.calibrate import calibrate  # noqa: E402
from ditfa_optimum.embedded import DEFAULTS  # noqa: E402
from ditfa_optimum.mini import mini_pipeline  # noqa: E402
from ditfa_optimum.mini.scenes import faithfulness  # noqa: E402
from ditfa_optimum.plan import CompressionPlan  # noqa: E402
from ditfa_optimum.search import search  # noqa: E402

THRESHOLDS = (0.005, 0.01, 0.02, 0.03, 0.05, 0.1, 0.2, 0.4)
#: head-wise variants: (budget schedule, error normalization); the first is the paper's (and the default)
VARIANTS = (("constant", "head"), ("linear", "head"), ("quadratic", "head"), ("constant", "module"),
            ("quadratic", "module"), ("cubic", "module"))


def variant_name(schedule: str, normalization: str) -> str:
    return " ".join(["head-wise"] + ([schedule] if schedule != "constant" else [])
                    + (["module-norm"] if normalization != "head" else []))
UNIFORM_METHODS = ("arrow:1/8", "arrow:1/32", "cache")
UNIFORM_STARTS = (1, 4, 8, 12, 16)
STRUCTURE_RSE = 0.05


def psnr(reference: torch.Tensor, images: torch.Tensor) -> torch.Tensor:
    """Per-image PSNR in dB for images in [0, 1] (peak 1; identical images: inf)."""
    mse = ((reference.double() - images.double()) ** 2).flatten(1).mean(1)
    return 10 * torch.log10(1 / mse)


def ssim(reference: torch.Tensor, images: torch.Tensor) -> torch.Tensor:
    """Per-image SSIM (Wang et al. 2004: 11x11 Gaussian window, sigma 1.5, per channel, averaged) for [0, 1] images."""
    x, y = reference.double(), images.double()
    coords = torch.arange(11, dtype=torch.float64) - 5
    g = torch.exp(-coords**2 / (2 * 1.5**2))
    window = (g[:, None] * g[None, :] / g.sum() ** 2).expand(x.shape[1], 1, 11, 11).contiguous()

    def blur(t):
        return F.conv2d(t, window, groups=x.shape[1])

    mx, my = blur(x), blur(y)
    vx, vy, cov = blur(x * x) - mx**2, blur(y * y) - my**2, blur(x * y) - mx * my
    c1, c2 = 0.01**2, 0.03**2
    value = ((2 * mx * my + c1) * (2 * cov + c2)) / ((mx**2 + my**2 + c1) * (vx + vy + c2))
    return value.flatten(1).mean(1)


def uniform_from(specs, steps: int, method: str, start: int, block_size: int, model_class: str) -> CompressionPlan:
    table = {s.name: [["full"] * s.num_heads if t < start else [method] * s.num_heads for t in range(steps)]
             for s in specs}
    return CompressionPlan.from_methods(specs, table, block_size=block_size, model_class=model_class)


def structure(stats) -> dict[str, float]:
    """Per module: share of (step >= 1, head) entries whose arrow-1/8 relative error is below `STRUCTURE_RSE`."""
    column = stats.candidates.index("arrow:0.125")
    return {spec.name: float((stats.rse(spec.name)[1:, :, column] < STRUCTURE_RSE).double().mean())
            for spec in stats.modules}


def interpolate(curve: list[tuple[float, float]], cut: float) -> float | None:
    """The value of a (cut, value) curve at ``cut`` (linear; None outside the curve's range)."""
    points = sorted(curve)
    for (c0, v0), (c1, v1) in zip(points, points[1:]):
        if c0 <= cut <= c1:
            return v0 if c1 == c0 else v0 + (v1 - v0) * (cut - c0) / (c1 - c0)
    return None


def plot(rows: list[dict], dense_faith: float, prompts: int, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8.6, 4.2), dpi=120)
    markers = {"head-wise": "o", "layer-wise": "s", "uniform": "^"}
    for i, name in enumerate(dict.fromkeys(r["curve"] for r in rows)):  # every curve, in the order of the table
        points = sorted((r["flop_cut"] * 100, min(r["psnr"], 60)) for r in rows if r["curve"] == name)
        ax.plot(*zip(*points), color=f"C{i % 10}", marker=markers[name.split()[0]],
                ls="-" if i < 10 else "--", label=name)
    ax.axhline(30, color="gray", lw=0.8, ls="--")
    ax.set_xlabel("attention FLOPs cut (%)")
    ax.set_ylabel("PSNR vs dense (dB, capped at 60)")
    ax.set_title(f"mini-mmdit, {prompts} held-out captions (dense faithfulness {dense_faith:.2f})")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))  # beside the axes: the curves fill them
    fig.tight_layout()
    fig.savefig(path)


def report(result: dict, png: Path | None = None) -> None:
    """Print the markdown table (with each row's PSNR against two head-wise curves at the same cut) and the attention
    structure; draw the plot when matplotlib is there."""
    rows = result["rows"]
    reference, best = variant_name("constant", "head"), variant_name("quadratic", "module")

    def at(curve: str, row: dict) -> str:
        value = None if row["curve"] == curve else interpolate(
            [(r["flop_cut"], r["psnr"]) for r in rows if r["curve"] == curve], row["flop_cut"])
        return "–" if value is None else f"{value:.2f}"

    print(f"dense faithfulness {result['dense_faithfulness']:.3f} on {result['evaluation_prompts']} held-out "
          f"captions; calibration {result['calibration_seconds']:.1f} s on {result['device']}\n")
    print(f"| strategy | setting | attention FLOPs cut | PSNR (dB) | SSIM | faithfulness | {reference} PSNR at this cut "
          f"| {best} PSNR at this cut |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['curve']} | {r['setting']} | {r['flop_cut']:.1%} | {r['psnr']:.2f} | {r['ssim']:.3f} | "
              f"{r['faithfulness']:.3f} | {at(reference, r)} | {at(best, r)} |")
    print("\nattention structure: share of (step, head) with arrow-1/8 RSE < 0.05 per layer: "
          + ", ".join(f"{k.split('.')[1]}: {v:.0%}" for k, v in result["structure_arrow_1_8_rse_below_0_05"].items()))
    if png is not None:
        try:
            plot(rows, result["dense_faithfulness"], result["evaluation_prompts"], png)
        except ImportError:
            print("matplotlib is missing: no plot", file=sys.stderr)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", help="directory for quality.json and quality.png")
    parser.add_argument("--report", metavar="JSON", help="only print the table of an earlier run's quality.json")
    parser.add_argument("--prompts", type=int, default=64, help="held-out evaluation captions")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--backend", default="blocked", help="attention backend of the plans (all are exact)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args(argv)
    if args.report:
        report(json.loads(Path(args.report).read_text()))
        return 0
    if not args.out:
        parser.error("--out is required (or --report JSON)")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    d = DEFAULTS["mini-mmdit"]
    config = DiTFastAttnConfig(num_inference_steps=d["steps"], height=d["size"], width=d["size"],
                               guidance_scale=d["guidance"], block_size=d["block_size"], backend=args.backend)
    pipe = mini_pipeline(device=args.device)
    start = time.perf_counter()
    calibration = pipe.default_prompts(config.num_prompts, config.seed)
    stats = calibrate(pipe, config, calibration, progress=False)
    calibration_seconds = time.perf_counter() - start
    captions = held_out_captions(args.prompts, calibration)
    seeds = list(range(len(captions)))

    def evaluate():
        return generate(pipe, captions, seeds, config.num_inference_steps, config.guidance_scale, args.batch)

    dense = evaluate()
    dense_faith = faithfulness(dense * 2 - 1, captions).mean().item()
    specs, model_class = stats.modules, stats.model_class
    plans = [(variant_name(b, n), f"δ={t:g}",
              search(stats, config.replace(budget_schedule=b, error_normalization=n), threshold=t))
             for b, n in VARIANTS for t in THRESHOLDS]
    plans += [("layer-wise", f"δ={t:g}", search(stats, config, threshold=t, granularity="layer")) for t in THRESHOLDS]
    plans += [(f"uniform {m}", f"from step {s}", uniform_from(specs, config.num_inference_steps, m, s,
                                                               config.block_size, model_class))
              for m in UNIFORM_METHODS for s in UNIFORM_STARTS]
    rows = []
    for curve, label, plan in plans:
        apply(pipe, plan, backend=args.backend)
        try:
            images = evaluate()
        finally:
            remove(pipe)
        p, s = psnr(dense, images), ssim(dense, images)
        rows.append(dict(curve=curve, setting=label, flop_cut=plan.flops(stats.image_tokens, stats.text_tokens,
                                                                         cfg=stats.cfg).cut,
                         psnr=float(p.clamp(max=99).mean()), psnr_min=float(p.min()), ssim=float(s.mean()),
                         faithfulness=faithfulness(images * 2 - 1, captions).mean().item(),
                         methods=plan.method_counts()))
        r = rows[-1]
        print(f"{curve:20s} {label:14s} cut {r['flop_cut']:6.1%}  PSNR {r['psnr']:6.2f} dB  SSIM {r['ssim']:.4f}  "
              f"faithfulness {r['faithfulness']:.3f}", flush=True)

    result = dict(device=torch.cuda.get_device_name() if args.device.startswith("cuda") else "cpu",
                  config=config.to_dict(), calibration_prompts=calibration, evaluation_prompts=len(captions),
                  calibration_seconds=calibration_seconds, dense_faithfulness=dense_faith,
                  structure_arrow_1_8_rse_below_0_05=structure(stats), rows=rows,
                  date=time.strftime("%Y-%m-%d"))
    (out / "quality.json").write_text(json.dumps(result, indent=1) + "\n")
    report(result, out / "quality.png")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
