"""Untrusted input is bounded work with clear errors (issue 16: "Numbers that validation lets through", "Untrusted
files", "The CI gate").

``adapter_config.json`` comes from strangers: every number in it is checked (finite, an integer where PEFT's is,
in range), every field's type, its size and nesting, every regex in it (matched in bounded time), and every size
it gives against the file's own tensors before anything is allocated; all of it is an ``AdapterLoadError`` that
names the file and the field. Rules refuse the same numbers with a ``RuleError``. ``fxpeft check`` exits non-zero
whenever its checks did not complete. A Hypothesis property throws random JSON at the config reader.

The model is two linears at module paths as long as a real model's (``encoder.layers.0.attention.self.q_proj``):
catastrophic backtracking needs long paths, and capturing two linears takes a fraction of a second. ``fxpeft
check`` runs on a one-layer llama (it builds example inputs for transformers models).
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch
import transformers as tf
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from safetensors.torch import save_file
from torch import nn

import fxpeft
from fxpeft import cli
from fxpeft.errors import AdapterLoadError, RuleError, UnsupportedError
from fxpeft.formats.files import CONFIG_NAME, WEIGHTS_NAME, read_adapter
from fxpeft.formats.peft import MAX_CONFIG_BYTES, MAX_CONFIG_DEPTH
from fxpeft.graph.bounded_regex import MAX_REGEX_LENGTH, bounded_regex, regex_problem
from fxpeft.rules import MAX_SIZE, LoRA, PrefixTuning, PromptTuning, PTuning, Quantize, check_alpha

ROOT = Path(__file__).resolve().parents[1]
Q_PROJ = "encoder.layers.0.attention.self.q_proj"
V_PROJ = "encoder.layers.0.attention.self.v_proj"
X = (torch.randn(3, 8, generator=torch.Generator().manual_seed(0)),)


class Deep(nn.Module):
    """Two linears (8 -> 8) at long module paths, as in a real model."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        attention = nn.ModuleDict({"self": nn.ModuleDict({"q_proj": nn.Linear(8, 8), "v_proj": nn.Linear(8, 8)})})
        self.encoder = nn.ModuleDict({"layers": nn.ModuleList([nn.ModuleDict({"attention": attention})])})

    def forward(self, x):
        block = self.encoder["layers"][0]["attention"]["self"]
        return block["v_proj"](torch.relu(block["q_proj"](x)))


def tiny_llama(cls=tf.LlamaForCausalLM) -> tf.LlamaForCausalLM:
    torch.manual_seed(0)
    return cls(tf.LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                              num_key_value_heads=1, vocab_size=64)).eval()


class Overtime(BaseException):
    """Raised by :func:`deadline` (a BaseException, so that no ``except Exception`` swallows it)."""


@contextlib.contextmanager
def deadline(seconds: float):
    """Fail when the block runs longer than ``seconds``: ``re`` checks for signals while it backtracks, so even a
    runaway match is stopped (on the main thread of a Unix process; elsewhere the block just runs)."""
    if not hasattr(signal, "setitimer") or threading.current_thread() is not threading.main_thread():
        yield
        return

    def expire(signum, frame):
        raise Overtime(f"still running after {seconds} s")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def write_adapter(folder, config: dict, state: dict[str, torch.Tensor]):
    folder.mkdir(parents=True, exist_ok=True)
    (folder / CONFIG_NAME).write_text(json.dumps(config))
    save_file(state, str(folder / WEIGHTS_NAME), metadata={"format": "pt"})
    return folder


@pytest.fixture(scope="module")
def lora_dir(tmp_path_factory):
    """An adapter fxpeft saved for :class:`Deep` (LoRA r=4 on q_proj and v_proj)."""
    folder = tmp_path_factory.mktemp("untrusted") / "lora"
    adapted = fxpeft.transform(Deep(), [LoRA(targets=["q_proj", "v_proj"], r=4, alpha=8)], example_inputs=X)
    adapted.save_adapter(folder)
    return folder


@pytest.fixture(scope="module")
def llama_dirs(tmp_path_factory):
    """For ``fxpeft check``: a one-layer llama's folder and an adapter for it (LoRA r=4 on q_proj, v_proj)."""
    root = tmp_path_factory.mktemp("check")
    tiny_llama().save_pretrained(root / "base")
    fxpeft.transform(tiny_llama(), [LoRA(targets=["q_proj", "v_proj"], r=4, alpha=8)]).save_adapter(root / "lora")
    return root / "base", root / "lora"


