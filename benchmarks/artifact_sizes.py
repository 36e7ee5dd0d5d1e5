"""Artifact sizes: what each way of storing the weights costs on disk (docs/benchmarks.md, "Artifact sizes").

    python benchmarks/artifact_sizes.py [--out docs/benchmarks]       # CPU, about a minute

* **mini-mmdit** (the embedded trained model): three real artifacts of one plan, written by `write_artifact` with a
  reproducibility record of two generations: weights ``base`` (the default: the embedded model's file is referred
  to), ``base+delta`` (one attention projection changed, as a fused LoRA on one layer would) and ``included``
  (``self_contained=True``); each read back and its transformer compared with ``torch.equal``.
* **SD3-medium, FLUX.1-dev architectures** (benchmarks/configs/, built on the meta device: no memory, no weights): the
  plan-only artifact's files are written by the same writer (`serialization._write_contents` with weights ``base``,
  which never reads a tensor; 28 steps, every head an arrow head: the plan's size does not depend on its methods),
  without a reproducibility record (two 1024² records add ~0.2 MB); the self-contained size adds the transformer's
  safetensors file, computed from the tensor shapes in bfloat16 (its 8-byte header length and JSON header aside);
  the FP8-linears size adds one byte per weight and a float32 scale per output row of `fp8_linears.eligible`.
* **FP8 linears** on mini-mmdit: measured (bfloat16, converted on the CPU, ``transformer_fp8.safetensors`` read back
  bit for bit).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from ditfa_optimum import fp8_linears  # noqa: E402
from ditfa_optimum.apply import uniform_plan  # noqa: E402
from ditfa_optimum.serialization import (  # noqa: E402
    LINEARS_FILE,
    StoredWeights,
    _write_contents,
    read_artifact,
    write_artifact,
)

MB = 1e6


def size(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def mini_rows(tmp: Path) -> list[dict]:
    from safetensors.torch import load_file

    from ditfa_optimum import DiTFastAttnOptimizer

    opt = DiTFastAttnOptimizer.from_pretrained("mini-mmdit")
    transformer = opt.pipeline.transformer
    opt.plan = uniform_plan(transformer, num_steps=20, method="arrow:1/4", block_size=32)
    opt.plan.metadata["search"] = {"config": opt.default_config().replace(num_inference_steps=20).to_dict()}
    rows = []
    for mode, kwargs in (("base", {}), ("included", dict(self_contained=True))):
        path = opt.save_pretrained(tmp / mode, **kwargs)
        art = read_artifact(path)
        assert art.weights == mode
        loaded = art.load_transformer()
        assert all(torch.equal(a, b) for a, b in zip(loaded.state_dict().values(), transformer.state_dict().values()))
        rows.append(dict(model="mini-mmdit", weights=mode, bytes=size(path), measured=True))
    with torch.no_grad():
        transformer.transformer_blocks[2].attn.to_q.weight.add_(1e-3)  # one projection changed: a one-layer LoRA
    path = opt.save_pretrained(tmp / "delta")
    art = read_artifact(path)
    assert art.weights == "base+delta" and list(load_file(path / "transformer_delta.safetensors")) == [
        "transformer_blocks.2.attn.to_q.weight"]
    loaded = art.load_transformer()
    assert all(torch.equal(a, b) for a, b in zip(loaded.state_dict().values(), transformer.state_dict().values()))
    rows.insert(1, dict(model="mini-mmdit", weights="base+delta (one 192x192 projection)", bytes=size(path),
                        measured=True))
    # FP8 linears: converted on the CPU (only running them needs an FP8 GPU); the file read back bit for bit
    transformer.to(torch.bfloat16)
    names = fp8_linears.quantize(transformer, check=False)
    path = opt.save_pretrained(tmp / "fp8")
    art = read_artifact(path)
    stored, mine = load_file(path / LINEARS_FILE), fp8_linears.state(transformer)
    assert art.linears == names and art.weights == "base" and stored.keys() == mine.keys()
    assert all(torch.equal(stored[k].view(torch.uint8), mine[k].view(torch.uint8)) if mine[k].element_size() == 1
               else torch.equal(stored[k], mine[k]) for k in mine)
    rows.append(dict(model="mini-mmdit", weights=f"base + FP8 linears ({len(names)} layers)", bytes=size(path),
                     measured=True))
    return rows


def full_size_rows(tmp: Path) -> list[dict]:
    from search_time import build_pipeline

    rows = []
    for name, label in (("sd3_medium", "SD3-medium"), ("flux_dev", "FLUX.1-dev")):
        transformer = build_pipeline(name, device="meta", dtype=torch.bfloat16)[0].transformer
        plan = uniform_plan(transformer, num_steps=28, method="arrow:1/8", block_size=128)
        folder = tmp / name
        folder.mkdir()
        base = {"id": f"{label} (architecture)", "revision": "0" * 40, "embedded": False,
                "files": {"transformer/config.json": "0" * 64,
                          "transformer/diffusion_pytorch_model.safetensors.index.json": "0" * 64}}
        _write_contents(folder, transformer, plan, StoredWeights("base", base), None, None)
        plan_only = size(folder)
        weights = sum(t.numel() * t.element_size() for t in transformer.state_dict().values())
        rows.append(dict(model=label, weights="base", bytes=plan_only, measured=True))
        rows.append(dict(model=label, weights="included (bfloat16)", bytes=plan_only + weights, measured=False))
        linears = [transformer.get_submodule(n) for n in fp8_linears.eligible(transformer)]
        fp8 = sum(m.out_features * m.in_features + 4 * m.out_features for m in linears)  # e4m3 bytes + fp32 scales
        rows.append(dict(model=label, weights=f"base + FP8 linears ({len(linears)} layers)", bytes=plan_only + fp8,
                         measured=False))
    return rows


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", help="write artifact-sizes.json here")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        rows = mini_rows(Path(tmp)) + full_size_rows(Path(tmp))
    print("| model | weights | artifact size | |\n|---|---|---|---|")
    for r in rows:
        print(f"| {r['model']} | {r['weights']} | {r['bytes'] / MB:,.3f} MB | "
              f"{'measured' if r['measured'] else 'plan files measured + weights computed'} |")
    if args.out:
        out = Path(args.out) / "artifact-sizes.json"
        out.write_text(json.dumps(dict(date=time.strftime("%Y-%m-%d"), torch=torch.__version__, rows=rows,
                                       command="python benchmarks/artifact_sizes.py " + " ".join(argv or sys.argv[1:])),
                                  indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
