"""The model a training run optimises: base VLM with latent tokens, optional LoRA, and the IVT-LR engine around it."""
from __future__ import annotations

import logging

import torch
from torch import nn

from ivtlr.backbones import get_backbone, unwrap_peft
from ivtlr.config import Config
from ivtlr.data import latent_plan
from ivtlr.method.engine import IVTLR
from ivtlr.modeling import Components, apply_lora, build_engine, load_components

logger = logging.getLogger(__name__)


def build_training_model(config: Config) -> tuple[Components, IVTLR]:
    """Load the base model (``bf16`` -> bfloat16 weights), add LoRA when ``use_lora`` (the latent tokens' rows
    trainable), enable gradient checkpointing when asked, and wrap it in the engine."""
    dtype = torch.bfloat16 if config.bf16 else torch.float32
    components = load_components(config.model, dtype=dtype, image_size=config.image_size, seed=config.seed)
    if config.gradient_checkpointing:
        # Non-reentrant: the engine runs the decoder on embeddings it builds itself (no grad-requiring inputs).
        components.model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if config.use_lora:
        latent_ids = [components.start_latent_id, components.end_latent_id, components.latent_token_id]
        components.model = apply_lora(components.model, r=config.lora_r, alpha=config.lora_alpha,
                                      dropout=config.lora_dropout, target_modules=config.lora_target_modules,
                                      trainable_token_ids=latent_ids)
    engine = build_engine(components, num_selected_patches=config.num_selected_patches, mode=config.mode,
                          latent_grad=config.latent_grad, positions=config.positions, patch_order=config.patch_order,
                          vision_bottleneck=config.vision_bottleneck)
    trainable = sum(p.numel() for p in engine.parameters() if p.requires_grad)
    logger.info("%s: %d trainable parameters (%s)", config.model, trainable, "LoRA" if config.use_lora else "full")
    return components, engine.train()  # loaded models start in eval mode: no dropout, no gradient checkpointing


def fsdp_wrap_classes(model: nn.Module) -> list[str]:
    """Layer classes FSDP should shard one by one: the decoder layers the backbone runs, plus those of the
    model's ``_no_split_modules`` it really contains (Chameleon lists a layer class that chameleon-7b lacks)."""
    inner = unwrap_peft(model)
    present = {type(module).__name__ for module in inner.modules()}
    names = {type(layer).__name__ for layer in get_backbone(inner).decoder().layers}
    names.update(name for name in getattr(inner, "_no_split_modules", None) or [] if name in present)
    return sorted(names)


def latents_at_stage(config: Config, stage: int) -> int:
    """Latent slots per question at ``stage``: what evaluation of a checkpoint from that stage should use."""
    n_latent, _ = latent_plan(config.max_latent_stage, stage, config.max_latent_stage, config.pad_latent_to_max,
                              latents_per_step=config.latents_per_step, mode=config.mode)
    return n_latent
