"""The one door to a model: :func:`load` takes a hub id, a model directory, a ``tiny:<family>`` name, an ivtlr
checkpoint directory or an original release's ``.pth`` (with ``base=``) and returns a :class:`LoadedModel`.

Whatever the source, the result is the same bundle — the engine with the tokenizer and processor that agree with it,
the latent token id, the mode it realises and the settings it was trained with — so ``ivtlr eval``, ``infer``,
``probe``, the demo and a user's script never need to know where a model came from. (Training builds its trainable
model from the same :func:`~ivtlr.modeling.load_components`, adding LoRA before the engine is built.)
"""
from __future__ import annotations

import dataclasses
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from transformers import AutoConfig

from ivtlr.backbones import load_processor
from ivtlr.checkpoint import META_FILE, CheckpointError, CheckpointMeta, load_weights, verify_checkpoint
from ivtlr.config import Config
from ivtlr.errors import UserError
from ivtlr.method.engine import IVTLR
from ivtlr.modeling import LATENT_TOKENS, Components, build_engine, engine_options, load_components, model_source
from ivtlr.modes import NO_LATENT_MODES, Mode
from ivtlr.original import OriginalCheckpointError

logger = logging.getLogger(__name__)

#: The original's number of latent steps at inference, used when nothing else says how many.
DEFAULT_N_LATENT = 3


