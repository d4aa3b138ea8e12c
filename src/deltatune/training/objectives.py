"""How a backbone classifies text: a classification head, or (decoders) writing a label word after the text.

``classify``: ``AutoModelForSequenceClassification``; the new head is trained with the delta.  It reads the pooling
``pooling`` chooses (:mod:`deltatune.pooling`; by default the mean for checkpoints trained to pool by mean).
``label-words``: a causal LM reads ``"<text>\\nAnswer:"`` (after a BOS token, if its tokenizer adds one) and is
trained to continue with `` <label word>``; it predicts the label whose word is most likely (its first token when the
label words' first tokens differ, else the whole word's log-likelihood).  No new head: only the delta is trained
(survey: prompt-based fine-tuning).  The model's head computes logits only at the positions that are scored
(:mod:`deltatune.kept_logits`).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
import transformers
from torch import nn

from .. import sharding
from ..loading import load_backbone, model_path, tokenizer_path
from ..pooling import resolve as resolve_pooling
from .data import Rows, Task
from ..kept_logits import logits_at

PROMPT_SUFFIX = "\nAnswer:"


class Classify:
    name = "classify"

    def __init__(self, backbone: str, task: Task, max_length: int, pooling: str = "auto") -> None:
        self.tokenizer = _tokenizer(backbone)
        self.backbone_options = {"num_labels": len(task.labels), "id2label": dict(enumerate(task.labels)),
                                 "label2id": {label: i for i, label in enumerate(task.labels)},
                                 "pooling": resolve_pooling(pooling, model_path(backbone))}
        self.model, info = _load(backbone, "AutoModelForSequenceClassification", self.backbone_options)
        if self.model.config.pad_token_id is None:  # decoders classify at the last non-pad token
            self.model.config.pad_token_id = self.tokenizer.pad_token_id
        self.head = sorted({key.rsplit(".", 1)[0] for key in info["missing_keys"]})  # newly initialised: trained
        self.max_length = max_length
        self.trained = self.model  # what a training forward calls: the model, or an engine's wrapper of it

    def _encode(self, rows: Rows):
        return self.tokenizer([text for text, _ in rows], padding=True, truncation=True,
                              max_length=self.max_length, return_tensors="pt").to(_device(self.model))

    def loss(self, rows: Rows) -> torch.Tensor:
        labels = torch.tensor([label for _, label in rows], device=_device(self.model))
        return self.trained(**self._encode(rows), labels=labels).loss

    def weight(self, rows: Rows) -> int:
        """How many terms the loss of ``rows`` averages: one per row."""
        return len(rows)

    @torch.no_grad()
    def predict(self, rows: Rows) -> torch.Tensor:
        return self.model(**self._encode(rows)).logits.argmax(-1)


class LabelWords:
    name = "label-words"

    def __init__(self, backbone: str, task: Task, max_length: int, pooling: str = "auto") -> None:
        chosen_pooling(self.name, pooling, backbone)  # refuses mean
        self.tokenizer = _tokenizer(backbone)
        self.backbone_options = {}
        self.model, _ = _load(backbone, "AutoModelForCausalLM", {})
        _check_causal(self.model, backbone)
        self.head: list[str] = []
        self.max_length = max_length
        self.trained = self.model
        encode = lambda s: self.tokenizer(s, add_special_tokens=False)["input_ids"]  # noqa: E731
        self.lead = _leading_special_tokens(self.tokenizer)
        self.suffix = encode(PROMPT_SUFFIX)
        self.words = [encode(" " + word) for word in task.words]
        firsts = [word[0] for word in self.words]
        self.first_tokens = torch.tensor(firsts) if len(set(firsts)) == len(firsts) else None

    def encode(self, rows: Rows, words: list[list[int]]):
        """Right-padded ids and mask of ``lead + text + suffix + word`` per row (``lead``: what the tokenizer puts
        before a text, such as a BOS token); the positions whose logits predict each row's word, ``(rows, longest
        word)`` (one position, the prompt's last, for empty words); and the words' tokens there (-100 past a word's
        end)."""
        texts = self.tokenizer([text for text, _ in rows], add_special_tokens=False)["input_ids"]
        room = self.max_length - len(self.lead) - len(self.suffix)
        prompts = [self.lead + text[:max(1, room - len(word))] + self.suffix for text, word in zip(texts, words)]
        width = max(len(p) + len(w) for p, w in zip(prompts, words))
        longest = max([1, *map(len, words)])
        ids = torch.full((len(rows), width), self.tokenizer.pad_token_id)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        targets = torch.full((len(rows), longest), -100)
        for i, (prompt, word) in enumerate(zip(prompts, words)):
            ids[i, : len(prompt) + len(word)] = torch.tensor(prompt + word)
            mask[i, : len(prompt) + len(word)] = 1
            targets[i, : len(word)] = torch.tensor(word, dtype=torch.long)
        # The logit at the prompt's last position predicts the word's first token, and so on; a shorter word's
        # extra positions are clamped into the row and carry no target.
        ends = torch.tensor([len(prompt) - 1 for prompt in prompts])
        columns = (ends[:, None] + torch.arange(longest)).clamp(max=width - 1)
        device = _device(self.model)
        return ids.to(device), mask.to(device), columns, targets.to(device)

    def _word_logits(self, model: nn.Module, rows: Rows, words: list[list[int]]):
        """The logits at :meth:`encode`'s positions, ``(rows, longest word, vocabulary)``, and the targets there;
        the model's head runs at these positions only (:mod:`deltatune.kept_logits`)."""
        ids, mask, columns, targets = self.encode(rows, words)
        logits = logits_at(self.model, lambda: model(input_ids=ids, attention_mask=mask).logits, columns,
                           ids.shape[1])
        return logits, targets

    def loss(self, rows: Rows) -> torch.Tensor:
        logits, targets = self._word_logits(self.trained, rows, [self.words[label] for _, label in rows])
        return F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten(), ignore_index=-100)

    def weight(self, rows: Rows) -> int:
        """How many terms the loss of ``rows`` averages: one per label-word token."""
        return sum(len(self.words[label]) for _, label in rows)

    @torch.no_grad()
    def predict(self, rows: Rows) -> torch.Tensor:
        if self.first_tokens is not None:  # one pass: compare the label words' first tokens after the prompt
            logits, _ = self._word_logits(self.model, rows, [[] for _ in rows])
            return logits[:, 0, self.first_tokens].argmax(-1)
        scores = []
        for word in self.words:  # the whole word's log-likelihood, one pass per label
            logits, targets = self._word_logits(self.model, rows, [word] * len(rows))
            scores.append(logits.log_softmax(-1).gather(-1, targets.unsqueeze(-1)).squeeze(-1).sum(-1))
        return torch.stack(scores, -1).argmax(-1)


