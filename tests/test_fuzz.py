"""Property-based fuzzing: random small transformers models x random adapter rule sets, held to fxpeft's invariants.

Each example builds a tiny model of a random family (llama, mistral, qwen2, gpt2, opt, bert, t5, bart) from a
transformers config with a random depth (1-3 layers), head count, head width, grouped-query ratio (key/value heads
dividing the heads), feed-forward width and tied or untied embeddings, every dropout probability 0 and weights seeded
by one fixed seed (so "a fresh identically-seeded base" is the same model again). On it go one to three adapters of
random rules: ``fxpeft.LoRA`` with targets drawn among the model's own linear names (as names, a regex, a glob,
``"all-linear"`` or graph roles), random ``r``, ``alpha``, ``dropout``, ``use_rslora``, ``init``, ``bias``,
``rank_pattern`` / ``alpha_pattern`` and ``layers``, sometimes with a ``fxpeft.Trainable`` head or norm; or prompt
tuning. The inputs are a random batch, left-padded per row. The properties checked are in each test's docstring.

Capture is the slow part (about a second per model), so each example captures once or twice and the number of
examples is small. The examples come from a Hypothesis profile registered in ``tests/conftest.py``:

- ``ci`` (the default): derandomized (the same examples on every run, no example database, no shrinking), 14 + 10
  generated examples and a few explicit ones; this whole file takes about 1 minute of CPU on 2 cores (1.5 minutes
  while others use the machine).
- ``long``: random examples, 20 times as many (10-15 minutes per property test on 2 cores), with Hypothesis' example
  database (``.hypothesis/``, git-ignored) so that a failure found once is replayed first on the next run, and
  shrinking. Run it locally to hunt for bugs; ``FXPEFT_FUZZ_EXAMPLES`` sets the number of examples per test::

      HYPOTHESIS_PROFILE=long python -m pytest tests/test_fuzz.py -x
      HYPOTHESIS_PROFILE=long FXPEFT_FUZZ_EXAMPLES=50 python -m pytest tests/test_fuzz.py -x   # about 5 minutes

Every failure the fuzzer found is a regression test at the end of this file: ``xfail(strict=True)`` with the cause
where the bug is open (each names the file and function to fix; when it is fixed the test passes, strict xfail turns
that into a failure, and the marker comes off), plain where it was fixed. Where a known bug or a documented PEFT
difference makes a property not apply, the property skips that case and says why (:func:`peft_plan`,
:func:`copy_conflicts`, :func:`copies_leak`).
"""

from __future__ import annotations

import dataclasses
import functools
import os
import tempfile

import peft
import pytest
import safetensors.torch
import torch
import transformers as tf
from hypothesis import assume, example, given, note, settings
from hypothesis import strategies as st
from hypothesis.errors import InvalidArgument
from torch import nn
from transformers.pytorch_utils import Conv1D

import fxpeft
from fxpeft.adapters import ParameterCopy
from fxpeft.graph.selectors import ROLES

VOCAB = 48
SEQ2SEQ = ("t5", "bart")
GQA = ("llama", "mistral", "qwen2")
FAMILIES = ("llama", "mistral", "qwen2", "gpt2", "opt", "bert", "t5", "bart")
ADAPTER_NAMES = ("default", "second", "third")
# Modules a Trainable rule may train whole: the output head and a norm (or the pooler) near the output.
TRAINABLE = {
    "llama": ("model.norm", "lm_head"), "mistral": ("model.norm", "lm_head"), "qwen2": ("model.norm", "lm_head"),
    "gpt2": ("transformer.ln_f", "lm_head"), "opt": ("model.decoder.final_layer_norm", "lm_head"),
    "bert": ("classifier", "bert.pooler.dense"), "t5": ("decoder.final_layer_norm", "lm_head"),
    "bart": ("model.decoder.layernorm_embedding", "lm_head"),
}
# Tolerances, relative to the largest logit (at least 1): ``merged ≈ unmerged`` (a merged linear computes
# ``x (W + s B A)^T`` instead of ``x W^T + s (x A^T) B^T``: the same numbers rounded in another order, which matters
# most where a large ``alpha / r`` makes the adapter outweigh the base), fxpeft against PEFT (eager operations that
# fxpeft's graph may order otherwise), a row of a mixed batch against the row alone (batched products round
# otherwise). 1e-5 of the scale is some 80 float32 ulps.
MERGE_TOL = PEFT_TOL = ROW_TOL = 1e-5


# -- models ------------------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class ModelSpec:
    """A tiny model: ``family``, ``layers`` per stack, ``heads`` of width ``head_dim`` (hidden = heads x head_dim),
    ``kv_heads`` dividing ``heads`` (grouped-query families), feed-forward width ``ffn``, tied embeddings, and
    ``variant``: opt's word-embedding projection narrower than hidden (project_in/out), t5's gated-gelu
    feed-forward, bert with 3 labels instead of 2. (transformers 5 always ties t5's head; ``tied=False`` only drops
    its output scaling.)"""

    family: str
    layers: int = 1
    heads: int = 2
    kv_heads: int = 2
    head_dim: int = 4
    ffn: int = 16
    tied: bool = True
    variant: bool = False

    @property
    def hidden(self) -> int:
        return self.heads * self.head_dim


def _config(spec: ModelSpec) -> tuple[tf.PretrainedConfig, type]:
    s, text = spec, dict(vocab_size=VOCAB, tie_word_embeddings=spec.tied)
    if s.family in GQA:
        cls = {"llama": tf.LlamaConfig, "mistral": tf.MistralConfig, "qwen2": tf.Qwen2Config}[s.family]
        return cls(hidden_size=s.hidden, intermediate_size=s.ffn, num_hidden_layers=s.layers,
                   num_attention_heads=s.heads, num_key_value_heads=s.kv_heads, head_dim=s.head_dim,
                   max_position_embeddings=64, **text), tf.AutoModelForCausalLM
    if s.family == "gpt2":
        return tf.GPT2Config(n_embd=s.hidden, n_inner=s.ffn, n_layer=s.layers, n_head=s.heads, n_positions=32,
                             bos_token_id=0, eos_token_id=0, **text), tf.AutoModelForCausalLM
    if s.family == "opt":
        return tf.OPTConfig(hidden_size=s.hidden, ffn_dim=s.ffn, num_hidden_layers=s.layers,
                            num_attention_heads=s.heads, word_embed_proj_dim=s.hidden // 2 if s.variant else s.hidden,
                            max_position_embeddings=32, bos_token_id=0, eos_token_id=0, pad_token_id=1,
                            **text), tf.AutoModelForCausalLM
    if s.family == "bert":
        return tf.BertConfig(hidden_size=s.hidden, intermediate_size=s.ffn, num_hidden_layers=s.layers,
                             num_attention_heads=s.heads, max_position_embeddings=32, num_labels=3 if s.variant else 2,
                             vocab_size=VOCAB), tf.AutoModelForSequenceClassification
    if s.family == "t5":
        return tf.T5Config(d_model=s.hidden, d_kv=s.head_dim, num_heads=s.heads, d_ff=s.ffn, num_layers=s.layers,
                           feed_forward_proj="gated-gelu" if s.variant else "relu", decoder_start_token_id=0,
                           **text), tf.AutoModelForSeq2SeqLM
    if s.family == "bart":
        return tf.BartConfig(d_model=s.hidden, encoder_layers=s.layers, decoder_layers=s.layers,
                             encoder_attention_heads=s.heads, decoder_attention_heads=s.heads, encoder_ffn_dim=s.ffn,
                             decoder_ffn_dim=s.ffn, max_position_embeddings=32, **text), tf.AutoModelForSeq2SeqLM
    raise ValueError(spec.family)


