"""Tiny Qwen2-VL and Qwen2.5-VL: the real classes at a few hundred thousand parameters, for offline tests."""
from __future__ import annotations

from functools import partial

from transformers import (PreTrainedTokenizerFast, Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration, Qwen2VLConfig,
                          Qwen2VLForConditionalGeneration, Qwen2VLImageProcessorPil)

from ivtlr.backbones.tiny_specs import (TinySizes, TinySpec, VisionKeys, qwen_style_text_config,
                                        vision_tower_config)
from ivtlr.backbones.qwen2_vl.processor import ImageOnlyQwen2VLProcessor
from ivtlr.errors import UnsupportedModelSetting

# Order fixes the ids (0, 1, 2, ...), matching the layout of the original-code fixtures.
SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>",
                  "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>")
TOKEN_ROLES = {"eos_token": "<|im_end|>", "pad_token": "<|endoftext|>"}
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for item in message['content'] %}"
    "{% if item['type'] == 'image' %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif item['type'] == 'text' %}{{ item['text'] }}{% endif %}"
    "{% endfor %}{% endif %}"
    "<|im_end|>\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
PATCH_SIZE = 14
MERGE_SIZE = 2
DEFAULT_IMAGE_SIZE = 112  # 8x8 patches of 14 -> 4x4 = 16 merged visual tokens


def build_processor(tokenizer: PreTrainedTokenizerFast, image_size: int) -> ImageOnlyQwen2VLProcessor:
    """Every image is resized to about ``image_size``**2 pixels (default 112 -> 16 merged tokens)."""
    factor = PATCH_SIZE * MERGE_SIZE
    if image_size % factor:
        raise UnsupportedModelSetting(f"Qwen image_size must be a multiple of {factor}, got {image_size}")
    image_processor = Qwen2VLImageProcessorPil(min_pixels=image_size * image_size, max_pixels=image_size * image_size,
                                               patch_size=PATCH_SIZE, merge_size=MERGE_SIZE)
    return ImageOnlyQwen2VLProcessor(image_processor, tokenizer, chat_template=CHAT_TEMPLATE)


def mrope_section(head_dim: int) -> list[int]:
    """Split head_dim/2 rotary frequencies into (time, height, width) in Qwen2-VL's 1 : 1.5 : 1.5 ratio."""
    half = head_dim // 2
    temporal = half // 4
    height = (half - temporal) // 2
    return [temporal, height, half - temporal - height]


def text_config(tokenizer: PreTrainedTokenizerFast, sizes: TinySizes) -> dict:
    head_dim = sizes.hidden_size // sizes.num_heads
    return qwen_style_text_config(tokenizer, sizes, {"rope_type": "default", "rope_theta": 1e6,
                                                     "mrope_section": mrope_section(head_dim)})


#: What the Qwen2.5-VL and Qwen3-VL vision configs call the tower's sizes.
QWEN_VISION_KEYS = VisionKeys(depth="depth", heads="num_heads")
#: Qwen2-VL's: its width is ``embed_dim`` (its ``hidden_size`` is the merger's output) and its MLP a ``mlp_ratio``.
QWEN2_VL_VISION_KEYS = VisionKeys(width="embed_dim", depth="depth", heads="num_heads", mlp=None)


def qwen_vision_config(patch_size: int, merge_size: int, keys: VisionKeys = QWEN_VISION_KEYS, **extra) -> dict:
    """The shared tiny vision tower with the Qwen patch merger (``merge_size`` x ``merge_size``) and two-frame
    temporal patches."""
    return vision_tower_config(patch_size, keys, spatial_merge_size=merge_size, temporal_patch_size=2, **extra)


def build_config(model_type: str, tokenizer: PreTrainedTokenizerFast, sizes: TinySizes, image_size: int):
    if model_type == "qwen2_vl":
        config_class = Qwen2VLConfig
        vision = qwen_vision_config(PATCH_SIZE, MERGE_SIZE, QWEN2_VL_VISION_KEYS, mlp_ratio=2,  # MLP 2 x 32
                                    hidden_size=sizes.hidden_size)
    else:
        config_class = Qwen2_5_VLConfig
        # 56-pixel windows make the default 112x112 image use both windowed (block 0) and full (block 1) attention.
        vision = qwen_vision_config(PATCH_SIZE, MERGE_SIZE, out_hidden_size=sizes.hidden_size, window_size=56,
                                    fullatt_block_indexes=[1])
    return config_class(text_config=text_config(tokenizer, sizes), vision_config=vision,
                        **vision_token_ids(tokenizer), tie_word_embeddings=False)


def vision_token_ids(tokenizer: PreTrainedTokenizerFast) -> dict[str, int]:
    """The config's ids of the image, video and vision-bracket tokens (Qwen2-VL's names, kept by its heirs)."""
    token_id = tokenizer.convert_tokens_to_ids
    return {"image_token_id": token_id("<|image_pad|>"), "video_token_id": token_id("<|video_pad|>"),
            "vision_start_token_id": token_id("<|vision_start|>"), "vision_end_token_id": token_id("<|vision_end|>")}


def _spec(model_type: str, model_class) -> TinySpec:
    return TinySpec(model_class=model_class, special_tokens=SPECIAL_TOKENS, token_roles=TOKEN_ROLES,
                    chat_template=CHAT_TEMPLATE, default_image_size=DEFAULT_IMAGE_SIZE,
                    build_processor=build_processor, build_config=partial(build_config, model_type))


TINY = {"qwen2_vl": _spec("qwen2_vl", Qwen2VLForConditionalGeneration),
        "qwen2_5_vl": _spec("qwen2_5_vl", Qwen2_5_VLForConditionalGeneration)}
