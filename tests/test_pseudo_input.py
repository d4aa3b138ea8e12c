"""The probe's pseudo inputs, built from a model's config for text, images, log-mel features and raw audio (the zoo
runs every delta type on them; here, what they are)."""

import torch
import transformers as tf

from deltatune import LoraModel
from deltatune.pseudo_input import pseudo_inputs


def test_encoder_decoder_classifiers_get_one_end_of_sequence_token_per_row_and_no_decoder_ids():
    model = tf.T5ForSequenceClassification(tf.T5Config(vocab_size=96, d_model=16, d_ff=32, num_layers=1, num_heads=2,
                                                       d_kv=8, eos_token_id=1, decoder_start_token_id=0))
    inputs = pseudo_inputs(model)
    assert "decoder_input_ids" not in inputs
    assert ((inputs["input_ids"] == 1).sum(1) == 1).all() and (inputs["input_ids"][:, -1] == 1).all()
    generator = tf.T5ForConditionalGeneration(model.config)
    assert pseudo_inputs(generator)["decoder_input_ids"].shape == (2, 4)


def test_speech_models_get_features_or_samples_their_encoders_take():
    whisper = tf.WhisperForConditionalGeneration(tf.WhisperConfig(
        vocab_size=64, d_model=16, encoder_layers=1, decoder_layers=1, encoder_attention_heads=2,
        decoder_attention_heads=2, encoder_ffn_dim=32, decoder_ffn_dim=32, num_mel_bins=8, max_source_positions=12,
        pad_token_id=0, bos_token_id=1, eos_token_id=2, decoder_start_token_id=1)).eval()
    inputs = pseudo_inputs(whisper)
    assert inputs["input_features"].shape == (2, 8, 24) and inputs["decoder_input_ids"].shape == (2, 4)
    wav2vec2 = tf.Wav2Vec2ForSequenceClassification(tf.Wav2Vec2Config(
        hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32, conv_dim=(8, 8),
        conv_stride=(5, 2), conv_kernel=(10, 3), num_feat_extract_layers=2, num_conv_pos_embeddings=4,
        num_conv_pos_embedding_groups=2)).eval()
    samples = pseudo_inputs(wav2vec2)["input_values"]
    assert wav2vec2.wav2vec2._get_feat_extract_output_lengths(samples.shape[1]) == 8  # frames, as for text
    assert samples.std() > 0.5  # not a constant: equal frames would make attention uniform whatever q and k
    for model in (whisper, wav2vec2):
        lora = LoraModel(model)  # the defaults: q and v of every attention, found on these inputs
        assert lora.positions and all(p.endswith(("q_proj", "v_proj")) for p in lora.positions)


def test_dual_encoders_get_images_and_image_text_models_do_not():
    text, vision = dict(vocab_size=64, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                        intermediate_size=32), dict(hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                                                    intermediate_size=32, image_size=16, patch_size=8)
    clip = tf.CLIPModel(tf.CLIPConfig(text_config=text, vision_config=vision))
    assert pseudo_inputs(clip)["pixel_values"].shape == (2, 3, 16, 16)
    llava_config = tf.LlavaConfig(text_config=tf.LlamaConfig(**text), vision_config=tf.CLIPVisionConfig(**vision))
    assert "pixel_values" not in pseudo_inputs(tf.LlavaForConditionalGeneration(llava_config))


def test_floating_inputs_take_the_model_precision():
    vit = tf.ViTForImageClassification(tf.ViTConfig(hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                                                    intermediate_size=32, image_size=16, patch_size=8))
    vit = vit.to(torch.bfloat16).eval()
    inputs = pseudo_inputs(vit)
    assert inputs["pixel_values"].dtype == torch.bfloat16
    assert LoraModel(vit).positions  # the probe runs on them