def build(spec: ModelSpec) -> nn.Module:
    """The model ``spec`` describes, every dropout probability 0, weights from seed 0, in eval mode."""
    config, auto = _config(spec)
    for name, value in list(vars(config).items()):
        if "drop" in name and isinstance(value, float):
            setattr(config, name, 0.0)
    torch.manual_seed(0)
    model = auto.from_config(config).eval()
    assert not [n for n, m in model.named_modules() if isinstance(m, nn.Dropout) and m.p], "dropout left"
    return model


@functools.lru_cache(maxsize=None)
def linear_paths(spec: ModelSpec) -> tuple[str, ...]:
    """Module paths of the model's linears (``nn.Linear`` and GPT-2's ``Conv1D``), from a model built on meta."""
    config, auto = _config(spec)
    with torch.device("meta"):
        model = auto.from_config(config)
    return tuple(path for path, module in model.named_modules() if isinstance(module, (nn.Linear, Conv1D)))


def linear_names(spec: ModelSpec) -> tuple[str, ...]:
    """The distinct last path segments of the linears: the names PEFT-style targets use."""
    return tuple(sorted({path.rpartition(".")[2] for path in linear_paths(spec)}))


def layered_names(spec: ModelSpec) -> tuple[str, ...]:
    """The linear names found inside numbered layers (which ``LoRA(layers=...)`` can keep)."""
    return tuple(sorted({path.rpartition(".")[2] for path in linear_paths(spec)
                         if any(part.isdigit() for part in path.split("."))}))


@st.composite
def model_specs(draw, families=FAMILIES) -> ModelSpec:
    family = draw(st.sampled_from(families))
    heads = draw(st.sampled_from([1, 2, 4]))
    kv_heads = draw(st.sampled_from([d for d in (1, 2, 4) if heads % d == 0])) if family in GQA else heads
    return ModelSpec(family=family, layers=draw(st.integers(1, 3)), heads=heads, kv_heads=kv_heads,
                     head_dim=draw(st.sampled_from([4, 8])), ffn=draw(st.sampled_from([8, 12, 24])),
                     tied=draw(st.booleans()), variant=draw(st.booleans()))


# -- inputs --------------------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class Batch:
    """``rows`` sequences of ``seq`` tokens from ``seed``; row ``i`` left-padded with ``pads[i]`` masked tokens."""

    rows: int = 2
    seq: int = 5
    pads: tuple = (0, 0)
    seed: int = 0


@st.composite
def batches(draw, min_rows=1, padded=True) -> Batch:
    rows, seq = draw(st.integers(min_rows, 4)), draw(st.integers(1, 6))
    pads = tuple(draw(st.integers(0, seq - 1)) if padded else 0 for _ in range(rows))
    return Batch(rows=rows, seq=seq, pads=pads, seed=draw(st.integers(0, 2 ** 16)))


def make_inputs(spec: ModelSpec, batch: Batch, padded: bool = True) -> dict:
    """Keyword inputs: ``input_ids`` and ``attention_mask`` (plus ``decoder_input_ids`` for seq2seq families)."""
    g = torch.Generator().manual_seed(batch.seed)
    ids = torch.randint(2, VOCAB, (batch.rows, batch.seq), generator=g)
    mask = torch.ones_like(ids)
    for row, pad in enumerate(batch.pads if padded else ()):
        mask[row, :pad] = 0
        ids[row, :pad] = 1
    inputs = {"input_ids": ids, "attention_mask": mask}
    if spec.family in SEQ2SEQ:
        inputs["decoder_input_ids"] = torch.randint(2, VOCAB, (batch.rows, max(batch.seq - 2, 1)), generator=g)
    return inputs


def rows_of(inputs: dict, row: int) -> dict:
    return {key: value[row:row + 1] for key, value in inputs.items()}


# -- rules ---------------------------------------------------------------------------------------------------------
@st.composite
def lora_rules(draw, spec: ModelSpec, avoid: tuple = ()) -> fxpeft.LoRA:
    """A LoRA rule whose targets are drawn among ``spec``'s linear names (never one in ``avoid``), in every target
    form, with random hyper-parameters."""
    names = [name for name in linear_names(spec) if name not in avoid]
    form = draw(st.sampled_from(["names", "names", "regex", "glob", "all-linear", "roles"]))
    chosen = draw(st.lists(st.sampled_from(names), min_size=1, max_size=3, unique=True))
    targets = {"names": tuple(chosen), "regex": rf"(.*\.)?({'|'.join(chosen)})",
               "glob": tuple(f"*{n}" for n in chosen), "all-linear": "all-linear",
               "roles": tuple(draw(st.lists(st.sampled_from(ROLES), min_size=1, max_size=2, unique=True)))}[form]
    init = draw(st.sampled_from(["default", "default", "gaussian", "random", "orthogonal"]))
    r = draw(st.integers(1, 6))
    r += r % 2 if init == "orthogonal" else 0
    fields = dict(targets=targets, r=r, alpha=draw(st.sampled_from([1, 4, 8, 16, 0.5, 3.0])),
                  dropout=draw(st.sampled_from([0.0, 0.0, 0.1])), init=init, use_rslora=draw(st.booleans()),
                  bias=draw(st.sampled_from(["none", "none", "lora_only", "all"])))
    if form == "names" and draw(st.booleans()):
        key = draw(st.sampled_from(chosen))
        fields["rank_pattern"] = {key: draw(st.integers(1, 4)) * (2 if init == "orthogonal" else 1)}
        fields["alpha_pattern"] = {key: draw(st.sampled_from([2, 32]))} if draw(st.booleans()) else {}
    if form == "names" and spec.layers > 1 and set(chosen) & set(layered_names(spec)) and draw(st.booleans()):
        fields["layers"] = tuple(draw(st.lists(st.integers(0, spec.layers - 1), min_size=1, unique=True)))
    return fxpeft.LoRA(**fields)


