"""Rules: *where* an adaptation goes (targets) and *what* it is (a method and its hyper-parameters).

Rules are frozen dataclasses that validate themselves when built, so a bad hyper-parameter fails at the
line that wrote it, not deep inside a training step. They round-trip through plain dicts (and so JSON)::

    rule = LoRA(targets=["q_proj", "v_proj"], r=8, alpha=16)
    assert Rule.from_dict(rule.to_dict()) == rule

``targets`` is resolved against the captured graph by :mod:`fxpeft.graph.selectors`; see there for the forms
it accepts (PEFT-style names, globs, a regex string, module types, ``"all-linear"`` and graph roles such
as ``"attention.query"``).

Every number is checked: finite (never NaN or inf), an ``int`` where PEFT's is one (``r``, ranks, layer indices,
token counts, sizes: ``4.9`` is refused, never truncated), in range, and sizes at most ``MAX_SIZE``. Every regex
(a ``targets`` string, ``rank_pattern``/``alpha_pattern`` keys, ``layers_pattern``) passes
:func:`fxpeft.graph.selectors.regex_problem`, so it matches in bounded time. :func:`number_problem` and
:func:`check_alpha` are the checks (:mod:`fxpeft.rule_checks`, re-exported here), for other code that takes such values
(``AdaptedModel.set_alpha``).

Rules take PEFT's names for their fields too (``LoRA(target_modules=[...], lora_alpha=16, lora_dropout=0.1)``; each
rule's ``aliases``), and any other unknown keyword is a :class:`RuleError` naming the rule's fields and, for PEFT's
names of what fxpeft takes differently, what to write instead (:mod:`fxpeft.peft_names`).
"""

from __future__ import annotations

import dataclasses
import functools
import math
import re
import sys
from typing import Any, ClassVar, Sequence, Union

import torch

from fxpeft.errors import RuleError, UnsupportedError
from fxpeft.graph.bounded_regex import bounded_regex
from fxpeft.graph.selectors import ALL_LINEAR, ROLES, as_regex
from fxpeft.methods import codec_for_peft_type, method_for
from fxpeft.param_targets import normalize_target_parameters
from fxpeft.peft_names import RuleType, not_a_rule
from fxpeft.rule_checks import MAX_SIZE, check_alpha, check_number, check_regex, number_problem

__all__ = ["Rule", "LoRA", "Trainable", "Targets", "normalize_targets", "as_rule_list", "MAX_SIZE", "number_problem",
           "check_alpha"]

Targets = Union[str, type, Sequence[Union[str, type]]]

_RULE_TYPES: dict[str, type["Rule"]] = {}
def _type_name(cls: type) -> str:
    return f"{cls.__module__}:{cls.__qualname__}"


def _type_from_name(name: str) -> type:
    """The class ``module:qualname`` names, looked up among the modules already imported: a rules file is data,
    so reading one never imports (runs) code."""
    module_name, _, qualname = str(name).partition(":")
    obj: Any = sys.modules.get(module_name)
    if obj is None:
        raise RuleError(f"A target names the type {name!r}, but module {module_name!r} is not imported; a rules file "
                        "never imports code: import the module first, or select by module names.")
    for part in qualname.split("."):
        obj = getattr(obj, part, None)
    if not isinstance(obj, type):
        raise RuleError(f"A target names the type {name!r}, which is not a class of module {module_name!r}.")
    return obj


