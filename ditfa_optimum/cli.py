"""The ``ditfa-optimum`` command line.

``ditfa-optimum optimize`` calibrates and searches a head-wise plan (default model: the embedded trained miniature
MMDiT, `ditfa_optimum.mini`, on CPU, offline), prints the summary and a per-module table, and saves the artifact and a
picture of the plan.

``ditfa-optimum demo`` runs a round-robin head-wise plan on a tiny random-weight transformer inside a real diffusers
`StableDiffusion3Pipeline` denoising loop (CPU, offline) and reports the attention-FLOP cut, the time per step and the
error against dense attention; ``--out`` saves the plan (never into an artifact; over an existing plan only with
``--overwrite``).

``generate``, ``inspect`` (table + ``--png`` plan picture), ``bench`` and ``verify`` work on an artifact directory or
Hub repo id.

Exit codes: 0 success, 1 user error (message on stderr, no traceback), 2 usage error, 3 ``verify`` found a regression.
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

import torch

from . import __version__

DEMO_MIX = ("full", "arrow:1/4", "cfg_share", "cache")


class UserError(Exception):
    """A problem the user can fix; printed without a traceback."""


def demo_plan(transformer, num_steps: int, methods: list[str], block_size: int):
    """Step 0 full; later steps give the heads ``methods`` round-robin, shifted by one per module and per step."""
    from .adapters import get_adapter
    from .plan import CompressionPlan

    adapter = get_adapter(transformer)
    specs = adapter.module_specs(transformer)
    table = {}
    for m, spec in enumerate(specs):
        rows = [["full"] * spec.num_heads]
        for step in range(1, num_steps):
            rows.append([methods[(h + m + step) % len(methods)] for h in range(spec.num_heads)])
        table[spec.name] = rows
    return CompressionPlan.from_methods(specs, table, block_size=block_size, model_class=adapter.model_class,
                                        metadata={"made_by": "ditfa-optimum demo", "methods": methods})


def run_demo(family: str = "sd3", methods: list[str] | None = None, steps: int = 8, latent_size: int = 32,
             block_size: int = 128, guidance: float = 5.0, backend: str | None = None, seed: int = 0,
             out: str | None = None, repeats: int = 2, overwrite: bool = False) -> dict:
    """Run the demo; returns the numbers it prints (see module docstring)."""
    from .adapters import get_adapter
    from .apply import apply, remove
    from .runtime import get_backend
    from .serialization import check_plan_target
    from .tiny import tiny_pipeline

    for name, value in (("steps", steps), ("repeats", repeats)):
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ValueError(f"{name} must be a positive int, got {value!r}")
    if not isinstance(latent_size, int) or not 1 <= latent_size <= 256:
        raise ValueError(f"latent_size must be 1 to 256 latent tokens per side (default 32: 1024 image tokens), got "
                         f"{latent_size!r}")
    if not math.isfinite(guidance):
        raise ValueError(f"guidance must be a finite number (the CFG scale, e.g. 5), got {guidance!r}")
    if out:
        check_plan_target(out, overwrite, hint="pass --overwrite")  # before the work, and again when saving

    methods = list(methods or DEMO_MIX)
    pipe = tiny_pipeline(family, seed=seed)
    transformer = pipe.transformer
    cfg = transformer.config
    table, patch = cfg.get("pos_embed_max_size"), cfg.get("patch_size") or 1
    if table and latent_size > table * patch:
        raise ValueError(f"latent_size {latent_size} is more than the tiny {family} transformer's position table "
                         f"covers ({table * patch} latent tokens per side); choose a smaller --latent-size")
    g = torch.Generator().manual_seed(seed + 1)
    text_tokens = 16
    emb = torch.randn(1, text_tokens, cfg.joint_attention_dim, generator=g)
    pooled = torch.randn(1, cfg.pooled_projection_dim, generator=g)
    adapter = get_adapter(transformer)
    px = latent_size * adapter.pixels_per_token(transformer, pipe.vae_scale_factor)
    # CFG as the family's pipeline does it: SD3 batches [uncond, cond]; FLUX.1 takes the scale as an embedding and
    # runs a negative prompt only with true_cfg_scale > 1 (left at 1)
    kwargs = dict(prompt_embeds=emb, pooled_prompt_embeds=pooled, height=px, width=px, num_inference_steps=steps,
                  output_type="latent", negative_prompt_embeds=torch.zeros_like(emb),
                  negative_pooled_prompt_embeds=torch.zeros_like(pooled), guidance_scale=guidance)

    def generate():
        best = float("inf")
        for _ in range(repeats):
            start = time.perf_counter()
            latents = pipe(generator=torch.Generator().manual_seed(seed), **kwargs).images
            best = min(best, time.perf_counter() - start)
        return latents, best / steps

    plan = demo_plan(transformer, steps, methods, block_size)
    with torch.inference_mode():
        dense, dense_time = generate()
        runtime = apply(pipe, plan, backend=backend)
        planned, planned_time = generate()
        remove(pipe)
    adapter_tokens = latent_size * latent_size
    report = plan.flops(adapter_tokens, text_tokens, cfg=bool(adapter.batched_cfg(pipe)))  # as of the last call
    rse = float(((planned - dense) ** 2).mean() / dense.var())
    result = dict(family=family, plan=plan.summary(), image_tokens=adapter_tokens, text_tokens=text_tokens,
                  steps=steps, flop_cut=report.cut, dense_ms_per_step=dense_time * 1e3,
                  planned_ms_per_step=planned_time * 1e3, latent_rse=rse,
                  backend=get_backend(runtime.backend_name, dense.device).name)
    if out:
        target = check_plan_target(out, overwrite, hint="pass --overwrite")
        try:
            result["saved"] = str(plan.save(target))
        except OSError as e:
            raise ValueError(f"cannot write the plan to {out}: {e.strerror or e}; choose another directory") from None
    return result


def _cmd_demo(args) -> int:
    try:
        result = run_demo(args.family, args.method, args.steps, args.latent_size, args.block_size, args.guidance,
                          args.backend, args.seed, args.out, overwrite=args.overwrite)
    except ValueError as e:
        raise UserError(str(e)) from None
    print(f"\n{result['plan']}")
    print(f"model        tiny random-weight {result['family']} transformer, {result['image_tokens']} image + "
          f"{result['text_tokens']} text tokens, {result['steps']} steps, backend {result['backend']}")
    print(f"attention    {result['flop_cut']:.1%} of dense attention FLOPs cut")
    print(f"time/step    dense {result['dense_ms_per_step']:.1f} ms, planned {result['planned_ms_per_step']:.1f} ms")
    print(f"error        final latents RSE vs dense = {result['latent_rse']:.3g} (random weights: no quality meaning)")
    if "saved" in result:
        print(f"saved        plan.json + plan.safetensors in {result['saved']}")
    return 0


MODEL_DEFAULTS = dict(steps=28, size=1024, block_size=128, guidance=None)


def _load_optimizer(model: str, dtype: str | None, device: str | None):
    from .loading import check_device
    from .optimizer import DiTFastAttnOptimizer

    check_device(device)  # before the model loads
    kwargs = {}  # from_pretrained also knows the embedded models and saved miniature-model directories
    if dtype:
        kwargs["torch_dtype"] = getattr(torch, dtype)
    opt = DiTFastAttnOptimizer.from_pretrained(model, **kwargs)
    if device:
        opt.pipeline.to(device)
    return opt


def _read_prompts(path: str | None) -> list[str] | None:
    if path is None:
        return None
    try:
        lines = open(path, encoding="utf-8").read().splitlines()
    except OSError as e:
        raise UserError(f"cannot read the prompts file {path!r}: {e.strerror}") from None
    except UnicodeDecodeError as e:
        raise UserError(f"the prompts file {path!r} is not UTF-8 text ({e.reason} at byte {e.start}); save it as "
                        "UTF-8, one prompt per line") from None
    prompts = [line.strip() for line in lines if line.strip() and not line.lstrip().startswith("#")]
    if not prompts:
        raise UserError(f"the prompts file {path!r} holds no prompts (one per line; # starts a comment)")
    return prompts


def _cmd_optimize(args) -> int:
    from .config import DEFAULT_METHODS, DiTFastAttnConfig
    from .serialization import check_target

    from .embedded import defaults_for

    defaults = defaults_for(args.model) or MODEL_DEFAULTS

    def given(value, default):  # 0 is a value to refuse, not "use the default"
        return default if value is None else value

    size = given(args.size, defaults["size"])
    try:
        config = DiTFastAttnConfig(
            threshold=args.threshold, methods=tuple(args.method or DEFAULT_METHODS),
            num_inference_steps=given(args.steps, defaults["steps"]), height=given(args.height, size),
            width=given(args.width, size),
            guidance_scale=args.guidance if args.guidance is not None else defaults["guidance"], seed=args.seed,
            cost_model=args.cost_model, num_prompts=args.num_prompts, batch_size=args.batch_size,
            block_size=given(args.block_size, defaults["block_size"]), backend=args.backend,
            budget_schedule=args.budget_schedule, error_normalization=args.error_normalization,
            allocation=args.allocation, target_cut=args.target_cut, target_snr_db=args.target_snr,
            max_head_rse=args.max_head_rse, calibration_passes=args.calibration_passes,
            skip_steps=False if args.no_skip_steps else None, verify_plans=args.verify_plans,
            quantize_linears=None if args.quantize_linears == "none" else args.quantize_linears)
        if args.repro_prompts < 0:
            raise UserError(f"--repro-prompts must be >= 0 (generations recorded for verify; 0: none), got "
                            f"{args.repro_prompts}")
        prompts = _read_prompts(args.prompts)
        out = check_target(args.out, args.overwrite, hint="pass --overwrite")  # before the work, not after
        opt = _load_optimizer(args.model, args.dtype, args.device)
        _check_resolution(opt.pipeline, config.height, config.width)
        plan = opt.optimize(config, calibration_prompts=prompts, progress=not args.quiet)
        if args.quiet:
            print(opt.summary())
        print(plan.report().table())
        saved = opt.save_pretrained(out, overwrite=args.overwrite, reproducibility_prompts=args.repro_prompts,
                                    self_contained=args.self_contained or None)
        if args.plan_picture:
            _picture(plan, args.model, saved / "plan.png")
    except ValueError as e:
        raise UserError(str(e)) from None
    print(f"saved        the artifact in {saved} (load it with ditfa_optimum.load_pipeline({str(saved)!r}); "
          f"check it with: ditfa-optimum verify {saved})")
    return 0


def _picture(plan, title: str, path: Path, flag: str = "the plan picture") -> Path:
    from .picture import plan_picture

    return _save_image(plan_picture(plan.report(), title=title), path, flag)


def _image_path(path: str, flag: str) -> Path:
    """Check an image file to write, before the work: an extension Pillow writes, not a directory, and a place where
    it can be made (missing parent directories are created when saving, as for ``optimize --out``)."""
    from PIL import Image

    from .serialization import nearest_existing_parent

    path = Path(path)
    Image.init()
    fmt = Image.registered_extensions().get(path.suffix.lower())
    if fmt not in Image.SAVE:
        raise UserError(f"{flag} {str(path)!r}: the extension {path.suffix or '(none)'!r} names no image format "
                        "Pillow can write; use e.g. .png, .jpg or .webp")
    try:
        if path.is_dir():
            raise UserError(f"{flag} {path} is a directory; give a file name, e.g. {path / ('image' + path.suffix)}")
        parent = nearest_existing_parent(path)
        if not parent.is_dir():
            raise UserError(f"{flag} {path}: {parent} is a file, not a directory; choose another path")
    except OSError as e:  # a name too long, a NUL byte
        raise UserError(f"{flag} {str(path)[:200]!r} is not a usable path: {e.strerror or e}") from None
    return path


def _save_image(image, path: Path, flag: str) -> Path:
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        image.save(path)
    except OSError as e:
        raise UserError(f"cannot write {flag} {path}: {e.strerror or e}; choose another path") from None
    return path


#: no side of an image beyond this many pixels: refused before a tensor of that size is made
MAX_SIDE_PX = 16384


def _check_resolution(pipe, height: int, width: int, flags: tuple[str, str] = ("height", "width")) -> None:
    """Refuse a size the transformer cannot take before the pipeline allocates latents for it: more than
    `MAX_SIDE_PX`, or (SD3) more than its position-embedding table covers."""
    transformer = pipe.transformer
    config = transformer.config
    limit = MAX_SIDE_PX
    reason = f"the CLI's limit of {MAX_SIDE_PX} px per side"
    table = config.get("pos_embed_max_size")
    factor = getattr(pipe, "vae_scale_factor", None)
    if table and isinstance(factor, int):
        patch = config.get("patch_size") or 1
        if table * patch * factor < limit:
            limit = table * patch * factor
            reason = (f"{type(transformer).__name__}'s position table: {table} patches x {patch} x VAE factor "
                      f"{factor}")
    for flag, px in zip(flags, (height, width)):
        if px > limit:
            raise UserError(f"{flag} {px} px is larger than this model takes (at most {limit} px: {reason}); choose "
                            "a smaller size")


def _read(artifact: str, strict: bool = True):
    from .serialization import read_artifact

    return read_artifact(artifact, strict=strict)


def _pipeline(args, art, steps: int | None = None):
    """The artifact (already read and checked once) as a pipeline, its plan remapped to ``steps`` when the command
    line asks for another step count than the plan's (refused with --strict-steps)."""
    from .loading import load_pipeline

    if steps is not None and steps != art.plan.num_steps:
        if getattr(args, "strict_steps", False):
            raise UserError(f"--steps {steps}: the plan was searched for {art.plan.num_steps} steps and "
                            "--strict-steps refuses to remap it; leave --steps out, or drop --strict-steps to run it "
                            "remapped (lower quality than searched)")
        # apply() warns once that the plan runs remapped and what to expect (one message, not two)
    dtype = getattr(torch, args.dtype) if getattr(args, "dtype", None) else None
    return load_pipeline(art, base_model=args.base_model, torch_dtype=dtype, device=args.device,
                         backend=args.backend, num_inference_steps=steps)


