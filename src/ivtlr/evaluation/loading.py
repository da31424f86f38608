"""The model that ``ivtlr eval`` and ``ivtlr infer`` run: from an ivtlr checkpoint, an original release, or a config.

Whatever the source, the result is the same bundle — the engine with the tokenizer and processor that agree with it,
the mode it realises, and what the training run recorded about latent steps and image size — so the evaluation
harness and the single-question command never need to know where a model came from.
"""
from __future__ import annotations

import argparse
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from transformers import AutoConfig

from ..config import Config
from ..modes import NO_LATENT_MODES, Mode
from ..engine import IVTLR
from ..modeling import LATENT_TOKENS, build_engine, engine_options, load_components
from ..backbones import load_processor
from ..original import OriginalCheckpointError
from .arguments import ModelArgumentError, check_model_arguments

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

    @property
    def device(self) -> torch.device:
        return next(self.engine.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.engine.parameters()).dtype

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


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def resolve_device(name: str | None) -> torch.device:
    """The ``--device`` asked for (:func:`~ivtlr.evaluation.arguments.add_device_argument`), else
    :func:`default_device`."""
    return torch.device(name) if name else default_device()


def load_checkpoint_model(directory: str | Path, device: torch.device, dtype: torch.dtype = torch.float32
                          ) -> LoadedModel:
    """A checkpoint written by ``ivtlr train``; its ``ivtlr.json`` says the mode, final stage and image size."""
    from ..checkpoint import load_checkpoint

    engine, components, meta = load_checkpoint(directory, dtype=dtype)
    engine.to(device)
    return LoadedModel(engine=engine, tokenizer=components.tokenizer, processor=components.processor,
                       mode=meta.mode, trained_n_latent=meta.n_latent, image_size=meta.image_size,
                       source=f"checkpoint {directory}", base_model=meta.base_model)


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
        raise ModelArgumentError(f"cannot load --base {base}: it is not a local model directory and the Hugging "
                                 f"Face hub could not provide it ({type(error).__name__}: {_telling_line(error)})"
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
        raise ModelArgumentError(f"--original {state_dict}: {_telling_line(error)}") from error
    embedding_rows = engine.backbone.input_embeddings().weight.shape[0]
    if len(tokenizer) > embedding_rows:
        raise ModelArgumentError(f"the tokenizer of {base} has {len(tokenizer)} tokens but the checkpoint only "
                                 f"{embedding_rows} embedding rows: it was not trained with this tokenizer")
    engine.to(device).eval()
    return LoadedModel(engine=engine, tokenizer=tokenizer, processor=processor, mode=mode, trained_n_latent=None,
                       image_size=image_size, source=f"original {state_dict} over {base}", base_model=str(base))


def load_config_model(config: Config, device: torch.device, dtype: torch.dtype = torch.float32) -> LoadedModel:
    """``config.model`` as it is, untrained for IVT-LR: zero-shot baselines and smoke runs."""
    components = load_components(config.model, dtype=dtype, image_size=config.image_size, seed=config.seed)
    engine = build_engine(components, num_selected_patches=config.num_selected_patches, mode=config.mode,
                          positions=config.positions, patch_order=config.patch_order,
                          vision_bottleneck=config.vision_bottleneck)
    engine.to(device).eval()
    return LoadedModel(engine=engine, tokenizer=components.tokenizer, processor=components.processor,
                       mode=config.mode, trained_n_latent=None, image_size=config.image_size,
                       source=f"model {config.model} (no IVT-LR checkpoint)", base_model=config.model)


def load_requested_model(args: argparse.Namespace, device: torch.device, *, mode: Mode,
                         num_selected_patches: int | None, image_size: int | None,
                         dtype: torch.dtype = torch.float32) -> LoadedModel:
    """The model ``--checkpoint`` or ``--original``/``--base`` names (one of them must be given).

    ``mode``, ``num_selected_patches`` and ``image_size`` apply to an ``--original`` checkpoint only, which does
    not record them; each command fills them from its own options.
    """
    if args.checkpoint is not None:
        return load_checkpoint_model(args.checkpoint, device, dtype)
    check_model_arguments(args)
    return load_original_model(args.original, args.base, mode=mode, num_selected_patches=num_selected_patches,
                               image_size=image_size, device=device, dtype=dtype)


def _telling_line(error: BaseException) -> str:
    """The line of a multi-line library error that names the problem (for a refused pickle, the global it named)."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    named = [line for line in lines if "unsupported global" in line.lower()]
    return (named or lines or [type(error).__name__])[0]


def _pad_token_id(tokenizer) -> int:
    return tokenizer.eos_token_id if tokenizer.pad_token_id is None else tokenizer.pad_token_id