def edited(lora_dir, tmp_path, **fields):
    """A copy of the adapter ``lora_dir`` whose config has ``fields``."""
    config = {**json.loads((lora_dir / CONFIG_NAME).read_text()), **fields}
    target = tmp_path / "edited"
    target.mkdir(parents=True)
    (target / CONFIG_NAME).write_text(json.dumps(config))
    (target / WEIGHTS_NAME).write_bytes((lora_dir / WEIGHTS_NAME).read_bytes())
    return target


def snapshot(model: nn.Module) -> dict[str, torch.Tensor]:
    return {name: tensor.detach().clone() for name, tensor in model.state_dict().items()}


# -- numbers in rules ----------------------------------------------------------------------------------------------
NAN, INF = float("nan"), float("inf")


@pytest.mark.parametrize("make, field", [
    (lambda: LoRA(targets=["q"], alpha=NAN), "alpha"),
    (lambda: LoRA(targets=["q"], alpha=INF), "alpha"),
    (lambda: LoRA(targets=["q"], alpha=-INF), "alpha"),
    (lambda: LoRA(targets=["q"], alpha_pattern={"q": NAN}), "alpha_pattern"),
    (lambda: LoRA(targets=["q"], alpha_pattern={"q": INF}), "alpha_pattern"),
    (lambda: LoRA(targets=["q"], dropout=False), "dropout"),
    (lambda: LoRA(targets=["q"], r=10 ** 9), "`r`"),
    (lambda: LoRA(targets=["q"], rank_pattern={"q": 10 ** 9}), "rank_pattern"),
    (lambda: Quantize(int8_threshold=NAN), "int8_threshold"),
    (lambda: Quantize(int8_threshold=INF), "int8_threshold"),
    (lambda: PromptTuning(num_virtual_tokens=10 ** 9), "num_virtual_tokens"),
    (lambda: PTuning(encoder_hidden_size=10 ** 9), "encoder_hidden_size"),
    (lambda: PTuning(encoder_dropout=NAN), "encoder_dropout"),
    (lambda: PrefixTuning(projection=10 ** 9), "projection"),
], ids=["alpha-nan", "alpha-inf", "alpha-minus-inf", "alpha_pattern-nan", "alpha_pattern-inf", "dropout-bool",
        "r-huge", "rank_pattern-huge", "int8-nan", "int8-inf", "tokens-huge", "hidden-huge", "encoder-dropout-nan",
        "projection-huge"])
def test_rules_refuse_non_finite_integral_and_out_of_range_numbers(make, field):
    with pytest.raises(RuleError, match=re.escape(field)):
        make()


def test_check_alpha_is_the_reusable_validator():
    """``fxpeft.rules.check_alpha``: what ``AdaptedModel.set_alpha`` takes (a finite number > 0)."""
    assert check_alpha(16) == 16 and check_alpha(0.5) == 0.5
    for bad in (NAN, INF, -INF, 0, -1, True, "8", None, [8]):
        with pytest.raises(RuleError, match=r"set_alpha: `alpha` must be a finite number > 0"):
            check_alpha(bad, "AdaptedModel.set_alpha")