def _leading_special_tokens(tokenizer) -> list[int]:
    """The ids ``tokenizer`` puts before a text (such as a BOS token; SmolLM2's tokenizer puts none): a model
    trained with them expects them first."""
    plain, full = tokenizer("a", add_special_tokens=False)["input_ids"], tokenizer("a")["input_ids"]
    return next((full[:k] for k in range(len(full) - len(plain) + 1) if full[k:k + len(plain)] == plain), [])


def _check_causal(model: nn.Module, backbone: str) -> None:
    """Writing label words only teaches a model whose tokens cannot see later ones: an encoder loaded as a language
    model (BertLMHeadModel) would read the answer it is asked to write.  Checked by behaviour: change the last
    token and see whether the first position's output moves."""
    with torch.no_grad(), sharding.each_module_whole(model):  # one row per call: equal kernels, equal numbers
        first, second = (model(input_ids=torch.tensor([[5, 6, 7, last]])).logits[0, 0] for last in (8, 9))
    if not torch.equal(first, second):
        raise ValueError(f"--objective label-words needs a causal language model; {backbone} "
                         f"({type(model).__name__}) attends to later tokens. Use --objective classify")


OBJECTIVES = {"classify": Classify, "label-words": LabelWords}


def _device(model: nn.Module) -> torch.device:
    """Where the model's inputs go: its first parameter's device (each rank's GPU, or the CPU)."""
    return next(model.parameters()).device


def lead_tokens(backbone: str) -> list[int]:
    """What label words put before each text on ``backbone`` (:func:`_leading_special_tokens`)."""
    return _leading_special_tokens(_tokenizer(backbone))


def _tokenizer(backbone: str):
    tokenizer = transformers.AutoTokenizer.from_pretrained(tokenizer_path(backbone))
    if tokenizer.pad_token is None:  # LLaMA-family tokenizers have none; padding is masked anyway
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def _load(backbone: str, auto_class: str, options: dict) -> tuple[nn.Module, dict]:
    return load_backbone(backbone, auto_class, output_loading_info=True, **options)


def chosen_pooling(objective: str, pooling: str, backbone: str) -> str:
    """What ``objective`` reads: a classifier's ``pooling`` resolved (``auto`` becomes what the checkpoint declares);
    label words are read at the last token, as ``model`` does."""
    if objective == Classify.name:
        return resolve_pooling(pooling, model_path(backbone))
    if pooling == "mean":
        raise ValueError("--pooling mean is for --objective classify; label words are read at the last token")
    return "model"


def make_objective(name: str, backbone: str, task: Task, max_length: int, pooling: str = "auto"):
    if name not in OBJECTIVES:
        raise ValueError(f"unknown objective {name!r}; choose {' or '.join(OBJECTIVES)}")
    return OBJECTIVES[name](backbone, task, max_length, pooling)
