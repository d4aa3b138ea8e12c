"""Print the delta parameter counts of docs/methods.md: python docs/parameter_counts.py"""

import torch
import transformers as tf

import deltatune as dt
from deltatune import assets

FFN_OUT, FFN_IN = r"[r]layer\.\d+\.output", r"[r]layer\.\d+\.intermediate"
ALL_LINEAR = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]

# row: (MiniLM-L6 delta, SmolLM2-135M delta), each a function of the backbone (None: not supported)
ROWS = {
    "LoRA r=8 (q, v)": (lambda m: dt.LoraModel(m, ["query", "value"]),
                        lambda m: dt.LoraModel(m, ["q_proj", "v_proj"])),
    "DoRA r=8 (q, v)": (lambda m: dt.LoraModel(m, ["query", "value"], use_dora=True),
                        lambda m: dt.LoraModel(m, ["q_proj", "v_proj"], use_dora=True)),
    "Adapter m=24 (attention output, FFN output)": (lambda m: dt.AdapterModel(m, ["attention.output", FFN_OUT]),
                                                    lambda m: dt.AdapterModel(m, ["self_attn", "mlp"])),
    "Low-rank adapter (d/32, k=1)": (lambda m: dt.LowRankAdapterModel(m, ["attention.output", FFN_OUT]),
                                     lambda m: dt.LowRankAdapterModel(m, ["self_attn", "mlp"])),
    "Compacter (d/16, n=4, r=1, shared rules)": (lambda m: dt.CompacterModel(m, ["attention.output", FFN_OUT]),
                                                 lambda m: dt.CompacterModel(m, ["self_attn", "mlp"])),
    "Parallel adapter m=24 (attention, FFN)": (lambda m: dt.ParallelAdapterModel(m, ["attention", FFN_IN]),
                                               lambda m: dt.ParallelAdapterModel(m, ["self_attn", "mlp"])),
    "BitFit (BERT: q, k, v, dense, LayerNorm; LLaMA: all 7 projections)": (
        lambda m: dt.BitFitModel(m, ["query", "key", "value", "dense", "LayerNorm"]),
        lambda m: dt.BitFitModel(m, ALL_LINEAR)),
    "(IA)³ (keys, values, FFN output input)": (
        lambda m: dt.IA3Model(m, ["key", "value", FFN_OUT + r"\.dense"], feedforward_modules=[FFN_OUT + r"\.dense"]),
        lambda m: dt.IA3Model(m, ["k_proj", "v_proj", "down_proj"], feedforward_modules=["down_proj"])),
    "Soft prompt, 20 tokens": (dt.SoftPromptModel, dt.SoftPromptModel),
    "Prefix, 6 tokens, reparameterized 512/512": (dt.PrefixModel, dt.PrefixModel),
}


def main() -> None:
    minilm = tf.AutoModelForSequenceClassification.from_pretrained(assets.minilm_l6(), num_labels=2)
    smollm2 = tf.AutoModelForCausalLM.from_pretrained(assets.smollm2_135m(), dtype=torch.float32)
    print("| method (positions) | MiniLM-L6 | SmolLM2-135M |\n|---|---|---|")
    for name, builders in ROWS.items():
        counts = []
        for build, backbone in zip(builders, (minilm, smollm2)):
            if build is None:
                counts.append("not yet")
                continue
            delta = build(backbone)
            counts.append(f"{delta.num_delta_parameters():,}")
            delta.detach()
        print(f"| {name} | {' | '.join(counts)} |")


if __name__ == "__main__":
    main()
