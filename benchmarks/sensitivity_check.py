"""How well the trajectory search's error model predicts the final image: inject one method at one (module, step),
run the rest of the generation, and compare the measured change of the final latents with the prediction
``sum_h gain * squared error`` (`ditfa_optimum.sensitivity`).

    python benchmarks/sensitivity_check.py --out docs/benchmarks          # ~1 min on one H200

Prints, per injection, measured / predicted; a ratio near 1 means the gain model holds there.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from ditfa_optimum import DiTFastAttnConfig, apply, remove  # noqa: E402
from ditfa_optimum.calibrate import calibrate, run_pipeline  # noqa: E402
from ditfa_optimum.embedded import defaults_for  # noqa: E402
from ditfa_optimum.mini import mini_pipeline  # noqa: E402
from ditfa_optimum.plan import CompressionPlan  # noqa: E402


def single_entry_plan(stats, entries: dict, block_size: int) -> CompressionPlan:
    """A plan that runs ``entries[(module, step)] = method`` on every head there, full everywhere else."""
    T = stats.num_steps
    table = {s.name: [[entries.get((s.name, t), "full")] * s.num_heads for t in range(T)] for s in stats.modules}
    return CompressionPlan.from_methods(stats.modules, table, block_size=block_size, model_class=stats.model_class)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True)
    parser.add_argument("--model", default="mini-mmdit")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args(argv)
    d = defaults_for(args.model)
    config = DiTFastAttnConfig(num_inference_steps=d["steps"], height=d["size"], width=d["size"],
                               guidance_scale=d["guidance"], block_size=d["block_size"], backend="blocked",
                               calibration_passes=1, num_prompts=2, batch_size=2)
    pipe = mini_pipeline(None if args.model == "mini-mmdit" else args.model, device=args.device)
    prompts = pipe.default_prompts(8, 0)[:2]
    stats = calibrate(pipe, config, prompts, progress=False)  # sensitivity + errors along the dense trajectory
    sens = stats.sensitivity

    def final(plan=None):
        if plan is not None:
            apply(pipe, plan, backend="blocked")
        try:
            with torch.no_grad():
                return run_pipeline(pipe, prompts, config).float()
        finally:
            if plan is not None:
                remove(pipe)

    dense = final()
    names = [s.name for s in stats.modules]
    rows = []
    T = config.num_inference_steps

    def measure(entries: dict, label: str):
        plan = single_entry_plan(stats, entries, config.block_size)
        change = ((final(plan) - dense) ** 2).flatten(1).sum(1).mean().item()
        predicted = 0.0
        for (m, t), method in entries.items():
            c = method_key(stats, method)
            predicted += float((sens.damage_gain(m, t) * stats.err_guided[m][t, :, c]).sum() / stats.num_prompts)
        rows.append(dict(label=label, measured=change, predicted=predicted,
                         ratio=change / predicted if predicted > 0 else None))
        print(f"{label:50s} measured {change:10.4g}  predicted {predicted:10.4g}  ratio "
              f"{rows[-1]['ratio'] if rows[-1]['ratio'] is None else round(rows[-1]['ratio'], 3)}", flush=True)

    for method in ("cache", "arrow:1/32", "arrow:1/8", "cfg_share"):
        for m in (names[0], names[len(names) // 2], names[-1]):
            for t in (1, 3, 6, 10, 15, T - 1):
                measure({(m, t): method}, f"{method} {m} step {t}")
    for method in ("cache", "arrow:1/32"):
        for t0 in (2, 10):  # coherence: one module, five steps in a row; and every module at one step
            measure({(names[2], t): method for t in range(t0, t0 + 5)}, f"{method} {names[2]} steps {t0}-{t0 + 4}")
            measure({(m, t0): method for m in names}, f"{method} all modules step {t0}")
    from ditfa_optimum.search import search

    plan = search(stats, config.replace(target_cut=0.6))
    per_step = plan.flops(stats.image_tokens, stats.text_tokens, cfg=stats.cfg).cut_per_step().tolist()
    print("trajectory plan at a 60% cut, cut per step:", [round(c, 2) for c in per_step])
    print("methods:", plan.method_counts())
    gains = {n: sens.gain[n].mean(1).tolist() for n in names}
    print("mean gain per step (module 0):", [round(g, 4) for g in gains[names[0]]])
    print("step factors:", [round(f, 3) for f in sens.step_factor])
    Path(args.out).mkdir(parents=True, exist_ok=True)
    (Path(args.out) / "sensitivity-check.json").write_text(json.dumps(
        dict(model=args.model, date=time.strftime("%Y-%m-%d"), rows=rows, gains=gains, step_factor=sens.step_factor,
             plan_cut_per_step=per_step, device=torch.cuda.get_device_name() if args.device.startswith("cuda") else "cpu"), indent=1) + "\n")
    return 0


def method_key(stats, method: str) -> int:
    from ditfa_optimum.methods import make_method

    return stats.candidates.index(str(make_method(method)))


if __name__ == "__main__":
    raise SystemExit(main())