@st.composite
def adapter_rules(draw, spec: ModelSpec) -> tuple:
    """One adapter's rules: a LoRA rule, sometimes with a Trainable rule on a head or norm the LoRA does not target."""
    trained = draw(st.sampled_from(TRAINABLE[spec.family])) if draw(st.booleans()) else None
    avoid = (trained.rpartition(".")[2],) if trained is not None else ()
    lora = draw(lora_rules(spec, avoid))
    return (lora,) if trained is None else (lora, fxpeft.Trainable(targets=(trained,)))


def is_fresh_zero(rules) -> bool:
    """Whether these rules start as the identity: LoRA with B = 0 (default and gaussian inits) and copies."""
    return all(not isinstance(rule, fxpeft.LoRA) or rule.init in ("default", "gaussian") for rule in rules)


@dataclasses.dataclass(frozen=True)
class Scenario:
    """One fuzzing example: a model, named adapters with their rules, a batch, the adapters made active, one
    adapter (or ``"__base__"``) per row for a mixed batch, whether to take a train step, a seed for the weights."""

    spec: ModelSpec
    adapters: tuple  # ((name, (rule, ...)), ...)
    batch: Batch
    active: tuple = ("default",)
    row_names: tuple = ()
    train: bool = False
    seed: int = 0

    @property
    def names(self) -> list[str]:
        return [name for name, _ in self.adapters]


@st.composite
def scenarios(draw, families=FAMILIES, max_adapters=3) -> Scenario:
    spec = draw(model_specs(families))
    count = draw(st.integers(1, max_adapters))
    adapters = tuple((name, draw(adapter_rules(spec))) for name in ADAPTER_NAMES[:count])
    names = [name for name, _ in adapters]
    batch = draw(batches(min_rows=2))
    active = tuple(draw(st.lists(st.sampled_from(names), min_size=1, unique=True)))
    row_names = tuple(draw(st.sampled_from(names + ["__base__"])) for _ in range(batch.rows))
    return Scenario(spec, adapters, batch, active, row_names, train=draw(st.booleans()),
                    seed=draw(st.integers(0, 2 ** 16)))


# -- running ------------------------------------------------------------------------------------------------------
def report(message: str) -> None:
    """``hypothesis.note`` inside a Hypothesis test (printed with a failing example); nothing elsewhere."""
    try:
        note(message)
    except InvalidArgument:
        pass


def logits(model: nn.Module, inputs: dict, **kwargs) -> torch.Tensor:
    with torch.no_grad():
        return model(**inputs, **kwargs).logits


def perturb(adapted: fxpeft.AdaptedModel, name: str, seed: int, scale: float = 0.2) -> None:
    """Add seeded noise to every tensor of adapter ``name`` (LoRA's A and B, trained copies, prompts)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for site in adapted.site_modules(name):
            for parameter in site.parameters():
                parameter.add_(torch.randn(parameter.shape, generator=g, dtype=parameter.dtype) * scale)


def adapt(scenario: Scenario, base: nn.Module) -> fxpeft.AdaptedModel:
    """``scenario``'s adapters on ``base``: the first through ``transform``, the others through ``add_adapter``."""
    (first, rules), *others = scenario.adapters
    adapted = fxpeft.transform(base, list(rules), adapter_name=first)
    for name, more in others:
        adapted.add_adapter(name, list(more))
    return adapted.eval()


def base_state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {key: value.detach().clone() for key, value in model.state_dict().items()}


def assert_state_equal(model: nn.Module, snapshot: dict[str, torch.Tensor], what: str) -> None:
    """Every tensor of the base model's state dict bit for bit as in ``snapshot``."""
    state = model.state_dict()
    assert state.keys() == snapshot.keys()
    changed = [key for key, value in state.items() if not torch.equal(value, snapshot[key])]
    assert not changed, f"{what} wrote base tensors {changed[:5]}"


def assert_close(actual: torch.Tensor, expected: torch.Tensor, tolerance: float, what: str) -> None:
    """``actual`` within ``tolerance`` of ``expected``, relative to the largest finite value of ``expected`` (and
    to each value); non-finite values where ``expected`` has them."""
    finite = expected[torch.isfinite(expected)]
    scale = max(1.0, float(finite.abs().max())) if finite.numel() else 1.0
    torch.testing.assert_close(actual, expected, rtol=tolerance, atol=tolerance * scale, equal_nan=True,
                               msg=lambda message: f"{what}: {message}")


def assert_no_new_nan(out: torch.Tensor, base_out: torch.Tensor, what: str) -> None:
    """No NaN (or inf) in ``out`` where the base model's output has none."""
    new = ~torch.isfinite(out) & torch.isfinite(base_out)
    assert not new.any(), f"{what}: {int(new.sum())} non-finite values the base model does not produce"


def assert_rows_alone(adapted: fxpeft.AdaptedModel, base_model_out, inputs: dict, row_names, mixed: torch.Tensor,
                      active: list[str]) -> None:
    """Each row of a mixed batch equals that row run alone with its adapter set (``"__base__"``: the base)."""
    for row, name in enumerate(row_names):
        alone = rows_of(inputs, row)
        if name == "__base__":
            expected = base_model_out(alone)
        else:
            adapted.set_adapter(name)
            expected = logits(adapted, alone)
        assert_close(mixed[row:row + 1], expected, ROW_TOL, f"row {row} ({name}) of the mixed batch")
    adapted.set_adapter(active)


def copies_leak(adapted: fxpeft.AdaptedModel, row_names) -> bool:
    """Whether a mixed batch of ``row_names`` has rows that do not use an adapter with trained copies
    (``Trainable``, LoRA's ``bias``) which another row uses."""
    used = set(row_names)
    with_copies = {name for name in used if name != "__base__" and any(
        isinstance(site, ParameterCopy) for site in adapted.site_modules(name))}
    return bool(with_copies) and len(used) > 1


def copy_conflicts(adapted: fxpeft.AdaptedModel, names) -> list[str]:
    """The base tensors of which two of the adapters ``names`` train a copy: such adapters cannot be active together
    (``set_adapter`` and ``merge`` refuse them, as PEFT does)."""
    owners: dict[str, set[str]] = {}
    for name in names:
        for site in adapted.site_modules(name):
            if isinstance(site, ParameterCopy):
                owners.setdefault(site.path, set()).add(name)
    return sorted(path for path, found in owners.items() if len(found) > 1)


def activate(adapted: fxpeft.AdaptedModel, names) -> list[str]:
    """``set_adapter(names)``, or, where two of them train copies of one tensor, check that it is refused with the
    model unchanged and activate the first alone; returns the names now active."""
    names = list(names)
    if copy_conflicts(adapted, names):
        was = adapted.active_adapters
        with pytest.raises(fxpeft.errors.UnsupportedError, match="train copies of the same base tensors"):
            adapted.set_adapter(names)
        assert adapted.active_adapters == was, "a refused set_adapter changed the active adapters"
        names = names[:1]
    adapted.set_adapter(names)
    return names


