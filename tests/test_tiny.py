"""The tiny models must behave like real checkpoints of their family: processor, tokenizer, config and model agree."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
from transformers import AutoModelForImageTextToText, AutoTokenizer

from ivtlr.backbones.chameleon.tiny import code_token_name
from ivtlr.testing import FAMILIES, LATENT_TOKENS, build_processor, build_tiny, build_tokenizer, make_test_image

QWEN_FAMILIES = ("qwen2_vl", "qwen2_5_vl")
QUESTION = "Which digit is in the picture?"


def _conversation(text: str = QUESTION) -> list[dict]:
    return [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": text}]}]


def _batch(bundle, texts=(QUESTION, "Count the digits, then answer.")):
    """Two chat prompts of different lengths (so padding is exercised) with differently sized images."""
    prompts = [
        bundle.processor.apply_chat_template(_conversation(text), add_generation_prompt=True, tokenize=False)
        for text in texts
    ]
    images = [make_test_image((112, 112), seed=1), make_test_image((84, 140), seed=2)]
    return bundle.processor(text=prompts, images=images, return_tensors="pt", padding=True)


@pytest.fixture(scope="module", params=FAMILIES)
def bundle(request):
    return build_tiny(request.param)


def test_config_token_ids_agree_with_tokenizer(bundle):
    tokenizer, config = bundle.tokenizer, bundle.model.config
    assert bundle.model.get_input_embeddings().num_embeddings == len(tokenizer)
    assert bundle.model.get_output_embeddings().out_features == len(tokenizer)
    latent_ids = tokenizer.convert_tokens_to_ids(list(LATENT_TOKENS))
    assert [bundle.start_latent_id, bundle.end_latent_id, bundle.latent_token_id] == latent_ids
    assert latent_ids == list(range(latent_ids[0], latent_ids[0] + 3))
    assert all(tokenizer.convert_ids_to_tokens(i) in tokenizer.all_special_tokens for i in latent_ids)
    assert not bundle.model.training
    assert bundle.model.get_input_embeddings().weight.data_ptr() != bundle.model.lm_head.weight.data_ptr()
    if bundle.family == "chameleon":
        assert config.image_token_id == tokenizer.convert_tokens_to_ids("<image>")
        assert (config.bos_token_id, config.eos_token_id, config.pad_token_id) == tuple(
            tokenizer.convert_tokens_to_ids(["<s>", "</s>", "<pad>"])
        )
    elif "<|image_pad|>" in tokenizer.get_vocab():  # the Qwen-VL token layout; other families test theirs
        expected = tokenizer.convert_tokens_to_ids(
            ["<|image_pad|>", "<|video_pad|>", "<|vision_start|>", "<|vision_end|>", "<|im_end|>", "<|endoftext|>"]
        )
        text = config.text_config
        got = [config.image_token_id, config.video_token_id, config.vision_start_token_id,
               config.vision_end_token_id, text.eos_token_id, text.pad_token_id]
        assert got == expected
        head_dim = text.hidden_size // text.num_attention_heads
        assert sum(text.rope_parameters["mrope_section"]) == head_dim // 2
    assert (bundle.image_token_id, bundle.eos_token_id, bundle.pad_token_id) == (
        config.image_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id)


def test_processor_output_runs_through_model(bundle):
    inputs = _batch(bundle)
    with torch.no_grad():
        logits = bundle.model(**inputs).logits
    assert logits.shape == (*inputs["input_ids"].shape, len(bundle.tokenizer))
    assert torch.isfinite(logits[inputs["attention_mask"].bool()]).all()


@pytest.mark.parametrize("family", QWEN_FAMILIES)
def test_qwen_image_pads_match_grid_and_vision_tower(family):
    bundle = build_tiny(family)
    inputs = _batch(bundle)
    merged_per_image = (inputs["image_grid_thw"].prod(dim=-1) // 4).tolist()
    assert merged_per_image[0] == 16  # the default 112x112 size: 8x8 patches of 14, merged 2x2
    pads_per_row = (inputs["input_ids"] == bundle.image_token_id).sum(dim=1).tolist()
    assert pads_per_row == merged_per_image
    with torch.no_grad():
        features = bundle.model.model.get_image_features(
            inputs["pixel_values"], inputs["image_grid_thw"], return_dict=True
        ).pooler_output
    assert [f.shape for f in features] == [(n, bundle.model.config.text_config.hidden_size) for n in merged_per_image]
    mm_types = inputs["mm_token_type_ids"]
    assert torch.equal(mm_types.bool(), inputs["input_ids"] == bundle.image_token_id)


@pytest.mark.parametrize("family", QWEN_FAMILIES)
def test_qwen_chat_template(family):
    tokenizer = build_tokenizer(family)
    processor = build_processor(family, tokenizer)
    text = processor.apply_chat_template(_conversation("Hi?"), add_generation_prompt=True, tokenize=False)
    assert text == (
        "<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|>Hi?<|im_end|>\n<|im_start|>assistant\n"
    )
    assert tokenizer.apply_chat_template(_conversation("Hi?"), add_generation_prompt=True, tokenize=False) == text
    conversation = [{"role": "user", "content": [{"type": "image", "image": make_test_image()},
                                                 {"type": "text", "text": "Hi?"}]}]
    encoded = processor.apply_chat_template(conversation, add_generation_prompt=True, tokenize=True,
                                            return_dict=True, return_tensors="pt")
    expanded = text.replace("<|image_pad|>", "<|image_pad|>" * 16)
    assert encoded["input_ids"][0].tolist() == tokenizer(expanded)["input_ids"]
    assert encoded["input_ids"][0, 0] == tokenizer.convert_tokens_to_ids("<|im_start|>")  # no BOS, as in Qwen


def test_chameleon_image_tokens_and_vq_codes():
    bundle = build_tiny("chameleon")
    processor, tokenizer, model = bundle.processor, bundle.tokenizer, bundle.model
    assert processor.image_seq_length == 64
    prompt = processor.apply_chat_template(_conversation("Hi?"), tokenize=False)
    assert prompt == "<image>Hi?"
    inputs = processor(text=[prompt], images=[make_test_image((40, 32))], return_tensors="pt")
    ids = inputs["input_ids"][0].tolist()
    start, end = ids.index(tokenizer.convert_tokens_to_ids("<racm3:break>")), ids.index(
        tokenizer.convert_tokens_to_ids("<eoss>"))
    assert ids[start + 1 : end] == [bundle.image_token_id] * 64
    assert ids.count(bundle.image_token_id) == 64
    assert ids[0] == tokenizer.bos_token_id and ids[-1] == tokenizer.sep_token_id
    with torch.no_grad():
        codes = model.model.get_image_tokens(inputs["pixel_values"])
    assert codes.shape == (1, 64)
    assert len(set(codes.tolist()[0])) > 8  # a random VQ that maps every patch to one code would be useless
    num_codes = model.config.vq_config.num_embeddings
    code_ids = tokenizer.convert_tokens_to_ids([code_token_name(c) for c in range(num_codes)])
    assert set(codes.tolist()[0]) <= set(code_ids)
    assert model.model.vocabulary_mapping.img2bpe == dict(enumerate(code_ids))
    assert max(code_ids) < len(tokenizer)


def test_code_token_names():
    assert [code_token_name(c) for c in (0, 7, 10, 63, 105)] == [
        "IMGIMGAZ", "IMGIMGHZ", "IMGIMGBAZ", "IMGIMGGDZ", "IMGIMGBAFZ"]


@pytest.mark.parametrize("family", ("qwen2_vl", "chameleon"))
def test_tokenizer_round_trips_english(family):
    tokenizer = build_tokenizer(family)
    for text in (
        "The answer is (B).",
        "Zebras quickly jumped over   three lazy foxes!\nThen: 42 apples, 7 pears.",
        " leading space, trailing space ",
        "spaces before punctuation survive : yes , no . it ' s",
    ):
        ids = tokenizer(text)["input_ids"]
        assert tokenizer.decode(ids, skip_special_tokens=True) == text
    special = "<|image_pad|>" if family != "chameleon" else "<image>"
    for token in (special, *LATENT_TOKENS):
        ids = tokenizer(f"a{token}b", add_special_tokens=False)["input_ids"]
        assert ids[1] == tokenizer.convert_tokens_to_ids(token)


def test_tokenizer_learns_from_extra_corpus():
    word = " photosynthesis"
    base = build_tokenizer("qwen2_vl")
    extended = build_tokenizer("qwen2_vl", corpus=[word * 50])
    assert len(extended(word)["input_ids"]) < len(base(word)["input_ids"])
    assert build_tokenizer("qwen2_vl").get_vocab() == base.get_vocab()


@pytest.mark.parametrize("family", FAMILIES)
def test_checkpoint_round_trip_offline(family, tmp_path):
    bundle = build_tiny(family)
    bundle.model.save_pretrained(tmp_path)
    bundle.processor.save_pretrained(tmp_path)
    processor = type(bundle.processor).from_pretrained(tmp_path, local_files_only=True)
    tokenizer = AutoTokenizer.from_pretrained(tmp_path, local_files_only=True)
    model = AutoModelForImageTextToText.from_pretrained(tmp_path, local_files_only=True).eval()
    assert type(model) is type(bundle.model)
    assert tokenizer.get_vocab() == bundle.tokenizer.get_vocab()
    assert tokenizer.all_special_tokens == bundle.tokenizer.all_special_tokens
    assert tokenizer.chat_template == bundle.tokenizer.chat_template
    assert processor.chat_template == bundle.processor.chat_template
    expected, reloaded = _batch(bundle), _batch(dataclasses.replace(bundle, processor=processor))
    assert expected.keys() == reloaded.keys()
    for key in expected:
        assert torch.equal(expected[key], reloaded[key]), key
    with torch.no_grad():
        torch.testing.assert_close(model(**reloaded).logits, bundle.model(**expected).logits, rtol=0, atol=0)


@pytest.mark.parametrize("family", FAMILIES)
def test_eager_and_sdpa_agree(family):
    eager, sdpa = build_tiny(family, attn_implementation="eager"), build_tiny(family, attn_implementation="sdpa")
    assert (eager.model.config._attn_implementation, sdpa.model.config._attn_implementation) == ("eager", "sdpa")
    inputs = _batch(eager)
    valid = inputs["attention_mask"].bool()
    with torch.no_grad():
        eager_logits, sdpa_logits = eager.model(**inputs).logits, sdpa.model(**inputs).logits
    torch.testing.assert_close(eager_logits[valid], sdpa_logits[valid], rtol=0, atol=1e-5)


def test_seed_fixes_weights_without_touching_global_rng():
    torch.manual_seed(123)
    expected_draw = torch.rand(3)
    torch.manual_seed(123)
    first = build_tiny("qwen2_vl", seed=7).model.state_dict()
    assert torch.equal(torch.rand(3), expected_draw)
    second = build_tiny("qwen2_vl", seed=7).model.state_dict()
    other = build_tiny("qwen2_vl", seed=8).model.state_dict()
    name = "model.language_model.layers.0.self_attn.q_proj.weight"
    assert all(torch.equal(first[k], second[k]) for k in first)
    assert not torch.equal(first[name], other[name])


def test_dtype_casts_the_float32_weights():
    full, half = build_tiny("chameleon", seed=3), build_tiny("chameleon", seed=3, dtype=torch.bfloat16)
    assert {p.dtype for p in half.model.parameters()} == {torch.bfloat16}
    assert torch.equal(half.model.lm_head.weight, full.model.lm_head.weight.to(torch.bfloat16))


def test_sizes_are_configurable():
    bundle = build_tiny("qwen2_5_vl", hidden_size=96, num_heads=4, num_kv_heads=4, num_layers=1, image_size=56)
    assert bundle.model.config.text_config.rope_parameters["mrope_section"] == [3, 4, 5]
    inputs = _batch(bundle)
    assert inputs["image_grid_thw"][0].tolist() == [1, 4, 4]
    with torch.no_grad():
        assert bundle.model(**inputs).logits.shape[-1] == len(bundle.tokenizer)


def test_chameleon_image_size_sets_token_count():
    bundle = build_tiny("chameleon", image_size=16, num_kv_heads=4)
    inputs = _batch(bundle)
    assert bundle.processor.image_seq_length == 16
    assert ((inputs["input_ids"] == bundle.image_token_id).sum(dim=1) == 16).all()
    with torch.no_grad():
        assert bundle.model.model.get_image_tokens(inputs["pixel_values"]).shape == (2, 16)
        assert bundle.model(**inputs).logits.shape[-1] == len(bundle.tokenizer)


def test_unknown_family_and_bad_sizes_are_rejected():
    with pytest.raises(ValueError, match="unknown tiny model family"):
        build_tiny("llava")
    with pytest.raises(ValueError, match="multiple of 28"):
        build_processor("qwen2_vl", build_tokenizer("qwen2_vl"), image_size=100)
    with pytest.raises(ValueError, match="sdpa"):
        build_tiny("qwen2_vl", attn_implementation="flash_attention_2")


def test_make_test_image_is_structured_and_seeded():
    image = make_test_image((70, 50), seed=4)
    assert image.mode == "RGB" and image.size == (70, 50)
    pixels = np.asarray(image, dtype=np.float64)
    assert np.array_equal(pixels, np.asarray(make_test_image((70, 50), seed=4)))
    assert not np.array_equal(pixels, np.asarray(make_test_image((70, 50), seed=5)))
    # Digit strokes: strong local contrast inside a tile, unlike a flat fill; smooth, unlike white noise.
    tile = pixels[:32, :32].mean(axis=-1)
    assert tile.max() - tile.min() > 100
    neighbour_diff = np.abs(np.diff(tile, axis=1)).mean()
    assert neighbour_diff < 0.5 * np.abs(tile - tile.mean()).mean()
