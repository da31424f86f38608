"""Loading checkpoints in the original IVT-LR release format into today's transformers layout.

The released files are the ``state_dict()`` of the original wrapper around a PEFT LoRA model built with
transformers 4.51: keys ``base_causallm.base_model.model.<4.51 weight name>``, LoRA-wrapped linears split into
``…base_layer.weight`` / ``…lora_A.default.weight`` / ``…lora_B.default.weight``, and the wrapper's own copy of the
input embeddings as ``embedding.weight``.
"""
from __future__ import annotations

import json
import logging
from pathlib import Path

import torch
from peft import LoraConfig, get_peft_model
from transformers import AutoConfig, AutoModelForImageTextToText, AutoTokenizer

from ivtlr.backbones import backbone_class_for

logger = logging.getLogger(__name__)

WRAPPER_PREFIX = "base_causallm.base_model.model."
WRAPPER_EMBEDDING_KEY = "embedding.weight"
#: Constructor arguments of the original wrapper, accepted under the same names.
ORIGINAL_ARGS = ("latent_token_id", "start_latent_id", "end_latent_id", "eos_token_id", "image_token_id",
                 "visual_start_id", "visual_end_id")
LATENT_TOKENS = ("<|start-latent|>", "<|end-latent|>", "<|latent|>")


class OriginalCheckpointError(ValueError):
    """The state dict does not fit the base model."""


def read_original_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise
    except Exception as exc:  # torch raises several types for truncated / foreign files
        raise OriginalCheckpointError(f"{path} is not a readable torch state dict ({exc})") from exc
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise OriginalCheckpointError(f"{path} does not hold a flat state dict of tensors")
    return state


def split_state_dict(state: dict[str, torch.Tensor]) -> tuple[dict, dict, dict, list[str]]:
    """-> (base weights, LoRA weights, wrapper-level weights, unrecognised keys); names in the 4.51 layout."""
    base, lora, wrapper, unknown = {}, {}, {}, []
    for key, value in state.items():
        if key == WRAPPER_EMBEDDING_KEY:
            wrapper[key] = value
        elif not key.startswith(WRAPPER_PREFIX):
            unknown.append(key)
        elif ".lora_A." in key or ".lora_B." in key:
            lora[key[len(WRAPPER_PREFIX):]] = value
        else:
            base[key[len(WRAPPER_PREFIX):].replace(".base_layer.", ".")] = value
    return base, lora, wrapper, unknown


def original_key_to_peft(key: str, backbone) -> str:
    """Name, in the PEFT-wrapped current model, of a parameter named ``key`` in an original state dict."""
    if not key.startswith(WRAPPER_PREFIX):
        raise KeyError(f"{key!r} is not a key of the original wrapper's LoRA model")
    return "base_model.model." + backbone.rename_legacy_key(key[len(WRAPPER_PREFIX):])


def _token_ids(base_model_dir: Path, state_dict_path: Path, config, given: dict) -> dict:
    """The original wrapper's token ids: given arguments, else a tokenizer next to the base model, else an
    ``ivtlr_constructor_args`` entry in a ``meta.json`` next to the state dict."""
    ids = {k: v for k, v in given.items() if v is not None}
    tokenizer_files = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")
    has_tokenizer = not base_model_dir.is_dir() or any((base_model_dir / f).is_file() for f in tokenizer_files)
    if "latent_token_id" not in ids and has_tokenizer:
        try:
            tokenizer = AutoTokenizer.from_pretrained(base_model_dir)
        except (OSError, ValueError, TypeError):
            tokenizer = None
        if tokenizer is not None:
            missing = [t for t in LATENT_TOKENS if t not in tokenizer.get_vocab()]
            tokenizer.add_tokens(missing)  # the original adds them in this order
            for name, token in zip(("start_latent_id", "end_latent_id", "latent_token_id"), LATENT_TOKENS):
                ids.setdefault(name, tokenizer.convert_tokens_to_ids(token))
            ids.setdefault("eos_token_id", tokenizer.eos_token_id)
    meta = state_dict_path.parent / "meta.json"
    if "latent_token_id" not in ids and meta.is_file():
        for name, value in json.loads(meta.read_text()).get("ivtlr_constructor_args", {}).items():
            ids.setdefault(name, value)
    if "latent_token_id" not in ids:
        raise ValueError("cannot tell the <|latent|> token id: pass latent_token_id=… (and eos_token_id=…) or put "
                         "the tokenizer next to the base model")
    if "image_token_id" in ids and getattr(config, "image_token_id", None) not in (None, ids["image_token_id"]):
        raise ValueError(f"image_token_id={ids['image_token_id']} disagrees with the base model's config "
                         f"({config.image_token_id})")
    return ids