def fuzz_settings(examples: int):
    """``examples`` examples in the ``ci`` profile, scaled with the loaded profile's ``max_examples`` (``long``); the
    other settings (derandomize, database, deadline) come from the profile."""
    scale = settings.default.max_examples / settings.get_profile("ci").max_examples
    override = os.environ.get("FXPEFT_FUZZ_EXAMPLES")
    return settings(max_examples=int(override) if override else max(1, round(examples * scale)))


# -- properties ----------------------------------------------------------------------------------------------------
def check_adapter_invariants(scenario: Scenario) -> None:
    """The properties of :func:`test_adapters_keep_their_invariants`, for one scenario (also for regressions)."""
    spec, names, active = scenario.spec, scenario.names, list(scenario.active)
    base = build(spec)
    inputs = make_inputs(spec, scenario.batch)
    base_out = logits(base, inputs)
    snapshot = base_state(base)
    adapted = adapt(scenario, base)

    # 1. Fresh adapters (LoRA's B = 0, trained copies equal to the base) give the base outputs bit for bit.
    activate(adapted, names)
    if all(is_fresh_zero(rules) for _, rules in scenario.adapters):
        assert torch.equal(logits(adapted, inputs), base_out), "fresh adapters changed the outputs"
    for index, name in enumerate(names):
        perturb(adapted, name, scenario.seed + index)

    # 2. disable_adapters() gives the base outputs bit for bit, whatever is active.
    active = activate(adapted, active)
    out = logits(adapted, inputs)
    assert_no_new_nan(out, base_out, "active adapters")
    with adapted.disable_adapters():
        assert torch.equal(logits(adapted, inputs), base_out), "disable_adapters() differs from the base model"

    # 3. A mixed batch: each row equals the row alone with its adapter; where trained copies (which apply to a
    # whole call) would serve other rows, the batch is refused.
    if copies_leak(adapted, scenario.row_names):
        with pytest.raises(fxpeft.errors.UnsupportedError, match="apply to every row of a call"):
            logits(adapted, inputs, adapter_names=list(scenario.row_names))
    else:
        mixed = logits(adapted, inputs, adapter_names=list(scenario.row_names))
        assert_no_new_nan(mixed, base_out, "mixed batch")
        assert_rows_alone(adapted, lambda alone: logits(base, alone), inputs, scenario.row_names, mixed, active)
    assert torch.equal(logits(adapted, inputs), out), "switching adapters back changed the outputs"

    # 4. A train step trains the active adapters only and writes no base tensor.
    if scenario.train:
        adapted.train()
        frozen = {(name, key): value.detach().clone() for name in names if name not in active
                  for key, value in adapted.adapters[name].named_parameters()}
        trained = {f"{name}.{key}": value.detach().clone() for name in active
                   for key, value in adapted.adapters[name].named_parameters()}
        assert all(not parameter.requires_grad for parameter in base.parameters())
        loss = adapted(**inputs).logits.float().square().mean()
        loss.backward()
        parameters = [parameter for parameter in adapted.parameters() if parameter.requires_grad]
        assert parameters and all(p.grad is None for p in base.parameters())
        torch.optim.SGD(parameters, lr=1.0).step()
        for name in names:
            for key, value in adapted.adapters[name].named_parameters():
                if name not in active:
                    assert value.grad is None and torch.equal(value, frozen[name, key]), f"inactive {name}.{key} moved"
        moved = [key for name in active for key, value in adapted.adapters[name].named_parameters()
                 if not torch.equal(value, trained[f"{name}.{key}"])]
        grads = [p.grad for p in parameters if p.grad is not None and p.grad.abs().max() > 1e-6]
        assert moved or not grads, "a train step with non-zero gradients moved no adapter tensor"
        adapted.zero_grad(set_to_none=True)
        adapted.eval()
        out = logits(adapted, inputs)
        assert_no_new_nan(out, base_out, "after a train step")
    assert_state_equal(base, snapshot, "forward, mixed batches and training")
    with adapted.disable_adapters():
        assert torch.equal(logits(adapted, inputs), base_out), "disable_adapters() differs after training"

    # 5. merge() gives the unmerged outputs within rounding, or refuses before writing anything (a tensor other
    # uses share: a tied head); unmerge() restores the base tensors within rounding.
    try:
        adapted.merge()
    except fxpeft.errors.UnsupportedError:
        assert adapted.merged_adapters == [], "a refused merge left adapters merged"
        assert_state_equal(base, snapshot, "a refused merge")
        assert torch.equal(logits(adapted, inputs), out), "a refused merge changed the outputs"
        return
    assert adapted.merged_adapters == adapted.active_adapters and set(active) == set(adapted.active_adapters)
    assert_close(logits(adapted, inputs), out, MERGE_TOL, "merged vs unmerged")
    merged = base_state(base)
    adapted.unmerge()
    for key, value in base.state_dict().items():  # W + d - d: rounded at the size of d
        scale = max(1.0, float((merged[key] - snapshot[key]).abs().max())) if value.is_floating_point() else 1.0
        torch.testing.assert_close(value, snapshot[key], rtol=1e-6, atol=1e-6 * scale,
                                   msg=lambda m: f"{key} after merge and unmerge: {m}")
    assert_close(logits(adapted, inputs), out, MERGE_TOL, "unmerged again")


# Explicit examples: families and features the derandomized examples of the ``ci`` profile happen to miss (opt's
# project_in/out linears and biases, a gated t5 with a trained norm, two bart adapters in one mixed batch).
@example(Scenario(ModelSpec("opt", layers=2, heads=2, head_dim=4, ffn=12, tied=False, variant=True), (
    ("default", (fxpeft.LoRA(targets=("project_in", "q_proj", "fc2"), r=2, alpha=4, bias="lora_only"),)),
    ("second", (fxpeft.LoRA(targets="all-linear", r=3, init="gaussian", use_rslora=True, dropout=0.1),))),
    Batch(rows=3, seq=5, pads=(0, 2, 4), seed=5), active=("default", "second"), row_names=("second", "__base__",
                                                                                            "default"), train=True))
@example(Scenario(ModelSpec("t5", layers=2, heads=2, head_dim=4, ffn=8, variant=True), (
    ("default", (fxpeft.LoRA(targets=("wi_0", "o"), r=2, layers=(1,)),
                 fxpeft.Trainable(targets=("decoder.final_layer_norm",)))),
    ("second", (fxpeft.LoRA(targets=("attention.value",), r=4, alpha=16),))),
    Batch(rows=2, seq=4, pads=(1, 0), seed=6), active=("second",), row_names=("second", "__base__"), train=True))
