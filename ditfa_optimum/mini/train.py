"""Train the miniature MMDiT from scratch on procedural scenes rendered on the fly (rectified flow, as SD3).

    python -m ditfa_optimum.mini.train --out ditfa_optimum/assets/mini-mmdit --minutes 7   # on one H100

``--minutes`` times 30 steps first and picks the step count that fills that time (the count is recorded in
``training.json``; ``--steps N`` repeats a run exactly).

Deterministic for a seed: the initialisation, every training batch (scenes, noise, timesteps, caption dropout) and the
optimiser come from seeded generators; on a GPU the bf16 kernels may still differ in the last bits between runs.
The saved weights are the exponential moving average, stored in fp16 (about 17 MB).
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import time
from pathlib import Path

import torch

from . import DEFAULTS, new_pipeline
from .scenes import sample_batch


def lr_at(step: int, steps: int, lr: float, warmup: int) -> float:
    """Linear warm-up, then cosine decay to a tenth."""
    if step < warmup:
        return lr * (step + 1) / warmup
    progress = (step - warmup) / max(1, steps - warmup)
    return lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


def train(*, steps: int = 4000, batch_size: int = 128, lr: float = 3e-4, warmup: int = 200, seed: int = 0,
          ema_decay: float = 0.999, caption_dropout: float = 0.1, device: str | None = None,
          max_minutes: float | None = None, log_every: int = 100, compile: bool = False, log=print):
    """Train; returns ``(pipeline with the EMA weights, record)``. ``record`` holds the loss curve and timings.

    ``compile`` compiles the transformer with ``torch.compile`` (same weights and state-dict keys; about 1.5x the
    steps per second on an H100, after a compile of under a minute).
    """
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    pipe = new_pipeline(seed)
    models = [pipe.transformer.to(device).train(), pipe.text_encoder.to(device).train()]
    if compile:
        pipe.transformer.compile()
    params = [p for m in models for p in m.parameters()]
    ema = [p.detach().clone() for p in params]
    optimizer = torch.optim.AdamW(params, lr=lr, betas=(0.9, 0.99), weight_decay=0.01)
    scenes = torch.Generator().manual_seed(seed + 1)               # what is drawn
    noise = torch.Generator(device).manual_seed(seed + 2)          # noise, timesteps, dropout
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")

    curve, window, start, done = [], [], time.perf_counter(), steps
    for step in range(steps):
        images, captions = sample_batch(batch_size, scenes, device=device)
        drop = torch.rand(batch_size, generator=noise, device=device) < caption_dropout
        captions = ["" if d else c for c, d in zip(captions, drop.tolist())]
        eps = torch.randn(images.shape, generator=noise, device=device)
        t = torch.sigmoid(torch.randn(batch_size, generator=noise, device=device))  # logit-normal, as SD3
        noisy = (1 - t[:, None, None, None]) * images + t[:, None, None, None] * eps
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step, steps, lr, warmup)
        with autocast:
            embeds, pooled = pipe.text_encoder.encode(captions)
            velocity = pipe.transformer(hidden_states=noisy, timestep=t * 1000, encoder_hidden_states=embeds,
                                        pooled_projections=pooled, return_dict=False)[0]
        loss = torch.nn.functional.mse_loss(velocity.float(), eps - images)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        with torch.no_grad():
            torch._foreach_lerp_(ema, [p.detach() for p in params], 1 - min(ema_decay, (step + 1) / (step + 10)))
        window.append(loss.detach())
        if (step + 1) % log_every == 0 or step + 1 == steps:
            mean = torch.stack(window).mean().item()
            window.clear()
            elapsed = time.perf_counter() - start
            curve.append({"step": step + 1, "loss": mean, "seconds": round(elapsed, 1)})
            log(f"step {step + 1:5d}/{steps}  loss {mean:.4f}  lr {lr_at(step, steps, lr, warmup):.2e}  "
                f"{(step + 1) / elapsed:.1f} steps/s  {elapsed:.0f} s")
            if max_minutes is not None and elapsed > 60 * max_minutes and step + 1 < steps:
                log(f"stopping at step {step + 1}: the {max_minutes} minute cap is reached")
                done = step + 1
                break
    with torch.no_grad():
        for p, e in zip(params, ema):
            p.copy_(e)
    for m in models:
        m.eval()
    record = dict(steps=done, planned_steps=steps, batch_size=batch_size, lr=lr, warmup=warmup, seed=seed,
                  ema_decay=ema_decay, caption_dropout=caption_dropout, compiled=compile, seconds=round(time.perf_counter() - start, 1),
                  device=torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
                  torch=torch.__version__, curve=curve)
    return pipe, record


def steps_for(minutes: float, batch_size: int, device: str | None, compile: bool = False) -> int:
    """How many training steps fit in ``minutes`` on this machine (times steps 10-30 of a throwaway run)."""
    _, record = train(steps=30, batch_size=batch_size, device=device, log_every=10, compile=compile,
                      log=lambda line: None)
    rate = 20 / (record["curve"][-1]["seconds"] - record["curve"][0]["seconds"])
    return max(1, int(rate * minutes * 60))


def save(pipe, record: dict, out: str | Path) -> Path:
    """Write the pipeline with fp16 weights (the form shipped in the package) and ``training.json``."""
    out = Path(out)
    half = copy.deepcopy(pipe).to("cpu", torch.float16)
    half.save_pretrained(out, safe_serialization=True)
    (out / "training.json").write_text(json.dumps(record, indent=1) + "\n")
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, help="directory to write the trained pipeline to")
    parser.add_argument("--steps", type=int, default=4000)
    parser.add_argument("--minutes", type=float, default=None, help="instead of --steps: as many steps as fit")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--lr", type=float, default=3e-4)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default=None)
    parser.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                        help="torch.compile the transformer (default: on CUDA)")
    parser.add_argument("--max-minutes", type=float, default=None, help="stop early once this much time has passed")
    args = parser.parse_args(argv)
    if args.compile is None:
        args.compile = torch.cuda.is_available() and args.device in (None, "cuda")
    if args.minutes is not None:
        args.steps = steps_for(args.minutes, args.batch_size, args.device, args.compile)
        print(f"{args.steps} steps fit in {args.minutes} minutes")
    pipe, record = train(steps=args.steps, batch_size=args.batch_size, lr=args.lr, seed=args.seed,
                         device=args.device, max_minutes=args.max_minutes, compile=args.compile)
    record["defaults"] = DEFAULTS
    print(f"saved {save(pipe, record, args.out)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
