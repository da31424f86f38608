"""Tiny LLaVA-OneVision: the real class with a small SigLIP tower and Qwen2 decoder, for offline tests.

One anyres pinpoint, the vision tower's own size, makes every image two views (the base view and one tile), so
``pixel_values`` of different images always stack and a square image gives 2 x 16 patch tokens plus 4 newline rows.
"""
from __future__ import annotations

from transformers import (LlavaOnevisionConfig, LlavaOnevisionForConditionalGeneration, LlavaOnevisionImageProcessorPil,
                          PreTrainedTokenizerFast)

from ivtlr.backbones.tiny_specs import TinySizes, TinySpec, qwen_style_text_config, vision_tower_config
from ivtlr.backbones.llava_onevision.processor import ImageOnlyLlavaOnevisionProcessor
from ivtlr.errors import UnsupportedModelSetting

# Order fixes the ids (0, 1, 2, ...).
SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>", "<image>", "<video>")
TOKEN_ROLES = {"eos_token": "<|im_end|>", "pad_token": "<|endoftext|>"}
# The released checkpoints' layout: role, then every image, then each text on its own line
# ("<|im_start|>user <image>\nWhat?<|im_end|><|im_start|>assistant\n").
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + ' ' }}"
    "{% if message['content'] is string %}{{ '\\n' + message['content'] }}"
    "{% else %}"
    "{% for item in message['content'] | selectattr('type', 'equalto', 'image') %}{{ '<image>' }}{% endfor %}"
    "{% for item in message['content'] | selectattr('type', 'equalto', 'text') %}{{ '\\n' + item['text'] }}"
    "{% endfor %}"
    "{% endif %}"
    "{{ '<|im_end|>' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
PATCH_SIZE = 14
DEFAULT_IMAGE_SIZE = 56  # 4x4 patches per view
ASPECT_RATIO = "anyres_max_9"  # the released checkpoints' setting; one pinpoint never reaches its limit


def build_processor(tokenizer: PreTrainedTokenizerFast, image_size: int) -> ImageOnlyLlavaOnevisionProcessor:
    """Views of ``image_size`` pixels and a single anyres pinpoint of that size (default 56 -> 4x4 patches)."""
    if image_size % PATCH_SIZE:
        raise UnsupportedModelSetting(f"LLaVA-OneVision image_size must be a multiple of {PATCH_SIZE}, "
                                      f"got {image_size}")
    image_processor = LlavaOnevisionImageProcessorPil(size={"height": image_size, "width": image_size},
                                                      image_grid_pinpoints=[[image_size, image_size]])
    return ImageOnlyLlavaOnevisionProcessor(image_processor, tokenizer,
                                            num_image_tokens=(image_size // PATCH_SIZE) ** 2,
                                            vision_feature_select_strategy="full", chat_template=CHAT_TEMPLATE,
                                            vision_aspect_ratio=ASPECT_RATIO)


def text_config(tokenizer: PreTrainedTokenizerFast, sizes: TinySizes) -> dict:
    return qwen_style_text_config(tokenizer, sizes, {"rope_type": "default", "rope_theta": 1e6}, model_type="qwen2")


def build_config(tokenizer: PreTrainedTokenizerFast, sizes: TinySizes, image_size: int) -> LlavaOnevisionConfig:
    vision = vision_tower_config(PATCH_SIZE, model_type="siglip_vision_model", image_size=image_size,
                                 vision_use_head=False)
    token_id = tokenizer.convert_tokens_to_ids
    return LlavaOnevisionConfig(
        text_config=text_config(tokenizer, sizes),
        vision_config=vision,
        image_token_index=token_id("<image>"),
        video_token_index=token_id("<video>"),
        vision_feature_select_strategy="full",  # SigLIP has no CLS token: every patch is a feature
        vision_feature_layer=-1,
        image_grid_pinpoints=[[image_size, image_size]],
        vision_aspect_ratio=ASPECT_RATIO,
        tie_word_embeddings=False,
    )


TINY = {"llava_onevision": TinySpec(model_class=LlavaOnevisionForConditionalGeneration,
                                    special_tokens=SPECIAL_TOKENS, token_roles=TOKEN_ROLES,
                                    chat_template=CHAT_TEMPLATE, default_image_size=DEFAULT_IMAGE_SIZE,
                                    build_processor=build_processor, build_config=build_config)}
