"""Tiny Qwen3-VL: the real class at a few hundred thousand parameters, deepstack included, for offline tests."""
from __future__ import annotations

from transformers import (PreTrainedTokenizerFast, Qwen2VLImageProcessorPil, Qwen3VLConfig,
                          Qwen3VLForConditionalGeneration)

from ivtlr.backbones.qwen2_vl.tiny import (CHAT_TEMPLATE, SPECIAL_TOKENS, TOKEN_ROLES, qwen_vision_config,
                                         vision_token_ids)
from ivtlr.backbones.tiny_specs import TinySizes, TinySpec, qwen_style_text_config
from ivtlr.backbones.qwen3_vl.processor import ImageOnlyQwen3VLProcessor
from ivtlr.errors import UnsupportedModelSetting

PATCH_SIZE = 16
MERGE_SIZE = 2
DEFAULT_IMAGE_SIZE = 128  # 8x8 patches of 16 -> 4x4 = 16 merged visual tokens
#: Vision blocks whose outputs the decoder adds after its first layers: both of the tiny tower's two blocks, so
#: that two decoder layers get deepstack features (Qwen3-VL-8B: blocks 8, 16, 24 of 27 -> decoder layers 0, 1, 2).
DEEPSTACK_VISUAL_INDEXES = [0, 1]


def build_processor(tokenizer: PreTrainedTokenizerFast, image_size: int) -> ImageOnlyQwen3VLProcessor:
    """Every image is resized to about ``image_size``**2 pixels (default 128 -> 16 merged tokens)."""
    factor = PATCH_SIZE * MERGE_SIZE
    if image_size % factor:
        raise UnsupportedModelSetting(f"Qwen3-VL image_size must be a multiple of {factor}, got {image_size}")
    # Qwen3-VL checkpoints normalise with mean = std = 0.5 (Qwen2-VL's processor defaults are CLIP's).
    image_processor = Qwen2VLImageProcessorPil(min_pixels=image_size * image_size, max_pixels=image_size * image_size,
                                               patch_size=PATCH_SIZE, merge_size=MERGE_SIZE,
                                               image_mean=[0.5, 0.5, 0.5], image_std=[0.5, 0.5, 0.5])
    return ImageOnlyQwen3VLProcessor(image_processor, tokenizer, chat_template=CHAT_TEMPLATE)


def mrope_section(head_dim: int) -> list[int]:
    """Split head_dim/2 rotary frequencies into (time, height, width) as Qwen3-VL does ([24, 20, 20] of 64).

    Qwen3-VL interleaves them (frequency i goes to height if i % 3 == 1, width if i % 3 == 2, below 3 * section),
    so height and width take ``5/16`` of the frequencies each and time the rest."""
    half = head_dim // 2
    spatial = half * 5 // 16
    return [half - 2 * spatial, spatial, spatial]


def text_config(tokenizer: PreTrainedTokenizerFast, sizes: TinySizes) -> dict:
    head_dim = sizes.hidden_size // sizes.num_heads
    rope = {"rope_type": "default", "rope_theta": 5e6, "mrope_section": mrope_section(head_dim),
            "mrope_interleaved": True}
    return qwen_style_text_config(tokenizer, sizes, rope, head_dim=head_dim)


def build_config(tokenizer: PreTrainedTokenizerFast, sizes: TinySizes, image_size: int) -> Qwen3VLConfig:
    vision = qwen_vision_config(PATCH_SIZE, MERGE_SIZE, out_hidden_size=sizes.hidden_size, num_position_embeddings=64,
                                deepstack_visual_indexes=DEEPSTACK_VISUAL_INDEXES)
    return Qwen3VLConfig(text_config=text_config(tokenizer, sizes), vision_config=vision,
                         **vision_token_ids(tokenizer), tie_word_embeddings=False)


TINY = {"qwen3_vl": TinySpec(model_class=Qwen3VLForConditionalGeneration, special_tokens=SPECIAL_TOKENS,
                             token_roles=TOKEN_ROLES, chat_template=CHAT_TEMPLATE,
                             default_image_size=DEFAULT_IMAGE_SIZE, build_processor=build_processor,
                             build_config=build_config)}