@fuzz_settings(14)
@given(scenario=scenarios())
def test_adapters_keep_their_invariants(scenario):
    """Random models, one to three adapters of random LoRA (+ Trainable) rules, a random left-padded batch:

    1. fresh adapters (LoRA's B = 0) all active give the eager base model's logits bit for bit;
    2. with random adapter weights, ``disable_adapters()`` gives the base logits bit for bit, and no NaN or inf
       appears that the base does not produce;
    3. a mixed batch (``adapter_names``, one adapter or ``"__base__"`` per row) gives each row what that row gives
       alone with its adapter set (or the base model);
    4. a train step (SGD on the trainable parameters) moves active adapters only, leaves inactive ones and every
       base tensor bit for bit as they were (forward passes and mixed batches write no base tensor either);
    5. ``merge()`` gives the unmerged logits within float rounding, and ``unmerge()`` restores the base tensors
       within rounding and the unmerged logits.
    """
    note(f"linears: {linear_paths(scenario.spec)}")
    check_adapter_invariants(scenario)


@st.composite
def file_scenarios(draw) -> Scenario:
    """Like :func:`scenarios`, or a single prompt-tuning adapter (for a sequence classifier, sometimes with its
    classifier trained too, as PEFT's prompt tuning does)."""
    if draw(st.integers(0, 3)) == 0:
        spec = draw(model_specs())
        rules = (fxpeft.PromptTuning(num_virtual_tokens=draw(st.integers(1, 4)),
                                     init=draw(st.sampled_from(["random", "vocab"]))),)
        if spec.family == "bert" and draw(st.booleans()):
            rules += (fxpeft.Trainable(targets=("classifier",)),)
        return Scenario(spec, (("default", rules),), draw(batches()), seed=draw(st.integers(0, 2 ** 16)))
    return draw(scenarios())


def unloadable_ranks(adapted: fxpeft.AdaptedModel) -> list[str]:
    """Adapters whose LoRA ``r`` exceeds every dimension of their LoRA tensors (``rank_pattern`` gives each site
    another rank), which fxpeft's loader refuses (test_regression_default_rank_unused_by_every_site_is_refused)."""
    found = []
    for name, adapter in adapted.adapters.items():
        dims = [size for tensor in adapter.peft_state_dict().values() for size in tensor.shape]
        found += [name for rule in adapter.rules if isinstance(rule, fxpeft.LoRA) and dims and rule.r > max(dims)]
    return found


def peft_plan(scenario: Scenario, adapted: fxpeft.AdaptedModel) -> dict[str, tuple[str | None, bool]]:
    """Per adapter, in loading order: why PEFT cannot be expected to give its logits from fxpeft's folder (or None),
    and whether PEFT can load it at all (beside the adapters loaded before it).

    What PEFT does otherwise by design: PEFT trains
    LoRA's ``bias`` in the base layer itself, so with a biased adapter loaded every other adapter's outputs change
    (fxpeft keeps trained biases as the adapter's own copies); PEFT's ``LoraModel`` refuses a second adapter with a
    bias; PEFT cannot train whole (``modules_to_save``) a module that another adapter puts LoRA on, nor the reverse;
    PEFT's sequence-classification model trains the classifier in every adapter; and PEFT's prompt tuning embeds
    tokens with ``get_input_embeddings()``, which untied bart's encoder does not use."""
    base = adapted.base_model

    def biased(name) -> bool:
        return any(isinstance(rule, fxpeft.LoRA) and rule.bias != "none" for rule in dict(scenario.adapters)[name])

    def lora_paths(name) -> set[str]:
        return {site.path for site in adapted.site_modules(name) if not isinstance(site, ParameterCopy)}

    def trained_paths(name) -> set[str]:
        return {path for rule, paths in adapted.adapters[name].selected.items() if isinstance(rule, fxpeft.Trainable)
                for path in paths}

    plan, loaded = {}, []
    for name in scenario.names:
        rules = dict(scenario.adapters)[name]
        reason, loads = None, True
        if biased(name) and any(biased(other) for other in loaded):
            reason, loads = "PEFT's LoraModel takes one adapter with a bias", False
        elif loaded and type(base).__name__.endswith("ForSequenceClassification") and \
                "classifier" in trained_paths(loaded[0]) and "classifier" not in trained_paths(name):
            reason, loads = "PEFT's SEQ_CLS model (the first adapter's) trains the classifier in every adapter", False
        elif any(lora_paths(other) & trained_paths(name) or trained_paths(other) & lora_paths(name)
                 for other in loaded):
            reason, loads = "PEFT cannot train whole a module that another adapter puts LoRA on", False
        elif any(isinstance(rule, fxpeft.PromptTuning) for rule in rules):
            table = next(site.path for site in adapted.site_modules(name) if not isinstance(site, ParameterCopy))
            if base.get_submodule(table).weight is not base.get_input_embeddings().weight:
                reason = f"PEFT embeds the tokens with get_input_embeddings(), not {table}, which the model uses " \
                         "(bart with untied embeddings)"
        plan[name] = reason, loads
        loaded += [name] if loads else []
    for name in loaded:  # a bias PEFT trains in the base layer applies to every other adapter, and is keyed by
        # the layers the other adapters wrap (``q_proj.base_layer.bias``) or lost inside their modules_to_save
        if plan[name][0] is None and len(loaded) > 1 and any(biased(other) for other in loaded):
            plan[name] = "an adapter trains biases, which PEFT keeps in the base layers shared by all", True
    return plan


