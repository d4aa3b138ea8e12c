"""Serve deltas of one backbone behind an OpenAI-compatible HTTP API (/v1/completions, /v1/chat/completions;
with --task classify, /v1/classify).

Each request names its delta as the model (the backbone itself is served under its own name); requests for any
deltas that arrive together run as one mixed batch.  With --task classify each delta answers with the head it was
trained with (a run folder of deltatune train names its labels).  Binds 127.0.0.1 unless --host says otherwise.
Needs the serve extra: pip install "deltatune[serve]".
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from .. import checkpoint
from ..loading import load_backbone, model_path, tokenizer_path
from .options import check_counts
from .training_info import delta_and_options


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--backbone", default="smollm2-135m", help="asset name or folder")
    parser.add_argument("--task", choices=["generate", "classify"], default="generate",
                        help="generate text (a causal LM) or classify it (each delta with its own trained head)")
    parser.add_argument("--delta", action="append", default=[], metavar="NAME=FOLDER",
                        help="a delta to serve as model NAME: a run folder of deltatune train, a deltatune "
                             "checkpoint or a PEFT adapter (repeatable)")
    parser.add_argument("--host", default="127.0.0.1", help="address to bind")
    parser.add_argument("--port", type=int, default=8000, help="port to bind")
    parser.add_argument("--api-key", default=os.environ.get("DELTATUNE_API_KEY"),
                        help="require 'Authorization: Bearer KEY' (default: $DELTATUNE_API_KEY, else none)")
    parser.add_argument("--max-batch", type=int, default=16, help="rows per mixed batch")
    parser.add_argument("--batch-window", type=float, default=0.01, help="seconds to wait for more requests")
    parser.add_argument("--continuous", action="store_true",
                        help="continuous batching: requests join a running generation at its next step and leave it "
                             "when done (deltas that add positions, soft prompts and prefixes, are refused)")
    parser.add_argument("--max-queue", type=int, default=256, help="waiting requests before answering 429")
    parser.add_argument("--max-prompt-tokens", type=int, default=2048, help="longest prompt accepted")
    parser.add_argument("--max-new-tokens", type=int, default=512, help="largest max_tokens accepted")
    parser.add_argument("--max-delta-bytes", type=int, default=None,
                        help="memory for loaded deltas; least recently used ones are unloaded (default: no bound)")
    parser.add_argument("--timeout", type=float, default=120.0, help="seconds a request may take")


def deltas_of(items: list[str]) -> dict[str, str]:
    found = {}
    for item in items:
        name, sep, folder = item.partition("=")
        if not sep or not name or not folder:
            raise ValueError(f"--delta takes NAME=FOLDER, got {item!r}")
        if name in found:
            raise ValueError(f"--delta names {name!r} twice")
        found[name] = folder
    return found


def _one_pooling(folders: dict[str, tuple[Path, dict]]) -> str:
    """The pooling the deltas' heads were trained with (deltatune.pooling): one backbone serves them all."""
    poolings = {name: options.get("pooling", "model") for name, (_, options) in folders.items()}
    if len(set(poolings.values())) > 1:
        raise ValueError(f"these deltas were trained with different poolings ({poolings}); one backbone pools one "
                         "way: serve them from two servers")
    return next(iter(poolings.values()))


def labels_of(folder: Path, options: dict, backbone: str | None = None) -> list[str] | None:
    """The labels of a delta's own head: recorded by deltatune train, else ``LABEL_i`` for each output of the last
    head weight saved with it (in ``backbone``'s order, for a PEFT adapter's modules_to_save); None without a head."""
    if "id2label" in options:
        return [str(label) for _, label in sorted(options["id2label"].items(), key=lambda item: int(item[0]))]
    if (folder / checkpoint.CONFIG_FILE).is_file():
        names = [k for k in checkpoint.read_config(folder).get("unfrozen_backbone", []) if k.endswith(".weight")]
        last = [f"backbone.{names[-1]}"] if names else []
        heads = list(checkpoint.read_tensors(folder, names=last).values())
    elif (folder / "adapter_config.json").is_file():
        heads = _peft_head_weights(folder, backbone)
    else:
        raise FileNotFoundError(f"{folder} is neither a run folder of deltatune train, a deltatune checkpoint "
                                f"({checkpoint.CONFIG_FILE}) nor a PEFT adapter (adapter_config.json)")
    return [f"LABEL_{i}" for i in range(heads[-1].shape[0])] if heads else None