# -- numbers and types in config files -----------------------------------------------------------------------------
@pytest.mark.parametrize("field, value", [
    ("r", 4.9), ("r", 4.0), ("r", "four"), ("r", True), ("r", 0), ("r", 10 ** 9), ("r", [4]),
    ("lora_alpha", NAN), ("lora_alpha", INF), ("lora_alpha", [1]), ("lora_alpha", "8"),
    ("lora_dropout", NAN), ("lora_dropout", "0.1"), ("lora_dropout", 1.5),
    ("alpha_pattern", {"q_proj": NAN}), ("alpha_pattern", {"q_proj": INF}), ("alpha_pattern", [1]),
    ("rank_pattern", {"q_proj": 2.5}), ("rank_pattern", "q_proj"),
    ("use_rslora", "false"), ("use_rslora", 1),
    ("target_modules", 5), ("target_modules", [1, 2]), ("target_modules", {"q_proj": 1}),
    ("exclude_modules", 3.5), ("modules_to_save", "v_proj"), ("modules_to_save", [None]),
    ("layers_to_transform", [0.5]), ("layers_to_transform", [-1]), ("layers_to_transform", "0"),
    ("layers_pattern", 7), ("bias", ["none"]), ("task_type", ["CAUSAL_LM"]), ("peft_type", ["LORA"]),
])
def test_a_config_field_of_the_wrong_type_or_value_is_an_error_naming_file_and_field(lora_dir, tmp_path, field,
                                                                                       value):
    folder = edited(lora_dir, tmp_path, **{field: value})
    base = Deep()
    before = snapshot(base)
    for load in (lambda: read_adapter(folder), lambda: fxpeft.load_adapter(base, folder, example_inputs=X)):
        with pytest.raises(AdapterLoadError) as info:
            load()
        message = str(info.value)
        assert f"`{field}" in message and str(folder / CONFIG_NAME) in message, message
    assert all(torch.equal(value, before[name]) for name, value in base.state_dict().items())


def test_a_fractional_rank_is_refused_not_truncated(lora_dir, tmp_path):
    """``r: 4.9`` used to load as ``r=4`` (``int()``), silently."""
    with pytest.raises(AdapterLoadError, match=r"`r` must be an integer >= 1 .* got 4\.9"):
        fxpeft.load_adapter(Deep(), edited(lora_dir, tmp_path, r=4.9), example_inputs=X)


@pytest.mark.parametrize("rank", [10 ** 9, 9])
def test_a_rank_the_files_tensors_do_not_bound_is_refused_before_anything_is_allocated(lora_dir, tmp_path, rank):
    """The file's LoRA tensors are 4 x 8 and 8 x 4: no rank above 8 (a layer's width) is built. ``read_adapter``
    refuses it, before any model or parameter exists; a rank within the bound (8, != 4) is left to the shape
    checks (``verify`` reports it as a config-mismatch finding)."""
    folder = edited(lora_dir, tmp_path, r=rank)
    with pytest.raises(AdapterLoadError, match=r"`r`") as info:
        read_adapter(folder)
    assert str(folder / CONFIG_NAME) in str(info.value)
    with pytest.raises(AdapterLoadError, match=r"`r`"):
        fxpeft.verify(Deep(), folder)
    pattern = edited(lora_dir, tmp_path / "pattern", rank_pattern={"q_proj": 100})
    with pytest.raises(AdapterLoadError, match=r"`rank_pattern\['q_proj'\]` is 100, but the largest dimension"):
        read_adapter(pattern)


def test_a_file_without_lora_tensors_is_not_a_lora_adapter(lora_dir, tmp_path):
    folder = write_adapter(tmp_path / "empty", json.loads((lora_dir / CONFIG_NAME).read_text()),
                           {"base_model.model.something.weight": torch.zeros(2, 2)})
    with pytest.raises(AdapterLoadError, match="holds no LoRA tensors"):
        read_adapter(folder)


def virtual_token_folder(tmp_path, peft_type: str, **fields):
    """A hand-written prompt-learning adapter: 4 virtual tokens of width 16 (and the method's own tensors)."""
    config = {"peft_type": peft_type, "task_type": "CAUSAL_LM", "num_virtual_tokens": 4, "token_dim": 16,
              "num_transformer_submodules": 1, "num_attention_heads": 2, "num_layers": 1}
    state = {"prompt_embeddings": torch.zeros(4, 16)}
    if peft_type == "P_TUNING":
        config.update(encoder_reparameterization_type="LSTM", encoder_hidden_size=8, encoder_num_layers=2)
        state.update({"fxpeft.prompt_encoder.embedding.weight": torch.zeros(4, 16),
                      **{f"fxpeft.prompt_encoder.lstm_head.weight_ih_l{k}{suffix}": torch.zeros(32, 16)
                         for k in range(2) for suffix in ("", "_reverse")}})
    if peft_type == "PREFIX_TUNING":
        config.update(prefix_projection=True, encoder_hidden_size=8)
        state = {"prompt_embeddings": torch.zeros(4, 64), "fxpeft.prefix_encoder.embedding.weight": torch.zeros(4, 16),
                 "fxpeft.prefix_encoder.transform.0.weight": torch.zeros(8, 16)}
    config.update(fields)
    return write_adapter(tmp_path / peft_type.lower(), config, state)