def load_original(cls, base_model_dir, state_dict_path, *, num_selected_patches: int | None = None,
                  lora_alpha: float = 16, patch_order: str = "topk", attn_implementation: str = "eager",
                  dtype: torch.dtype = torch.float32, tokenizer=None, **kwargs):
    """Build ``cls`` (``IVTLR``) from a base model directory (or hub id) and an original state dict.

    ``lora_alpha`` is not stored in the state dict; the original trains with 16. ``patch_order`` defaults to
    ``topk``, the order the original inserts patches in. Extra keyword arguments are the original wrapper's
    constructor arguments (``latent_token_id``, ``eos_token_id``, …) or ``IVTLR`` options.
    """
    base_model_dir, state_dict_path = Path(base_model_dir), Path(state_dict_path)
    original_args = {k: kwargs.pop(k) for k in ORIGINAL_ARGS if k in kwargs}
    if tokenizer is not None and "latent_token_id" not in original_args:
        original_args["latent_token_id"] = tokenizer.convert_tokens_to_ids("<|latent|>")
        original_args.setdefault("eos_token_id", tokenizer.eos_token_id)
    state = read_original_state_dict(state_dict_path)
    base_sd, lora_sd, wrapper_sd, unknown = split_state_dict(state)
    if not base_sd and not lora_sd and not unknown:
        # Evaluating the untrained base model under the checkpoint's name would be a silently wrong result.
        raise OriginalCheckpointError(f"{state_dict_path} holds no model weights ({len(state)} keys: "
                                      f"{sorted(state)[:20]}): expected the original wrapper's LoRA and base weights "
                                      f"under {WRAPPER_PREFIX!r}")
    if unknown:
        raise OriginalCheckpointError(f"{len(unknown)} keys are not in the original wrapper's layout "
                                      f"(expected prefix {WRAPPER_PREFIX!r}): {unknown[:20]}")
    config = AutoConfig.from_pretrained(base_model_dir)
    backbone_cls = backbone_class_for(config.model_type)
    ids = _token_ids(base_model_dir, state_dict_path, config, original_args)
    model = AutoModelForImageTextToText.from_pretrained(base_model_dir, dtype=dtype,
                                                        attn_implementation=attn_implementation)
    backbone = backbone_cls(model)
    base_sd = {backbone.rename_legacy_key(k): v for k, v in base_sd.items()}
    lora_sd = {backbone.rename_legacy_key(k): v for k, v in lora_sd.items()}

    embed_key = next((k for k, v in model.state_dict().items()
                      if v.data_ptr() == model.get_input_embeddings().weight.data_ptr()), None)
    vocab = (base_sd.get(embed_key) if embed_key else None)
    vocab = vocab if vocab is not None else wrapper_sd.get(WRAPPER_EMBEDDING_KEY)
    if vocab is not None and vocab.shape[0] != model.get_input_embeddings().weight.shape[0]:
        logger.info("resizing token embeddings %d -> %d to fit the state dict",
                    model.get_input_embeddings().weight.shape[0], vocab.shape[0])
        model.resize_token_embeddings(vocab.shape[0])
    if WRAPPER_EMBEDDING_KEY in wrapper_sd and embed_key and embed_key not in base_sd:
        base_sd[embed_key] = wrapper_sd[WRAPPER_EMBEDDING_KEY]

    expected = model.state_dict()
    unmapped = sorted(k for k in base_sd if k not in expected)
    bad_shape = sorted(k for k in base_sd if k in expected and expected[k].shape != base_sd[k].shape)
    if unmapped or bad_shape:
        raise OriginalCheckpointError(
            f"the state dict does not fit {type(model).__name__} from {base_model_dir}: "
            f"{len(unmapped)} keys did not map ({unmapped[:20]}), {len(bad_shape)} have other shapes "
            f"({[(k, tuple(base_sd[k].shape), tuple(expected[k].shape)) for k in bad_shape[:10]]})")
    missing = sorted(k for k in expected if k not in base_sd)
    if missing:
        logger.info("%d base weights not in the state dict keep the base model's values (e.g. %s)",
                    len(missing), missing[:5])
    model.load_state_dict(base_sd, strict=False)

    if lora_sd:
        targets = sorted({k.split(".lora_")[0] for k in lora_sd})
        rank = next(v.shape[0] for k, v in lora_sd.items() if ".lora_A." in k)
        peft_config = LoraConfig(r=rank, lora_alpha=lora_alpha, lora_dropout=0.0, bias="none",
                                 target_modules=targets)
        model = get_peft_model(model, peft_config)
        peft_keys = {f"base_model.model.{k}": v for k, v in lora_sd.items()}
        result = model.load_state_dict(peft_keys, strict=False)
        if result.unexpected_keys:
            raise OriginalCheckpointError(f"LoRA keys did not map: {result.unexpected_keys[:20]}")
        lora_missing = sorted(k for k in result.missing_keys if ".lora_" in k)
        if lora_missing:  # an adapter half loaded would keep random LoRA rows: name what is missing
            raise OriginalCheckpointError(f"{len(lora_missing)} LoRA weights the adapter needs are not in the state "
                                          f"dict: {lora_missing[:20]}")
    model.eval()
    ivtlr_kwargs = {k: ids[k] for k in ("eos_token_id", "start_latent_id", "end_latent_id") if k in ids}
    ivtlr_kwargs.update(kwargs)
    return cls(model, ids["latent_token_id"], num_selected_patches=num_selected_patches, patch_order=patch_order,
               **ivtlr_kwargs)