def _peft_head_weights(folder: Path, backbone: str | None) -> list:
    from .. import peft_format

    tensors = peft_format.adapter_tensors(folder)
    weights = [k for k in tensors if peft_format.lora_position(k) is None and k.endswith(".weight")]
    if len(weights) > 1:  # which is last: the order of the sequence classifier's parameters, from a skeleton
        import torch
        import transformers

        if backbone is None:
            raise ValueError(f"{folder} saved several head weights ({weights}); name the backbone to order them")
        with torch.device("meta"):
            skeleton = transformers.AutoModelForSequenceClassification.from_config(
                transformers.AutoConfig.from_pretrained(model_path(backbone)))
        order = [name for name, _ in skeleton.named_parameters(remove_duplicate=False)]
        weights.sort(key=lambda k: order.index(k) if k in order else -1)
    return [tensors[k] for k in weights]


def run(args: argparse.Namespace) -> None:
    check_counts(max_batch=args.max_batch, max_queue=args.max_queue, max_prompt_tokens=args.max_prompt_tokens,
                 max_new_tokens=args.max_new_tokens, max_delta_bytes=args.max_delta_bytes)
    if not 0 <= args.port <= 65535:
        raise ValueError(f"--port must be between 0 and 65535, got {args.port}")
    if args.continuous and args.task == "classify":
        raise ValueError("--continuous is for generation; a classification is one forward pass")
    deltas = deltas_of(args.delta)
    try:
        import uvicorn

        from ..serve import Engine, create_app
    except ImportError as error:
        raise ValueError(f'deltatune serve needs the serve extra ({error}): pip install "deltatune[serve]"') from None
    import transformers

    from ..bank.registry import DeltaRegistry

    folders = {name: delta_and_options(folder) for name, folder in deltas.items()}
    tokenizer = transformers.AutoTokenizer.from_pretrained(tokenizer_path(args.backbone))
    labels = {name: labels_of(folder, options, args.backbone) if args.task == "classify" else None
              for name, (folder, options) in folders.items()}
    if args.task == "classify":
        headless = [name for name, names in labels.items() if names is None]
        if not deltas or headless:
            raise ValueError("--task classify serves each delta with the head trained with it; "
                             + (f"{', '.join(headless)} saved no head" if headless else "give at least one --delta"))
        model = load_backbone(args.backbone, "AutoModelForSequenceClassification",
                              num_labels=max(map(len, labels.values())), pooling=_one_pooling(folders))
        if model.config.pad_token_id is None:  # decoders classify at the last token that is not padding
            model.config.pad_token_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (
                tokenizer.eos_token_id)
    else:
        model = load_backbone(args.backbone)
    registry = DeltaRegistry(model, args.max_delta_bytes)
    for name, (folder, _) in folders.items():
        registry.register(name, folder, labels[name])
    base = os.path.basename(os.path.normpath(args.backbone))
    if base in deltas:
        raise ValueError(f"--delta {base}=... takes the backbone's own name; choose another")
    engine = Engine(model, tokenizer, registry, max_batch=args.max_batch, window=args.batch_window,
                    max_queue=args.max_queue, continuous=args.continuous)
    for name in deltas:
        engine.check_servable(name)
    app = create_app(engine, base_name=base, api_key=args.api_key, max_prompt_tokens=args.max_prompt_tokens,
                     max_new_tokens=args.max_new_tokens, timeout=args.timeout)
    print(f"deltatune serve: {base} with {', '.join(deltas) or 'no deltas'} on http://{args.host}:{args.port}/v1",
          flush=True)
    uvicorn.run(app, host=args.host, port=args.port, log_level="warning", timeout_graceful_shutdown=30)