@pytest.mark.parametrize("peft_type, field, value, match", [
    ("PROMPT_TUNING", "num_virtual_tokens", 4.5, "must be an integer"),
    ("PROMPT_TUNING", "num_virtual_tokens", "4", "must be an integer"),
    ("PROMPT_TUNING", "num_virtual_tokens", 10 ** 6, "must be an integer"),
    ("PROMPT_TUNING", "num_virtual_tokens", 5000, "rows of the file's prompt_embeddings"),
    ("PROMPT_TUNING", "num_virtual_tokens", None, "is missing"),
    ("PROMPT_TUNING", "prompt_tuning_init", ["TEXT"], "must be a string"),
    ("PROMPT_TUNING", "modules_to_save", "lm_head", "list of module names"),
    ("P_TUNING", "encoder_num_layers", 2.7, "must be an integer"),
    ("P_TUNING", "encoder_num_layers", 5000, "LSTM layers in the file"),
    ("P_TUNING", "encoder_hidden_size", 60000, "prompt-encoder tensors"),
    ("P_TUNING", "encoder_dropout", "0.1", "finite number"),
    ("P_TUNING", "encoder_dropout", NAN, "finite number"),
    ("PREFIX_TUNING", "encoder_hidden_size", 60000, "prefix-encoder tensors"),
    ("PREFIX_TUNING", "prefix_projection", "yes", "true or false"),
])
def test_virtual_token_configs_are_checked_against_their_tensors(tmp_path, peft_type, field, value, match):
    folder = virtual_token_folder(tmp_path, peft_type, **{field: value})
    with pytest.raises(AdapterLoadError, match=match) as info:
        read_adapter(folder)
    assert f"`{field}`" in str(info.value) and str(folder / CONFIG_NAME) in str(info.value)


@pytest.mark.parametrize("peft_type", ["PROMPT_TUNING", "P_TUNING", "PREFIX_TUNING"])
def test_virtual_token_configs_that_fit_their_tensors_read(tmp_path, peft_type):
    config, _ = read_adapter(virtual_token_folder(tmp_path, peft_type))
    assert config["num_virtual_tokens"] == 4


# -- the config file itself ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("text, match", [
    ("[" * 100_000, f"more than {MAX_CONFIG_DEPTH} deep"),
    ('{"r": 4, "x": ' + "[" * 40 + "]" * 40 + "}", f"`x` nests lists or objects more than {MAX_CONFIG_DEPTH} deep"),
    ('{"r": ' + "1" * 5000 + "}", "not valid JSON"),
    ('{"r": 4, "notes": "' + "x" * MAX_CONFIG_BYTES + '"}', "larger than"),
], ids=["deep-array", "deep-field", "5000-digit-number", "over-1-MiB"])
def test_a_deep_huge_or_odd_config_file_is_an_adapter_load_error(lora_dir, tmp_path, text, match):
    folder = edited(lora_dir, tmp_path)
    (folder / CONFIG_NAME).write_bytes(text.encode("latin-1"))
    with deadline(30), pytest.raises(AdapterLoadError, match=match) as info:
        fxpeft.load_adapter(Deep(), folder, example_inputs=X)
    assert str(folder / CONFIG_NAME) in str(info.value)


# -- regexes: bounded work, the same answers -----------------------------------------------------------------------
def test_a_catastrophic_regex_in_a_file_is_bounded_work(lora_dir, llama_dirs, tmp_path, capsys):
    """``(.*)*Z`` backtracks 2**n ways on an n-character path in ``re`` (minutes on these paths); here
    load_adapter and ``fxpeft check`` answer at once. A regex of the same kind that does select ``q_proj`` loads."""
    folder = edited(lora_dir, tmp_path, target_modules="(.*)*Z")
    base, adapter = llama_dirs
    start = time.perf_counter()
    with deadline(120):
        with pytest.raises(AdapterLoadError, match="targets modules this base model does not have"):
            fxpeft.load_adapter(Deep(), folder, example_inputs=X)
        selecting = edited(lora_dir, tmp_path / "selecting", target_modules="(.*)*(q|v)_proj")
        adapted = fxpeft.load_adapter(Deep(), selecting, example_inputs=X)
        code = cli.main(["check", str(base), str(edited(adapter, tmp_path / "llama", target_modules="(.*)*Z"))])
    out = capsys.readouterr()
    assert code == 1 and "targets-unmatched" in out.out, out.err
    assert list(adapted.adapters["default"].selected.values())[0] == [Q_PROJ, V_PROJ]
    assert time.perf_counter() - start < 120