def check_files_round_trip(scenario: Scenario) -> None:
    """The properties of :func:`test_saved_adapters_load_back_in_fxpeft_and_peft`, for one scenario."""
    spec, names = scenario.spec, scenario.names
    base = build(spec)
    inputs = make_inputs(spec, scenario.batch)
    plain = make_inputs(spec, scenario.batch, padded=False)  # PEFT puts virtual tokens before the padding
    base_out = logits(base, inputs)
    snapshot = base_state(base)
    adapted = adapt(scenario, base)
    assume(not unloadable_ranks(adapted))
    for index, name in enumerate(names):
        perturb(adapted, name, scenario.seed + index)
    skips = peft_plan(scenario, adapted)
    with tempfile.TemporaryDirectory() as folder:
        adapted.save_adapter(folder, names if len(names) > 1 else names[0])
        assert_state_equal(base, snapshot, "save_adapter")
        folders = {name: folder if index == 0 else os.path.join(folder, name) for index, name in enumerate(names)}
        again = fxpeft.load_adapter(build(spec), folder, adapter_name=names[0]).eval()
        for name in names[1:]:
            again.load_adapter(folders[name], name)
        theirs = None  # (the first adapter always loads in PEFT but for a known bug; later ones need it loaded)
        for name in names:
            if not skips[name][1]:
                continue
            if theirs is None:
                theirs = peft.PeftModel.from_pretrained(build(spec), folders[name], adapter_name=name).eval()
            else:
                theirs.load_adapter(folders[name], adapter_name=name)
    assert_state_equal(again.base_model, snapshot, "load_adapter")
    for name in names:
        ours, loaded = adapted.adapters[name].peft_state_dict(), again.adapters[name].peft_state_dict()
        assert ours.keys() == loaded.keys()
        assert all(torch.equal(ours[key], loaded[key]) for key in ours), f"{name}: loaded tensors differ"
        adapted.set_adapter(name)
        again.set_adapter(name)
        out = logits(adapted, inputs)
        assert torch.equal(logits(again, inputs), out), f"{name}: the loaded adapter gives other logits"
        if out.shape == base_out.shape:  # (virtual tokens lengthen a causal LM's output)
            assert_no_new_nan(out, base_out, name)
        if skips[name][0] is not None:
            report(f"{name}: not compared with PEFT: {skips[name][0]}")
            continue
        theirs.set_adapter(name)
        with torch.no_grad():
            reference = theirs(**plain).logits
        assert_close(logits(adapted, plain), reference, PEFT_TOL, f"{name}: fxpeft vs PEFT loading fxpeft's files")
    if len(names) > 1 and not copies_leak(adapted, scenario.row_names):  # else refused (see the invariants test)
        row_names = list(scenario.row_names)
        assert torch.equal(logits(again, inputs, adapter_names=row_names),
                           logits(adapted, inputs, adapter_names=row_names)), "the loaded mixed batch differs"
    assert_state_equal(base, snapshot, "loading, PEFT and forward passes")


@example(Scenario(ModelSpec("bert", layers=2, heads=2, head_dim=4, ffn=8, variant=True), (
    ("default", (fxpeft.PromptTuning(num_virtual_tokens=3, init="vocab"), fxpeft.Trainable(targets=("classifier",)))),
    ), Batch(rows=2, seq=4, pads=(0, 2), seed=7)))
@example(Scenario(ModelSpec("opt", layers=1, heads=4, head_dim=4, ffn=8, tied=True), (
    ("default", (fxpeft.LoRA(targets=("q_proj", "v_proj"), r=2), fxpeft.Trainable(targets=(
        "model.decoder.final_layer_norm",)))),
    ("second", (fxpeft.LoRA(targets=r"(.*\.)?(k_proj|fc1)", r=3, alpha=8, init="random"),))),
    Batch(rows=2, seq=5, pads=(3, 0), seed=8), row_names=("second", "default")))
@fuzz_settings(10)
@given(scenario=file_scenarios())
def test_saved_adapters_load_back_in_fxpeft_and_peft(scenario):
    """Random models and adapters (LoRA + Trainable, several of them, or prompt tuning) with random weights:

    - ``save_adapter`` then ``fxpeft.load_adapter`` (and ``AdaptedModel.load_adapter`` for the others) into a fresh
      identically-seeded base gives back the same tensors and the same logits bit for bit, per adapter and in a
      mixed batch;
    - ``peft.PeftModel.from_pretrained`` (and ``load_adapter``) on fxpeft's folder gives fxpeft's logits (1e-5);
    - saving and loading write no base tensor (neither the saved model's nor the fresh base's).
    """
    note(f"linears: {linear_paths(scenario.spec)}")
    check_files_round_trip(scenario)


# -- regressions: examples the fuzzer found ----------------------------------------------------------------------
def test_regression_trained_copy_of_one_adapter_leaks_into_other_rows():
    """Found by :func:`test_adapters_keep_their_invariants`: in a mixed batch, a ``"__base__"`` row (and a row of
    another adapter) gets the trained copy of ``model.norm`` that only adapter ``second`` trains, so it differs from
    the same row alone; PEFT's ``ModulesToSaveWrapper`` picks the module per row (``_mixed_batch_forward``).

    Cause: ``RewriteContext.train_copy`` reads ``where(amax(gate) > 0, copy, base)``: one choice for the whole call,
    on when *any* row's gate is on (its docstring: "A copy serves a whole call"). Rows whose gate is off need the
    base tensor (or the copy of their own adapter). Until copies are selected per row, such a batch is refused
    (``AdaptedModel._check_whole_call_sites``, from ``SiteModule.serves_whole_call``) instead of silently mixed."""
    spec = ModelSpec("llama", layers=1, heads=1, kv_heads=1, head_dim=4, ffn=8, tied=False)
    base = build(spec)
    inputs = make_inputs(spec, Batch(rows=2, seq=6, pads=(0, 0), seed=118))
    adapted = fxpeft.transform(base, [fxpeft.LoRA(targets=["down_proj"], r=2)]).eval()
    adapted.add_adapter("second", [fxpeft.LoRA(targets=["q_proj"], r=2), fxpeft.Trainable(targets=["model.norm"])])
    perturb(adapted, "second", 1)
    # Now refused clearly (the copy cannot be given to some rows only), never mixed into the "__base__" row.
    with pytest.raises(fxpeft.errors.UnsupportedError, match=r"\['second'\] train whole tensors"):
        logits(adapted, inputs, adapter_names=["second", "__base__"])
    # Rows that all use the adapter with the copy are still one batch, equal to the plain call.
    adapted.set_adapter("second")
    assert torch.equal(logits(adapted, inputs, adapter_names=["second", "second"]), logits(adapted, inputs))


def test_regression_merge_into_a_tied_weight_refuses_or_matches():
    """Found by :func:`test_adapters_keep_their_invariants` (llama and t5 with LoRA on ``lm_head``): with the output
    head tied to the input embeddings, ``merge()`` added LoRA's delta in place into ``lm_head.weight``, the very
    tensor of ``model.embed_tokens.weight``, so the merged model embedded its input tokens with ``W + delta`` too and
    gave other logits than the unmerged one (by ~0.4, not rounding), silently (PEFT does the same, with warnings).

    Fixed meanwhile (commit cd0c4f0, fxpeft/shared_tensors.py ``check_merge``): such a merge is refused before
    anything is written. Either outcome is right; a merge that changes the logits is not."""
    spec = ModelSpec("llama", tied=True)
    base = build(spec)
    inputs = make_inputs(spec, Batch(rows=2, seq=5, pads=(0, 0), seed=1))
    adapted = fxpeft.transform(base, [fxpeft.LoRA(targets=["lm_head"], r=1, alpha=0.5, init="random")]).eval()
    assert base.lm_head.weight is base.model.embed_tokens.weight
    unmerged, snapshot = logits(adapted, inputs), base_state(base)
    try:
        adapted.merge()
    except fxpeft.errors.UnsupportedError:
        assert adapted.merged_adapters == []
        assert_state_equal(base, snapshot, "a refused merge")
        merged = logits(adapted, inputs)
    else:
        merged = logits(adapted, inputs)
        adapted.unmerge()
    assert_close(merged, unmerged, MERGE_TOL, "merged vs unmerged")


