"""Compression quality on the trained miniature MMDiTs: compute saved against image fidelity, ours and the peers'.

    python benchmarks/quality.py --out docs/benchmarks                       # mini-mmdit, ~5 min on one H200
    python benchmarks/quality.py --out docs/benchmarks --model benchmarks/assets/mini-mmdit-128 --tag 128
    python benchmarks/quality.py --out /tmp/q --prompts 4 --quick            # CPU smoke run

Every plan is evaluated on held-out captions (disjoint from the calibration captions, fixed seeds) against the dense
model's images: PSNR and SSIM (mean over images), faithfulness, the attention-FLOP cut and the share of
whole-transformer FLOPs skipped (one counter for everyone: benchmarks/flops.py counts the linear layers and attention
calls that really run). Strategies:

* **trajectory** (the product's default search): `DiTFastAttnOptimizer`'s calibration (sensitivity + two passes)
  with ``target_cut`` swept; each point is its own calibration, as a user would run it; plus the default config
  (``target_snr_db``) as one point;
* **trajectory + blocks / + steps / + steps + blocks**: the same search with block methods, whole skipped steps
  (``skip_steps``) or both; and whole skipped steps without head methods; ``target_cut`` on whole-transformer FLOPs;
* **trajectory (heads only) + int8**: the head-only sweep with `full_int8` (Q.K^T in INT8) among the candidates,
  costed at its measured price (issue 16);
* **trajectory, 1 pass**: the same allocation on one dense-flow calibration (shows what the second pass buys);
* **paper**: the first wave's search (``allocation="local"``, constant budget per step, per-head RSE) over δ;
* **local quadratic module-norm**: the best first-wave option, over δ;
* **uniform cache**: every head cached from a start step on;
* **peers** (``--peers``): diffusers FirstBlockCache / MagCache / TaylorSeer and cache-dit DBCache (± TaylorSeer),
  each over its own thresholds (benchmarks/peers.py).

Writes ``quality[-TAG].json``, ``quality[-TAG].png`` (whole-transformer FLOPs skipped vs PSNR) and prints a markdown
table.
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
from ditfa_optimum.embedded import defaults_for  # noqa: E402
from ditfa_optimum.mini import mini_pipeline  # noqa: E402
from ditfa_optimum.plan import CompressionPlan  # noqa: E402
from ditfa_optimum.search import search  # noqa: E402
from training.scenes import faithfulness, object_changes  # noqa: E402

THRESHOLDS = (0.005, 0.01, 0.02, 0.05, 0.1, 0.2)
TARGET_CUTS = (0.3, 0.45, 0.6, 0.7, 0.8, 0.9)
#: whole-transformer FLOP cuts asked of the plans with block methods
WHOLE_TARGETS = (0.2, 0.3, 0.4, 0.5, 0.6, 0.7)
BLOCK_METHODS = ("block_cache", "block_taylor")
CURVES = ("default", "trajectory", "blocks", "steps", "steps-unverified", "steps-only",
          "steps-blocks", "one-pass", "paper", "local-quadratic", "uniform", "int8", "fp8", "peers")
#: the 8-bit candidates the "int8" curve adds to the default ones (`arrow_int8` costs more than `arrow` at its measured
#: price on an H200, so it cannot reach the frontier and is left out of the sweep)
INT8_METHODS = ("full_int8",)
UNIFORM_STARTS = (4, 8, 12, 16)


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


def image_scores(dense: torch.Tensor, images: torch.Tensor, captions: list[str]) -> dict:
    """Every image metric of a row against the dense images (all [N, 3, H, W] in [0, 1]): PSNR (capped at 99 dB
    per image, mean and min), SSIM, faithfulness, and how far the caption objects moved (``drift_px``, px of 64) and
    changed area (``area_change``, share of the shape's area) against dense (training.scenes.object_changes)."""
    p, s = psnr(dense, images), ssim(dense, images)
    changes = object_changes(images * 2 - 1, dense * 2 - 1, captions)
    return dict(psnr=float(p.clamp(max=99).mean()), psnr_min=float(p.min()), ssim=float(s.mean()),
                faithfulness=faithfulness(images * 2 - 1, captions).mean().item(),
                drift_px=float(changes["position_px"].mean()), area_change=float(changes["area"].mean()))


def uniform_from(specs, steps: int, method: str, start: int, block_size: int, model_class: str) -> CompressionPlan:
    table = {s.name: [["full"] * s.num_heads if t < start else [method] * s.num_heads for t in range(steps)]
             for s in specs}
    return CompressionPlan.from_methods(specs, table, block_size=block_size, model_class=model_class)


def interpolate(curve: list[tuple[float, float]], cut: float) -> float | None:
    """The value of a (cut, value) curve at ``cut`` (linear; None outside the curve's range)."""
    points = sorted(curve)
    for (c0, v0), (c1, v1) in zip(points, points[1:]):
        if c0 <= cut <= c1:
            return v0 if c1 == c0 else v0 + (v1 - v0) * (cut - c0) / (c1 - c0)
    return None


def plot(rows: list[dict], title: str, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(12, 4.4), dpi=120)
    for ax, key, label in ((axes[0], "whole_cut", "whole-transformer FLOPs skipped (%)"),
                           (axes[1], "flop_cut", "attention FLOPs cut (%)")):
        for i, name in enumerate(dict.fromkeys(r["curve"] for r in rows)):
            points = sorted((r[key] * 100, min(r["psnr"], 60)) for r in rows if r["curve"] == name
                            and r.get(key) is not None)
            if points:
                ax.plot(*zip(*points), color=f"C{i % 10}", marker="o" if i < 10 else "s",
                        ls="-" if i < 10 else "--", label=name)
        ax.axhline(30, color="gray", lw=0.8, ls="--")
        ax.set_xlabel(label)
        ax.set_ylabel("PSNR vs dense (dB, capped at 60)")
        ax.grid(alpha=0.3)
    axes[1].legend(*axes[0].get_legend_handles_labels(), fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path)


def best_peer_at(rows: list[dict], cut: float) -> tuple[str, float] | None:
    """The best peer PSNR at a whole-transformer cut (each peer's curve interpolated), or None."""
    best = None
    for name in dict.fromkeys(r["curve"] for r in rows if r.get("peer")):
        value = interpolate([(r["whole_cut"], r["psnr"]) for r in rows if r["curve"] == name], cut)
        if value is not None and (best is None or value > best[1]):
            best = (name, value)
    return best


def report(result: dict, png: Path | None = None) -> None:
    """Print the markdown table (each of our rows beside the best peer at its whole-transformer cut); plot."""
    rows = result["rows"]
    print(f"{result['model']}: dense faithfulness {result['dense_faithfulness']:.3f} on "
          f"{result['evaluation_prompts']} held-out captions, {result['device']}\n")
    print("| strategy | setting | attention FLOPs cut | whole FLOPs skipped | PSNR (dB) | predicted PSNR | SSIM "
          "| faithfulness | object drift (px) | best peer at this whole cut |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        peer = None if r.get("peer") else best_peer_at(rows, r["whole_cut"])
        cut = "–" if r.get("flop_cut") is None else f"{r['flop_cut']:.1%}"
        pred = "–" if r.get("predicted_psnr") is None else f"{r['predicted_psnr']:.1f}"
        faith = "–" if r.get("faithfulness") is None else f"{r['faithfulness']:.3f}"  # runs before they were scored
        drift = "–" if r.get("drift_px") is None else f"{r['drift_px']:.2f}"
        print(f"| {r['curve']} | {r['setting']} | {cut} | {r['whole_cut']:.1%} | {r['psnr']:.2f} | {pred} | "
              f"{r['ssim']:.3f} | {faith} | {drift} | {'–' if peer is None else f'{peer[1]:.2f} ({peer[0]})'} |")
    if png is not None:
        try:
            plot(rows, f"{result['model']}, {result['evaluation_prompts']} held-out captions", png)
        except ImportError:
            print("matplotlib is missing: no plot", file=sys.stderr)


class Evaluator:
    """Generates the held-out images under whatever is installed on the pipeline and scores them against dense."""

    def __init__(self, pipe, captions, config, batch: int):
        from flops import count_flops

        self.pipe, self.captions, self.config, self.batch = pipe, captions, config, batch
        self.seeds = list(range(len(captions)))
        self.count_flops = count_flops
        self.dense, self.dense_flops = self.images()
        self.dense_faith = faithfulness(self.dense * 2 - 1, captions).mean().item()

    def images(self, attention_flops=None):
        with self.count_flops(self.pipe.transformer, attention_flops=attention_flops) as counter:
            images = generate(self.pipe, self.captions, self.seeds, self.config.num_inference_steps,
                              self.config.guidance_scale, self.batch)
        return images, counter.per_image(len(self.captions))

    def score(self, images, flops: float, **row) -> dict:
        row.update(image_scores(self.dense, images, self.captions), whole_cut=1 - flops / self.dense_flops)
        print(f"{row['curve']:28s} {row['setting']:18s} whole {row['whole_cut']:6.1%}  PSNR {row['psnr']:6.2f} dB "
              f"SSIM {row['ssim']:.4f}  faithfulness {row['faithfulness']:.3f}  drift {row['drift_px']:.2f} px",
              flush=True)
        return row

    def plan_row(self, curve: str, setting: str, plan: CompressionPlan, stats, backend: str) -> dict:
        runtime = apply(self.pipe, plan, backend=backend)
        try:
            images, flops = self.images(attention_flops=plan_attention_flops(runtime, plan, stats))
        finally:
            remove(self.pipe)
        info = plan.metadata.get("search", {})
        return self.score(images, flops, curve=curve, setting=setting,
                          flop_cut=plan.flops(stats.image_tokens, stats.text_tokens, cfg=stats.cfg).cut,
                          predicted_psnr=info.get("predicted_psnr_db"), methods=plan.method_counts(),
                          head_weight=info.get("head_weight"), max_skip_run=info.get("max_skip_run"),
                          skipped_steps=plan.skipped_steps, variant=info.get("variant"),
                          alternatives=(info.get("selected_by_measurement") or {}).get("alternatives"))


def plan_attention_flops(runtime, plan: CompressionPlan, stats):
    """For the FLOP counter: the attention FLOPs of a planned module's call at the runtime's current step."""
    def attention_flops(name, batch, image_tokens, text_tokens, heads, head_dim):
        if name not in plan.module_names:
            return None
        spec = plan.spec(name)
        layout = spec.layout(image_tokens, text_tokens, plan.block_size)
        step = runtime.state.step
        # a method's cost is per row of the transformer batch (cfg_share: half a row's, for both halves)
        return batch * sum(m.flops(layout, spec.head_dim, bool(stats.cfg)) for m in plan.step_methods(name, step))
    return attention_flops


def fp8_rows(ev: Evaluator, args, config, calibration) -> list[dict]:
    """FP8 linear layers (`ditfa_optimum.fp8_linears`, GPU of compute capability 8.9+): the same model in bfloat16,
    then with FP8 linears, then the default search calibrated and searched on the FP8 model (as
    ``quantize_linears="fp8"`` does), each scored against the float32 dense images. FP8 does not change the FLOP
    count: the cut is the plan's."""
    from ditfa_optimum import fp8_linears

    bf16 = mini_pipeline(None if args.model == "mini-mmdit" else args.model, device=args.device,
                         torch_dtype=torch.bfloat16)
    bf16.set_progress_bar_config(disable=True)
    fp32, ev.pipe = ev.pipe, bf16
    rows = []
    try:
        images, flops = ev.images()
        rows.append(ev.score(images, flops, curve="bf16", setting="dense attention", flop_cut=0.0))
        fp8_linears.quantize(bf16.transformer)
        images, flops = ev.images()
        rows.append(ev.score(images, flops, curve="fp8 linears", setting="dense attention", flop_cut=0.0))
        stats = calibrate(bf16, config, calibration, progress=False)
        kind, value = config.target()
        rows.append(ev.plan_row("fp8 linears + default plan", f"{kind} {value:g}", search(stats, config), stats,
                                args.backend))
    finally:
        ev.pipe = fp32
    return rows


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", help="directory for quality[-TAG].json and .png")
    parser.add_argument("--report", metavar="JSON", help="only print the table of an earlier run's JSON")
    parser.add_argument("--model", default="mini-mmdit", help="mini-mmdit or a saved miniature model directory")
    parser.add_argument("--tag", default="", help="suffix of the output file names")
    parser.add_argument("--prompts", type=int, default=64, help="held-out evaluation captions")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--backend", default="blocked", help="attention backend of the plans (all are exact)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--peers", action="store_true", help="also sweep the peers' block caches")
    parser.add_argument("--quick", action="store_true", help="a few points per curve (smoke runs)")
    parser.add_argument("--curves", default=",".join(c for c in CURVES if c != "peers"),
                        help=f"comma-separated subset of {','.join(CURVES)} (--peers adds peers)")
    parser.add_argument("--max-head-rse", type=float, default=None, help="override the per-head (and block) cap")
    parser.add_argument("--targets", default=None,
                        help="comma-separated target cuts of the head-only curve (default: 0.3,0.45,0.6,0.7,0.8,0.9)")
    parser.add_argument("--calibration-prompts", type=int, default=None,
                        help="calibration captions (default: the config's 8; fewer for CPU runs of the 4096-token model)")
    args = parser.parse_args(argv)
    if args.report:  # the table again, and the plot beside the JSON (--out: elsewhere)
        path = Path(args.report)
        report(json.loads(path.read_text()), (Path(args.out) if args.out else path.parent) / f"{path.stem}.png")
        return 0
    if not args.out:
        parser.error("--out is required (or --report JSON)")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    d = defaults_for(args.model)
    config = DiTFastAttnConfig(num_inference_steps=d["steps"], height=d["size"], width=d["size"],
                               guidance_scale=d["guidance"], block_size=d["block_size"], backend=args.backend)
    if args.max_head_rse is not None:
        config = config.replace(max_head_rse=args.max_head_rse)
    if args.calibration_prompts is not None:
        config = config.replace(num_prompts=args.calibration_prompts,
                                batch_size=min(config.batch_size, args.calibration_prompts))
    curves = set(args.curves.split(",")) | ({"peers"} if args.peers else set())
    unknown = curves - set(CURVES)
    if unknown:
        parser.error(f"unknown curves {sorted(unknown)}; choose from {CURVES}")
    pipe = mini_pipeline(None if args.model == "mini-mmdit" else args.model, device=args.device)
    pipe.set_progress_bar_config(disable=True)
    calibration = pipe.default_prompts(config.num_prompts, config.seed)
    captions = held_out_captions(args.prompts, calibration)
    ev = Evaluator(pipe, captions, config, args.batch)
    targets = TARGET_CUTS[1::2] if args.quick else TARGET_CUTS
    if args.targets:
        targets = tuple(float(t) for t in args.targets.split(","))
    thresholds = THRESHOLDS[2::2] if args.quick else THRESHOLDS
    rows = []

    def calibrated(cfg):
        return calibrate(pipe, cfg, calibration, progress=False)

    start = time.perf_counter()
    # every curve but the peers, fp8 (which calibrates its own model) and the head-only sweep (one calibration per
    # target) reads the default calibration
    stats = calibrated(config) if curves - {"fp8", "peers", "trajectory"} else None
    seconds = time.perf_counter() - start
    if "default" in curves:
        kind, value = config.target()
        rows.append(ev.plan_row("trajectory (default)", f"{kind} {value:g}", search(stats, config),
                                stats, args.backend))
    if "trajectory" in curves:
        for cut in targets:
            cfg = config.replace(target_cut=cut, skip_steps=False)
            own = calibrated(cfg)
            rows.append(ev.plan_row("trajectory (heads only)", f"target {cut:.0%}", search(own, cfg), own,
                                    args.backend))
    if "int8" in curves:  # the head-only sweep again, with 8-bit heads among the candidates at their measured cost
        for cut in targets:
            cfg = config.replace(target_cut=cut, skip_steps=False, methods=tuple(config.methods) + INT8_METHODS)
            own = calibrated(cfg)
            rows.append(ev.plan_row("trajectory (heads only) + int8", f"target {cut:.0%}", search(own, cfg), own,
                                    args.backend))
    if "blocks" in curves:
        for cut in WHOLE_TARGETS[1::2] if args.quick else WHOLE_TARGETS:
            cfg = config.replace(target_cut=cut, block_methods=BLOCK_METHODS, skip_steps=False)
            plan = search(calibrated(cfg), cfg)
            rows.append(ev.plan_row("trajectory + blocks", f"whole target {cut:.0%}", plan, stats, args.backend))
    for key, name, extra in (("steps", "trajectory + steps", dict(skip_steps=True)),
                             ("steps-unverified", "trajectory + steps, model's choice (verify_plans=1)",
                              dict(skip_steps=True, verify_plans=1)),
                             ("steps-only", "steps only (no head methods)", dict(skip_steps=True, methods=())),
                             ("steps-blocks", "trajectory + steps + blocks",
                              dict(skip_steps=True, block_methods=BLOCK_METHODS))):
        if key not in curves:
            continue
        for cut in WHOLE_TARGETS[1::2] if args.quick else WHOLE_TARGETS:
            cfg = config.replace(target_cut=cut, **extra)
            plan = search(calibrated(cfg), cfg)
            rows.append(ev.plan_row(name, f"whole target {cut:.0%}", plan, stats, args.backend))
    if "one-pass" in curves:
        one = config.replace(calibration_passes=1)
        stats1 = calibrated(one)
        for cut in targets:
            cfg = one.replace(target_cut=cut)
            rows.append(ev.plan_row("trajectory, 1 pass", f"target {cut:.0%}", search(stats1, cfg), stats1,
                                    args.backend))
    for key, name, cfg in (("paper", "paper (local δ)", config.replace(allocation="local", max_head_rse=1e9)),
                           ("local-quadratic", "local quadratic module-norm",
                            config.replace(allocation="local", max_head_rse=1e9, budget_schedule="quadratic",
                                           error_normalization="module"))):
        if key not in curves:
            continue
        local_stats = calibrated(cfg)
        for t in thresholds:
            rows.append(ev.plan_row(name, f"δ={t:g}", search(local_stats, cfg, threshold=t), local_stats,
                                    args.backend))
    if "uniform" in curves:
        for s in UNIFORM_STARTS[::2] if args.quick else UNIFORM_STARTS:
            plan = uniform_from(stats.modules, config.num_inference_steps, "cache", s, config.block_size,
                                stats.model_class)
            rows.append(ev.plan_row("uniform cache", f"from step {s}", plan, stats, args.backend))
    if "fp8" in curves:
        rows += fp8_rows(ev, args, config, calibration)
    if "peers" in curves:
        from peers import PEERS, run_peer_sweep

        chosen = {k: v[::2] for k, v in PEERS.items()} if args.quick else None
        for row in run_peer_sweep(pipe, captions, ev.seeds, ev.dense, calibration, config.num_inference_steps,
                                  config.guidance_scale, args.batch, args.device, peers=chosen):
            rows.append(dict(row, peer=True, flop_cut=None))

    result = dict(model=args.model, device=torch.cuda.get_device_name() if args.device.startswith("cuda") else "cpu",
                  config=config.to_dict(), calibration_prompts=calibration, evaluation_prompts=len(captions),
                  calibration_seconds=seconds, dense_faithfulness=ev.dense_faith, rows=rows,
                  step_factors=dict(output=stats.sensitivity.output_factor, runs=stats.sensitivity.run_factor)
                  if stats is not None and stats.sensitivity is not None else None,
                  date=time.strftime("%Y-%m-%d"), command=" ".join(["python benchmarks/quality.py", *(argv or sys.argv[1:])]))
    name = "quality" + (f"-{args.tag}" if args.tag else "")
    (out / f"{name}.json").write_text(json.dumps(result, indent=1) + "\n")
    report(result, out / f"{name}.png")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