@pytest.mark.parametrize("regex, match", [
    ("((a*)*)*Z", "nests repeats"), (r"(?:(?!.*x).)*Z", "nests repeats"), (r"(a)\1", "refers back"),
    (r"(?P<a>q)(?P=a)", "refers back"), ("a" * (MAX_REGEX_LENGTH + 1), "characters long"),
    # Atomic groups and possessive repeats are Python 3.11 syntax; before it, re rejects them: refused either way.
    *[(regex, match if sys.version_info >= (3, 11) else "is not a valid regex")
      for regex, match in ((r"(?>.*)q_proj", "atomic"), (r".*+q_proj", "possessive"))],
])
def test_regexes_a_stranger_has_no_need_for_are_refused_naming_the_field(lora_dir, tmp_path, regex, match):
    for field, value in (("target_modules", regex), ("exclude_modules", regex), ("rank_pattern", {regex: 2}),
                         ("alpha_pattern", {regex: 2})):
        folder = edited(lora_dir, tmp_path / field, **{field: value})
        with deadline(30), pytest.raises(AdapterLoadError, match=match) as info:
            read_adapter(folder)
        assert f"`{field}`" in str(info.value) and str(folder / CONFIG_NAME) in str(info.value)
    with pytest.raises(RuleError, match=match):
        LoRA(targets=regex)


def test_layers_pattern_names_a_module(lora_dir, tmp_path):
    folder = edited(lora_dir, tmp_path, layers_to_transform=[0], layers_pattern="(la+)+yers")
    with pytest.raises(AdapterLoadError, match="`layers_pattern` .* may only name modules"):
        read_adapter(folder)
    assert LoRA(targets=["q_proj"], layers=[0], layers_pattern="layers").layer_index(Q_PROJ) == 0


