"""`DiTFastAttnOptimizer`: load a pipeline, calibrate on prompts, search a head-wise plan, save it.

    opt = DiTFastAttnOptimizer.from_pretrained("stabilityai/stable-diffusion-3-medium-diffusers", torch_dtype=...)
    plan = opt.optimize(DiTFastAttnConfig(threshold=0.1, num_inference_steps=28), calibration_prompts=prompts)
    opt.apply()      # the pipeline now runs the plan: opt.pipeline("a lighthouse at dusk", num_inference_steps=28)
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import torch

from . import fp8_linears
from .adapters import get_adapter
from .calibrate import CalibrationStats, calibrate, check_prompts
from .config import DiTFastAttnConfig
from .plan import CompressionPlan
from .prompts import default_prompts
from .search import search

logger = logging.getLogger(__name__)


class DiTFastAttnOptimizer:
    """Head-wise attention compression for one diffusers pipeline.

    Args:
        pipeline: a loaded diffusers pipeline whose transformer an adapter knows (SD3, SD3.5, FLUX.1).
        prompt_encoder: for pipelines without text encoders: ``list of prompts -> pipeline kwargs``.
        source: where the pipeline came from (model id or path), recorded in the plan.
    """

    def __init__(self, pipeline, *, prompt_encoder=None, source: str | None = None, revision: str | None = None):
        transformer = getattr(pipeline, "transformer", None)
        if transformer is None:
            raise ValueError(f"expected a diffusers pipeline with a .transformer (an MMDiT such as SD3 or FLUX), got "
                             f"{type(pipeline).__name__}")
        self.adapter = get_adapter(transformer)  # raises, naming the supported transformers
        self.pipeline = pipeline
        self.prompt_encoder = prompt_encoder
        self.source = source
        self.revision = revision
        self.plan: CompressionPlan | None = None
        self.stats: CalibrationStats | None = None

    @classmethod
    def from_pretrained(cls, model, *, prompt_encoder=None, **load_kwargs) -> "DiTFastAttnOptimizer":
        """From a Hub model id, a local pipeline directory, an embedded model name (`ditfa_optimum.embedded`, e.g.
        "mini-mmdit"), or an already loaded pipeline.

        Ids and paths load with ``diffusers.DiffusionPipeline.from_pretrained(model, **load_kwargs)`` (e.g.
        ``torch_dtype=torch.bfloat16``; ``use_safetensors=True`` unless given: pickled weights are not read);
        ``HF_HUB_OFFLINE=1`` loads from the local cache only. Embedded models and
        saved miniature-model directories are built by the package and take ``torch_dtype`` only.

        Example:
            >>> opt = DiTFastAttnOptimizer.from_pretrained("stabilityai/stable-diffusion-3-medium-diffusers")  # doctest: +SKIP
        """
        if isinstance(model, (str, os.PathLike)):
            from diffusers import DiffusionPipeline

            from .embedded import EMBEDDED_MODELS, embedded_pipeline
            from .mini import is_mini_pipeline_dir, mini_pipeline

            embedded = os.fspath(model) in EMBEDDED_MODELS
            if embedded or is_mini_pipeline_dir(model):  # built from the package, or a pipeline class of ours
                kwargs = dict(load_kwargs)
                dtype = kwargs.pop("torch_dtype", kwargs.pop("dtype", None))
                if kwargs:
                    raise ValueError(f"{os.fspath(model)!r} loads with torch_dtype only, got {sorted(kwargs)}")
                if embedded:
                    pipeline, encoder = embedded_pipeline(os.fspath(model), torch_dtype=dtype)
                else:
                    pipeline, encoder = mini_pipeline(model, torch_dtype=dtype or torch.float32), None
                return cls(pipeline, prompt_encoder=prompt_encoder or encoder, source=os.fspath(model))

            from .serialization import offline_hint

            try:  # safetensors only unless asked: a pickled .bin is never unpickled by default
                pipeline = DiffusionPipeline.from_pretrained(os.fspath(model), **{"use_safetensors": True,
                                                                                  **load_kwargs})
            except (OSError, ValueError, EnvironmentError) as e:
                where = "the local directory" if Path(model).exists() else "the Hugging Face Hub id"
                raise ValueError(f"could not load a diffusers pipeline from {where} {os.fspath(model)!r}"
                                 f"{offline_hint()}: {e}") from e
            return cls(pipeline, prompt_encoder=prompt_encoder, source=os.fspath(model),
                       revision=load_kwargs.get("revision"))
        if load_kwargs:
            raise ValueError(f"load arguments {sorted(load_kwargs)} only apply when loading from an id or a path")
        return cls(model, prompt_encoder=prompt_encoder)

    def optimize(self, config: DiTFastAttnConfig | None = None, calibration_prompts: list[str] | None = None,
                 save_dir: str | os.PathLike | None = None, *, overwrite: bool = False,
                 progress: bool = True) -> CompressionPlan:
        """Calibrate on prompts, search the plan, and optionally save it.

        Args:
            config: target, candidate methods, steps, resolution, guidance, seed, cost model, batch size; None:
                `default_config` (the embedded models' own resolution and steps).
            calibration_prompts: captions to calibrate on; None = ``config.num_prompts`` built-in captions.
            save_dir: write the artifact there (`save_pretrained`); checked before calibrating
                (`ditfa_optimum.serialization.check_target`), so a path that cannot be written fails at once.
            overwrite: replace an existing artifact in ``save_dir`` (never anything else).
            progress: progress bars and the final summary on stderr.

        Returns:
            The `CompressionPlan` (also ``self.plan``; the statistics are ``self.stats``).
        """
        config = config or self.default_config()
        if not isinstance(config, DiTFastAttnConfig):
            raise ValueError(f"config must be a DiTFastAttnConfig, got {type(config).__name__}")
        if calibration_prompts is None:
            prompts = self.default_prompts(config.num_prompts, config.seed)
        else:
            prompts = check_prompts(calibration_prompts)
        if save_dir is not None:
            from .serialization import check_target

            check_target(save_dir, overwrite)  # before the long calibration, not after
        if config.quantize_linears == "fp8" and not fp8_linears.quantized_names(self.pipeline.transformer):
            # before calibrating: the plan is searched on the model users run (converted in place)
            fp8_linears.quantize(self.pipeline.transformer)
        self.stats = calibrate(self.pipeline, config, prompts, prompt_encoder=self.prompt_encoder, progress=progress)
        self.plan = search(self.stats, config)
        self.plan.metadata["search"]["base_model"] = self.source
        self.plan.metadata["search"]["prompts"] = list(prompts)
        if progress:
            import sys

            print(self.summary(), file=sys.stderr)
        if save_dir is not None:
            self.save_pretrained(save_dir, overwrite=overwrite)
        return self.plan

    def default_config(self) -> DiTFastAttnConfig:
        """The config `optimize` uses when given none: the library defaults, with the resolution, steps, CFG scale
        and mask block of the model where the package knows them (the embedded models and saved miniature models,
        as the CLI does); otherwise 1024x1024, 28 steps, the pipeline's CFG."""
        from .embedded import defaults_for

        d = defaults_for(self.source) if self.source is not None else None
        if d is None:
            return DiTFastAttnConfig()
        return DiTFastAttnConfig(num_inference_steps=d["steps"], height=d["size"], width=d["size"],
                                 guidance_scale=d["guidance"], block_size=d["block_size"])

    def default_prompts(self, n: int, seed: int) -> list[str]:
        """The calibration captions used when none are given: the pipeline's own (``pipeline.default_prompts``, e.g.
        the miniature model's shapes grammar) or the package's 40 built-in captions."""
        return getattr(self.pipeline, "default_prompts", default_prompts)(n, seed)

    def summary(self) -> str:
        if self.plan is None:
            return "DiTFastAttnOptimizer: no plan searched yet (call optimize)"
        info = self.plan.metadata["search"]
        counts = self.plan.method_counts()
        total = sum(counts.values())
        shares = ", ".join(f"{name} {n} ({n / total:.1%})" for name, n in sorted(counts.items(), key=lambda kv: -kv[1]))
        if info.get("allocation") == "trajectory":
            (kind, value), = info["target"].items()
            how = f"target {'cut' if kind == 'cut' else 'predicted SNR'} {value:g}{'' if kind == 'cut' else ' dB'}"
            quality = [f"predicted SNR of the final latents {info['predicted_snr_db']:.1f} dB"
                       if info.get("predicted_snr_db") is not None else "no error predicted"]
            if info.get("predicted_psnr_db") is not None:
                quality.append(f"image PSNR {info['predicted_psnr_db']:.1f} dB")
            checked = (info.get("selected_by_measurement") or {}).get("alternatives") or []
            kept = ("the error model's choice kept" if not checked or checked[0]["variant"] == info.get("variant")
                    else "kept one that changed their images at least 2x less than the error model's choice")
            how += ("\n  " + ", ".join(quality) + f" (error model scaled by {info.get('damage_scale', 1.0):.2g}"
                    + (f"; {len(checked)} candidate plans run on the calibration prompts, {kept}" if checked
                       else "") + "; predictions are estimates: docs/search.md)")
        else:
            how = f"threshold {info['threshold']:g} (local allocation)"
        whole = (f"  whole-transformer FLOPs skipped {info['whole_cut']:.1%}"
                 + (f"; steps skipped whole (step_taylor): {self.plan.skipped_steps}" if self.plan.skipped_steps
                    else "") + "\n") if info.get("whole_cut") is not None else ""
        return (f"ditfa: searched {len(self.plan.modules)} attention modules x {self.plan.num_steps} steps, {how}\n"
                f"{whole}"
                f"  attention FLOPs cut {info['flop_cut']:.1%} ({info['image_tokens']} image + {info['text_tokens']} "
                f"text tokens{', batched CFG' if info['cfg'] else ''})\n"
                f"  (module, step, head) entries: {shares}\n"
                f"  calibration {info['calibration_seconds']:.1f} s on {info['num_prompts']} prompts, "
                f"search {info['search_seconds']:.2f} s")

    def save_pretrained(self, directory: str | os.PathLike, *, overwrite: bool = False,
                        reproducibility_prompts: int = 2, self_contained: bool | None = None) -> Path:
        """Write the artifact: plan, config with checksums, model card, reproducibility record, and the transformer
        weights only where they differ from the base model's.

        Args:
            directory: the artifact directory (created; an empty one is used).
            overwrite: replace an existing ditfa artifact there, once the new one is complete. Anything else that is
                not empty is never replaced (see `ditfa_optimum.serialization.write_artifact` for the guarantees:
                one writer at a time, no window without a recoverable artifact).
            reproducibility_prompts: how many generations to record for `ditfa-optimum verify` (0: none).
            self_contained: None (default): refer to the base model's transformer files (pinned revision and
                sha256) and store only the tensors that differ from them (every tensor is compared with the base's
                files, read once: 4 GB for SD3-medium, 24 GB for FLUX.1-dev in bfloat16), or the whole transformer
                when the base has no files to refer to (a pipeline passed as an object). True: always store the whole transformer
                (air-gapped deployment; mind the base model's licence before publishing its weights). False: never.

        Under ``torchrun`` (several processes) rank 0 writes and every rank returns once it has.

        Example:
            >>> opt.save_pretrained("sd3-ditfa")          # doctest: +SKIP
        """
        from . import distributed

        return Path(distributed.from_rank0(lambda: str(self._save_pretrained(
            directory, overwrite=overwrite, reproducibility_prompts=reproducibility_prompts,
            self_contained=self_contained))))

    def _save_pretrained(self, directory, *, overwrite, reproducibility_prompts, self_contained) -> Path:
        from .apply import apply, get_runtime, remove
        from .runtime import get_backend
        from .serialization import EMBEDDED_MODELS, write_artifact
        from .verify import make_record

        if self.plan is None:
            raise ValueError("no plan to save yet; call optimize() first")
        info = self.plan.metadata.get("search", {})
        config = DiTFastAttnConfig.from_dict(info["config"]) if "config" in info else None
        encoder_record = None
        if self.prompt_encoder is not None:
            encoder_record = getattr(self.prompt_encoder, "record", lambda: None)()
            if encoder_record is None:
                logger.warning("ditfa: the prompt encoder has no record(); the artifact cannot rebuild it, so "
                               "load_pipeline users must encode prompts themselves")
        reproducibility = None
        if reproducibility_prompts and config is not None:
            prompts = list(info.get("prompts") or [])[:reproducibility_prompts]
            prompts += self.default_prompts(reproducibility_prompts, config.seed + 1)[len(prompts):]
            transformer = self.pipeline.transformer
            device = next(transformer.parameters()).device
            installed = get_runtime(self.pipeline) is not None
            runtime = None if installed else apply(self.pipeline, self.plan, backend=config.backend)
            try:
                backend = get_backend((runtime or get_runtime(self.pipeline)).backend_name, device).name
                reproducibility = make_record(self.pipeline, prompts, [1000 + i for i in range(len(prompts))],
                                              config.num_inference_steps, config.height, config.width,
                                              config.guidance_scale, self.prompt_encoder, backend)
            finally:
                if not installed:
                    remove(self.pipeline)
        base = {"id": self.source, "revision": self.revision, "embedded": self.source in EMBEDDED_MODELS}
        return write_artifact(directory, transformer=self.pipeline.transformer, plan=self.plan, base_model=base,
                              prompt_encoder=encoder_record, reproducibility=reproducibility, overwrite=overwrite,
                              self_contained=self_contained)

    def push_to_hub(self, repo_id: str, *, private: bool | None = None, token=None,
                    commit_message: str = "Upload ditfa-optimum artifact", reproducibility_prompts: int = 2,
                    self_contained: bool | None = None):
        """Save the artifact to a temporary directory and upload it as the Hub model repo ``repo_id``
        (`ditfa_optimum.serialization.push_artifact`; ``self_contained`` as in `save_pretrained`).

        Returns the `huggingface_hub.CommitInfo` of the upload.
        """
        import tempfile

        from . import distributed
        from .serialization import push_artifact

        def push():
            with tempfile.TemporaryDirectory() as tmp:
                folder = self._save_pretrained(Path(tmp) / "artifact", overwrite=False,
                                               reproducibility_prompts=reproducibility_prompts,
                                               self_contained=self_contained)
                return push_artifact(folder, repo_id, private=private, token=token, commit_message=commit_message)

        return distributed.from_rank0(push)  # under torchrun: one upload, by rank 0

    def save_plan(self, directory: str | os.PathLike, *, overwrite: bool = False) -> Path:
        """Write the plan (and the calibration statistics under ``calibration/``) into ``directory``; an existing plan
        there is replaced only with ``overwrite``, an artifact directory never. Under ``torchrun`` rank 0 writes."""
        from . import distributed
        from .serialization import check_plan_target

        if self.plan is None:
            raise ValueError("no plan to save yet; call optimize() first")

        def write() -> str:
            target = check_plan_target(directory, overwrite)
            self.plan.save(target)
            if self.stats is not None:
                self.stats.save(target / "calibration")
            return str(target)

        return Path(distributed.from_rank0(write))

    def apply(self, backend: str | None = None):
        """Run the searched plan in this optimizer's pipeline (see `ditfa_optimum.apply`)."""
        from .apply import apply

        if self.plan is None:
            raise ValueError("no plan to apply yet; call optimize() first")
        return apply(self.pipeline, self.plan, backend=backend)