def _settings(art, args, seed: int):
    """Steps, resolution and guidance from the command line, else from the artifact's search."""
    from .config import DiTFastAttnConfig

    search = art.search_config or {}

    def given(value, default):  # 0 is a value to refuse, not "use the default"
        return default if value is None else value

    return DiTFastAttnConfig(num_inference_steps=given(args.steps, art.plan.num_steps),
                             height=given(args.height, search.get("height") or 1024),
                             width=given(args.width, search.get("width") or 1024),
                             guidance_scale=args.guidance if args.guidance is not None else search.get("guidance_scale"),
                             seed=seed)


def _cmd_generate(args) -> int:
    from .apply import remove
    from .calibrate import pipeline_kwargs, progress_bars

    out = _image_path(args.out, "--out")  # before the work
    try:
        art = _read(args.artifact)
        settings = _settings(art, args, args.seed)
        steps, height, width = settings.num_inference_steps, settings.height, settings.width
        pipe = _pipeline(args, art, None if args.dense else steps)
        _check_resolution(pipe, height, width)
        if args.dense:
            remove(pipe)
        kwargs = pipeline_kwargs(pipe, [args.prompt], settings, prompt_encoder=art.prompt_encoder(pipe))
        pixels = getattr(pipe, "vae", None) is not None or getattr(pipe, "pixel_space", False)
        with torch.inference_mode(), progress_bars(pipe, not args.quiet):
            result = pipe(**kwargs, output_type="pil" if pixels else "latent").images
    except ValueError as e:
        raise UserError(str(e)) from None
    image = result[0] if pixels else _latent_preview(result, pipe, height, width)
    _save_image(image, out, "--out")
    kind = "image" if pixels else "latent preview (the model has no VAE: first three latent channels as RGB)"
    print(f"wrote {args.out}: {kind}, {'dense attention' if args.dense else 'the artifact plan'}, {steps} steps, "
          f"seed {args.seed}")
    return 0