def normalize_targets(value: Any, field: str, rule: str, allow_none: bool = False, allow_empty: bool = False) -> Any:
    """A rule's targets (``targets``, ``exclude``, ...) as a str (PEFT's regex form, checked to run in bounded time) or
    a tuple of names/globs/roles/types; RuleError naming ``rule`` and ``field`` otherwise. None passes with
    ``allow_none``, an empty list with ``allow_empty``. Every rule type validates its targets with it."""
    if value is None:
        if allow_none:
            return None
        raise RuleError(f"{rule}: `{field}` is required; pass module names, globs, a regex, types or roles.")
    if isinstance(value, str) and value not in ROLES and value != ALL_LINEAR and as_regex(value) is not None:
        check_regex(rule, field, value)  # one string is a regex (a glob when it is not a valid one)
    if isinstance(value, (str, type)):
        return value
    try:
        items = tuple(value)
    except TypeError:
        raise RuleError(f"{rule}: `{field}` must be a string, a type or a list of them, got {value!r}.") from None
    for item in items:
        if not isinstance(item, (str, type)):
            raise RuleError(f"{rule}: every entry of `{field}` must be a string or a type, got {item!r}.")
    if not items and not allow_empty:
        raise RuleError(f"{rule}: `{field}` is empty; name at least one target.")
    return items


def _targets_to_json(value: Any) -> Any:
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, type):
        return {"type": _type_name(value)}
    return [_targets_to_json(item) for item in value]


def _targets_from_json(value: Any) -> Any:
    if isinstance(value, dict) and set(value) == {"type"}:
        return _type_from_name(value["type"])
    if isinstance(value, list):
        return tuple(_targets_from_json(item) for item in value)
    return value


def as_rule_list(rules: Any, what: str) -> list["Rule"]:
    """``rules`` (one rule or a sequence of them) as a non-empty list; :class:`RuleError` naming ``what`` for
    anything else."""
    if isinstance(rules, Rule):
        rules = [rules]
    try:
        rules = list(rules)
    except TypeError:
        raise not_a_rule(what, rules) from None
    for rule in rules:
        if not isinstance(rule, Rule):
            raise not_a_rule(what, rule)
    if not rules:
        raise RuleError(f"{what} needs at least one rule.")
    return rules


