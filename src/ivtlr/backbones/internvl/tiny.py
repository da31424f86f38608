"""Tiny InternVL: the real class (InternViT tower, pixel-shuffle projector, Qwen3 decoder) at a few hundred thousand
parameters, for offline tests. The default 112-px tile gives 8x8 patches of 14 -> 4x4 = 16 image tokens."""
from __future__ import annotations

from transformers import (GotOcr2ImageProcessorPil, InternVLConfig, InternVLForConditionalGeneration,
                          PreTrainedTokenizerFast)

from ivtlr.backbones.tiny_specs import TinySizes, TinySpec, qwen_style_text_config, vision_tower_config
from ivtlr.backbones.internvl.processor import ImageOnlyInternVLProcessor
from ivtlr.errors import UnsupportedModelSetting

# Order fixes the ids (0, 1, 2, ...).
SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>", "<img>", "</img>", "<IMG_CONTEXT>", "<video>")
# The image tokens are named as in the released tokenizers (InternVLProcessor reads these names), in the order
# tokenizer_config.json stores them, so a saved and reloaded tokenizer lists its special tokens in the same order.
TOKEN_ROLES = {"eos_token": "<|im_end|>", "pad_token": "<|endoftext|>", "context_image_token": "<IMG_CONTEXT>",
               "end_image_token": "</img>", "start_image_token": "<img>", "video_token": "<video>"}
# As the released "-hf" template: `<IMG_CONTEXT>` marks the image; the processor expands it into
# `<img>` + one `<IMG_CONTEXT>` per image token + `</img>`.
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for item in message['content'] %}"
    "{% if item['type'] == 'image' %}<IMG_CONTEXT>\n"
    "{% elif item['type'] == 'video' %}<video>\n"
    "{% elif item['type'] == 'text' %}{{ item['text'] }}{% endif %}"
    "{% endfor %}{% endif %}"
    "<|im_end|>\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
PATCH_SIZE = 14
DOWNSAMPLE_RATIO = 0.5  # pixel shuffle: 2x2 patches -> one image token
DEFAULT_IMAGE_SIZE = 112
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)  # as InternVL's image processor


def tokens_per_tile(image_size: int) -> int:
    side = image_size // PATCH_SIZE
    return int(side * side * DOWNSAMPLE_RATIO**2)


def build_processor(tokenizer: PreTrainedTokenizerFast, image_size: int) -> ImageOnlyInternVLProcessor:
    """Every image becomes one ``image_size`` tile (default 112 -> 16 image tokens)."""
    factor = int(PATCH_SIZE / DOWNSAMPLE_RATIO)
    if image_size % factor:
        raise UnsupportedModelSetting(f"InternVL image_size must be a multiple of {factor}, got {image_size}")
    image_processor = GotOcr2ImageProcessorPil(size={"height": image_size, "width": image_size},
                                               image_mean=list(IMAGENET_MEAN), image_std=list(IMAGENET_STD))
    return ImageOnlyInternVLProcessor(image_processor, tokenizer, image_seq_length=tokens_per_tile(image_size),
                                      chat_template=CHAT_TEMPLATE)


def text_config(tokenizer: PreTrainedTokenizerFast, sizes: TinySizes, model_type: str) -> dict:
    """A Qwen3 (InternVL3.5) or Qwen2 (InternVL3) decoder."""
    return qwen_style_text_config(tokenizer, sizes, {"rope_type": "default", "rope_theta": 1e6},
                                  model_type=model_type, head_dim=sizes.hidden_size // sizes.num_heads,
                                  tie_word_embeddings=False)


def build_config(tokenizer: PreTrainedTokenizerFast, sizes: TinySizes, image_size: int,
                 text_model_type: str = "qwen3") -> InternVLConfig:
    return InternVLConfig(
        vision_config=vision_tower_config(PATCH_SIZE, image_size=image_size, intermediate_size=128),  # MLP 4 x 32
        text_config=text_config(tokenizer, sizes, text_model_type),
        image_token_id=tokenizer.convert_tokens_to_ids("<IMG_CONTEXT>"),
        image_seq_length=tokens_per_tile(image_size),
        downsample_ratio=DOWNSAMPLE_RATIO,
        tie_word_embeddings=False,
    )


TINY = {"internvl": TinySpec(model_class=InternVLForConditionalGeneration, special_tokens=SPECIAL_TOKENS,
                             token_roles=TOKEN_ROLES, chat_template=CHAT_TEMPLATE,
                             default_image_size=DEFAULT_IMAGE_SIZE, build_processor=build_processor,
                             build_config=build_config)}
