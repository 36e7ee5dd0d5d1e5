"""GPU integration check: a plan on SD3- and FLUX-shaped transformers (random weights, bf16) through diffusers.

For each family: a 4-block transformer with the real head layout (24 heads; SD3 D=64 image-first, FLUX D=128
text-first) at 1024^2, a 4-step timestep loop with a mixed plan (full / arrow 1/8 / arrow 1/16 / cache / cfg_share),
run with the `flex` backend and with the `reference` backend; the two must agree to bf16 precision, and an all-full
plan must match the stock model. Prints one line per check; exit code 1 on failure.

    python benchmarks/gpu_smoke.py            (needs diffusers: see ../shared/gpu/prepare-wheels.sh)
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import ditfa_optimum as dfa  # noqa: E402
from ditfa_optimum.cli import demo_plan  # noqa: E402

MIX = ["full", "arrow:1/8", "arrow:1/16", "cache", "cfg_share"]


def build(family):
    from diffusers import FluxTransformer2DModel, SD3Transformer2DModel

    torch.manual_seed(0)
    with torch.device("cuda"):
        if family == "sd3":
            model = SD3Transformer2DModel(sample_size=128, patch_size=2, in_channels=16, num_layers=4,
                                          attention_head_dim=64, num_attention_heads=24, joint_attention_dim=4096,
                                          caption_projection_dim=1536, pooled_projection_dim=2048, out_channels=16)
        else:
            model = FluxTransformer2DModel(patch_size=1, in_channels=64, num_layers=2, num_single_layers=2,
                                           attention_head_dim=128, num_attention_heads=24, joint_attention_dim=4096,
                                           pooled_projection_dim=768, guidance_embeds=False)
    with torch.no_grad():  # every weight random and non-zero, so every path shows in the output
        for p in model.parameters():
            p.normal_(0, 0.02)
    return model.to(torch.bfloat16).eval()


def inputs(model, family, t):
    g = torch.Generator("cuda").manual_seed(1)
    bf = dict(device="cuda", dtype=torch.bfloat16, generator=g)
    if family == "sd3":
        return dict(hidden_states=torch.randn(2, 16, 128, 128, **bf), encoder_hidden_states=torch.randn(2, 333, 4096, **bf),
                    pooled_projections=torch.randn(2, 2048, **bf), timestep=torch.full((2,), t, device="cuda"))
    ids = torch.zeros(64, 64, 3, device="cuda")
    ids[..., 1], ids[..., 2] = torch.arange(64, device="cuda")[:, None], torch.arange(64, device="cuda")[None, :]
    return dict(hidden_states=torch.randn(1, 4096, 64, **bf), encoder_hidden_states=torch.randn(1, 512, 4096, **bf),
                pooled_projections=torch.randn(1, 768, **bf), timestep=torch.full((1,), t / 1000, device="cuda"),
                img_ids=ids.reshape(-1, 3), txt_ids=torch.zeros(512, 3, device="cuda"))


def loop(model, family):
    outs = []
    with torch.no_grad():
        for t in (1000.0, 750.0, 500.0, 250.0):
            outs.append(model(**inputs(model, family, t)).sample.float())
    return torch.stack(outs)


def rel(a, b):
    return float((a - b).norm() / b.norm())


def main():
    ok = True
    for family in ("sd3", "flux"):
        model = build(family)
        stock = loop(model, family)
        dfa.apply(model, dfa.uniform_plan(model, 4), backend="flex")
        full_err = rel(loop(model, family), stock)
        dfa.remove(model)
        plan = demo_plan(model, 4, MIX, block_size=128)
        results = {}
        for backend in ("reference", "flex"):
            dfa.apply(model, plan, backend=backend, cfg=family == "sd3")
            results[backend] = loop(model, family)
            dfa.remove(model)
        flex_vs_ref = rel(results["flex"], results["reference"])
        plan_vs_dense = rel(results["reference"], stock)
        good = full_err < 1e-2 and flex_vs_ref < 2e-2 and torch.isfinite(results["flex"]).all()
        ok &= bool(good)
        print(f"{family}: all-full vs stock {full_err:.2e}; mixed plan flex vs reference {flex_vs_ref:.2e} "
              f"(plan vs dense {plan_vs_dense:.2e}, FLOP cut {plan.flops(4096, 333 if family == 'sd3' else 512, cfg=family == 'sd3').cut:.1%}) "
              f"{'ok' if good else 'FAIL'}", flush=True)
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
