"""Relative error of FP8 (e4m3) attention (`ditfa_optimum.fp8_attention`) against float64 attention, for the
quantization variants the fused kernel could implement, beside bfloat16 attention (what the model runs today).

Inputs:

* ``random``: q, k, v ~ N(0, 1), B=2, H=4, 2048 tokens, D=64 and 128 (near-uniform softmax over many keys: the
  output is small and the relative error pessimistic); ``random, key offset``: the same with the keys of one
  channel shifted by +8, what K smoothing is for.
* ``captured``: q, k, v of every attention call of the trained miniature model ``--model`` (default
  benchmarks/assets/mini-mmdit-128: 4096 image tokens, 6 layers, 6 heads of 32) at three denoising steps of one
  generation (CFG batch 2) in its first, middle and last layer (``--layers``), captured with a pass-through
  attention backend.

Variants: scales per (sample, head) or per block of 64 / 128 tokens, with or without K smoothing, each also under
an arrow mask (1/8 of the image key blocks). Errors are per input tensor (all samples and heads of a call), median
and worst over the calls.

    python benchmarks/fp8_attention_error.py [--out PATH] [--device cpu|cuda] [--steps 3]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from datetime import date
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [p for p in (str(ROOT),) if p not in sys.path]

from ditfa_optimum.fp8_attention import fp8_attention, reference_attention, relative_error  # noqa: E402
from ditfa_optimum.masks import TokenLayout, arrow_mask, window_blocks  # noqa: E402

VARIANTS = {  # name: fp8_attention keywords
    "per head": dict(granularity="head", smooth_k=False),
    "per head, K smoothed": dict(granularity="head", smooth_k=True),
    "per 128 tokens, K smoothed": dict(granularity="block", block=128, smooth_k=True),
    "per 64 tokens, K smoothed": dict(granularity="block", block=64, smooth_k=True),
    "per head, K and V smoothed": dict(granularity="head", smooth_k=True, smooth_v=True),
    "Q.K^T only (P.V bfloat16), K smoothed": dict(granularity="head", smooth_k=True, fp8_pv=False),
    "INT8 Q.K^T per 64 tokens, K smoothed": dict(granularity="block", block=64, smooth_k=True, qk_format="int8"),
    "INT8 Q.K^T per token, K smoothed": dict(granularity="block", block=1, smooth_k=True, qk_format="int8"),
    "INT8 Q.K^T per 64 tokens, P.V bfloat16, K smoothed": dict(granularity="block", block=64, smooth_k=True,
                                                               qk_format="int8", fp8_pv=False),
}
ARROW_FRACTION = 1 / 8


def random_inputs(device, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    for D in (64, 128):
        q, k, v = (torch.randn(2, 4, 2048, D, generator=g).to(device) for _ in range(3))
        yield f"random D={D}", (q, k, v), TokenLayout(2048, 0, 128, True)
        k = k.clone()
        k[..., 0] += 8.0
        yield f"random D={D}, key offset", (q, k, v), TokenLayout(2048, 0, 128, True)


def captured_inputs(model: str, device, steps: int, layers: list[int] | None):
    """(name, (q, k, v), layout) of every attention call at ``steps`` denoising steps of one generation."""
    import ditfa_optimum as dfa
    from ditfa_optimum.mini import mini_pipeline
    from ditfa_optimum.runtime.backends import get_backend, register_backend

    captured = []

    @register_backend
    class Capture:  # noqa: F841  (registered by the decorator)
        name = "fp8-error-capture"
        differentiable = False

        def available(self, device):
            return True

        def attend(self, q, k, v, layout, widths):
            captured.append(((q.clone(), k.clone(), v.clone()), layout))
            return get_backend("reference", q.device).attend(q, k, v, layout, widths)

    pipe = mini_pipeline(None if model == "mini-mmdit" else model, device=device)
    total = pipe.transformer.config.num_layers
    num_steps = 20
    plan = dfa.uniform_plan(pipe, num_steps=num_steps, method="full")
    dfa.apply(pipe, plan, backend="fp8-error-capture")
    wanted = sorted({round(i * (num_steps - 1) / max(steps - 1, 1)) for i in range(steps)})
    keep_steps: dict[int, list] = {}

    def on_step_end(pipeline, step, timestep, kwargs):
        if step in wanted:
            keep_steps[step] = captured[-total:]  # one call per layer
        captured.clear()
        return kwargs

    with torch.no_grad():
        pipe("a red circle above a blue square", num_inference_steps=num_steps, generator=torch.Generator().manual_seed(0),
             output_type="latent", callback_on_step_end=on_step_end)
    dfa.remove(pipe)
    for step in wanted:
        chosen = layers if layers is not None else sorted({0, total // 2, total - 1})
        for layer, (qkv, layout) in enumerate(keep_steps[step]):
            if layer in chosen:
                yield f"captured step {step} layer {layer}", qkv, layout


def measure(name, qkv, layout, device) -> dict:
    q, k, v = qkv
    row = dict(input=name, shape=list(q.shape), image_tokens=layout.num_image_tokens, text_tokens=layout.num_text_tokens)
    ref = reference_attention(q, k, v)
    bf16 = torch.nn.functional.scaled_dot_product_attention(q.bfloat16(), k.bfloat16(), v.bfloat16())
    row["bfloat16"] = relative_error(bf16, ref)
    keep = arrow_mask(layout, window_blocks(ARROW_FRACTION, layout.num_image_blocks), device)
    ref_arrow = reference_attention(q, k, v, keep)
    for variant, kw in VARIANTS.items():
        row[variant] = relative_error(fp8_attention(q, k, v, **kw), ref)
        row[f"{variant}, arrow 1/8"] = relative_error(fp8_attention(q, k, v, keep, **kw), ref_arrow)
    return row


def summary(rows: list[dict]) -> str:
    groups: dict[str, list[dict]] = {}
    for r in rows:
        key = r["input"].split(" step ")[0] if r["input"].startswith("captured") else r["input"]
        groups.setdefault(key, []).append(r)
    columns = ["bfloat16"] + [c for v in VARIANTS for c in (v, f"{v}, arrow 1/8")]
    lines = ["| inputs | calls | " + " | ".join(columns) + " |", "|---|---|" + "---|" * len(columns)]
    for key, rs in groups.items():
        cells = []
        for c in columns:
            values = [r[c] for r in rs]
            cells.append(f"{statistics.median(values):.2e}" + (f" (max {max(values):.2e})" if len(values) > 1 else ""))
        lines.append(f"| {key} | {len(rs)} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=str(ROOT / "benchmarks" / "assets" / "mini-mmdit-128"),
                        help="a miniature model directory, or mini-mmdit (the embedded one: 256 image tokens)")
    parser.add_argument("--steps", type=int, default=3, help="denoising steps captured (spread over the generation)")
    parser.add_argument("--layers", type=int, nargs="+", help="layers captured (default first, middle, last)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--no-random", action="store_true")
    parser.add_argument("--out", help="JSON path (default docs/benchmarks/fp8-attention-error-<date>-<device>.json)")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    card = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    slug = card.lower().replace("nvidia ", "").replace(" ", "-")
    out = Path(args.out or ROOT / "docs" / "benchmarks" / f"fp8-attention-error-{date.today()}-{slug}.json")
    payload = dict(meta=dict(date=str(date.today()), device=card, torch=torch.__version__, command=" ".join(
        ["python benchmarks/fp8_attention_error.py", *(sys.argv[1:] if argv is None else argv)])), rows=[])
    started = time.perf_counter()
    sources = [] if args.no_random else [random_inputs(device)]
    sources.append(captured_inputs(args.model, device, args.steps, args.layers))
    for source in sources:
        for name, qkv, layout in source:
            payload["rows"].append(measure(name, qkv, layout, device))
            print(f"[{time.perf_counter() - started:6.1f} s] {name}", flush=True)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(payload, indent=2) + "\n")
    print(f"\n{card}, torch {torch.__version__}, {date.today()}: `{payload['meta']['command']}` -> {out}")
    print(summary(payload["rows"]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
