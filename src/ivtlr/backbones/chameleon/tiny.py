"""Tiny Chameleon: the real class with a small VQ-VAE (32 px -> 8x8 = 64 image tokens), for offline tests."""
from __future__ import annotations

from transformers import (ChameleonConfig, ChameleonForConditionalGeneration, ChameleonImageProcessorPil,
                          PreTrainedTokenizerFast)

from ivtlr.backbones.tiny_specs import INITIALIZER_RANGE, TinySizes, TinySpec
from ivtlr.backbones.chameleon.processor import ChameleonChatProcessor
from ivtlr.errors import UnsupportedModelSetting

SPECIAL_TOKENS = ("<s>", "<pad>", "</s>", "<reserved08706>", "<image>", "<racm3:break>", "<eoss>")
TOKEN_ROLES = {"bos_token": "<s>", "eos_token": "</s>", "pad_token": "<pad>", "sep_token": "<reserved08706>"}
# Chameleon has no role markers: ChameleonProcessor itself appends the sep token that opens the answer,
# so the template only lays out text and the `<image>` placeholder in order.
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for item in message['content'] %}"
    "{% if item['type'] == 'image' %}<image>"
    "{% elif item['type'] == 'text' %}{{ item['text'] }}{% endif %}"
    "{% endfor %}{% endif %}"
    "{% if not loop.last %}\n{% endif %}"
    "{% endfor %}"
)
DEFAULT_IMAGE_SIZE = 32
CHANNEL_MULTIPLIER = (1, 1, 1)  # two downsamplings: 32x32 pixels -> 8x8 = 64 image tokens
DOWNSAMPLING = 2 ** (len(CHANNEL_MULTIPLIER) - 1)
NUM_CODES = 64


def code_token_name(code: int) -> str:
    """Chameleon's vocabulary name of VQ code `code`: 'IMGIMG' + its decimal digits as letters A-J + 'Z'."""
    return "IMGIMG" + "".join(chr(ord("A") + int(digit)) for digit in str(code)) + "Z"


def build_processor(tokenizer: PreTrainedTokenizerFast, image_size: int) -> ChameleonChatProcessor:
    """Images are resized and centre-cropped to ``image_size`` (default 32 -> 64 VQ tokens)."""
    if image_size % DOWNSAMPLING:
        raise UnsupportedModelSetting(f"Chameleon image_size must be a multiple of {DOWNSAMPLING}, got {image_size}")
    image_processor = ChameleonImageProcessorPil(size={"shortest_edge": image_size},
                                                 crop_size={"height": image_size, "width": image_size})
    return ChameleonChatProcessor(image_processor, tokenizer, image_seq_length=(image_size // DOWNSAMPLING) ** 2,
                                  chat_template=CHAT_TEMPLATE)


def build_config(tokenizer: PreTrainedTokenizerFast, sizes: TinySizes, image_size: int) -> ChameleonConfig:
    return ChameleonConfig(
        vocab_size=len(tokenizer),
        hidden_size=sizes.hidden_size,
        intermediate_size=sizes.intermediate_size,
        num_hidden_layers=sizes.num_layers,
        num_attention_heads=sizes.num_heads,
        num_key_value_heads=sizes.num_kv_heads,
        max_position_embeddings=4096,
        initializer_range=INITIALIZER_RANGE,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=False,
        # The whole vocabulary, as in released checkpoints: the model reads `<image>` and the IMGIMG code names.
        vocabulary_map=tokenizer.get_vocab(),
        vq_config={
            "resolution": image_size,
            "base_channels": 32,
            "channel_multiplier": list(CHANNEL_MULTIPLIER),
            "num_res_blocks": 1,
            "attn_resolutions": [],
            "latent_channels": 16,
            "embed_dim": 8,
            "num_embeddings": NUM_CODES,
            "initializer_range": INITIALIZER_RANGE,
        },
    )


TINY = {"chameleon": TinySpec(model_class=ChameleonForConditionalGeneration, special_tokens=SPECIAL_TOKENS,
                              token_roles=TOKEN_ROLES, chat_template=CHAT_TEMPLATE,
                              default_image_size=DEFAULT_IMAGE_SIZE, build_processor=build_processor,
                              build_config=build_config, add_bos_token=True,
                              extra_tokens=tuple(code_token_name(code) for code in range(NUM_CODES)))}
