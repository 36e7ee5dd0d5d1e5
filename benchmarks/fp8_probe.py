"""Which 8-bit kernel variants compile and run on this GPU: each (mode, TMA on/off, head dim, tile) in a process of
its own (an illegal instruction ends a process's CUDA context), checked against the PyTorch scheme.

    python benchmarks/fp8_probe.py     # one line per variant
"""

from __future__ import annotations

import itertools
import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

CHILD = r"""
import sys, torch, triton
sys.path.insert(0, {root!r})
from ditfa_optimum.fp8_attention import quantize_qkv, quantized_attention
from ditfa_optimum.kernels.headwise_attention import headwise_attention, launch_table
from ditfa_optimum.masks import TokenLayout, arrow_mask
fp8_pv, D, tile = {fp8_pv}, {D}, {tile}
layout = TokenLayout({n_img}, {n_txt}, image_first={image_first}, block_size=128)
torch.manual_seed(0)
q, k, v = (torch.randn(1, 4, layout.seq_len, D, device="cuda", dtype=torch.bfloat16) for _ in range(3))
widths = torch.tensor([[layout.num_image_blocks, 2, 1, 4]], dtype=torch.int32, device="cuda")
qq = quantize_qkv(q, k, v, fp8_pv)
cfg = triton.Config(dict(BLOCK_M=tile[0], BLOCK_N=tile[1]), num_warps=tile[2], num_stages=tile[3])
out, _ = headwise_attention(q, k, v, widths, layout.num_image_tokens, layout.num_text_tokens, layout.image_first,
                            128, quant=qq, config=cfg, table=launch_table(widths, drop_skipped=True))
torch.cuda.synchronize()
worst = 0.0
for h in range(4):
    keep = arrow_mask(layout, int(widths[0, h]), device="cuda")
    part = type(qq)(*(None if t is None else t[:, h:h + 1] for t in (qq.q8, qq.k8, qq.row_scale, qq.v, qq.v_scale)))
    emu = quantized_attention(part, keep)[0, 0]
    worst = max(worst, float((out[0, h].float() - emu).norm() / emu.norm()))
print(f"{{worst:.2e}}")
"""


def probe(fp8_pv, tma, D, tile, n_img, n_txt, image_first):
    code = CHILD.format(root=str(ROOT), fp8_pv=fp8_pv, D=D, tile=tile, n_img=n_img, n_txt=n_txt,
                        image_first=image_first)
    env = dict(os.environ, DITFA_TRITON_TMA="1" if tma else "0")
    try:
        done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=240)
    except subprocess.TimeoutExpired:
        return "timeout"
    if done.returncode:
        lines = [ln for ln in done.stderr.strip().splitlines() if ln.strip()]
        return "FAIL " + (lines[-1][:160] if lines else f"rc {done.returncode}")
    return "ok, vs scheme " + done.stdout.strip()


def main():
    tiles = {64: [(128, 64, 4, 3), (128, 128, 8, 2), (64, 64, 4, 3)], 128: [(128, 128, 8, 3), (128, 64, 4, 3)]}
    cases = [(fp8_pv, tma, D, tile, n_img, n_txt, first)
             for fp8_pv, tma, D in itertools.product((False, True), (True, False), (64, 128))
             for tile in tiles[D] for n_img, n_txt, first in ((2000, 77, True), (2048, 256, False))]
    with ThreadPoolExecutor(8) as pool:
        for case, result in zip(cases, pool.map(lambda c: probe(*c), cases)):
            fp8_pv, tma, D, tile, n_img, n_txt, first = case
            print(f"{'qk+pv' if fp8_pv else 'qk   '} tma={int(tma)} D={D} tile={tile} {n_img}+{n_txt} "
                  f"{'image-first' if first else 'text-first'}: {result}", flush=True)


if __name__ == "__main__":
    main()