def _cmd_export(args) -> int:
    from .apply import remove
    from .calibrate import pipeline_kwargs
    from .export import export_onnx

    try:
        art = _read(args.artifact)
        if args.steps not in (None, art.plan.num_steps):
            raise UserError(f"--steps {args.steps}: the export runs the plan's own {art.plan.num_steps} steps (a "
                            "remapped plan is not exported); leave --steps out")
        if args.batch < 1:
            raise UserError(f"--batch must be >= 1, got {args.batch}")
        settings = _settings(art, args, args.seed)
        pipe = _pipeline(args, art, art.plan.num_steps)
        _check_resolution(pipe, settings.height, settings.width)
        remove(pipe)  # export_onnx applies the plan itself, one step per graph
        kwargs = pipeline_kwargs(pipe, [args.prompt] * args.batch, settings, prompt_encoder=art.prompt_encoder(pipe))
        kwargs.pop("generator")
        out = export_onnx(pipe, art.plan, args.out, dynamo=args.dynamo, progress=not args.quiet, **kwargs)
    except ValueError as e:
        raise UserError(str(e)) from None
    except ImportError as e:
        raise UserError(f"ONNX export needs onnx and onnxruntime: pip install 'ditfa-optimum[onnx]' ({e})") from None
    graphs = len(list(Path(out).glob("*.onnx")))
    print(f"wrote {out}: {graphs} ONNX graphs for the {art.plan.num_steps} steps (one per distinct step program), "
          f"weights in weights.bin, export.json; run it with ditfa_optimum.export.OnnxPlanTransformer({str(out)!r}, "
          "pipe.transformer)")
    return 0


