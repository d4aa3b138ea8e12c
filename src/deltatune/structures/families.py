"""Common names -> addressing specs, per model family (``config.model_type``). Data only."""

_BERT = {
    "q": ["attention.self.query"], "k": ["attention.self.key"], "v": ["attention.self.value"],
    "o": ["attention.output.dense"], "attn": ["attention"], "attn_out": ["attention.output"],
    "ffn_in": ["intermediate.dense"], "ffn_in_block": ["intermediate"],
    "ffn_out": [r"[r]layer\.\d+\.output\.dense"], "ffn_block_out": [r"[r]layer\.\d+\.output"],
    "norm": ["LayerNorm"],
}
_LLAMA = {
    "q": ["q_proj"], "k": ["k_proj"], "v": ["v_proj"], "o": ["o_proj"], "attn": ["self_attn"],
    "attn_out": ["self_attn"], "ffn_in": ["gate_proj", "up_proj"], "ffn_in_block": ["mlp"], "ffn_out": ["down_proj"],
    "ffn": ["mlp"], "ffn_block_out": ["mlp"], "norm": ["input_layernorm", "post_attention_layernorm"],
}
_OPT_BART = {  # self- and cross-attention share projection names; the feed-forward is inline in the layer
    "q": ["q_proj"], "k": ["k_proj"], "v": ["v_proj"], "o": ["out_proj"], "attn": ["self_attn"],
    "attn_out": ["self_attn"], "ffn_in": ["fc1"], "ffn_in_block": ["fc1"], "ffn_out": ["fc2"],
    "ffn_block_out": ["fc2"], "norm": ["self_attn_layer_norm", "final_layer_norm"],
}

_DEBERTA_V2 = {**_BERT, "q": ["query_proj"], "k": ["key_proj"], "v": ["value_proj"]}

FAMILIES: dict[str, dict[str, list[str]]] = {
    "bert": _BERT,
    "deberta-v2": _DEBERTA_V2,
    "distilbert": {
        "q": ["q_lin"], "k": ["k_lin"], "v": ["v_lin"], "o": ["out_lin"], "attn": ["attention"],
        "attn_out": ["attention"], "ffn_in": ["lin1"], "ffn_in_block": ["ffn"], "ffn_out": ["lin2"], "ffn": ["ffn"],
        "ffn_block_out": ["ffn"], "norm": ["sa_layer_norm", "output_layer_norm"],
    },
    "vit": {
        "q": ["attention.q_proj"], "k": ["attention.k_proj"], "v": ["attention.v_proj"], "o": ["attention.o_proj"],
        "attn": ["attention"], "attn_out": ["attention"], "ffn_in": ["fc1"], "ffn_in_block": ["mlp"],
        "ffn_out": ["fc2"], "ffn": ["mlp"], "ffn_block_out": ["mlp"], "norm": ["layernorm_before", "layernorm_after"],
    },
    "roberta": _BERT,
    "electra": _BERT,
    # GPT-2 fuses q, k and v into one Conv1D (c_attn): defaults naming q, k or v take its slices.
    "gpt2": {
        "qkv": ["attn.c_attn"], "o": ["attn.c_proj"], "attn": ["attn"], "attn_out": ["attn"],
        "ffn_in": ["mlp.c_fc"], "ffn_in_block": ["mlp"], "ffn_out": ["mlp.c_proj"], "ffn": ["mlp"],
        "ffn_block_out": ["mlp"], "norm": ["ln_1", "ln_2"],
    },
    "llama": _LLAMA,
    "mistral": _LLAMA,
    "qwen2": _LLAMA,
    "opt": _OPT_BART,
    "bart": _OPT_BART,
    "t5": {
        "q": ["q"], "k": ["k"], "v": ["v"], "o": ["o"], "attn": ["SelfAttention"], "attn_out": ["SelfAttention"],
        "ffn_in": ["wi"], "ffn_in_block": ["DenseReluDense"], "ffn_out": ["wo"], "ffn": ["DenseReluDense"],
        "ffn_block_out": ["DenseReluDense"], "norm": ["layer_norm"],
    },
}
