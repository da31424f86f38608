"""Building what a run needs: the VLM, its tokenizer and processor, the latent tokens, LoRA, and the engine.

Models are named by hub id, local directory, or ``source:argument`` for a registered model source (``tiny:<model
type>``: the tiny random models of ``ivtlr.testing``, for tests, the demo and smoke runs). Nothing here is
family-specific beyond what the backbone adapters expose.
"""
from __future__ import annotations

import importlib
import importlib.metadata
import logging
import re
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn
from transformers import AutoConfig, AutoModelForImageTextToText

from ivtlr.backbones import backbone_class_for, load_processor, unwrap_peft
from ivtlr.method.engine import IVTLR
from ivtlr.errors import UserError
from ivtlr.modes import mode_spec

logger = logging.getLogger(__name__)

#: Entry-point group of model-source plugins: ``name = "module:function"``, called as ``function(argument,
#: **options)`` and returning (model, tokenizer, processor).
MODEL_SOURCES_GROUP = "ivtlr.model_sources"
#: Model sources that ship with ivtlr, loaded by name only when a config asks for them (the opt-in testing package
#: is never imported otherwise).
BUILTIN_MODEL_SOURCES = {"tiny": "ivtlr.testing.tiny:load_tiny_components"}
LATENT_TOKENS = ("<|start-latent|>", "<|end-latent|>", "<|latent|>")  # the original adds them in this order
#: Tokens whose rows initialise the new latent tokens (the first one the tokenizer knows is used).
INIT_TOKEN_CANDIDATES = ("<<", "<|endoftext|>")


@dataclass
class Components:
    """A model with the tokenizer and processor that agree with it."""

    model: nn.Module
    tokenizer: object
    processor: object
    model_type: str
    latent_token_id: int
    start_latent_id: int
    end_latent_id: int

    @property
    def eos_token_id(self) -> int:
        return self.tokenizer.eos_token_id

    @property
    def pad_token_id(self) -> int:
        pad = self.tokenizer.pad_token_id
        return self.tokenizer.eos_token_id if pad is None else pad


def load_components(name: str, *, dtype: torch.dtype = torch.float32, attn_implementation: str = "sdpa",
                    image_size: int | None = None, tiny_options: dict | None = None, seed: int = 0) -> Components:
    """Load a model, tokenizer and processor by hub id or directory (or from a registered model source such as
    ``tiny:<model_type>``), with the latent tokens added."""
    source, argument = model_source(name)
    if source is not None:
        model, tokenizer, processor = source(argument, attn_implementation=attn_implementation, seed=seed,
                                             image_size=image_size, dtype=dtype, **(tiny_options or {}))
    else:
        try:
            config = AutoConfig.from_pretrained(name)
        except OSError as error:  # not a directory, and the hub unreachable or without such a repository
            raise ModelNotFound(f"cannot load the model {name!r}: it is not a local model directory and the Hugging "
                                f"Face hub could not provide it ({error.__class__.__name__}: {first_line(error)}). "
                                "Connect, or set model: to a local directory") from error
        try:
            backbone_class_for(config.model_type)  # fail early, naming the supported families
        except ValueError as error:
            raise ModelNotFound(f"{name}: {error}") from error
        processor = load_processor(name, config.model_type)
        tokenizer = processor.tokenizer
        model = AutoModelForImageTextToText.from_pretrained(name, dtype=dtype,
                                                            attn_implementation=attn_implementation)
    start_id, end_id, latent_id = add_latent_tokens(tokenizer, model)
    return Components(model=model, tokenizer=tokenizer, processor=processor, model_type=model.config.model_type,
                      latent_token_id=latent_id, start_latent_id=start_id, end_latent_id=end_id)


class ModelNotFound(UserError):
    """A model name that names no loadable, supported model."""


def first_line(error: BaseException) -> str:
    return str(error).strip().splitlines()[0] if str(error).strip() else ""


