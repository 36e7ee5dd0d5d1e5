"""Train the miniature MMDiT on procedural scenes (rectified flow, as SD3), from scratch or fine-tuning a saved model.

The scenes are rendered on the fly; fine-tuning can change the image size (the 128 px, 4096-token model). From the
repository root (the script is not in the wheel; ``python training/train_mini.py ...`` works as well):

    python -m training.train_mini --out ditfa_optimum/assets/mini-mmdit --minutes 7   # on one H100
    python -m training.train_mini --init ditfa_optimum/assets/mini-mmdit --size 128 \
        --out benchmarks/assets/mini-mmdit-128 --minutes 6.5 --max-minutes 8 --batch-size 64 --compile  # one H200

``--minutes`` times steps 11-30 of the run itself (inside the learning-rate warm-up, which does not depend on the
step count) and then fixes the step count that fills that much training time (compilation not counted); the count is
recorded in ``training.json`` and ``--steps N`` repeats the run exactly.

``--init DIR --size PX`` fine-tunes: every weight of DIR's transformer and text encoder is loaded, and when PX is not
DIR's size the transformer gets a new fixed sin-cos position table for PX (`ditfa_optimum.mini.with_image_size`);
the scenes are rendered at PX. The saved model generates PX x PX images by default.

Deterministic for a seed: the initialisation, every training batch (scenes, noise, timesteps, caption dropout) and the
optimiser come from seeded generators; on a GPU the bf16 kernels may still differ in the last bits between runs.
The saved weights are the exponential moving average, stored in fp16 (about 17 MB; 19 MB at 128 px, whose position
table is 4x larger).
"""

from __future__ import annotations

import argparse
import copy
import hashlib
import json
import math
import shlex
import sys
import time
from pathlib import Path

import torch

if __package__ in (None, ""):  # run as a script (python training/train_mini.py): the repository root holds `training`
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ditfa_optimum.mini import image_defaults, mini_pipeline, new_pipeline, with_image_size  # noqa: E402
from training.scenes import sample_batch  # noqa: E402

#: ``--minutes`` times the steps after the first PROBE[0] up to PROBE[1] (inside the warm-up)
PROBE = (10, 30)


def lr_at(step: int, steps: int, lr: float, warmup: int) -> float:
    """Linear warm-up, then cosine decay to a tenth."""
    if step < warmup:
        return lr * (step + 1) / warmup
    progress = (step - warmup) / max(1, steps - warmup)
    return lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


def pipeline_defaults(size: int) -> dict:
    """Generation and calibration defaults of a model trained at ``size`` px (the form of ``mini.DEFAULTS``)."""
    d = image_defaults(size)
    return dict(height=d["size"], width=d["size"], num_inference_steps=d["steps"], guidance_scale=d["guidance"],
                block_size=d["block_size"])


def start_pipeline(seed: int = 0, init: str | Path | None = None, size: int | None = None):
    """What training starts from: random weights (``init=None``, 64 px unless ``size``) or the saved model ``init``,
    in float32; at ``size`` px, its transformer rebuilt by `with_image_size` when that is not its size."""
    torch.manual_seed(seed)
    pipe = new_pipeline(seed) if init is None else mini_pipeline(init)
    return with_image_size(pipe, size) if size is not None else pipe


def _sha256(path: Path) -> str | None:
    return hashlib.sha256(path.read_bytes()).hexdigest() if path.is_file() else None


