"""ONNX export of the miniature model with a plan: time per image in onnxruntime against PyTorch eager, dense and with
the plan, on this machine's CPU (docs/benchmarks.md, "ONNX export").

    python benchmarks/onnx_export.py --out docs/benchmarks             # the default search first (~6 min on 2 cores)
    python benchmarks/onnx_export.py --plan mixed --images 2           # a fixed mixed plan, no search (smoke run)

Rows (batch 1, 20 steps, CFG 4, 64 px; median seconds per image over ``--images`` captions after one warm-up):
PyTorch eager dense; PyTorch eager with the plan ("blocked" backend, what "auto" runs on CPUs); onnxruntime dense
(the stock transformer exported with an all-full plan: one graph per step, all alike); onnxruntime with the plan.
Each onnxruntime image is compared with its PyTorch counterpart (PSNR; 99 = identical).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [p for p in (str(ROOT), str(ROOT / "benchmarks"), str(ROOT / "tests")) if p not in sys.path]

from ditfa_optimum import apply, remove  # noqa: E402
from ditfa_optimum.apply import uniform_plan  # noqa: E402
from ditfa_optimum.export import OnnxPlanTransformer, export_onnx  # noqa: E402
from ditfa_optimum.mini import mini_pipeline  # noqa: E402

STEPS, GUIDANCE = 20, 4.0


def default_plan(pipe):
    from ditfa_optimum import DiTFastAttnOptimizer

    opt = DiTFastAttnOptimizer(pipe, source="mini-mmdit")
    return opt.optimize(opt.default_config(), progress=True)


def time_images(pipe, captions) -> tuple[list[float], torch.Tensor]:
    seconds, images = [], []
    for i, caption in enumerate([captions[0], *captions]):  # the first call warms up
        start = time.perf_counter()
        image = pipe([caption], num_inference_steps=STEPS, guidance_scale=GUIDANCE,
                     generator=torch.Generator().manual_seed(i), output_type="pt").images
        if i:
            seconds.append(time.perf_counter() - start)
            images.append(image)
    return seconds, torch.cat(images)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--plan", choices=["default", "mixed"], default="default",
                        help="default: the default search (as `ditfa-optimum optimize`); mixed: tests/test_export.py's")
    parser.add_argument("--images", type=int, default=4)
    parser.add_argument("--out", help="write onnx-export-cpu.json here")
    args = parser.parse_args(argv)
    from quality import psnr

    pipe = mini_pipeline()
    captions = pipe.default_prompts(40, 1)[-args.images:]
    if args.plan == "default":
        plan = default_plan(pipe)
    else:
        from test_export import mixed_plan

        plan = mixed_plan(pipe)
    dense_plan = uniform_plan(pipe.transformer, num_steps=STEPS, method="full", block_size=plan.block_size)
    rows, images = [], {}
    with tempfile.TemporaryDirectory() as tmp:
        exports = {}
        for name, p in (("dense", dense_plan), ("plan", plan)):
            start = time.perf_counter()
            exports[name] = export_onnx(pipe, p, Path(tmp) / name, prompt=[captions[0]], guidance_scale=GUIDANCE)
            size = sum(f.stat().st_size for f in exports[name].iterdir())
            print(f"exported {name}: {time.perf_counter() - start:.1f} s, {size / 1e6:.1f} MB", flush=True)
        for runner in ("pytorch", "onnxruntime"):
            for name, p in (("dense", None), ("plan", plan)):
                stock = pipe.transformer
                if runner == "onnxruntime":
                    pipe.transformer = OnnxPlanTransformer(exports[name], stock)
                elif p is not None:
                    apply(pipe, p, backend="blocked")
                try:
                    seconds, imgs = time_images(pipe, captions)
                finally:
                    if runner == "pytorch" and p is not None:
                        remove(pipe)
                    pipe.transformer = stock
                images[runner, name] = imgs
                row = dict(runner=runner, attention=name, seconds_per_image=statistics.median(seconds),
                           seconds_all=seconds)
                if runner == "onnxruntime":
                    row["psnr_vs_pytorch"] = float(psnr(images["pytorch", name], imgs).clamp(max=99).mean())
                rows.append(row)
                print(row, flush=True)
    base = {r["runner"]: r["seconds_per_image"] for r in rows if r["attention"] == "dense"}
    print("\n| runner | attention | s / image | vs PyTorch dense | PSNR vs PyTorch |\n|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['runner']} | {r['attention']} | {r['seconds_per_image']:.2f} | "
              f"{base['pytorch'] / r['seconds_per_image']:.2f}x | {r.get('psnr_vs_pytorch', '–')} |")
    info = dict(date=time.strftime("%Y-%m-%d"), device="cpu", threads=torch.get_num_threads(), torch=torch.__version__,
                plan=plan.summary(), whole_cut=plan.report().transformer_cut, rows=rows,
                command="python benchmarks/onnx_export.py " + " ".join(argv or sys.argv[1:]))
    if args.out:
        (Path(args.out) / "onnx-export-cpu.json").write_text(json.dumps(info, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
