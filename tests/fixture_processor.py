"""A processor for the original-code Qwen2-VL fixture, whose base model has a 64-token vocabulary and no tokenizer.

The fixture's token ids 0..10 are the Qwen special tokens and the latent tokens (its ``meta.json`` names them); the
rest are ordinary text. A character-level BPE over the evaluation prompts fills the vocabulary to exactly 64
entries with those specials first, so every prompt encodes to ids the model has and every id decodes to text.
Saving it next to a copy of the base model makes that copy a complete checkpoint directory, as a released base
model is (``--original STATE --base DIR`` then runs end to end).
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, trainers
from transformers import PreTrainedTokenizerFast

from ivtlr.data import answer_line, format_prompt_text
from ivtlr.testing import build_processor
from schema_files import DIGIT_NAMES
from test_original_fixtures import FIXTURES

QWEN_FIXTURE = FIXTURES / "qwen2vl"
IMAGE_SIZE = 112  # the fixture's image size: 8x8 patches -> 4x4 = 16 merged tokens


def fixture_special_tokens(root: Path = QWEN_FIXTURE) -> list[str]:
    """The fixture's named tokens in id order (meta.json keys read like "<|im_end|> (eos)")."""
    named = json.loads((root / "meta.json").read_text())["token_ids"]
    by_id = {token_id: name.split(" ")[0] for name, token_id in named.items()}
    assert sorted(by_id) == list(range(len(by_id)))
    return [by_id[i] for i in range(len(by_id))]


def fixture_tokenizer(vocab_size: int, root: Path = QWEN_FIXTURE) -> PreTrainedTokenizerFast:
    specials = fixture_special_tokens(root)
    corpus = [format_prompt_text("Which digit is written in the image?", DIGIT_NAMES[i:i + 4]) for i in range(7)]
    corpus += [answer_line(letter) for letter in "ABCD"]
    backend = Tokenizer(models.BPE(unk_token="<|endoftext|>"))
    backend.decoder = decoders.Fuse()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials,
                                  limit_alphabet=vocab_size - len(specials), show_progress=False)
    backend.train_from_iterator(corpus, trainer)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                                        extra_special_tokens=[t for t in specials
                                                              if t not in ("<|im_end|>", "<|endoftext|>")],
                                        clean_up_tokenization_spaces=False)
    assert len(tokenizer) == vocab_size and tokenizer.convert_tokens_to_ids(specials) == list(range(len(specials)))
    return tokenizer


def base_with_processor(destination: Path, root: Path = QWEN_FIXTURE) -> Path:
    """Copy the fixture's base model to ``destination`` and save a matching processor next to it."""
    shutil.copytree(root / "base", destination)
    vocab_size = json.loads((root / "meta.json").read_text())["config_summary"]["vocab_size"]
    build_processor("qwen2_vl", fixture_tokenizer(vocab_size, root), image_size=IMAGE_SIZE).save_pretrained(destination)
    return destination