def train(*, steps: int = 4000, batch_size: int = 128, lr: float = 3e-4, warmup: int = 200, seed: int = 0,
          ema_decay: float = 0.999, caption_dropout: float = 0.1, device: str | None = None,
          max_minutes: float | None = None, log_every: int = 100, compile: bool = False, log=print,
          init: str | Path | None = None, size: int | None = None, minutes: float | None = None):
    """Train; returns ``(pipeline with the EMA weights, record)``. ``record`` holds the settings, the loss curve and
    timings.

    ``compile`` compiles the transformer with ``torch.compile`` (same weights and state-dict keys; about 1.5x the
    steps per second on an H100, after a compile of under a minute). ``init`` and ``size``: see `start_pipeline`
    (``init`` fine-tunes a saved model; the scenes are rendered at the transformer's size). ``minutes`` replaces
    ``steps``: the rate of steps 11-30 (all in the warm-up, whose learning rates do not depend on the step count, so
    ``warmup >= 30``) fixes the step count that fills that many minutes of training.
    """
    if minutes is not None and warmup < PROBE[1]:
        raise ValueError(f"minutes sizes the run during the warm-up: it needs warmup >= {PROBE[1]}, got {warmup}")
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    pipe = start_pipeline(seed, init, size)
    size = pipe.transformer.config.sample_size
    models = [pipe.transformer.to(device).train(), pipe.text_encoder.to(device).train()]
    if compile:
        pipe.transformer.compile()
    params = [p for m in models for p in m.parameters()]
    ema = [p.detach().clone() for p in params]
    optimizer = torch.optim.AdamW(params, lr=lr, betas=(0.9, 0.99), weight_decay=0.01)
    scenes = torch.Generator().manual_seed(seed + 1)               # what is drawn
    noise = torch.Generator(device).manual_seed(seed + 2)          # noise, timesteps, dropout
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")

    if minutes is not None:
        steps = None  # fixed after step PROBE[1]
    curve, window, marks, rate, start, step = [], [], {}, None, time.perf_counter(), 0
    while steps is None or step < steps:
        images, captions = sample_batch(batch_size, scenes, device=device, size=size)
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
        if minutes is not None and step + 1 in PROBE:
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            marks[step + 1] = time.perf_counter()
            if step + 1 == PROBE[1]:
                rate = (PROBE[1] - PROBE[0]) / (marks[PROBE[1]] - marks[PROBE[0]])
                steps = max(PROBE[1], int(rate * minutes * 60))
                log(f"{steps} steps fit in {minutes} minutes ({rate:.2f} steps/s over steps "
                    f"{PROBE[0] + 1}-{PROBE[1]})")
        if (step + 1) % log_every == 0 or step + 1 == steps:
            mean = torch.stack(window).mean().item()
            window.clear()
            elapsed = time.perf_counter() - start
            curve.append({"step": step + 1, "loss": mean, "seconds": round(elapsed, 1)})
            log(f"step {step + 1:5d}/{steps or '?'}  loss {mean:.4f}  lr {lr_at(step, steps, lr, warmup):.2e}  "
                f"{(step + 1) / elapsed:.1f} steps/s  {elapsed:.0f} s")
            if max_minutes is not None and elapsed > 60 * max_minutes and (steps is None or step + 1 < steps):
                log(f"stopping at step {step + 1}: the {max_minutes} minute cap is reached")
                step += 1
                break
        step += 1
    done = step
    with torch.no_grad():
        for p, e in zip(params, ema):
            p.copy_(e)
    for m in models:
        m.eval()
    import diffusers

    config = pipe.transformer.config
    record = dict(steps=done, planned_steps=steps, batch_size=batch_size, lr=lr, warmup=warmup, seed=seed,
                  ema_decay=ema_decay, caption_dropout=caption_dropout, compiled=compile,
                  seconds=round(time.perf_counter() - start, 1),
                  device=torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
                  torch=torch.__version__, diffusers=diffusers.__version__,
                  init=None if init is None else str(init),
                  init_transformer_sha256=None if init is None else _sha256(
                      Path(init) / "transformer" / "diffusion_pytorch_model.safetensors"),
                  size=size, image_tokens=(size // config.patch_size) ** 2,
                  pos_embed_max_size=config.pos_embed_max_size, minutes=minutes,
                  probe_steps_per_second=None if rate is None else round(rate, 3), max_minutes=max_minutes,
                  defaults=pipeline_defaults(size), curve=curve)
    return pipe, record


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
    parser.add_argument("--init", default=None, metavar="DIR",
                        help="fine-tune: start from this saved miniature model (e.g. ditfa_optimum/assets/mini-mmdit) "
                             "instead of random weights")
    parser.add_argument("--size", type=int, default=None, metavar="PX",
                        help="image size to train at (default: the --init model's, else 64); a new size gets a new "
                             "fixed sin-cos position table (sample_size PX, pos_embed_max_size PX/2), every other "
                             "weight comes from --init")
    parser.add_argument("--steps", type=int, default=4000)
    parser.add_argument("--minutes", type=float, default=None,
                        help="instead of --steps: as many steps as fit in this much training time (timed on steps "
                             "11-30 of the run; compilation not counted)")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--lr", type=float, default=3e-4)
    parser.add_argument("--warmup", type=int, default=200, help="linear learning-rate warm-up steps")
    parser.add_argument("--ema-decay", type=float, default=0.999)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default=None)
    parser.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                        help="torch.compile the transformer (default: on CUDA)")
    parser.add_argument("--max-minutes", type=float, default=None, help="stop early once this much time has passed")
    args = parser.parse_args(argv)
    if args.compile is None:
        args.compile = torch.cuda.is_available() and args.device in (None, "cuda")
    pipe, record = train(steps=args.steps, batch_size=args.batch_size, lr=args.lr, warmup=args.warmup,
                         seed=args.seed, ema_decay=args.ema_decay, device=args.device, max_minutes=args.max_minutes,
                         compile=args.compile, init=args.init, size=args.size, minutes=args.minutes)
    record["command"] = shlex.join(["python", "-m", "training.train_mini",
                                    *(sys.argv[1:] if argv is None else argv)])
    print(f"saved {save(pipe, record, args.out)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