def test_regression_two_adapters_copying_one_tensor_are_not_active_together():
    """Found by :func:`test_adapters_keep_their_invariants` (opt, both adapters with ``Trainable`` on the final layer
    norm): both adapters active, the merged model's logits differed from the unmerged ones (by ~0.08).

    Cause: ``RewriteContext.train_copy`` for the second adapter replaces every use of the base placeholder, including
    the first adapter's ``where(on, copy, base)``, so the graph computes ``where(on_1, copy_1, where(on_2, copy_2,
    base))``: the first adapter's copy wins; ``merge`` wrote the last one's. Fixed as PEFT does it
    (``ModulesToSaveWrapper.set_adapter``: "Attempted to set multiple ... adapters at once for modules_to_save"):
    ``set_adapter`` and ``merge`` refuse adapters that train copies of one tensor, before changing anything. A copy
    and a LoRA of *another* adapter on one tensor merge right (copies are written first)."""
    spec = ModelSpec("llama", tied=False)
    base = build(spec)
    snapshot = base_state(base)
    inputs = make_inputs(spec, Batch(rows=2, seq=5, pads=(0, 0), seed=1))
    adapted = fxpeft.transform(base, [fxpeft.LoRA(targets=["q_proj"], r=2),
                                      fxpeft.Trainable(targets=["model.norm", "o_proj"])]).eval()
    adapted.add_adapter("second", [fxpeft.LoRA(targets=["v_proj", "o_proj"], r=2),
                                   fxpeft.Trainable(targets=["model.norm"])])
    perturb(adapted, "default", 1)
    perturb(adapted, "second", 2)
    before = logits(adapted, inputs)
    with pytest.raises(fxpeft.errors.UnsupportedError, match=r"model\.norm\.weight .*\['default', 'second'\]"):
        adapted.set_adapter(["default", "second"])
    assert adapted.active_adapters == ["default"] and torch.equal(logits(adapted, inputs), before)
    with pytest.raises(fxpeft.errors.UnsupportedError, match="merge one of these adapters at a time"):
        adapted.merge(["default", "second"])
    assert adapted.merged_adapters == []
    assert_state_equal(base, snapshot, "a refused merge")
    # default's copy of o_proj and second's LoRA on o_proj: merged, the tensor is the copy plus the LoRA update.
    adapted.delete_adapter("second")
    adapted.add_adapter("second", [fxpeft.LoRA(targets=["v_proj", "o_proj"], r=2)])
    perturb(adapted, "second", 2)
    adapted.set_adapter(["second", "default"])
    unmerged = logits(adapted, inputs)
    adapted.merge()
    assert_close(logits(adapted, inputs), unmerged, MERGE_TOL, "merged vs unmerged")
    adapted.unmerge()
    for key, value in base.state_dict().items():  # W + d - d: rounded at the size of d
        torch.testing.assert_close(value, snapshot[key], rtol=0, atol=1e-5, msg=lambda m: f"unmerge, {key}: {m}")


def test_regression_trained_copy_of_a_tied_head_replaces_the_input_embeddings():
    """Found by :func:`test_saved_adapters_load_back_in_fxpeft_and_peft` (t5, llama: ``Trainable(["lm_head"])`` with
    tied embeddings gave other logits than PEFT, by ~2). PEFT's ``modules_to_save`` trains a copy of the head only;
    fxpeft's graph embedded the input tokens with the copy too: torch.export lifts a tied tensor as *one* placeholder
    that every user reads, and ``RewriteContext.train_copy`` replaced every use of it.

    Fixed meanwhile (commit cd0c4f0, passes/trainable.py ``_train_tied_copy``: only the ops that read the tensor as
    the selected path read the copy). The model below is the reference: an untied copy whose head alone has the
    trained tensor."""
    spec = ModelSpec("llama", tied=True)
    inputs = make_inputs(spec, Batch(rows=2, seq=4, pads=(0, 0), seed=3))
    adapted = fxpeft.transform(build(spec), [fxpeft.Trainable(targets=["lm_head"])]).eval()
    perturb(adapted, "default", 1)
    trained = adapted.adapters["default"].sites["copy:lm_head/weight"].weight
    reference = build(spec)  # the head alone gets the trained tensor, as PEFT's modules_to_save does it
    reference.lm_head.weight = nn.Parameter(trained.detach().clone())
    assert reference.lm_head.weight is not reference.model.embed_tokens.weight
    assert_close(logits(adapted, inputs), logits(reference, inputs), PEFT_TOL, "trained tied head")


def test_regression_default_rank_unused_by_every_site_loads(tmp_path):
    """Found by :func:`test_saved_adapters_load_back_in_fxpeft_and_peft` (bart, ``r=5`` with
    ``rank_pattern={"k_proj": 3}`` on 4-wide layers): fxpeft refuses the folder it saved itself, with
    "`r` is 5, but the largest dimension of the file's LoRA tensors ... is 4: ... a tampered or mismatched file",
    while PEFT loads it.

    Cause: ``_check_ranks`` (passes/lora/codec.py) bounds the config's ``r`` (and every ``rank_pattern`` value) by the
    largest dimension of the file's LoRA tensors; but when ``rank_pattern`` covers every adapted site, ``r`` sizes no
    tensor at all, so no tensor bounds it. Only the ranks that some site actually takes (or ``r`` when a site takes
    the default) are bounded by the tensors."""
    spec = ModelSpec("llama", heads=1, kv_heads=1, head_dim=4, ffn=8)
    adapted = fxpeft.transform(build(spec), [fxpeft.LoRA(targets=["q_proj"], r=5, rank_pattern={"q_proj": 2})])
    perturb(adapted, "default", 1)
    adapted.eval().save_adapter(tmp_path)
    inputs = make_inputs(spec, Batch(rows=2, seq=4, pads=(0, 1), seed=3))
    theirs = peft.PeftModel.from_pretrained(build(spec), tmp_path).eval()
    assert_close(logits(adapted, inputs), logits(theirs, inputs), PEFT_TOL, "PEFT loading the folder")
    again = fxpeft.load_adapter(build(spec), tmp_path).eval()
    assert torch.equal(logits(again, inputs), logits(adapted, inputs))