@dataclasses.dataclass(frozen=True)
class Rule(metaclass=RuleType):
    """Base class of every rule. Subclasses are frozen dataclasses with a ``method`` name.

    ``aliases`` maps PEFT's names of a rule's fields to the rule's own (``LoRA(target_modules=..., lora_alpha=16)``
    is ``LoRA(targets=..., alpha=16)``; giving both names of one field is a RuleError); ``peft_hints`` says, for
    PEFT's names of things the rule takes differently, what to write instead (a RuleError shows it)."""

    method: ClassVar[str] = ""
    aliases: ClassVar[dict[str, str]] = {}
    peft_hints: ClassVar[dict[str, str]] = {}

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        if cls.method:
            known = _RULE_TYPES.get(cls.method)
            if known is not None and (known.__module__, known.__qualname__) != (cls.__module__, cls.__qualname__):
                raise RuleError(f"Two rule types are named {cls.method!r}: {known.__module__}.{known.__qualname__} "
                                f"and {cls.__module__}.{cls.__qualname__}; give the new rule another `method` name.")
            _RULE_TYPES[cls.method] = cls

    def to_dict(self) -> dict:
        """A JSON-ready dict: ``{"method": ..., <fields>}``."""
        data = {"method": self.method}
        for field in dataclasses.fields(self):
            value = getattr(self, field.name)
            data[field.name] = _targets_to_json(value) if field.name in ("targets", "exclude") else value
        return data

    @staticmethod
    def from_dict(data: dict) -> "Rule":
        """Rebuild a rule from :meth:`to_dict`'s output (validated like any other construction)."""
        data = dict(data)
        method = data.pop("method", None)
        cls = _RULE_TYPES.get(method) if isinstance(method, str) else None
        if cls is None:
            raise RuleError(f"Unknown rule method {method!r}; known methods: {sorted(_RULE_TYPES)}.")
        known = {field.name for field in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise RuleError(f"{cls.__name__}: unknown field(s) {unknown}; known fields: {sorted(known)}.")
        for name in ("targets", "exclude"):
            if name in data:
                data[name] = _targets_from_json(data[name])
        return cls(**data)

    @classmethod
    def from_peft_config(cls, config) -> list["Rule"]:
        """Rules equivalent to a PEFT config object (or its dict), through the method's codec: for ``LoRA``, the
        LoRA rule plus a :class:`Trainable` rule for ``modules_to_save``. On ``Rule`` itself the config's
        ``peft_type`` picks the method. Unsupported fields are an error naming them."""
        data = config.to_dict() if hasattr(config, "to_dict") else dict(config)
        if cls is Rule:
            peft_type = data.get("peft_type")
            codec = codec_for_peft_type(getattr(peft_type, "value", peft_type) or "LORA")
        else:
            codec = method_for(cls).codec
        if codec is None:
            raise UnsupportedError(f"{cls.__name__} has no PEFT config of its own.")
        return codec.to_rules(data, None)

    def to_peft_config(self, modules_to_save: list[str] | None = None):
        """This rule as PEFT's config object (``peft.LoraConfig`` for LoRA; needs the ``peft`` package)."""
        codec = method_for(self).codec
        if codec is None:
            raise UnsupportedError(f"{type(self).__name__} has no PEFT config of its own.")
        return codec.rule_to_peft_config(self, modules_to_save)


def _pattern_regex(key: str) -> str:
    """The regex PEFT's ``get_pattern_key`` matches a ``rank_pattern``/``alpha_pattern`` key with."""
    return rf"(.*\.)?({key})$"


@functools.lru_cache(maxsize=256)
def _matchers(pattern: tuple) -> tuple:
    """A ``rank_pattern``/``alpha_pattern`` as (bounded regex, value) pairs, compiled once."""
    return tuple((bounded_regex(_pattern_regex(key)), value) for key, value in pattern)


@dataclasses.dataclass(frozen=True)
class LoRA(Rule):
    """Low-rank adaptation (Hu et al., 2021), numerically the same as PEFT's ``LoraConfig``. Targets may also select
    convolutions and embeddings (PEFT's forms: fxpeft/passes/lora/conv.py, embedding.py); "all-linear" selects linears.
    Each selected linear ``y = x W^T + b`` becomes ``y + B(A(dropout(x))) * scaling`` with
    ``scaling = alpha / r`` (``alpha / sqrt(r)`` with ``use_rslora``). ``A`` starts kaiming-uniform
    (``init="default"``) or gaussian with std ``1/r`` (``init="gaussian"``), ``B`` starts at zero, so a
    fresh adapter leaves the model's outputs unchanged bit for bit. ``init="random"`` (PEFT's
    ``init_lora_weights=False``) starts ``B`` kaiming-uniform too; ``init="orthogonal"`` (even ``r``) starts
    ``A`` and ``B`` with orthogonal rows so that ``B @ A = 0``. ``use_dora=True``: DoRA (Liu et al., 2024) as PEFT's,
    ``y + (m / ||W + s B A||_row - 1) (y - b) + m / ||...||_row * s B A x``, the norm a constant in backward.

    ``bias``: ``"none"`` (PEFT's default), ``"lora_only"`` (the biases of the adapted linears train) or
    ``"all"`` (every linear bias trains). Trained biases are copies owned by the adapter; the base model's
    tensors are never written.

    Per-site hyper-parameters, as PEFT's ``rank_pattern`` / ``alpha_pattern``: a mapping from a regex to
    ``r`` (or ``alpha``); the first key (in order) that matches the end of a module path
    (``(.*\\.)?(key)$``) gives that site its value. ``layers`` (PEFT's ``layers_to_transform``) keeps only
    the sites whose layer index is listed: the index is the first ``<layers_pattern>.<n>.`` in the path, or
    with no ``layers_pattern`` the first numbered path segment. A linear inside a module that a
    :class:`Trainable` rule of the same adapter trains whole gets no LoRA (PEFT's ``modules_to_save`` rule).
    ``target_parameters`` (PEFT's): raw parameters (MoE expert stacks) whose every use reads ``W + scaling * delta``.

    Example::

        fxpeft.LoRA(targets=["q_proj", "v_proj"], r=8, alpha=16, dropout=0.05)
        fxpeft.LoRA(targets="all-linear", r=16, rank_pattern={"down_proj": 4}, layers=[0, 1])
        fxpeft.LoRA(targets=["attention.query", "attention.value"])   # roles read from the graph
    """

    method: ClassVar[str] = "lora"
    aliases: ClassVar[dict[str, str]] = {"target_modules": "targets", "lora_alpha": "alpha", "lora_dropout": "dropout",
                                         "exclude_modules": "exclude", "layers_to_transform": "layers"}
    peft_hints: ClassVar[dict[str, str]] = {
        "init_lora_weights": "fxpeft's `init`: 'default' (PEFT's True), 'random' (False), 'gaussian' or 'orthogonal'",
        "fan_in_fan_out": "fxpeft reads it from the graph (transformers' Conv1D); drop it"}
    _INITS: ClassVar[tuple] = ("default", "gaussian", "random", "orthogonal")
    _BIASES: ClassVar[tuple] = ("none", "all", "lora_only")

    targets: Targets = None
    r: int = 8
    alpha: float = 8
    dropout: float = 0.0
    init: str = "default"
    use_rslora: bool = False
    use_dora: bool = False
    bias: str = "none"
    exclude: Targets | None = None
    rank_pattern: Any = ()   # {regex: r}, kept as a tuple of (regex, r) pairs in order (rules are hashable)
    alpha_pattern: Any = ()  # {regex: alpha}, likewise
    layers: Any = None       # layer indices to adapt (a tuple), or None for every layer
    layers_pattern: Any = None  # the name before the layer index ("layers", "h", ...): str or tuple, or None
    target_parameters: Any = ()  # PEFT's: raw parameters to adapt (passes/lora/parameters.py), sorted names
    ensure_weight_tying: bool = False  # PEFT's: tie the LoRAs of tied weights (refused at such sites: passes/lora)

    def __post_init__(self):
        check_number("LoRA", "dropout", self.dropout, minimum=0, below=1)
        params = normalize_target_parameters(self.target_parameters, self)
        object.__setattr__(self, "target_parameters", params)
        object.__setattr__(self, "targets", normalize_targets(self.targets, "targets", "LoRA", allow_none=bool(
            params), allow_empty=bool(params)) or None)
        object.__setattr__(self, "exclude", normalize_targets(self.exclude, "exclude", "LoRA", allow_none=True))
        check_number("LoRA", "r", self.r, integer=True, minimum=1, maximum=MAX_SIZE)
        check_alpha(self.alpha, "LoRA")
        if self.init not in self._INITS:
            raise RuleError(f"LoRA: unknown `init` {self.init!r}; use one of {list(self._INITS)}.")
        if self.bias not in self._BIASES:
            raise RuleError(f"LoRA: unknown `bias` {self.bias!r}; use one of {list(self._BIASES)}.")
        for flag in ("use_rslora", "use_dora", "ensure_weight_tying"):
            if not isinstance(getattr(self, flag), bool):
                raise RuleError(f"LoRA: `{flag}` must be True or False, got {getattr(self, flag)!r}.")
        object.__setattr__(self, "rank_pattern", self._pattern("rank_pattern", self.rank_pattern, rank=True))
        object.__setattr__(self, "alpha_pattern", self._pattern("alpha_pattern", self.alpha_pattern, rank=False))
        object.__setattr__(self, "layers", self._layers(self.layers))
        patterns = self.layers_pattern
        if patterns is not None:
            items = (patterns,) if isinstance(patterns, str) else \
                tuple(patterns) if isinstance(patterns, (list, tuple)) else None
            if items is None or not all(isinstance(p, str) for p in items):
                raise RuleError(f"LoRA: `layers_pattern` must be a name (or a list of names) such as 'layers', "
                                f"got {self.layers_pattern!r}.")
            items = tuple(p for p in items if p)  # PEFT reads "" or [] as "any layer pattern"
            for item in items:  # PEFT puts it inside a regex of its own (:meth:`layer_index`)
                check_regex("LoRA", "layers_pattern", item, fixed=True)
            patterns = None if not items else items[0] if len(items) == 1 else items
            if patterns is not None and self.layers is None:
                raise RuleError("LoRA: `layers_pattern` only says where to read the layer index; give `layers` too.")
        object.__setattr__(self, "layers_pattern", patterns)
        if self.init == "orthogonal":
            odd = sorted({r for r in (self.r, *(r for _, r in self.rank_pattern)) if r % 2})
            if odd:
                raise RuleError(f"LoRA: init='orthogonal' needs an even rank, got r={odd}.")

    @staticmethod
    def _pattern(field: str, value: Any, rank: bool) -> tuple:
        """``{regex: value}`` (or pairs) as a tuple of pairs, in order; keys are regexes, values validated."""
        if value is None:
            return ()
        try:
            items = tuple(value.items()) if hasattr(value, "items") else tuple(tuple(pair) for pair in value)
        except TypeError:
            raise RuleError(f"LoRA: `{field}` must be a mapping from a module-path regex to a value, "
                            f"got {value!r}.") from None
        for item in items:
            if len(item) != 2 or not isinstance(item[0], str):
                raise RuleError(f"LoRA: `{field}` must map regex strings to values, got the entry {item!r}.")
            key, number = item
            try:
                re.compile(key)
            except (re.error, RecursionError, OverflowError) as error:
                raise RuleError(f"LoRA: `{field}` key {key[:80]!r} is not a valid regex ({error}).") from None
            check_regex("LoRA", field, _pattern_regex(key), shown=f"key {key[:80]!r}")
            check_number("LoRA", f"{field}[{key[:80]!r}]", number, **(
                dict(integer=True, minimum=1, maximum=MAX_SIZE) if rank else dict(above=0)))
        return tuple((key, number) for key, number in items)

    @staticmethod
    def _layers(value: Any) -> tuple | None:
        if value is None:
            return None
        items = (value,) if isinstance(value, int) and not isinstance(value, bool) else value
        try:
            items = tuple(items)
        except TypeError:
            items = (value,)
        if not all(isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in items):
            raise RuleError(f"LoRA: `layers` must be a layer index or a list of them (integers >= 0), got {value!r}.")
        return items or None  # PEFT reads an empty list as "every layer"

    def to_dict(self) -> dict:
        data = super().to_dict()
        data["rank_pattern"] = dict(self.rank_pattern)
        data["alpha_pattern"] = dict(self.alpha_pattern)
        data["target_parameters"] = list(self.target_parameters)
        data["layers"] = list(self.layers) if self.layers is not None else None
        data["layers_pattern"] = list(self.layers_pattern) if isinstance(self.layers_pattern, tuple) else \
            self.layers_pattern
        return data

    @staticmethod
    def _pattern_value(pattern: tuple, path: str, default):
        """PEFT's ``get_pattern_key``: the first key whose regex matches the end of ``path``."""
        for regex, value in _matchers(pattern):
            if regex.match(path):
                return value
        return default

    def rank_pattern_key(self, path: str) -> str | None:
        """The ``rank_pattern`` key that gives the site ``path`` its rank, or None where ``r`` does."""
        return self._pattern_value(tuple((key, key) for key, _ in self.rank_pattern), path, None)

    def rank_for(self, path: str) -> int:
        """``r`` at the site ``path`` (``rank_pattern`` first, else ``r``)."""
        return self._pattern_value(self.rank_pattern, path, self.r)

    def alpha_for(self, path: str) -> float:
        """``alpha`` at the site ``path`` (``alpha_pattern`` first, else ``alpha``)."""
        return self._pattern_value(self.alpha_pattern, path, self.alpha)

    def scaling_for(self, path: str) -> float:
        """The scaling at the site ``path``, as PEFT computes it from that site's r and alpha."""
        r, alpha = self.rank_for(path), self.alpha_for(path)
        return alpha / math.sqrt(r) if self.use_rslora else alpha / r

    def layer_index(self, path: str) -> int | None:
        """The layer index PEFT reads from ``path`` (see the class docstring), or None."""
        patterns = (self.layers_pattern,) if isinstance(self.layers_pattern, str) else self.layers_pattern
        if not patterns:
            match = re.match(r".*?\.[^.]*\.(?P<idx>\d+)\.", path)
        else:
            match = None
            for pattern in patterns:
                match = re.match(rf"(?:^|.*?\.){pattern}\.(?P<idx>\d+)\.", path)
                if match is not None:
                    break
        return int(match["idx"]) if match else None

    def selects_layer(self, path: str) -> bool:
        """Whether ``layers`` keeps the site ``path`` (always, without ``layers``)."""
        return self.layers is None or self.layer_index(path) in self.layers


@dataclasses.dataclass(frozen=True)
class Trainable(Rule):
    """Train whole modules next to the adapter, as PEFT's ``modules_to_save`` does.

    The selected modules' parameters are copied into the adapter (the base model keeps its own tensors,
    untouched) and the copies train and are saved with the adapter under PEFT's key names
    (``base_model.model.<module path>.weight``). Typical use: a new classification head::

        fxpeft.Trainable(targets=["classifier"])
    """

    method: ClassVar[str] = "trainable"
    aliases: ClassVar[dict[str, str]] = {"modules_to_save": "targets"}

    targets: Targets = None

    def __post_init__(self):
        object.__setattr__(self, "targets", normalize_targets(self.targets, "targets", "Trainable"))


# -- virtual-token methods (passes/prompt.py, passes/ptuning.py) ----------------------------------------------
def _check_virtual_tokens(rule: str, value: Any) -> None:
    check_number(rule, "num_virtual_tokens", value, integer=True, minimum=1, maximum=MAX_SIZE)


@dataclasses.dataclass(frozen=True)
class PromptTuning(Rule):
    """Prompt tuning (Lester et al., 2021), numerically the same as PEFT's ``PromptTuningConfig``.

    ``num_virtual_tokens`` learned embeddings go in front of the token embeddings; the attention mask gets
    ones and (for a causal LM) the labels get ``-100`` in front, so the loss keeps its meaning. Encoder-decoder
    models get the prompt on the encoder side. ``init``: ``"random"`` (normal, PEFT's default), ``"vocab"``
    (rows of the model's own embedding table, picked at random) or ``"text"`` (the embeddings of
    ``init_text`` tokenized by ``tokenizer``, repeated to fill the prompt; ``tokenizer`` is a tokenizer object
    or a local path). Example::

        fxpeft.PromptTuning(num_virtual_tokens=20)
        fxpeft.PromptTuning(8, init="text", init_text="Classify the sentiment:", tokenizer=tok)
    """

    method: ClassVar[str] = "prompt_tuning"
    aliases: ClassVar[dict[str, str]] = {"prompt_tuning_init_text": "init_text", "tokenizer_name_or_path": "tokenizer"}
    peft_hints: ClassVar[dict[str, str]] = {
        "prompt_tuning_init": "fxpeft's `init`: 'random', 'vocab' (PEFT's SAMPLE_VOCAB) or 'text'"}
    _INITS: ClassVar[tuple] = ("random", "vocab", "text")

    num_virtual_tokens: int = 20
    init: str = "random"
    init_text: str | None = None
    tokenizer: Any = dataclasses.field(default=None, compare=False, hash=False)

    def __post_init__(self):
        _check_virtual_tokens("PromptTuning", self.num_virtual_tokens)
        if self.init not in self._INITS:
            raise RuleError(f"PromptTuning: unknown `init` {self.init!r}; use one of {list(self._INITS)}.")
        if self.init == "text":
            if not isinstance(self.init_text, str) or not self.init_text:
                raise RuleError("PromptTuning: init='text' needs `init_text`, the text whose token embeddings "
                                "start the prompt.")
            if self.tokenizer is None:
                raise RuleError("PromptTuning: init='text' needs `tokenizer` (a tokenizer object, or the local path "
                                "of one) to turn `init_text` into token ids; or use init='vocab' or 'random'.")

    def to_dict(self) -> dict:
        data = super().to_dict()
        if data["tokenizer"] is not None and not isinstance(data["tokenizer"], str):
            data["tokenizer"] = getattr(self.tokenizer, "name_or_path", None) or None
        return data


@dataclasses.dataclass(frozen=True)
class PTuning(Rule):
    """P-tuning (Liu et al., 2021), numerically the same as PEFT's ``PromptEncoderConfig``.

    Like :class:`PromptTuning`, with the virtual-token embeddings computed by PEFT's prompt encoder:
    ``encoder="mlp"`` (linear-relu-linear-relu-linear) or ``"lstm"`` (a bidirectional LSTM then an MLP) of
    width ``encoder_hidden_size`` (default: the model's hidden size). Example::

        fxpeft.PTuning(num_virtual_tokens=20, encoder="mlp", encoder_hidden_size=128)
    """

    method: ClassVar[str] = "p_tuning"
    peft_hints: ClassVar[dict[str, str]] = {"encoder_reparameterization_type": "fxpeft's `encoder`: 'mlp' or 'lstm'"}
    _ENCODERS: ClassVar[tuple] = ("mlp", "lstm")

    num_virtual_tokens: int = 20
    encoder: str = "mlp"
    encoder_hidden_size: int | None = None
    encoder_num_layers: int = 2
    encoder_dropout: float = 0.0

    def __post_init__(self):
        _check_virtual_tokens("PTuning", self.num_virtual_tokens)
        if self.encoder not in self._ENCODERS:
            raise RuleError(f"PTuning: unknown `encoder` {self.encoder!r}; use one of {list(self._ENCODERS)}.")
        for name in ("encoder_hidden_size", "encoder_num_layers"):
            value = getattr(self, name)
            if value is None and name == "encoder_hidden_size":
                continue
            check_number("PTuning", name, value, integer=True, minimum=1, maximum=MAX_SIZE)
        check_number("PTuning", "encoder_dropout", self.encoder_dropout, minimum=0, below=1)


@dataclasses.dataclass(frozen=True)
class PrefixTuning(Rule):
    """Prefix tuning (Li & Liang, 2021), numerically the same as PEFT's ``PrefixTuningConfig``.

    At every selected attention op, ``num_virtual_tokens`` learned keys and values are put in front of the
    op's own, per layer, as if the model were called with a cache of that length: every query sees them, and
    real tokens take positions after them (PEFT's convention). They are stored at the model's key/value head
    count (grouped-query models repeat them as they repeat their keys). ``projection`` (an integer, or ``True``
    for the model's key/value width) learns them through PEFT's reparameterisation, an embedding followed by
    ``linear -> tanh -> linear`` of that hidden width. ``targets`` selects attention ops by module path (names,
    globs, a regex); by default, the self-attention ops of the stack that produces the outputs (for an
    encoder-decoder model the decoder's, as PEFT does). Example::

        fxpeft.PrefixTuning(num_virtual_tokens=20)
        fxpeft.PrefixTuning(10, projection=256)
    """

    method: ClassVar[str] = "prefix_tuning"
    peft_hints: ClassVar[dict[str, str]] = {
        "prefix_projection": "fxpeft's `projection`: the projection's hidden size (PEFT's encoder_hidden_size), True "
                             "for the model's key/value width, or None for no projection",
        "encoder_hidden_size": "fxpeft's `projection` (the projection's hidden size)"}

    num_virtual_tokens: int = 20
    projection: int | bool | None = None
    targets: Targets | None = None

    def __post_init__(self):
        _check_virtual_tokens("PrefixTuning", self.num_virtual_tokens)
        if self.projection is not None and not isinstance(self.projection, bool) and \
                number_problem(self.projection, integer=True, minimum=1, maximum=MAX_SIZE) is not None:
            raise RuleError(f"PrefixTuning: `projection` is the reparameterisation's hidden size (an integer >= 1 "
                            f"and <= {MAX_SIZE}), "
                            f"True for the model's key/value width, or None; got {self.projection!r}.")
        if self.projection is False:
            object.__setattr__(self, "projection", None)
        object.__setattr__(self, "targets", normalize_targets(self.targets, "targets", "PrefixTuning",
                                                               allow_none=True))


__all__ += ["PromptTuning", "PTuning", "PrefixTuning"]


_COMPUTE_DTYPES = ("float32", "bfloat16", "float16")


@dataclasses.dataclass(frozen=True)
class Quantize(Rule):
    """Quantize the selected linears of a full-precision model with bitsandbytes, in the same transform.

    ``Quantize(bits=4)`` then ``LoRA(...)`` is QLoRA in one line::

        adapted = fxpeft.transform(model, [fxpeft.Quantize(bits=4, double_quant=True),
                                           fxpeft.LoRA(targets="all-linear", r=16)])

    This rule **changes the base model**: each selected ``nn.Linear`` (or transformers ``Conv1D``) is
    replaced, one at a time, by a ``bitsandbytes.nn.Linear8bitLt`` (``bits=8``) or ``Linear4bit``
    (``bits=4``) holding its weight quantized, exactly as transformers' ``BitsAndBytesConfig`` loading builds
    them; the full-precision weight is freed (the bias is kept as it is). So memory drops to the quantized size
    and is never the sum of both. ``targets`` defaults to ``"all-linear"`` (every linear but the output head,
    as transformers' loader leaves ``lm_head``). Layers already quantized (loaded with ``BitsAndBytesConfig``)
    are left as they are when their settings match, and are an error when they do not.

    ``quant_type`` (``"nf4"`` or ``"fp4"``), ``double_quant`` and ``compute_dtype`` (``torch.float32``,
    ``torch.bfloat16``, ``torch.float16`` or their names) apply to 4 bits; ``int8_threshold`` (transformers'
    ``llm_int8_threshold``, outlier columns kept in 16 bits at inference) to 8 bits. Needs the bitsandbytes
    package (an :class:`fxpeft.errors.UnsupportedError` says so when it is missing or cannot run).
    """

    method: ClassVar[str] = "quantize"
    describes_base: ClassVar[bool] = True  # changes the base model; not part of a saved adapter's config
    _BITS: ClassVar[tuple] = (4, 8)
    _QUANT_TYPES: ClassVar[tuple] = ("nf4", "fp4")

    bits: int = 4
    quant_type: str = "nf4"
    double_quant: bool = False
    compute_dtype: Any = "float32"
    targets: Targets = "all-linear"
    exclude: Targets | None = None
    int8_threshold: float = 6.0

    def __post_init__(self):
        object.__setattr__(self, "targets", normalize_targets(self.targets, "targets", "Quantize"))
        object.__setattr__(self, "exclude", normalize_targets(self.exclude, "exclude", "Quantize", allow_none=True))
        if isinstance(self.bits, bool) or self.bits not in self._BITS:
            raise RuleError(f"Quantize: `bits` must be 4 or 8, got {self.bits!r}.")
        if self.quant_type not in self._QUANT_TYPES:
            raise RuleError(f"Quantize: unknown `quant_type` {self.quant_type!r}; "
                            f"use one of {list(self._QUANT_TYPES)}.")
        if not isinstance(self.double_quant, bool):
            raise RuleError(f"Quantize: `double_quant` must be True or False, got {self.double_quant!r}.")
        name = str(self.compute_dtype).removeprefix("torch.")
        if name not in _COMPUTE_DTYPES:
            raise RuleError(f"Quantize: `compute_dtype` must be one of torch.float32, torch.bfloat16, "
                            f"torch.float16, got {self.compute_dtype!r}.")
        object.__setattr__(self, "compute_dtype", name)  # a name, so the rule stays JSON-ready
        check_number("Quantize", "int8_threshold", self.int8_threshold, minimum=0)

    @property
    def dtype(self):
        """``compute_dtype`` as a ``torch.dtype``."""
        return getattr(torch, self.compute_dtype)


__all__ += ["Quantize"]
