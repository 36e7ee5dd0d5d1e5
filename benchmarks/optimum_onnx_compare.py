"""The dense transformer exported by ditfa-optimum against optimum-onnx's own export of the same transformer.

optimum-onnx (``optimum.exporters.onnx``, the exporter behind ``optimum-cli export onnx``) exports a diffusers SD3
transformer with its `SD3TransformerOnnxConfig`; `ditfa_optimum.export.export_onnx` exports it with an all-``full``
plan (dense attention at every step). Both graphs run in onnxruntime on the inputs of a real generation's steps and
on fresh random inputs of the same shapes; the script prints the largest differences between them and against
PyTorch, and the time per call of each.

optimum-onnx 0.1.0 (the newest) pins transformers < 4.58, which needs huggingface_hub < 1.0, while diffusers >= 0.38
needs huggingface_hub >= 1.32: it installs only beside an older diffusers, so this runs in its own environment:

    python3 -m venv /tmp/ovenv && /tmp/ovenv/bin/pip install torch==2.13.0
    /tmp/ovenv/bin/pip install diffusers==0.37.0 optimum-onnx==0.1.0 onnxruntime==1.32.0 scipy tqdm "numpy<2.4"
    /tmp/ovenv/bin/pip install --no-deps -e . && /tmp/ovenv/bin/python benchmarks/optimum_onnx_compare.py
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
sys.path[:0] = [p for p in (str(ROOT),) if p not in sys.path]

from ditfa_optimum.apply import uniform_plan  # noqa: E402
from ditfa_optimum.export import export_onnx  # noqa: E402
from ditfa_optimum.mini import mini_pipeline  # noqa: E402

INPUTS = ("hidden_states", "timestep", "encoder_hidden_states", "pooled_projections")


def optimum_export(transformer, out: Path, opset: int) -> Path:
    from optimum.exporters.onnx import export
    from optimum.exporters.tasks import TasksManager

    # the model type optimum's diffusers export gives an SD3 transformer (get_diffusion_models_for_export)
    constructor = TasksManager.get_exporter_config_constructor(model=transformer, exporter="onnx",
                                                               model_type="sd3-transformer-2d",
                                                               library_name="diffusers", task="semantic-segmentation")
    config = constructor(transformer.config, int_dtype="int64", float_dtype="fp32")
    path = out / "model.onnx"
    export(transformer, config, path, opset=opset)
    return path


def session(path: Path):
    import onnxruntime

    return onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])


def run(sess, feeds: dict) -> tuple[torch.Tensor, float]:
    names = {i.name for i in sess.get_inputs()}
    start = time.perf_counter()
    out = sess.run(None, {k: v.numpy() for k, v in feeds.items() if k in names})[0]
    return torch.from_numpy(out), time.perf_counter() - start


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--opset", type=int, default=18)
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--out", help="JSON results here")
    args = parser.parse_args(argv)
    import diffusers
    import onnxruntime
    import optimum.version

    pipe = mini_pipeline()
    transformer = pipe.transformer.eval()
    recorded = []
    hook = transformer.register_forward_pre_hook(
        lambda m, a, kw: recorded.append({k: kw[k].detach().clone() for k in INPUTS}), with_kwargs=True)
    pipe(["a small red circle in the center"], num_inference_steps=20, guidance_scale=4.0,
         generator=torch.Generator().manual_seed(0), output_type="latent")
    hook.remove()
    calls = [recorded[0], recorded[10], recorded[19]]
    torch.manual_seed(torch.seed() % 2**31)  # fresh random inputs of the same shapes on every run
    calls.append({k: (torch.randn_like(v) if k != "timestep" else torch.rand_like(v) * 1000)
                  for k, v in recorded[0].items()})
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        ours_dir = export_onnx(pipe, uniform_plan(transformer, num_steps=1, method="full"), tmp / "ours",
                               prompt=["a small red circle in the center"], num_inference_steps=1, guidance_scale=4.0,
                               opset=args.opset, progress=False)
        theirs = session(optimum_export(transformer, tmp / "optimum", args.opset))
        ours = session(ours_dir / "step_00.onnx")
        rows = []
        for i, feeds in enumerate(calls):
            with torch.no_grad():
                want = transformer(**feeds, return_dict=False)[0]
            a, _ = run(ours, feeds)
            b, _ = run(theirs, feeds)
            rows.append(dict(call=["step 0", "step 10", "step 19", "random"][i],
                             ours_vs_optimum=float((a - b).abs().max()), ours_vs_torch=float((a - want).abs().max()),
                             optimum_vs_torch=float((b - want).abs().max()), scale=float(want.abs().max())))
        times = {}
        for name, sess in (("ours", ours), ("optimum-onnx", theirs)):
            times[name] = statistics.median(run(sess, calls[1])[1] for _ in range(args.reps)) * 1e3
    result = dict(versions=dict(torch=torch.__version__, diffusers=diffusers.__version__,
                                optimum=optimum.version.__version__, onnxruntime=onnxruntime.__version__),
                  opset=args.opset, rows=rows, ms_per_call=times)
    for r in rows:
        print(f"{r['call']:8s} max |ours - optimum-onnx| {r['ours_vs_optimum']:.2e}   max |ours - torch| "
              f"{r['ours_vs_torch']:.2e}   max |optimum-onnx - torch| {r['optimum_vs_torch']:.2e}   "
              f"(output scale {r['scale']:.2f})")
    print(f"ms per call (onnxruntime, CPU, median of {args.reps}): " + ", ".join(f"{k} {v:.1f}" for k, v in times.items()))
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