def test_regression_prompt_of_a_model_with_narrower_token_embeddings_loads_in_peft(tmp_path):
    """Found by :func:`test_saved_adapters_load_back_in_fxpeft_and_peft` (opt with ``word_embed_proj_dim`` below
    ``hidden_size``, as facebook/opt-350m): PEFT fails to load fxpeft's prompt-tuning folder ("size mismatch for
    weight: copying a param with shape [1, 4] ..., the shape in current model is [1, 8]").

    Cause: ``model_dims`` (fxpeft/formats/prompt_learning.py) writes ``token_dim`` from the config's
    ``hidden_size``, while the saved ``prompt_embeddings`` are as wide as the token embeddings
    (``word_embed_proj_dim``; OPT projects them up afterwards). With ``token_dim`` set to the prompt's width, PEFT
    loads the folder and gives fxpeft's logits exactly; it should be the width of the tensor fxpeft saves."""
    spec = ModelSpec("opt", heads=1, head_dim=8, variant=True)
    adapted = fxpeft.transform(build(spec), [fxpeft.PromptTuning(num_virtual_tokens=2)]).eval()
    adapted.save_adapter(tmp_path)
    inputs = make_inputs(spec, Batch(rows=2, seq=4, pads=(0, 0), seed=3))
    theirs = peft.PeftModel.from_pretrained(build(spec), tmp_path).eval()
    assert_close(logits(adapted, inputs), logits(theirs, inputs), PEFT_TOL, "PEFT loading the folder")


def test_regression_prompt_tuning_of_a_classifier_loads_in_peft(tmp_path):
    """Found by :func:`test_saved_adapters_load_back_in_fxpeft_and_peft` (bert, ``PromptTuning`` alone): PEFT fails to
    load fxpeft's folder with ``KeyError: 'base_model.classifier.weight'``.

    Cause: ``VirtualTokenCodec.to_config`` writes ``task_type`` ``"SEQ_CLS"`` (from the model class); PEFT's class for
    that task adds the classifier to ``modules_to_save`` and expects its weights in the file, which holds only
    ``prompt_embeddings``. The LoRA codec guards against exactly this (``to_peft_config`` drops the task type when the
    head is not trained); the virtual-token codec does not. With ``Trainable(["classifier"])`` in the adapter PEFT
    loads it and matches (as PEFT's own prompt tuning always trains the classifier). fxpeft should save the head's
    weights, or refuse to save (or warn) rather than write a folder PEFT cannot read."""
    spec = ModelSpec("bert", heads=4, head_dim=4, ffn=8)
    adapted = fxpeft.transform(build(spec), [fxpeft.PromptTuning(num_virtual_tokens=2)]).eval()
    adapted.save_adapter(tmp_path)
    inputs = make_inputs(spec, Batch(rows=2, seq=4, pads=(0, 0), seed=3))
    theirs = peft.PeftModel.from_pretrained(build(spec), tmp_path).eval()
    assert_close(logits(adapted, inputs), logits(theirs, inputs), PEFT_TOL, "PEFT loading the folder")


def test_regression_layers_do_not_filter_a_target_that_is_a_whole_module_path():
    """Found by the ``long`` profile of :func:`test_saved_adapters_load_back_in_fxpeft_and_peft` (shrunk: llama,
    ``LoRA(targets=("lm_head", "down_proj", "gate_proj"), layers=(0,), init="random")``; PEFT's logits off by 0.31).

    PEFT's ``check_target_module_exists`` (peft/tuners/tuners_utils.py) applies ``layers_to_transform`` only to
    targets matched as a suffix (``key.endswith("." + target)``); a target equal to the whole module path
    (``key in target_modules``: the top-level ``lm_head``) is adapted whatever the layers. ``LoRA.selects_layer``
    (used by ``_narrow`` in passes/lora/__init__.py) filters every site by its layer index, and ``lm_head`` has none,
    so fxpeft adapts fewer sites than PEFT for the same config: PEFT loading fxpeft's folder gets an ``lm_head`` LoRA
    the file does not hold (left at its random init), and fxpeft refuses PEFT's folder of that config
    (unexpected ``lm_head.lora_*`` keys)."""
    spec = ModelSpec("llama", layers=2)
    rule = fxpeft.LoRA(targets=["lm_head", "q_proj"], r=2, layers=[0])
    theirs = peft.get_peft_model(build(spec), rule.to_peft_config())
    peft_sites = {name.removeprefix("base_model.model.") for name, module in theirs.named_modules()
                  if isinstance(module, peft.tuners.lora.LoraLayer)}
    ours = {site.path for site in fxpeft.transform(build(spec), [rule]).site_modules()}
    assert ours == peft_sites, f"fxpeft adapts {sorted(ours)}, PEFT {sorted(peft_sites)}"


def test_regression_peft_folder_of_a_lora_on_the_head_loads(tmp_path):
    """Found while reducing the example above: PEFT saves a LoRA that targets ``lm_head`` (one of its
    ``EMBEDDING_LAYER_NAMES``) with the layer's base weight, ``base_model.model.lm_head.base_layer.weight``
    (``save_embedding_layers="auto"`` turns itself on, with a warning), and ``fxpeft.load_adapter`` refuses the
    folder: "unexpected base_model.model.lm_head.base_layer.weight". A plain PEFT adapter on a common target cannot
    be loaded.

    Cause: the LoRA codec's key map (``LoraCodec.state_from_file``, passes/lora/codec.py) passes the base-layer key
    through, and ``check_state_fits`` (fxpeft/formats/files.py) then finds no adapter tensor of that name. Such keys
    are base weights (PEFT writes them into the base model when loading, for a resized vocabulary). Fixed: the
    loaders accept them when they equal the base model's tensor and refuse them with a clear error otherwise
    (``without_base_layers``, fxpeft/formats/peft.py)."""
    spec = ModelSpec("llama", layers=1)
    inputs = make_inputs(spec, Batch(rows=2, seq=3, pads=(0, 0), seed=0))
    theirs = peft.get_peft_model(build(spec), peft.LoraConfig(target_modules=["lm_head", "q_proj"], r=2,
                                                              init_lora_weights=False)).eval()
    theirs.save_pretrained(tmp_path)
    ours = fxpeft.load_adapter(build(spec), tmp_path).eval()
    assert_close(logits(ours, inputs), logits(theirs, inputs), PEFT_TOL, "fxpeft loading PEFT's folder")
    file = tmp_path / "adapter_model.safetensors"
    state = safetensors.torch.load_file(file)
    state["base_model.model.lm_head.base_layer.weight"][0, 0] += 1  # a base the adapter was not trained on
    safetensors.torch.save_file(state, file)
    base = build(spec)
    before = {name: value.clone() for name, value in base.state_dict().items()}
    with pytest.raises(fxpeft.errors.AdapterLoadError, match=r"differs from this base model's lm_head\.weight"):
        fxpeft.load_adapter(base, tmp_path)
    assert all(torch.equal(value, before[name]) for name, value in base.state_dict().items())
