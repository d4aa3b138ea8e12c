"""Prompt tuning (Lester et al. 2021): trainable soft token embeddings inserted into the input, input -> input route.

::

    [e(x_1) … e(x_L)]  ->  [e(x_1) … e(x_i)] P [e(x_i+1) … e(x_L)],   P: soft_token_num × d, trainable

The delta rewrites the model's call: ``input_ids`` become ``inputs_embeds`` with ``P`` inserted, and the
``attention_mask`` (ones), ``token_type_ids`` (zeros), ``position_ids`` and causal-LM ``labels`` (-100) are
extended to match.  Decoders get ``P`` first (``i = 0``); encoders that pool their first token get it after that
token (``i = 1``), so the pooler keeps reading ``[CLS]``.  In an encoder-decoder the encoder's input gets ``P``
first (the encoder is hooked itself, since ``generate()`` calls it on its own) and the mask the decoder's
cross-attention reads is extended on the model's call.  During ``generate()`` the prompt enters the KV cache at
the first step; later steps only get their mask and positions shifted.  Outputs are ``soft_token_num`` positions
longer than the inputs, and with a learned position table prompt + input (+ generated tokens) must fit it.  With
``token_init`` the prompt starts as embeddings of random vocabulary tokens (their norm matches the model's, which
matters: random vectors of the wrong scale stall training), else uniform in ``±init_range``.  ``insert_at`` sets
``i`` by hand (encoders only).  Parameters: ``soft_token_num · d``.

With ``reparameterize`` (residual reparameterisation, Razdaibiedina et al. 2023) the prompt the model reads is

    P' = P + W_up ReLU(W_down P + b_down) + b_up,    W_down: m × d,  W_up: d × m (zero at init, so P' = P),

one small MLP shared by the prompt's tokens (``m = reparameterize_hidden``), which couples their updates (on
MiniLM-L6 it reached its best point a third sooner, at the same accuracy: docs/study.md); ``2·m·d + m + d`` more
parameters, and P' costs one MLP pass per call that inserts the prompt.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from .. import compat
from ..base import DeltaBase
from ..config import MAX_SIZE, DeltaConfig, hyper
from ..probe import Seen, evaluating, first_tensor, keyword_inputs
from ..routing import Route
from .positions import check_room


@dataclass
class SoftPromptConfig(DeltaConfig):
    soft_token_num: int = hyper(20, low=1, high=MAX_SIZE)
    init_range: float = hyper(0.5, above=0, high=1e3)
    token_init: bool = True
    insert_at: int | None = hyper(None, low=0, high=MAX_SIZE)  # None: first, or after the first token of encoders
    reparameterize: bool = False
    reparameterize_hidden: int = hyper(128, low=1, high=MAX_SIZE)


def _encoder_name(model: nn.Module) -> list[str]:
    if not getattr(getattr(model, "config", None), "is_encoder_decoder", False):
        return []
    encoder = model.get_encoder()
    return [name for name, module in model.named_modules() if module is encoder][:1]


def _insert(tensor: torch.Tensor, at: int, block: torch.Tensor) -> torch.Tensor:
    return torch.cat([tensor[:, :at], block.to(tensor.dtype), tensor[:, at:]], dim=1)


class SoftPrompt(nn.Module):
    """Insert ``soft_embeds`` into the embedded input of every call that does not continue a cached prefix."""

    rewrites_call = True

    def __init__(self, embedding: nn.Embedding, config: SoftPromptConfig, insert_at: int, causal_lm: bool,
                 host: nn.Module) -> None:
        super().__init__()
        n = config.soft_token_num
        self.limit = compat.position_limit(host)
        check_room(self.limit, n + insert_at + 1, f"soft_token_num={n} and {insert_at + 1} token(s) of input")
        self._embedding = (embedding,)  # a tuple: not registered, it belongs to the backbone
        weight = embedding.weight
        if config.token_init:
            low = min(1000, weight.shape[0] // 10)  # skip the special / rare low ids most vocabularies start with
            ids = torch.randint(low, weight.shape[0], (n,), device=weight.device)
            initial = weight.detach()[ids].clone()
        else:
            initial = torch.empty(n, weight.shape[1], device=weight.device, dtype=weight.dtype)
            initial.uniform_(-config.init_range, config.init_range)
        self.soft_embeds = nn.Parameter(initial)
        self.reparameterization = _ResidualMLP(weight.shape[1], config.reparameterize_hidden, weight) \
            if config.reparameterize else None
        self.insert_at = insert_at
        self.causal_lm = causal_lm

    def prompt(self) -> torch.Tensor:
        """The ``soft_token_num × d`` embeddings the model reads."""
        if self.reparameterization is None:
            return self.soft_embeds
        return self.reparameterization(self.soft_embeds)

    def forward(self, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        kwargs = dict(kwargs)
        n, at = self.soft_embeds.shape[0], self.insert_at
        cache = compat.passed_cache(kwargs)
        cached = compat.cache_length(cache) if cache is not None else 0
        if cached:
            # A generation step after the first: the prompt is in the cache; shift the mask and positions past it.
            new = next(kwargs[k] for k in ("input_ids", "inputs_embeds") if kwargs.get(k) is not None).shape[1]
            check_room(self.limit, cached + new, f"the soft prompt ({n}) and {cached + new - n} tokens")
            mask = compat.padding_mask(kwargs)
            if mask is not None:
                kwargs["attention_mask"] = _insert(mask, at, mask.new_ones(mask.shape[0], n))
            if kwargs.get("position_ids") is not None:
                kwargs["position_ids"] = kwargs["position_ids"] + n
            compat.shift_cache_position(kwargs, n)
            return args, kwargs
        embeds = kwargs.pop("inputs_embeds", None)
        ids = kwargs.pop("input_ids", None)
        if embeds is None:
            if ids is None:
                raise ValueError("soft prompts need input_ids or inputs_embeds")
            embeds = self._embedding[0](ids)
        batch = embeds.shape[0]
        if embeds.shape[1] < at:
            raise ValueError(f"the soft prompt goes after token {at} (insert_at), and the input has only "
                             f"{embeds.shape[1]}")
        compat.padding_mask(kwargs)  # checks its shape
        check_room(self.limit, embeds.shape[1] + n, f"the soft prompt ({n}) and an input of {embeds.shape[1]} tokens")
        kwargs["inputs_embeds"] = _insert(embeds, at, self.prompt().expand(batch, -1, -1))
        for key, fill in (("attention_mask", 1), ("token_type_ids", 0)):
            # A mask already longer than the input was extended by the enclosing encoder-decoder call.
            if kwargs.get(key) is not None and kwargs[key].shape[1] == embeds.shape[1]:
                kwargs[key] = _insert(kwargs[key], at, kwargs[key].new_full((batch, n), fill))
        if self.causal_lm and kwargs.get("labels") is not None:
            kwargs["labels"] = _insert(kwargs["labels"], at, kwargs["labels"].new_full((batch, n), -100))
        positions = kwargs.get("position_ids")
        if positions is not None:
            # After the token before it; or first: the row's smallest position, which is its first real token's
            # whatever position left padding was given (0 or 1, depending on the transformers release).
            start = positions[:, at - 1:at] + 1 if at else positions.amin(dim=1, keepdim=True)
            prompt = start + torch.arange(n, device=positions.device)
            kwargs["position_ids"] = torch.cat([positions[:, :at], prompt, positions[:, at:] + n], dim=1)
        compat.shift_cache_position(kwargs, n, extend=True)
        return args, kwargs


class _ResidualMLP(nn.Module):
    """``p + up(relu(down(p)))``, ``up`` zero at init."""

    def __init__(self, dim: int, hidden: int, like: torch.Tensor) -> None:
        super().__init__()
        factory = {"device": like.device, "dtype": like.dtype}
        self.down = nn.Linear(dim, hidden, **factory)
        self.up = nn.Linear(hidden, dim, **factory)
        nn.init.zeros_(self.up.weight)
        nn.init.zeros_(self.up.bias)

    def forward(self, prompt: torch.Tensor) -> torch.Tensor:
        return prompt + self.up(torch.relu(self.down(prompt)))


class EncoderMaskExtension(nn.Module):
    """On an encoder-decoder's own call: the encoder's outputs are ``n`` positions longer, so is the mask the
    decoder's cross-attention reads."""

    rewrites_call = True

    def __init__(self, soft_token_num: int) -> None:
        super().__init__()
        self.soft_token_num = soft_token_num

    def forward(self, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        mask = compat.padding_mask(kwargs)
        if mask is not None:
            kwargs = {**kwargs, "attention_mask": _insert(mask, 0, mask.new_ones(mask.shape[0], self.soft_token_num))}
        return args, kwargs


def _input_embeddings(module: nn.Module, pseudo_input) -> nn.Embedding:
    """The embedding the prompt joins, once checked: ``module`` must give the same output for ``inputs_embeds``
    made with it as for the ``input_ids`` (else the prompt would enter a model that ignores or rescales it)."""
    name = type(module).__name__
    try:
        embedding = module.get_input_embeddings()
    except (AttributeError, NotImplementedError):
        embedding = None
    if not isinstance(embedding, nn.Embedding):
        raise TypeError(f"SoftPromptModel needs the input embedding of {name} (get_input_embeddings() gives "
                        f"{type(embedding).__name__})")
    inputs = keyword_inputs(module, pseudo_input)
    inputs["input_ids"] = ids = _ordinary_tokens(inputs["input_ids"], module, embedding.num_embeddings)
    try:  # only the model's own errors are a refusal
        with evaluating(module):
            by_ids = first_tensor(module(**inputs))
            inputs.pop("input_ids")
            by_embeds = first_tensor(module(**inputs, inputs_embeds=embedding(ids)))
        same = torch.equal(by_ids, by_embeds)
    except Exception as error:
        raise TypeError(f"SoftPromptModel passes the prompt to {name} as inputs_embeds, which it does not take "
                        f"in place of input_ids ({type(error).__name__}: {error})") from error
    if not same:
        raise TypeError(f"{name} gives another output for inputs_embeds than for the input_ids they embed (it "
                        "scales or adds to its embeddings itself); SoftPromptModel would train a prompt it reads "
                        "differently")
    return embedding


def _ordinary_tokens(ids: torch.Tensor, module: nn.Module, vocabulary: int) -> torch.Tensor:
    """``ids`` without special tokens (a padding id changes RoBERTa's positions for ids, not for embeddings)."""
    config = getattr(module, "config", None)
    special = set()
    for kind in ("pad", "bos", "eos", "sep", "cls", "mask", "unk"):
        value = getattr(config, f"{kind}_token_id", None)  # an id, or a list of them (several eos tokens)
        special |= {i for i in (value if isinstance(value, (list, tuple)) else [value]) if isinstance(i, int)}
    ordinary = next(i for i in range(vocabulary - 1, -1, -1) if i not in special)
    return ids.masked_fill(torch.isin(ids, torch.tensor(sorted(special) or [-1])), ordinary)


class SoftPromptModel(DeltaBase):
    """Prompt tuning: ``soft_token_num`` trainable embeddings inserted into every input of the model."""

    delta_type = "soft_prompt"
    config_class = SoftPromptConfig
    route = Route.INPUT_INPUT
    default_lr = 3e-2  # prompts move through one embedding each: about 30× a weight delta's rate (docs/study.md)

    takes_modules = False

    def resolve_positions(self) -> list[str]:
        # The model itself; for an encoder-decoder also its encoder, which generate() calls on its own.
        return ["", *_encoder_name(self.backbone_model)]

    def build(self, position: str, module: nn.Module, seen: Seen) -> nn.Module:
        root = self.backbone_model
        config = getattr(root, "config", None)
        if config is None or not hasattr(root, "get_input_embeddings"):
            raise TypeError(f"SoftPromptModel supports transformers models, not {type(root).__name__}")
        if getattr(config, "is_encoder_decoder", False):
            if position == "":
                return EncoderMaskExtension(self.config.soft_token_num)
            embedding = _input_embeddings(module, self.pseudo_input)
            return SoftPrompt(embedding, self.config, insert_at=self._insert_at(True, module), causal_lm=False,
                              host=module)
        causal_lm = module.can_generate() if hasattr(module, "can_generate") else False
        stateful = causal_lm and compat.keeps_state(module, keyword_inputs(module, self.pseudo_input))
        if stateful and not compat.cache_argument(module):
            # Generation steps after the first could not be told apart: the prompt would go in again.  (A model
            # that keeps nothing between calls, like OpenAI GPT, reads the whole sequence each step: fine.)
            raise compat.CompatibilityError(
                f"SoftPromptModel cannot find the KV cache argument of {type(module).__name__}.forward (looked for "
                f"{', '.join(compat.CACHE_ARGUMENTS)})")
        decoder = causal_lm or getattr(config, "is_decoder", False)
        return SoftPrompt(_input_embeddings(module, self.pseudo_input), self.config,
                          insert_at=self._insert_at(decoder or getattr(config, "is_encoder_decoder", False), module),
                          causal_lm=causal_lm, host=module)

    def _insert_at(self, first: bool, module: nn.Module) -> int:
        """Where the prompt goes: first in decoders and encoder-decoders; after the first token (``[CLS]``, which
        the pooler reads) in encoders, unless ``insert_at`` says otherwise (encoders only)."""
        chosen = self.config.insert_at
        if chosen is not None and chosen and first:
            raise ValueError(f"insert_at={chosen}: {type(module).__name__} generates after its input, so the prompt "
                             "goes first (insert_at=0 or unset)")
        return (0 if first else 1) if chosen is None else chosen