def model_source(name: str) -> tuple[Callable | None, str]:
    """``prefix:argument`` names a model built by a model source: one of :data:`BUILTIN_MODEL_SOURCES` or a plugin
    registered under the ``ivtlr.model_sources`` entry-point group; anything else is a hub id or a directory."""
    prefix, colon, argument = name.partition(":")
    if not colon:
        return None, name
    if prefix in BUILTIN_MODEL_SOURCES:
        module, _, function = BUILTIN_MODEL_SOURCES[prefix].partition(":")
        return getattr(importlib.import_module(module), function), argument
    for entry_point in importlib.metadata.entry_points(group=MODEL_SOURCES_GROUP):
        if entry_point.name == prefix:
            return entry_point.load(), argument
    return None, name


def add_latent_tokens(tokenizer, model: nn.Module) -> tuple[int, int, int]:
    """Add ``<|start-latent|>``, ``<|end-latent|>``, ``<|latent|>`` where missing and give new ones real rows.

    New rows (input embedding and output projection) start as copies of an existing token's rows — the original
    meant to do this but copied a row onto itself.
    """
    missing = [t for t in LATENT_TOKENS if t not in tokenizer.get_vocab()]
    if missing:
        tokenizer.add_special_tokens({"additional_special_tokens": missing}, replace_extra_special_tokens=False)
    ids = tuple(tokenizer.convert_tokens_to_ids(t) for t in LATENT_TOKENS)
    rows = model.get_input_embeddings().weight.shape[0]
    if max(ids) >= rows:
        model.resize_token_embeddings(max(ids) + 1, mean_resizing=False)
    if missing:
        vocab = tokenizer.get_vocab()
        source = next((vocab[t] for t in INIT_TOKEN_CANDIDATES if t in vocab), tokenizer.eos_token_id)
        new_ids = [tokenizer.convert_tokens_to_ids(t) for t in missing]
        with torch.no_grad():
            for weight in {id(w): w for w in (model.get_input_embeddings().weight,
                                               model.get_output_embeddings().weight)}.values():
                weight[new_ids] = weight[source].clone()
        logger.info("added %s (ids %s), rows initialised from token id %d", missing, new_ids, source)
    return ids


def language_model_target_regex(model: nn.Module, target_modules: list[str]) -> str:
    """A PEFT ``target_modules`` regex matching the named projections of the language model only (the vision
    tower of some families has modules with the same names)."""
    backbone = backbone_class_for(unwrap_peft(model).config.model_type)(model)
    prefix = next(n for n, m in unwrap_peft(model).named_modules() if m is backbone.decoder())
    names = "|".join(re.escape(t) for t in target_modules)
    return rf"^{re.escape(prefix)}\.layers\.\d+\..*\b({names})$"


def apply_lora(model: nn.Module, *, r: int, alpha: float, dropout: float, target_modules: list[str],
               trainable_token_ids: list[int]) -> nn.Module:
    """Wrap with PEFT LoRA on the language model; the latent tokens' input and output rows stay trainable."""
    from peft import LoraConfig, get_peft_model

    tokens = {"embed_tokens": list(trainable_token_ids), "lm_head": list(trainable_token_ids)}
    config = LoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout, bias="none",
                        target_modules=language_model_target_regex(model, target_modules),
                        trainable_token_indices=tokens)
    peft_model = get_peft_model(model, config)
    trainable = sum(p.numel() for p in peft_model.parameters() if p.requires_grad)
    logger.info("LoRA r=%d alpha=%s on %s: %d trainable parameters", r, alpha, target_modules, trainable)
    return peft_model


def engine_options(mode: str) -> dict:
    """IVTLR options that realise a training / evaluation mode (the paper's baselines and ablations)."""
    return dict(mode_spec(mode).engine_options)


def build_engine(components: Components, *, num_selected_patches: int | None = None, mode: str = "ivtlr",
                 **options) -> IVTLR:
    """The IVT-LR engine around ``components.model`` for a mode (ivtlr, cot, nocot, ablations)."""
    kwargs = {"num_selected_patches": num_selected_patches, **options, **engine_options(mode)}
    return IVTLR(components.model, components.latent_token_id, eos_token_id=components.eos_token_id,
                 pad_token_id=components.pad_token_id, start_latent_id=components.start_latent_id,
                 end_latent_id=components.end_latent_id, **kwargs)