# Regexes PEFT users write (this suite's, PEFT's docs, unsloth's vision-model regex) and paths to try them on.
USER_REGEXES = [
    r".*\.(q|k)_proj", r".*layers\.0\.mlp\..*", r".*\.layers\.0\.(self_attn|mlp)\.(q|down)_proj",
    r"model\.layers\.1\..*_proj", r".*(k|v)_proj", r".*\.layers\.1\..*\.v_proj", r"model\.layers\.\d\.mlp\.\w+_proj",
    r"(en|de)coder\.block\.\d+\.layer\.\d\.DenseReluDense\.w[io]", r"^(?!.*lm_head).*(q|k|v)_proj",
    r".*decoder.*(SelfAttention|EncDecAttention).*(q|v)$", r"(?:(?!lm_head).)*", r"(\w+\.)*q_proj", "(.*)*Z",
    r"(?:.*?(?:language|text).*?(?:self_attn|attention|attn|mlp|feed_forward|ffn|dense).*?(?:q_proj|k_proj|v_proj|"
    r"o_proj|gate_proj|up_proj|down_proj).*?)|(?:\bmodel\.layers\.[\d]{1,}\.(?:self_attn|attention|attn|mlp|"
    r"feed_forward|ffn|dense)\.(?:(?:q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)))",
    r"(?i)MODEL\.layers\.0\..*", r"(.*\.)?(layers\.1\.self_attn\.v_proj)$", r"(?<=attn\.)q_proj|.*(?<!\.)v_proj",
]
USER_PATHS = [f"model.layers.{i}.{part}" for i in (0, 1, 12) for part in (
    "self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "mlp.down_proj", "mlp.up_proj")] + [
    "lm_head", "model.language_model.layers.0.self_attn.q_proj", "encoder.block.0.layer.1.DenseReluDense.wi",
    "decoder.block.1.layer.0.SelfAttention.q", "decoder.block.1.layer.1.EncDecAttention.v", Q_PROJ, V_PROJ,
    "a" * 200 + ".q_proj"]


@pytest.mark.parametrize("regex", USER_REGEXES)
def test_regexes_users_write_give_re_answers(regex):
    assert regex_problem(regex) is None
    bounded = bounded_regex(regex)
    for path in USER_PATHS:
        with deadline(10):
            expected = re.fullmatch(regex, path) is not None if "(.*)*" not in regex else False
        assert bounded.fullmatch(path) == expected == (len(path) in bounded.ends(path)), (regex, path)
        if "(.*)*" not in regex:
            assert bounded.match(path) == (re.match(regex, path) is not None) == bool(bounded.ends(path))


_ATOMS = st.sampled_from(["a", "b", ".", r"\.", r"\d", r"\w", "[ab]", "[^a]", "[a-c0-9]", "_", "^", "$", r"\b",
                          r"\B", "(?i:A)"])


def _regexes():
    def grow(inner):
        return st.one_of(
            st.tuples(inner, inner).map("".join),
            st.tuples(inner, inner).map("|".join),
            st.tuples(inner, st.sampled_from(["*", "+", "?", "{1,2}", "*?", "{2}", "{0,3}?"])).map(
                lambda p: f"(?:{p[0]}){p[1]}"),
            inner.map(lambda p: f"({p})"),
            inner.map(lambda p: f"(?={p})"), inner.map(lambda p: f"(?!{p})"),
            st.sampled_from(["(?<=a)", "(?<!b)", r"(?<=\.\d)"]))
    return st.recursive(_ATOMS, grow, max_leaves=10)


@settings(derandomize=True, database=None, max_examples=400, deadline=None)
@given(regex=_regexes(), texts=st.lists(st.text("ab.0_A", max_size=7), min_size=1, max_size=4))
def test_the_position_set_evaluator_gives_re_answers(regex, texts):
    """The evaluator that runs costly regexes answers as ``re`` does (short texts keep ``re`` itself quick)."""
    problem = regex_problem(regex)
    event("refused" if problem else "accepted")
    if problem:
        return
    bounded = bounded_regex(regex)
    for text in texts:
        ends = bounded.ends(text)
        assert (len(text) in ends) == (re.fullmatch(regex, text) is not None), (regex, text)
        assert bool(ends) == (re.match(regex, text) is not None), (regex, text)


# -- the CI gate: fxpeft check exits non-zero unless its checks completed -------------------------------------------
FACTORIES = '''
import sys
import transformers
from tests.test_untrusted import tiny_llama


def exits():
    sys.exit(0)


def exits_plain():
    raise SystemExit


def interrupted():
    raise KeyboardInterrupt


class Exiting(transformers.LlamaForCausalLM):
    def forward(self, input_ids=None, attention_mask=None, **kwargs):
        sys.exit(0)


def exits_when_run():
    return tiny_llama(Exiting)
'''


@pytest.fixture()
def factories(tmp_path, monkeypatch):
    (tmp_path / "gate_factories.py").write_text(FACTORIES)
    (tmp_path / "exits_on_import.py").write_text("import sys\nsys.exit(0)\n\ndef base():\n    pass\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    yield tmp_path
    for name in ("gate_factories", "exits_on_import"):
        sys.modules.pop(name, None)


@pytest.mark.parametrize("base, code, match", [
    ("gate_factories:exits", 2, r"called sys.exit\(0\)"),
    ("gate_factories:exits_plain", 2, r"called sys.exit\(None\)"),
    ("exits_on_import:base", 2, r"importing 'exits_on_import' called sys.exit\(0\)"),
    ("gate_factories:exits_when_run", 2, "the check could not complete"),
    ("gate_factories:interrupted", 130, "interrupted"),
])
def test_check_exits_non_zero_when_loading_or_running_exits(factories, llama_dirs, capsys, base, code, match):
    try:
        assert cli.main(["check", base, str(llama_dirs[1])]) == code
    except (SystemExit, KeyboardInterrupt) as error:  # what escaped before: exit status 0 with no report
        pytest.fail(f"fxpeft check let {error!r} escape")
    out = capsys.readouterr()
    assert re.search(match, out.err) and not out.out.strip(), out.err


def test_check_on_a_base_that_exits_0_is_exit_status_2_in_a_real_process(factories, llama_dirs):
    """The gate as CI runs it: ``python -m fxpeft check`` with a BASE factory that calls ``sys.exit(0)``."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
               OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")
    result = subprocess.run([sys.executable, "-m", "fxpeft", "check", "gate_factories:exits", str(llama_dirs[1])],
                            cwd=factories, capture_output=True, text=True, timeout=300, env=env)
    assert result.returncode == 2 and "sys.exit(0)" in result.stderr and not result.stdout, result.stderr


def test_check_passes_a_clean_adapter(llama_dirs, capsys):
    assert cli.main(["check", *map(str, llama_dirs)]) == 0, capsys.readouterr().err


# -- property: random JSON in every LoRA field loads or is a clear error, quickly --------------------------------------
_JSON = st.recursive(
    st.none() | st.booleans() | st.integers(-10, 10 ** 12) | st.floats(allow_nan=True, allow_infinity=True)
    | st.text(max_size=12),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4),
    max_leaves=12)
_PLAUSIBLE = {
    "r": st.integers(1, 16), "lora_alpha": st.floats(0.5, 64), "lora_dropout": st.sampled_from([0.0, 0.1]),
    "target_modules": st.sampled_from([["q_proj"], ["q_proj", "v_proj"], ".*_proj", "(.*)*Z", "((a*)*)*", "all-linear",
                                       ".*q_proj", ["*.q_proj"]]),
    "exclude_modules": st.sampled_from([None, ["v_proj"], ".*v_proj"]),
    "rank_pattern": st.sampled_from([{}, {"q_proj": 2}, {"v_proj": 8}, {"(.*)*": 4}]),
    "alpha_pattern": st.sampled_from([{}, {"q_proj": 3.5}]),
    "layers_to_transform": st.sampled_from([None, 0, [0], [1]]), "layers_pattern": st.sampled_from([None, "layers"]),
    "use_rslora": st.booleans(), "bias": st.sampled_from(["none", "all", "lora_only"]),
    "init_lora_weights": st.sampled_from([True, False, "gaussian", "orthogonal", "pissa"]),
    "modules_to_save": st.sampled_from([None, ["v_proj"]]), "task_type": st.sampled_from([None, "CAUSAL_LM"]),
    "peft_type": st.sampled_from(["LORA", "PROMPT_TUNING", None]),
}


def _deeply_nested(value, depth: int):
    for _ in range(depth):
        value = [value]
    return value


_FIELD_VALUE = st.one_of(_JSON, st.integers(0, 80).map(lambda depth: _deeply_nested(1, depth)))


@st.composite
def _configs(draw, base: dict):
    if draw(st.integers(0, 19)) == 0:  # now and then, any JSON document at all
        return draw(_JSON)
    config = dict(base, **draw(st.dictionaries(st.text(max_size=6), _JSON, max_size=2)))
    for name in sorted(_PLAUSIBLE):
        choice = draw(st.sampled_from(["keep", "keep", "keep", "plausible", "plausible", "random", "drop"]))
        if choice == "plausible":
            config[name] = draw(_PLAUSIBLE[name])
        elif choice == "random":
            config[name] = draw(_FIELD_VALUE)
        elif choice == "drop":
            config.pop(name, None)
    return config


@settings(derandomize=True, database=None, max_examples=250, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(data=st.data())
def test_random_configs_load_or_raise_a_clear_error_in_bounded_time(lora_dir, tmp_path_factory, data):
    base = json.loads((lora_dir / CONFIG_NAME).read_text())
    config = data.draw(_configs(base))
    folder = tmp_path_factory.mktemp("fuzz")
    (folder / CONFIG_NAME).write_text(json.dumps(config))
    (folder / WEIGHTS_NAME).write_bytes((lora_dir / WEIGHTS_NAME).read_bytes())
    start = time.perf_counter()
    with deadline(60):
        try:
            adapted = fxpeft.load_adapter(Deep(), folder, example_inputs=X)
        except (AdapterLoadError, UnsupportedError) as error:
            assert str(error)
            event(type(error).__name__)
        else:
            event("loaded")
            rule = adapted.adapters["default"].rules[0]
            assert isinstance(rule, LoRA) and math.isfinite(rule.alpha) and 1 <= rule.r <= MAX_SIZE
            assert torch.isfinite(adapted(*X)).all()
    assert time.perf_counter() - start < 30
