"""A plan run at another step count than it was searched for (`CompressionPlan.remap_steps`) against a plan searched
for that count at the same target, on the trained miniature model: PSNR against the dense images of that count.

    python benchmarks/remap_quality.py --out docs/benchmarks          # mini-mmdit, a few minutes on one H200
    python benchmarks/remap_quality.py --out /tmp/r --prompts 2 --steps 6 --searched 8   # CPU smoke run

Writes ``remap-quality.json`` and prints a markdown table.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from mini_model import generate, held_out_captions  # noqa: E402
from quality import psnr  # noqa: E402

from ditfa_optimum import DiTFastAttnConfig, apply, remove  # noqa: E402
from ditfa_optimum.calibrate import calibrate  # noqa: E402
from ditfa_optimum.embedded import defaults_for  # noqa: E402
from ditfa_optimum.mini import mini_pipeline  # noqa: E402
from ditfa_optimum.search import search  # noqa: E402


def cuts(plan, stats) -> tuple[float, float | None]:
    """(attention-FLOP cut, whole-transformer FLOP cut or None without blocks) at the calibration's token counts."""
    attention = plan.flops(stats.image_tokens, stats.text_tokens, cfg=stats.cfg).cut
    whole = plan.transformer_flops(stats.image_tokens, stats.text_tokens, cfg=stats.cfg).cut if plan.blocks else None
    return attention, whole


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, help="directory for remap-quality.json")
    parser.add_argument("--model", default="mini-mmdit")
    parser.add_argument("--searched", type=int, default=None, help="step count of the remapped plan (default: the "
                                                                    "model's, 20)")
    parser.add_argument("--steps", default="10,15,28,40", help="comma-separated step counts to run it at")
    parser.add_argument("--target-cut", type=float, default=None, help="default: the product's default target")
    parser.add_argument("--prompts", type=int, default=32, help="held-out evaluation captions")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--backend", default="blocked")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args(argv)
    d = defaults_for(args.model)
    base = DiTFastAttnConfig(num_inference_steps=args.searched or d["steps"], height=d["size"], width=d["size"],
                             guidance_scale=d["guidance"], block_size=d["block_size"], backend=args.backend,
                             target_cut=args.target_cut)
    pipe = mini_pipeline(None if args.model == "mini-mmdit" else args.model, device=args.device)
    pipe.set_progress_bar_config(disable=True)
    calibration = pipe.default_prompts(base.num_prompts, base.seed)
    captions = held_out_captions(args.prompts, calibration)
    seeds = [10_000 + i for i in range(len(captions))]

    def images(steps, plan=None):
        if plan is not None:
            apply(pipe, plan, backend=args.backend)
        try:
            return generate(pipe, captions, seeds, steps, base.guidance_scale, args.batch)
        finally:
            if plan is not None:
                remove(pipe)

    def searched_plan(steps):
        cfg = base.replace(num_inference_steps=steps)
        stats = calibrate(pipe, cfg, calibration, progress=False)
        return search(stats, cfg), stats

    start = time.perf_counter()

    def write(rows, done):  # after every row: a run cut short keeps what it measured
        result = dict(model=args.model, searched_steps=base.num_inference_steps, config=base.to_dict(), rows=rows,
                      prompts=len(captions), seconds=time.perf_counter() - start, complete=done,
                      device=torch.cuda.get_device_name() if args.device.startswith("cuda") else "cpu",
                      date=time.strftime("%Y-%m-%d"),
                      command=" ".join(["python benchmarks/remap_quality.py", *(argv or sys.argv[1:])]))
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "remap-quality.json").write_text(json.dumps(result, indent=1) + "\n")

    plan, stats = searched_plan(base.num_inference_steps)
    rows = []
    for steps in sorted({base.num_inference_steps, *(int(s) for s in args.steps.split(","))}):
        dense = images(steps)
        row = dict(steps=steps)
        searched, searched_stats = (plan, stats) if steps == base.num_inference_steps else searched_plan(steps)
        for kind, candidate, its_stats in (("remapped", plan.remap_steps(steps), stats),
                                           ("searched", searched, searched_stats)):
            attention, whole = cuts(candidate, its_stats)
            row[kind] = dict(psnr_db=psnr(dense, images(steps, candidate)).mean().item(), attention_cut=attention,
                             whole_cut=whole, skipped_steps=list(candidate.skipped_steps))
        rows.append(row)
        print(row, flush=True)
        write(rows, done=False)
    write(rows, done=True)
    print(f"\n| steps | remapped from {base.num_inference_steps}: PSNR dB, whole cut | searched for it: PSNR dB, "
          "whole cut |\n|---|---|---|")
    for row in rows:
        r, s = row["remapped"], row["searched"]
        fmt = (lambda x: "n/a" if x is None else f"{x:.0%}")
        print(f"| {row['steps']} | {r['psnr_db']:.2f}, {fmt(r['whole_cut'])} | {s['psnr_db']:.2f}, "
              f"{fmt(s['whole_cut'])} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