def _latent_preview(latents, pipe, height, width):
    from PIL import Image

    from .verify import downsample

    x = downsample(latents, pipe, height, width)[0][:3]
    while x.shape[0] < 3:
        x = torch.cat([x, x[:1]])
    x = (x - x.amin(dim=(1, 2), keepdim=True)) / (x.amax(dim=(1, 2), keepdim=True) - x.amin(dim=(1, 2),
                                                                                              keepdim=True) + 1e-8)
    array = (x.permute(1, 2, 0) * 255).round().to(torch.uint8).numpy()
    image = Image.fromarray(array)
    return image.resize((image.width * 4, image.height * 4), Image.NEAREST)


def _cmd_inspect(args) -> int:
    png = _image_path(args.png, "--png") if args.png else None
    try:
        art = _read(args.artifact)
    except ValueError as e:
        raise UserError(str(e)) from None
    config, plan = art.config, art.plan
    base = config["base_model"] or {}
    print(f"artifact     {art.path} (schema version {art.schema_version}, ditfa-optimum {config['package_version']})")
    print(f"base model   {base.get('id')}{' @ ' + base['revision'] if base.get('revision') else ''}")
    fp = config["transformer"]["fingerprint"]
    print(f"transformer  {config['transformer']['class_name']}: {fp['attention_modules']} attention modules, "
          f"heads {fp['num_heads']}, head dim {fp['head_dim']}, {'image' if fp['image_first'] else 'text'} first")
    print(f"weights      " + {
        "base": f"the base model's ({len(base.get('files', {}))} files pinned by sha256), none stored here",
        "base+delta": f"the base model's ({len(base.get('files', {}))} files pinned by sha256), with the tensors "
                      f"that differ from them stored here",
        "included": "stored here (self-contained)"}[art.weights])
    if art.linears:
        print(f"linears      {len(art.linears)} linear layers in FP8 (float8 e4m3 weights, per-row scales; needs a "
              "GPU of compute capability 8.9+)")
    print(f"plan         {plan.summary()}")
    cut = art.attention_flop_cut
    print(f"attention    {cut:.1%} of dense attention FLOPs cut" if cut is not None else
          "attention    FLOP cut not recorded (the plan was made without a search)")
    try:
        report = plan.report()
    except ValueError as e:  # a plan made without a search may not know its token counts: no FLOP table then
        report = None
        print(f"table        not drawn: {e}")
    if report is not None and report.transformer_cut is not None:
        print(f"transformer  {report.transformer_cut:.1%} of the whole transformer's FLOPs skipped"
              + (f" (steps skipped whole: {plan.skipped_steps})" if plan.skipped_steps else ""))
    if report is not None:
        print()
        print(report.table())
    if png:
        path = _picture(plan, f"{base.get('id')}: {plan.num_steps} steps", png, "--png")
        print(f"\nwrote {path}")
    return 0


