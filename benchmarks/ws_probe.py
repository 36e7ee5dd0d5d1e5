"""Does Triton's automatic warp specialisation pay on this GPU? A dense attention probe (issue 16).

    python benchmarks/ws_probe.py --out DIR        # GPU: every variant's error and time, JSON in DIR
    TRITON_INTERPRET=1 python benchmarks/ws_probe.py --tiny   # CPU: the kernel's arithmetic against PyTorch

Issue 16 asks 8-bit heads to be 1.3x faster than bf16 ones. Our kernel's main loop waits at barriers and does not
overlap the softmax with the matrix products (docs/design-notes.md), so halving the tensor-core time buys little.
FlashAttention-3 overlaps them with warp specialisation; Triton generates it from ``tl.range(...,
warp_specialize=True)``, for Blackwell first and, since mid-2025, for Hopper attention with device-side tensor
descriptors. This probe is a plain dense attention forward (one program per 128-query tile, device-side descriptors,
online softmax in base 2) in four forms: bf16 or INT8 Q.K^T (one scale per tensor: the probe's question is speed),
each with and without warp specialisation, at SD3-medium (D=64) and FLUX.1-dev (D=128) 2K shapes. It reports each
variant's relative error against PyTorch's attention of the same (dequantised) inputs and its median time against
SDPA (cuDNN) in the same run. Not a shipped kernel: the answer decides whether the fused kernel's 8-bit heads can
reach the issue's target with this toolchain.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch
import triton
import triton.language as tl

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"


@triton.jit
def _dense_attention(Q, K, V, O, qk_scale, SEQ: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr,
                     BLOCK_N: tl.constexpr, INT8: tl.constexpr, WS: tl.constexpr):
    """One program per (query tile, batch x head); Q, K, V, O are ``[B * H * SEQ, HEAD_DIM]``; ``qk_scale`` folds
    sm_scale, log2(e) and (INT8) the dequantisation scales."""
    tile, bh = tl.program_id(0), tl.program_id(1)
    rows = bh * SEQ
    dq = tl.make_tensor_descriptor(Q, shape=[SEQ * tl.num_programs(1), HEAD_DIM], strides=[HEAD_DIM, 1],
                                   block_shape=[BLOCK_M, HEAD_DIM])
    dk = tl.make_tensor_descriptor(K, shape=[SEQ * tl.num_programs(1), HEAD_DIM], strides=[HEAD_DIM, 1],
                                   block_shape=[BLOCK_N, HEAD_DIM])
    dv = tl.make_tensor_descriptor(V, shape=[SEQ * tl.num_programs(1), HEAD_DIM], strides=[HEAD_DIM, 1],
                                   block_shape=[BLOCK_N, HEAD_DIM])
    do = tl.make_tensor_descriptor(O, shape=[SEQ * tl.num_programs(1), HEAD_DIM], strides=[HEAD_DIM, 1],
                                   block_shape=[BLOCK_M, HEAD_DIM])
    q = dq.load([rows + tile * BLOCK_M, 0])
    m = tl.full([BLOCK_M], float("-inf"), tl.float32)
    total = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], tl.float32)
    for start in tl.range(0, SEQ, BLOCK_N, warp_specialize=WS):
        k = dk.load([rows + start, 0])
        if INT8:
            s = tl.dot(q, k.T, out_dtype=tl.int32).to(tl.float32) * qk_scale
        else:
            s = tl.dot(q, k.T) * qk_scale
        m_new = tl.maximum(m, tl.max(s, 1))
        p = tl.math.exp2(s - m_new[:, None])
        alpha = tl.math.exp2(m - m_new)
        total = total * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None]
        v = dv.load([rows + start, 0])
        acc = tl.dot(p.to(v.dtype), v, acc)
        m = m_new
    do.store([rows + tile * BLOCK_M, 0], (acc / total[:, None]).to(O.dtype.element_ty))


def _allocate(size: int, alignment: int, stream):
    """Scratch memory for device-side tensor descriptors."""
    return torch.empty(size, dtype=torch.int8, device="cpu" if INTERPRET else "cuda")


def quantize(x: torch.Tensor) -> tuple[torch.Tensor, float]:
    """INT8 with one scale per tensor (the probe times the loop; the shipped scheme's finer scales are elsewhere)."""
    scale = float(x.abs().amax().float()) / 127.0
    return (x.float() / scale).round().clamp(-127, 127).to(torch.int8), scale


def prepare(q, k, v, int8: bool) -> tuple[tuple, float, tuple]:
    """(kernel inputs, qk_scale, the inputs it computes on dequantised) of ``[B, H, S, D]`` q, k, v."""
    scale = q.shape[-1] ** -0.5 * 1.4426950408889634
    if not int8:
        return (q, k, v), scale, (q.float(), k.float(), v.float())
    (q8, qs), (k8, ks) = quantize(q), quantize(k)
    return (q8, k8, v), scale * qs * ks, (q8.float() * qs, k8.float() * ks, v.float())


def launch(q, k, v, out, qk_scale: float, int8: bool, ws: bool, block_m: int, block_n: int, warps: int,
           stages: int) -> None:
    """Dense attention of ``[B, H, S, D]`` q, k, v (S a multiple of both blocks) into ``out`` by the probe kernel."""
    B, H, S, D = q.shape
    _dense_attention[(S // block_m, B * H)](q.reshape(-1, D), k.reshape(-1, D), v.reshape(-1, D), out.reshape(-1, D),
                                            qk_scale, S, D, block_m, block_n, int8, ws, num_warps=warps,
                                            num_stages=stages)


def relative_error(out: torch.Tensor, q, k, v) -> float:
    want = torch.nn.functional.scaled_dot_product_attention(q, k, v)
    return float((out.float() - want).norm() / want.norm())


def ours(case: str, sdpa_ms: float) -> list[dict]:
    """The same run's baseline: our fused kernel, every head full, bf16 and with its 8-bit Q.K^T (inputs quantized
    before), on the real (unpadded) 2K layout of ``case`` (`benchmarks/backends.py`)."""
    here = Path(__file__).resolve().parent
    sys.path[:0] = [p for p in (str(here.parent), str(here)) if p not in sys.path]  # (called once per case)
    from backends import case_inputs, head_methods, widths_for

    from ditfa_optimum.fp8_attention import quantize_qkv
    from ditfa_optimum.kernels.headwise_attention import headwise_attention, launch_table, tune_key

    layout, q, k, v, _ = case_inputs(case, torch.device("cuda"))
    widths = widths_for(head_methods("all full"), layout).to("cuda", torch.int32)
    table, key = launch_table(widths, drop_skipped=True), tune_key(widths)
    rows = []
    for int8 in (False, True):
        quant = quantize_qkv(q, k, v, False) if int8 else None

        def kernel():
            return headwise_attention(q, k, v, widths, layout.num_image_tokens, layout.num_text_tokens,
                                      layout.image_first, 128, table=table, key=key, store_lse=False, quant=quant)

        kernel()  # autotunes
        ms = triton.testing.do_bench(kernel)
        rows.append(dict(case=case, kernel="ours (fused, all full)", S=layout.seq_len, D=q.shape[-1], int8=int8,
                         warp_specialize=False, ms=ms, sdpa_ms=sdpa_ms, vs_sdpa=sdpa_ms / ms))
        print(json.dumps(rows[-1]), flush=True)
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tiny", action="store_true", help="CPU interpreter check of the arithmetic")
    parser.add_argument("--budget", type=float, default=300.0, help="start no variant after this many seconds")
    parser.add_argument("--out", help="directory for ws-probe.json")
    args = parser.parse_args(argv)
    triton.set_allocator(_allocate)
    started = time.perf_counter()
    if args.tiny:
        if not INTERPRET:
            parser.error("--tiny runs in Triton's interpreter: set TRITON_INTERPRET=1")
        cases = [("tiny", 1, 2, 64, 32, torch.float16)]
        configs = [(32, 32, 4, 2)]
        device = "cpu"
    else:
        if not torch.cuda.is_available():
            parser.error("the probe times a GPU; use --tiny on the CPU")
        # SD3-medium 2K: 16384 image + 333 text tokens, padded to a tile multiple; FLUX.1-dev 2K: 16384 + 512
        cases = [("SD3 2K", 1, 24, 16768, 64, torch.bfloat16), ("FLUX 2K", 1, 24, 16896, 128, torch.bfloat16)]
        configs = [(128, 128, 4, 2), (128, 128, 8, 2), (128, 128, 8, 3), (128, 64, 4, 3)]
        device = "cuda"
    rows = []
    for name, B, H, S, D, dtype in cases:
        gen = torch.Generator(device="cpu").manual_seed(0)
        q, k, v = (torch.randn(B, H, S, D, generator=gen).to(device, dtype) for _ in range(3))
        k = k + 0.5 * torch.randn(1, H, 1, D, generator=gen).to(device, dtype)  # a shared key offset, as in models
        sdpa_ms = None
        if device == "cuda":
            sdpa_ms = triton.testing.do_bench(lambda: torch.nn.functional.scaled_dot_product_attention(q, k, v))
            rows.extend(ours(name, sdpa_ms))
        for int8 in (False, True):
            for ws in (False, True):
                for block_m, block_n, warps, stages in configs:
                    if time.perf_counter() - started > args.budget:
                        print("stopped: budget spent", flush=True)
                        break
                    row = dict(case=name, B=B, H=H, S=S, D=D, int8=int8, warp_specialize=ws, block_m=block_m,
                               block_n=block_n, num_warps=warps, num_stages=stages, sdpa_ms=sdpa_ms)
                    try:
                        inputs, qk_scale, seen = prepare(q, k, v, int8)
                        out = torch.empty_like(v)
                        config = (qk_scale, int8, ws, block_m, block_n, warps, stages)
                        launch(*inputs, out, *config)
                        row["relative_error"] = relative_error(out, *seen)
                        if device == "cuda":  # the kernel alone: inputs quantized before
                            row["ms"] = triton.testing.do_bench(lambda: launch(*inputs, out, *config))
                            row["vs_sdpa"] = sdpa_ms / row["ms"]
                    except Exception as error:  # a variant this compiler cannot build or run: reported, not fatal
                        row["error"] = f"{type(error).__name__}: {str(error).splitlines()[0][:300]}"
                    rows.append(row)
                    print(json.dumps(row), flush=True)
    if args.out:
        Path(args.out).mkdir(parents=True, exist_ok=True)
        meta = dict(torch=torch.__version__, triton=triton.__version__,
                    device=torch.cuda.get_device_name() if device == "cuda" else "cpu (interpreter)")
        (Path(args.out) / "ws-probe.json").write_text(json.dumps(dict(meta=meta, rows=rows), indent=2) + "\n")
    print("\n| case | kernel | qk | warp spec. | tile | warps | stages | ms | vs SDPA | rel. error |\n"
          "|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        tile = f"{r['block_m']}x{r['block_n']}" if "block_m" in r else "tuned"
        print(f"| {r['case']} | {r.get('kernel', 'probe')} | {'int8' if r['int8'] else 'bf16'} | {r['warp_specialize']} "
              f"| {tile} | {r.get('num_warps', '')} | {r.get('num_stages', '')} | {r.get('ms', float('nan')):.3f} | "
              f"{r.get('vs_sdpa', float('nan')):.2f} | {r.get('relative_error', r.get('error', ''))} |")
    return 0 if all("error" not in r for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
