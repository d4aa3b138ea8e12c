"""Pseudo inputs: small inputs a model accepts, built from its config, for the probe's forward pass.

By the model's main input (``main_input_name``):

- token ids (``input_ids``), each row ending with the end-of-sequence token as tokenizers write it; a dual encoder
  (CLIP-style: a vision sub-config, ``pixel_values`` in its forward, no image token to place) also gets images;
- images (``pixel_values``): ``num_channels × image_size²``;
- log-mel features (``input_features``): Whisper's ``num_mel_bins × 2·max_source_positions`` frames (its encoder
  takes no other length), or Speech2Text's frames × ``input_feat_per_channel · input_channels``;
- audio (``input_values``): raw samples, enough for a convolutional feature encoder (``conv_kernel``,
  ``conv_stride``: wav2vec 2.0, HuBERT, WavLM, ...) to give a few frames; or a ``max_length × num_mel_bins``
  spectrogram (Audio Spectrogram Transformer).

Encoder-decoder generators also get decoder ids (classifiers derive theirs).  Otherwise transformers'
``dummy_inputs``, or token ids for a plain PyTorch model with one input and an embedding; anything else needs
``pseudo_input=...`` from the caller.
"""

from __future__ import annotations

import inspect
from typing import Any

import torch
from torch import nn

# Encoder-decoder classifiers (T5, BART) derive their decoder inputs from input_ids and read the decoder at the
# encoder's end-of-sequence positions.
_DERIVING_DECODER = ("ForSequenceClassification", "ForQuestionAnswering")
_IMAGE_TOKEN = ("image_token_id", "image_token_index", "image_token")  # image-text-to-text models place images by it


def pseudo_inputs(model: nn.Module, batch: int = 2, length: int = 8) -> dict[str, torch.Tensor] | tuple:
    """Small inputs that ``model`` accepts (keyword inputs; for a plain PyTorch LM a tuple of token ids)."""
    config = getattr(model, "config", None)
    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    dtype = next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.float32)
    build = _BUILDERS.get(getattr(model, "main_input_name", None))
    inputs = build(model, config, batch, length) if config is not None and build is not None else None
    if inputs is not None and getattr(config, "is_encoder_decoder", False) and "decoder_input_ids" not in inputs \
            and not type(model).__name__.endswith(_DERIVING_DECODER):
        inputs["decoder_input_ids"] = _ids(config, batch, max(2, length // 2))  # shorter: the two are told apart
    if inputs is None:
        inputs = getattr(model, "dummy_inputs", None)  # transformers' own, for other main inputs
    if isinstance(inputs, dict) and inputs:
        # Features, audio and images in the model's own precision (a bfloat16 Whisper takes no float32 features)
        return {name: tensor.to(device, dtype if tensor.is_floating_point() else tensor.dtype)
                for name, tensor in inputs.items()}
    embedding = next((m for m in model.modules() if isinstance(m, nn.Embedding)), None)
    if embedding is not None and _takes_one_input(model):  # token ids for a plain PyTorch language model
        return ((torch.arange(batch * length, device=device).reshape(batch, length) % embedding.num_embeddings),)
    raise ValueError(
        f"cannot build a pseudo input for {type(model).__name__} (forward{inspect.signature(model.forward)}); "
        "pass pseudo_input=... (a tensor, a tuple of positional inputs or a dict of keyword inputs)"
    )


def _ids(config: Any, batch: int, length: int) -> torch.Tensor:
    vocab = getattr(config, "vocab_size", None) or 2
    return (torch.arange(batch * length).reshape(batch, length) % (vocab - 1)) + 1


def _token_ids(model: nn.Module, config: Any, batch: int, length: int) -> dict[str, torch.Tensor]:
    ids, vocab = _ids(config, batch, length), getattr(config, "vocab_size", None) or 2
    eos = getattr(config, "eos_token_id", None)
    eos = eos[0] if isinstance(eos, list) and eos else eos
    if isinstance(eos, int) and 0 <= eos < vocab and vocab > 2:  # one per row, last
        ids[ids == eos] = eos % (vocab - 1) + 1
        ids[:, -1] = eos
    inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    vision = getattr(config, "vision_config", None)
    takes_images = "pixel_values" in inspect.signature(model.forward).parameters
    if vision is not None and takes_images and not any(hasattr(config, a) for a in _IMAGE_TOKEN):
        inputs.update(_images(model, vision, batch, length))
    return inputs


def _images(model: nn.Module, config: Any, batch: int, length: int) -> dict[str, torch.Tensor]:
    size = getattr(config, "image_size", 224)
    size = size if isinstance(size, int) else size[0]
    return {"pixel_values": _signal(batch, getattr(config, "num_channels", 3), size, size)}


def _features(model: nn.Module, config: Any, batch: int, length: int) -> dict[str, torch.Tensor] | None:
    mels, positions = getattr(config, "num_mel_bins", None), getattr(config, "max_source_positions", None)
    if isinstance(mels, int) and isinstance(positions, int):  # Whisper: mel bins × frames
        return {"input_features": _signal(batch, mels, 2 * positions)}
    per_channel = getattr(config, "input_feat_per_channel", None)
    if isinstance(per_channel, int):  # Speech2Text: frames × features, subsampled by its convolutions
        return {"input_features": _signal(batch, 4 * length, per_channel * getattr(config, "input_channels", 1))}
    return None


def _audio(model: nn.Module, config: Any, batch: int, length: int) -> dict[str, torch.Tensor] | None:
    kernels, strides = getattr(config, "conv_kernel", None), getattr(config, "conv_stride", None)
    if kernels and strides:
        samples = length  # frames; back through the feature encoder's convolutions to the samples they need
        for kernel, stride in zip(reversed(kernels), reversed(strides)):
            samples = (samples - 1) * stride + kernel
        return {"input_values": _signal(batch, samples)}
    frames, mels = getattr(config, "max_length", None), getattr(config, "num_mel_bins", None)
    if isinstance(frames, int) and isinstance(mels, int):
        return {"input_values": _signal(batch, frames, mels)}
    return None


def _signal(*shape: int) -> torch.Tensor:
    """Fixed values that vary along every axis: a constant input can hide a module's effect (equal positions make
    attention uniform whatever its queries)."""
    return torch.randn(*shape, generator=torch.Generator().manual_seed(0))


_BUILDERS = {"input_ids": _token_ids, "pixel_values": _images, "input_features": _features, "input_values": _audio}


def _takes_one_input(model: nn.Module) -> bool:
    required = [p for p in inspect.signature(model.forward).parameters.values()
                if p.default is p.empty and p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    return len(required) <= 1