def _cmd_push(args) -> int:
    from .base_weights import hub_id_form
    from .serialization import push_artifact

    if not hub_id_form(args.repo_id):
        raise UserError(f"repo_id must be a Hub repo id (user/name), got {args.repo_id!r}")
    if not Path(args.artifact).is_dir():
        raise UserError(f"{args.artifact!r} is not an artifact directory (push uploads a saved artifact)")
    try:
        info = push_artifact(args.artifact, args.repo_id, private=args.private or None, commit_message=args.message)
    except ValueError as e:  # ArtifactError: not uploaded
        raise UserError(str(e)) from None
    except Exception as e:  # huggingface_hub: no token, no network, no permission
        raise UserError(f"upload to {args.repo_id} failed: {e} ({type(e).__name__}); log in with "
                        "`huggingface-cli login` or set HF_TOKEN") from None
    print(f"pushed       {args.artifact} to {getattr(info, 'commit_url', None) or args.repo_id}")
    return 0


def _cmd_bench(args) -> int:
    import time

    from .apply import apply, remove
    from .calibrate import pipeline_kwargs, progress_bars

    if args.repeats < 1:
        raise UserError(f"--repeats must be at least 1 (timed runs per variant), got {args.repeats}")
    try:
        art = _read(args.artifact)
        settings = _settings(art, args, seed=0)
        steps, height, width = settings.num_inference_steps, settings.height, settings.width
        pipe = _pipeline(args, art, steps)
        _check_resolution(pipe, height, width)
        device = next(pipe.transformer.parameters()).device
        sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
        kwargs = pipeline_kwargs(pipe, [args.prompt], settings, prompt_encoder=art.prompt_encoder(pipe))

        def run():  # the same noise every time
            return pipe(**{**kwargs, "generator": [torch.Generator().manual_seed(0)]}, output_type="latent")

        def per_step(what: str):
            from tqdm.auto import tqdm

            times = []
            with torch.inference_mode(), progress_bars(pipe, False):
                run()  # warm-up
                for _ in tqdm(range(args.repeats), desc=f"ditfa bench ({what})", unit="run", leave=False):
                    sync()
                    start = time.perf_counter()
                    run()
                    sync()
                    times.append((time.perf_counter() - start) / steps)
            return sorted(times)[len(times) // 2]

        planned = per_step("plan")
        plan = remove(pipe)
        dense = per_step("dense")
        apply(pipe, plan, backend=args.backend)
    except ValueError as e:
        raise UserError(str(e)) from None
    print(f"device       {device} ({torch.cuda.get_device_name(device) if device.type == 'cuda' else 'CPU'}), "
          f"{height}x{width}, {steps} steps, median of {args.repeats}")
    print(f"dense        {dense * 1e3:.1f} ms per step (stock attention)")
    print(f"artifact     {planned * 1e3:.1f} ms per step ({dense / planned:.2f}x)")
    return 0


def _cmd_verify(args) -> int:
    from .verify import verify_artifact

    try:
        report = verify_artifact(args.artifact, device=args.device, backend=args.backend,
                                 psnr_floor=args.psnr_floor, base_model=args.base_model)
    except ValueError as e:
        raise UserError(str(e)) from None
    print(report.text())
    return 0 if report.ok else 3


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ditfa-optimum", description=__doc__.split("\n\n")[0])
    add_commands(parser)
    return parser


def add_commands(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Put the subcommands (optimize, generate, export, ...) on ``parser``: `build_parser`'s, or the ``optimum-cli
    ditfa`` command's (integrations/optimum-cli). Each sets ``run``, the function that `run_command` calls."""
    from .config import BUDGET_SCHEDULES, ERROR_NORMALIZATIONS
    from .embedded import DEFAULT_MODEL, EMBEDDED_MODELS

    parser.add_argument("--version", action="version", version=f"ditfa-optimum {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    opt = sub.add_parser("optimize", help="calibrate on prompts and search a head-wise plan")
    opt.add_argument("model", nargs="?", default=DEFAULT_MODEL,
                     help="a Hub model id or local pipeline directory, or an embedded model: "
                          f"{', '.join(EMBEDDED_MODELS)} (default {DEFAULT_MODEL}: the trained miniature MMDiT)")
    opt.add_argument("--target-cut", type=float, default=None,
                     help="share of the whole transformer's FLOPs to skip with the least predicted error (default "
                          "0.3; trajectory search; with --no-skip-steps a share of the attention FLOPs)")
    opt.add_argument("--no-skip-steps", action="store_true",
                     help="trajectory search: never skip whole steps (head methods only)")
    opt.add_argument("--verify-plans", type=int, default=6, metavar="N",
                     help="trajectory search: run up to N of the search's alternative plans on two calibration "
                          "captions and keep the error model's choice unless another changes the images at least 2x "
                          "less (default 6; 1 = only check the model's choice; 0 = no checking generation)")
    opt.add_argument("--target-snr", type=float, default=None,
                     help="instead of a cut: the predicted SNR of the final latents in dB to keep while saving the "
                          "most (trajectory search)")
    opt.add_argument("--allocation", choices=["trajectory", "local"], default="trajectory",
                     help="trajectory (default): one error budget over every module, step and head, weighted by how "
                          "much each moves the final image; local: the paper's per-(module, step) budget --threshold")
    opt.add_argument("--max-head-rse", type=float, default=0.5, help="per-head cap on the local error (default 0.5)")
    opt.add_argument("--calibration-passes", type=int, default=2, choices=[1, 2, 3],
                     help="trajectory search: measuring passes (2: the second along the first's plan)")
    opt.add_argument("--threshold", type=float, default=0.1,
                     help="local search only: error budget, mean RSE per head (default 0.1)")
    opt.add_argument("--method", action="append", metavar="METHOD",
                     help="a candidate method besides full; repeat for several (default: arrow:1/8 arrow:1/16 "
                          "arrow:1/32 cache cfg_share)")
    opt.add_argument("--prompts", metavar="FILE", help="calibration prompts, one per line (default: built-in captions)")
    opt.add_argument("--num-prompts", type=int, default=8, help="built-in captions to use without --prompts")
    opt.add_argument("--steps", type=int, help="denoising steps (default 28; mini-mmdit 20, tiny models 8)")
    opt.add_argument("--size", type=int, help="image height and width in pixels (default 1024; mini-mmdit 64, "
                                               "tiny models 128, tiny-flux 256)")
    opt.add_argument("--height", type=int)
    opt.add_argument("--width", type=int)
    opt.add_argument("--guidance", type=float, help="CFG scale (default: the pipeline's; mini-mmdit 4, tiny models 5)")
    opt.add_argument("--cost-model", choices=["flops", "measured"], default="flops")
    opt.add_argument("--budget-schedule", choices=list(BUDGET_SCHEDULES), default="constant",
                     help="spread of the error budget over the steps (default constant, as in the paper; the others "
                          "give later steps more: better images at the same cut on mini-mmdit, docs/search.md)")
    opt.add_argument("--error-normalization", choices=list(ERROR_NORMALIZATIONS), default="head",
                     help="divide a head's error by its own output variance (head, the paper's) or by the module's "
                          "mean (module)")
    opt.add_argument("--batch-size", type=int, default=8, help="prompts per calibration batch")
    opt.add_argument("--block-size", type=int, help="arrow mask block size (default 128; mini-mmdit 32, tiny models 16)")
    opt.add_argument("--backend", default=None, help="attention backend while calibrating (default auto)")
    opt.add_argument("--dtype", choices=["float32", "float16", "bfloat16"], help="load the pipeline in this dtype")
    opt.add_argument("--device", help="run on this device (e.g. cuda)")
    opt.add_argument("--seed", type=int, default=0)
    opt.add_argument("--out", default="ditfa-artifact", help="artifact directory (default ./ditfa-artifact)")
    opt.add_argument("--overwrite", action="store_true",
                     help="replace an existing ditfa artifact in --out (never any other non-empty directory)")
    opt.add_argument("--self-contained", action="store_true",
                     help="store the whole transformer in the artifact (air-gapped use; mind the base model's "
                          "licence before publishing it). Default: refer to the base model's files, pinned by "
                          "revision and sha256, and store only the tensors that differ")
    opt.add_argument("--quantize-linears", choices=["none", "fp8"], default="none",
                     help="fp8: the transformer blocks' linear layers in FP8 (torchao; needs --dtype bfloat16 and a "
                          "GPU of compute capability 8.9+), calibrated and saved that way (default none)")
    opt.add_argument("--repro-prompts", type=int, default=2,
                     help="generations recorded for `verify` (default 2; 0: none)")
    opt.add_argument("--no-picture", dest="plan_picture", action="store_false",
                     help="do not write plan.png into the artifact")
    opt.add_argument("--quiet", action="store_true", help="no progress bars")
    opt.set_defaults(run=_cmd_optimize)

    def artifact_args(p, load=True):
        p.add_argument("artifact", help="artifact directory or Hub repo id")
        if load:
            p.add_argument("--base-model", help="where text encoders and VAE come from, and the transformer weights of "
                                                "an artifact that refers to them (default: the recorded base model)")
            p.add_argument("--device", help="e.g. cuda (default: CPU)")
            p.add_argument("--backend", default="auto", help="attention backend (default auto)")

    def generation_args(p):
        p.add_argument("--steps", type=int, help="denoising steps (default: the plan's; another count runs the plan "
                                                 "remapped, with a note)")
        p.add_argument("--strict-steps", action="store_true",
                       help="refuse a --steps other than the plan's instead of remapping the plan")
        p.add_argument("--height", type=int)
        p.add_argument("--width", type=int)
        p.add_argument("--guidance", type=float)
        p.add_argument("--dtype", choices=["float32", "float16", "bfloat16"])

    gen = sub.add_parser("generate", help="generate an image with an artifact (or dense, to compare)")
    artifact_args(gen)
    gen.add_argument("prompt")
    gen.add_argument("--out", default="ditfa-image.png", help="image file (default ditfa-image.png)")
    gen.add_argument("--dense", action="store_true", help="stock attention instead of the plan, to compare")
    gen.add_argument("--seed", type=int, default=0)
    gen.add_argument("--quiet", action="store_true")
    generation_args(gen)
    gen.set_defaults(run=_cmd_generate)

    exp = sub.add_parser("export", help="export the artifact's transformer with its plan to ONNX (one graph per "
                                        "distinct step program; docs/export.md)")
    exp.add_argument("format", choices=["onnx"])
    artifact_args(exp)
    exp.add_argument("out", help="new directory for the graphs")
    exp.add_argument("--prompt", default="a small red circle in the center",
                     help="the caption of the recorded call (its text length fixes the graphs')")
    exp.add_argument("--batch", type=int, default=1, help="prompts per call the graphs take (default 1)")
    exp.add_argument("--seed", type=int, default=0)
    exp.add_argument("--dynamo", action="store_true", default=None,
                     help="trace with torch.onnx's dynamo exporter (needs onnxscript; about 5x slower to export, "
                          "the same graphs); default: TorchScript, dynamo where it lacks an operator (FLUX)")
    exp.add_argument("--quiet", action="store_true")
    generation_args(exp)
    exp.set_defaults(run=_cmd_export)

    ins = sub.add_parser("inspect", help="summary table of an artifact, and a PNG picture of its plan")
    artifact_args(ins, load=False)
    ins.add_argument("--png", default=None, help="write the plan picture here (e.g. plan.png)")
    ins.set_defaults(run=_cmd_inspect)

    bench = sub.add_parser("bench", help="time per denoising step, dense vs the artifact, on this device")
    artifact_args(bench)
    bench.add_argument("--prompt", default="a lighthouse at dusk")
    bench.add_argument("--repeats", type=int, default=3)
    generation_args(bench)
    bench.set_defaults(run=_cmd_bench)

    ver = sub.add_parser("verify", help="regenerate the artifact's reference images and compare (exit 3 on failure)")
    artifact_args(ver)
    ver.add_argument("--psnr-floor", type=float, default=30.0,
                     help="PSNR floor in dB when device/backend/dtype differ from the saving machine (default 30)")
    ver.set_defaults(run=_cmd_verify)

    push = sub.add_parser("push", help="upload an artifact to the Hugging Face Hub (checked first)")
    artifact_args(push, load=False)
    push.add_argument("repo_id", help="the Hub model repo to create or update (user/name)")
    push.add_argument("--private", action="store_true", help="create the repo private")
    push.add_argument("--message", default="Upload ditfa-optimum artifact", help="commit message")
    push.set_defaults(run=_cmd_push)

    demo = sub.add_parser("demo", help="run a head-wise plan on the embedded tiny model and report cut, time, error")
    demo.add_argument("--family", choices=["sd3", "sd35", "flux"], default="sd3")
    demo.add_argument("--method", action="append", metavar="METHOD",
                      help=f"a method such as full, arrow:1/8, cache, cfg_share, arrow_residual:1/4; repeat to mix "
                           f"(heads take them round-robin). Default: {' '.join(DEMO_MIX)}")
    demo.add_argument("--steps", type=int, default=8)
    demo.add_argument("--latent-size", type=int, default=32, help="latent tokens per side (default 32: 1024 tokens)")
    demo.add_argument("--block-size", type=int, default=128, help="arrow mask block size in tokens")
    demo.add_argument("--guidance", type=float, default=5.0)
    demo.add_argument("--backend", default=None, help="auto (default), reference or flex")
    demo.add_argument("--seed", type=int, default=0)
    demo.add_argument("--out", default=None, help="directory to save the plan in (not an artifact directory)")
    demo.add_argument("--overwrite", action="store_true", help="replace a plan already saved in --out")
    demo.set_defaults(run=_cmd_demo)
    return parser


def run_command(args: argparse.Namespace) -> int:
    """Run the parsed subcommand; its exit status (a user error printed, 1)."""
    try:
        return args.run(args)
    except UserError as e:
        print(f"ditfa-optimum: error: {e}", file=sys.stderr)
        return 1


def main(argv: list[str] | None = None) -> int:
    return run_command(build_parser().parse_args(argv))


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