@dataclass
class LoadedModel:
    """An engine ready to generate, with what the prompts and the latent steps must agree with."""

    engine: IVTLR
    tokenizer: Any
    processor: Any
    mode: Mode
    trained_n_latent: int | None  # latent steps of the final training stage, when the source records it
    image_size: int | None  # the square side the model was trained at, when known
    source: str  # where the weights came from, for logs and summaries
    base_model: str  # the model the weights were trained from (hub id, directory or tiny:<family>)
    #: what the weights were trained with (a checkpoint's ``ivtlr.json`` fields; for other sources, what was asked)
    settings: dict[str, Any] = field(default_factory=dict)

    @property
    def latent_token_id(self) -> int:
        """Id of ``<|latent|>``: put ``n`` of them between ``<|start-latent|>`` and ``<|end-latent|>``."""
        return self.engine.latent_token_id

    @property
    def device(self) -> torch.device:
        return next(self.engine.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.engine.parameters()).dtype

    def place(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """``batch`` (processor outputs) on the model's device, floating inputs (pixels) in its dtype."""
        return place_batch(batch, self.engine)

    def n_latent(self, requested: int | None, fallback: int = DEFAULT_N_LATENT) -> int:
        """Latent steps at inference: none for No-CoT / CoT; else ``requested``, else the final training stage."""
        if self.mode in NO_LATENT_MODES:
            if requested:
                logger.warning("mode %s answers without latent steps: ignoring n_latent=%d", self.mode, requested)
            return 0
        if requested is not None:
            if self.trained_n_latent is not None and requested > self.trained_n_latent:
                # Allowed (how accuracy extrapolates is a fair question), but never unannounced: the extra steps
                # feed back states the model never learnt to read.
                logger.warning("%d latent steps requested, but %s was trained with at most %d: the steps beyond %d "
                               "are untrained", requested, self.source, self.trained_n_latent,
                               self.trained_n_latent)
            return requested
        return self.trained_n_latent if self.trained_n_latent is not None else fallback


def place_batch(batch: dict[str, torch.Tensor], model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """``batch`` (processor outputs) on ``model``'s device, floating inputs (pixels) in its dtype."""
    parameter = next(model.parameters())
    return {key: value.to(parameter.device, parameter.dtype) if value.is_floating_point()
            else value.to(parameter.device) for key, value in batch.items()}


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def resolve_device(name: str | None) -> torch.device:
    """The ``--device`` asked for (:func:`~ivtlr.evaluation.arguments.add_device_argument`), else
    :func:`default_device`."""
    return torch.device(name) if name else default_device()


class ModelLoadError(UserError, ValueError):
    """A source that names no usable weights: an unreachable base, a refused or foreign state dict."""


def load(source: str | os.PathLike, *, base: str | os.PathLike | None = None, mode: Mode | None = None,
         num_selected_patches: int | None = None, image_size: int | None = None, device: str | torch.device | None =
         None, dtype: torch.dtype = torch.float32, seed: int = 0, **engine_settings: Any) -> LoadedModel:
    """Load a model for answering, in eval mode, on ``device`` (default: cuda if available, else cpu).

    ``source`` is one of
    - an ivtlr checkpoint directory (holding ``ivtlr.json``): everything it was trained with is read from it, and
      ``mode``, K and ``image_size`` may not be given;
    - an original release's state dict (a file; ``base=`` names the model it was trained from): it records neither
      mode nor K, so ``mode`` (default ``ivtlr``), ``num_selected_patches`` and ``image_size`` say them;
    - a hub id, a model directory or ``tiny:<family>``: the base model untrained for IVT-LR, with the latent tokens
      added (zero-shot baselines, smoke runs); ``engine_settings`` are further :class:`IVTLR` options
      (``positions``, ``patch_order``, ``vision_bottleneck``).
    """
    device = resolve_device(str(device) if device is not None else None)
    path = Path(source)
    if (path / META_FILE).is_file():
        asked = {"base": base, "mode": mode, "num_selected_patches": num_selected_patches, "image_size": image_size,
                 **engine_settings}
        given = sorted(name for name, value in asked.items() if value is not None)
        if given:
            raise ModelLoadError(f"{path} is an ivtlr checkpoint: it records {', '.join(given)} itself; leave them out")
        return load_checkpoint_model(path, device, dtype)
    if path.is_file() or base is not None:
        if base is None:
            raise ModelLoadError(f"{path} is a file: an original release's state dict needs base= (the model it "
                                 "was trained from)")
        return load_original_model(path, base, mode=mode or "ivtlr", num_selected_patches=num_selected_patches,
                                   image_size=image_size, device=device, dtype=dtype)
    return load_base_model(str(source), mode=mode or "ivtlr", num_selected_patches=num_selected_patches,
                           image_size=image_size, device=device, dtype=dtype, seed=seed, **engine_settings)


def load_checkpoint(path: str | os.PathLike, *, dtype: torch.dtype = torch.float32,
                    attn_implementation: str = "sdpa") -> tuple[IVTLR, Components, CheckpointMeta]:
    """Rebuild the trained engine from a checkpoint directory alone, in eval mode.

    The base model is loaded from its recorded name (a base from a model source such as ``tiny:`` is rebuilt from
    its recorded seed and image size), the latent tokens added, then the adapter or full weights loaded; the
    processor is the checkpoint's own. A full-weights checkpoint of a real model is loaded directly from the
    directory.
    """
    from peft import PeftModel

    path = Path(path)
    meta = verify_checkpoint(path)
    if meta.weights == "full" and model_source(meta.base_model)[0] is None:
        components = load_components(str(path), dtype=dtype, attn_implementation=attn_implementation)
    else:
        components = load_components(meta.base_model, dtype=dtype, attn_implementation=attn_implementation,
                                     image_size=meta.image_size, seed=meta.base_seed)
        if meta.weights == "lora":
            components.model = PeftModel.from_pretrained(components.model, str(path))
        else:
            load_weights(components.model, path, meta)
    components.processor = load_processor(str(path), meta.model_type)
    components.tokenizer = components.processor.tokenizer
    found = (components.latent_token_id, components.start_latent_id, components.end_latent_id)
    expected = (meta.latent_token_id, meta.start_latent_id, meta.end_latent_id)
    if found != expected:
        raise CheckpointError(f"latent token ids {found} of the rebuilt model differ from {expected} in "
                              f"{path / META_FILE}")
    engine = build_engine(components, num_selected_patches=meta.num_selected_patches, mode=meta.mode,
                          positions=meta.positions, patch_order=meta.patch_order,
                          vision_bottleneck=meta.vision_bottleneck)
    return engine.eval(), components, meta


def load_checkpoint_model(directory: str | Path, device: torch.device, dtype: torch.dtype = torch.float32
                          ) -> LoadedModel:
    """A checkpoint written by ``ivtlr train``; its ``ivtlr.json`` says the mode, final stage and image size."""
    engine, components, meta = load_checkpoint(directory, dtype=dtype)
    engine.to(device)
    settings = {key: value for key, value in dataclasses.asdict(meta).items() if key != "files"}
    return LoadedModel(engine=engine, tokenizer=components.tokenizer, processor=components.processor,
                       mode=meta.mode, trained_n_latent=meta.n_latent, image_size=meta.image_size,
                       source=f"checkpoint {directory}", base_model=meta.base_model, settings=settings)


def load_original_model(state_dict: str | Path, base: str | Path, *, mode: Mode = "ivtlr",
                        num_selected_patches: int | None = None, image_size: int | None = None,
                        device: torch.device, dtype: torch.dtype = torch.float32) -> LoadedModel:
    """A checkpoint in the original release format (the wrapper's state dict) over its base model.

    The latent tokens are added to the base model's tokenizer the way the original does (plain tokens, in its
    order), so their ids are the ones the checkpoint was trained with; the weights are not touched.
    """
    try:
        model_type = AutoConfig.from_pretrained(base).model_type
    except (OSError, ValueError) as error:  # no such directory or hub repository, or no model config in it
        raise ModelLoadError(f"cannot load the base model {base} (--base): it is not a local model directory and the "
                             f"Hugging Face hub could not provide it ({type(error).__name__}: {_telling_line(error)})"
                             ) from error
    processor = load_processor(str(base), model_type)
    tokenizer = processor.tokenizer
    missing = [token for token in LATENT_TOKENS if token not in tokenizer.get_vocab()]
    if missing:
        tokenizer.add_tokens(missing)
    options: dict[str, Any] = {"num_selected_patches": num_selected_patches, **engine_options(mode)}
    try:
        engine = IVTLR.from_original(base, state_dict, tokenizer=tokenizer, attn_implementation="sdpa", dtype=dtype,
                                     pad_token_id=_pad_token_id(tokenizer), **options)
    except OriginalCheckpointError as error:  # a refused pickle, a damaged file, weights of another model
        raise ModelLoadError(f"--original {state_dict}: {_telling_line(error)}") from error
    embedding_rows = engine.backbone.input_embeddings().weight.shape[0]
    if len(tokenizer) > embedding_rows:
        raise ModelLoadError(f"the tokenizer of {base} has {len(tokenizer)} tokens but the checkpoint only "
                             f"{embedding_rows} embedding rows: it was not trained with this tokenizer")
    engine.to(device).eval()
    settings = {"mode": mode, "num_selected_patches": engine.num_selected_patches, "image_size": image_size,
                "base_model": str(base)}
    return LoadedModel(engine=engine, tokenizer=tokenizer, processor=processor, mode=mode, trained_n_latent=None,
                       image_size=image_size, source=f"original {state_dict} over {base}", base_model=str(base),
                       settings=settings)


def load_base_model(name: str, *, mode: Mode = "ivtlr", num_selected_patches: int | None = None,
                    image_size: int | None = None, device: torch.device, dtype: torch.dtype = torch.float32,
                    seed: int = 0, **engine_settings: Any) -> LoadedModel:
    """``name`` as it is, untrained for IVT-LR (latent tokens added): zero-shot baselines and smoke runs."""
    components = load_components(name, dtype=dtype, image_size=image_size, seed=seed)
    engine = build_engine(components, num_selected_patches=num_selected_patches, mode=mode, **engine_settings)
    engine.to(device).eval()
    settings = {"mode": mode, "num_selected_patches": engine.num_selected_patches, "image_size": image_size,
                "base_model": name, **engine_settings}
    return LoadedModel(engine=engine, tokenizer=components.tokenizer, processor=components.processor, mode=mode,
                       trained_n_latent=None, image_size=image_size,
                       source=f"model {name} (no IVT-LR checkpoint)", base_model=name, settings=settings)


def load_config_model(config: Config, device: torch.device, dtype: torch.dtype = torch.float32) -> LoadedModel:
    """``config.model`` as it is, in the config's mode and settings, untrained for IVT-LR."""
    return load_base_model(config.model, mode=config.mode, num_selected_patches=config.num_selected_patches,
                           image_size=config.image_size, device=device, dtype=dtype, seed=config.seed,
                           positions=config.positions, patch_order=config.patch_order,
                           vision_bottleneck=config.vision_bottleneck)


def _telling_line(error: BaseException) -> str:
    """The line of a multi-line library error that names the problem (for a refused pickle, the global it named)."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    named = [line for line in lines if "unsupported global" in line.lower()]
    return (named or lines or [type(error).__name__])[0]


def _pad_token_id(tokenizer) -> int:
    return tokenizer.eos_token_id if tokenizer.pad_token_id is None else tokenizer.pad_token_id
