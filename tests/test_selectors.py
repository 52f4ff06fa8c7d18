"""Selection: which linear sites a rule's ``targets`` picks, checked against the model and against PEFT.

Selections are read from a :class:`fxpeft.rewrite.RewriteContext` over one fresh capture per family (the
same object the passes select through), and end to end from ``transform`` + ``adapter_state_dict`` keys.
PEFT is the reference wherever it has the same notion (names, regex strings, ``all-linear``, exclusions).
Tests come in pairs, ``test_match_X`` / ``test_no_match_X``.
"""

from __future__ import annotations

import functools
import re

import pytest
import torch
import torch.nn.functional as F
from peft import LoraConfig, get_peft_model, get_peft_model_state_dict
from torch import nn
from transformers.pytorch_utils import Conv1D

import fxpeft
from fxpeft.adapters import Adapter
from fxpeft.capture.export import capture
from fxpeft.errors import NoMatchError
from fxpeft.rewrite import RewriteContext
from tests.models import hf_model, mlp, small_cnn

ROLES = ("attention.query", "attention.key", "attention.value", "attention.output")


# -- helpers ---------------------------------------------------------------------------------------------------

def _context(model: nn.Module, program) -> RewriteContext:
    return RewriteContext(program, model, "probe", Adapter([]))


def _select(ctx: RewriteContext, targets, exclude=None) -> set[str]:
    return {site.path for site in ctx.select_linear(fxpeft.LoRA(targets=targets, exclude=exclude))}


@pytest.fixture(scope="module")
def select(fresh_capture):
    """``select(family, targets, exclude=None) -> set of module paths``, on the family's cached capture."""
    contexts = {}

    def run(family, targets, exclude=None):
        if family not in contexts:
            contexts[family] = _context(*fresh_capture(family))
        return _select(contexts[family], targets, exclude)

    return run


def _peft_selected(model: nn.Module, **config) -> set[str]:
    """Module paths PEFT puts LoRA on, read from the keys of its adapter state dict."""
    peft_model = get_peft_model(model, LoraConfig(r=2, **config))
    keys = get_peft_model_state_dict(peft_model)
    prefix, suffix = "base_model.model.", ".lora_A.weight"
    return {key[len(prefix):-len(suffix)] for key in keys if key.endswith(suffix)}


def _paths(model: nn.Module, pattern: str) -> set[str]:
    return {name for name, _ in model.named_modules() if re.fullmatch(pattern, name)}


# -- roles read from data flow ------------------------------------------------------------------------------------

# family -> (regexes of its attention blocks, child of a block per role, number of attention blocks, MLP regex)
_ATTENTION = {
    "llama": ([r"model\.layers\.\d+\.self_attn"], ("q_proj", "k_proj", "v_proj", "o_proj"), 2,
              r"model\.layers\.\d+\.mlp\.(gate|up|down)_proj"),
    "gpt2": ([r"transformer\.h\.\d+\.attn"], ("c_attn", "c_attn", "c_attn", "c_proj"), 2,
             r"transformer\.h\.\d+\.mlp\.c_(fc|proj)"),
    "bloom": ([r"transformer\.h\.\d+\.self_attention"], ("query_key_value",) * 3 + ("dense",), 2,
              r"transformer\.h\.\d+\.mlp\.dense_(h_to_4h|4h_to_h)"),
    "t5": ([r"encoder\.block\.\d+\.layer\.0\.SelfAttention", r"decoder\.block\.\d+\.layer\.0\.SelfAttention",
            r"decoder\.block\.\d+\.layer\.1\.EncDecAttention"], ("q", "k", "v", "o"), 6,
           r"(en|de)coder\.block\.\d+\.layer\.\d\.DenseReluDense\.w[io]"),
    "bert": ([r"bert\.encoder\.layer\.\d+\.attention"], ("self.query", "self.key", "self.value", "output.dense"), 2,
             r"bert\.encoder\.layer\.\d+\.(intermediate|output)\.dense"),
    "whisper": ([r"model\.(en|de)coder\.layers\.\d+\.self_attn", r"model\.decoder\.layers\.\d+\.encoder_attn"],
                ("q_proj", "k_proj", "v_proj", "out_proj"), 6, r"model\.(en|de)coder\.layers\.\d+\.fc[12]"),
}


def _expected_role(family: str, model: nn.Module, role: str) -> set[str]:
    blocks, children, count, _ = _ATTENTION[family]
    child = re.escape(children[ROLES.index(role)])
    expected = set().union(*(_paths(model, rf"{block}\.{child}") for block in blocks))
    assert len(expected) == count, f"test table is wrong for {family} {role}: {sorted(expected)}"
    return expected


@pytest.mark.parametrize("family", list(_ATTENTION))
@pytest.mark.parametrize("role", ROLES)
def test_match_attention_role(select, fresh_capture, family, role):
    model, _ = fresh_capture(family)
    assert select(family, [role]) == _expected_role(family, model, role)


@pytest.mark.parametrize("family", list(_ATTENTION))
def test_no_match_attention_roles_outside_attention(select, fresh_capture, family):
    """No role picks an MLP linear, the output head, or a projection of a neighbouring role."""
    model, _ = fresh_capture(family)
    linears = select(family, [nn.Linear, Conv1D])
    mlp_paths = _paths(model, _ATTENTION[family][3])
    assert mlp_paths and mlp_paths <= linears
    for role in ROLES:
        own = _expected_role(family, model, role)
        chosen = select(family, [role])
        assert not chosen & mlp_paths, f"{role} picked an MLP linear"
        assert not chosen & (linears - own), f"{role} picked a linear of another role, layer or the head"


class _Attention(nn.Module):
    """Hand-written attention: ``pre`` feeds ``q`` (so it is not the query), and ``bias`` computes the
    additive attention bias (so it is not the key). ``eager`` picks matmul-softmax-matmul over SDPA."""

    def __init__(self, eager: bool):
        super().__init__()
        self.eager = eager
        self.pre = nn.Linear(16, 16)
        self.q, self.k, self.v, self.o = (nn.Linear(16, 16) for _ in range(4))
        self.bias = nn.Linear(16, 4)
        self.mlp = nn.Linear(16, 16)

    def forward(self, x):
        b, s, _ = x.shape
        heads = lambda t: t.view(b, s, 4, 4).transpose(1, 2)  # noqa: E731
        q, k, v = heads(self.q(self.pre(x))), heads(self.k(x)), heads(self.v(x))
        bias = self.bias(x).transpose(1, 2).unsqueeze(-1)  # [b, heads, s, 1]
        if self.eager:  # as transformers writes it: scale, add a bias, mask with where, softmax in float32
            causal = torch.ones(s, s, dtype=torch.bool, device=x.device).tril()
            scores = torch.where(causal, q @ k.transpose(-1, -2) / 2.0 + bias, torch.finfo(x.dtype).min)
            mixed = torch.softmax(scores, dim=-1, dtype=torch.float32).to(x.dtype) @ v
        else:
            mixed = F.scaled_dot_product_attention(q, k, v, attn_mask=bias)
        return self.mlp(torch.relu(self.o(mixed.transpose(1, 2).reshape(b, s, 16))))


@functools.lru_cache(maxsize=None)
def _hand_written(eager: bool) -> RewriteContext:
    torch.manual_seed(0)
    model = _Attention(eager).eval()
    return _context(model, capture(model, {"x": torch.randn(2, 5, 16)}))


@pytest.mark.parametrize("eager", [False, True], ids=["sdpa", "eager"])
def test_match_roles_hand_written_attention(eager):
    ctx = _hand_written(eager)
    assert [op.form for op in ctx.attention_ops] == ["eager" if eager else "sdpa"]
    assert {role: _select(ctx, [role]) for role in ROLES} == {
        "attention.query": {"q"}, "attention.key": {"k"}, "attention.value": {"v"}, "attention.output": {"o"}}


@pytest.mark.parametrize("eager", [False, True], ids=["sdpa", "eager"])
def test_no_match_roles_behind_another_linear_or_in_the_mask(eager):
    ctx = _hand_written(eager)
    chosen = _select(ctx, list(ROLES))
    assert {"pre", "bias", "mlp"}.isdisjoint(chosen)
    assert chosen == {"q", "k", "v", "o"}


def test_no_match_roles_without_attention():
    model = mlp()
    ctx = _context(model, capture(model, {"x": torch.randn(4, 16)}))
    assert ctx.attention_ops == []
    for role in ROLES:
        with pytest.raises(NoMatchError, match=re.escape(role)):
            _select(ctx, [role])


def test_match_roles_end_to_end_like_peft_names():
    """transform with roles saves exactly the keys PEFT saves for target_modules=["q_proj", "v_proj"]."""
    adapted = fxpeft.transform(hf_model("vit"), fxpeft.LoRA(targets=["attention.query", "attention.value"]))
    peft_keys = get_peft_model_state_dict(get_peft_model(hf_model("vit"),
                                                         LoraConfig(r=8, target_modules=["q_proj", "v_proj"])))
    assert set(adapted.adapter_state_dict()) == set(peft_keys)
    assert {k: tuple(v.shape) for k, v in adapted.adapter_state_dict().items()} == \
        {k: tuple(v.shape) for k, v in peft_keys.items()}


# -- PEFT-style names -----------------------------------------------------------------------------------------------

class _Names(nn.Module):
    """Module names that a substring test would confuse: only ``q_proj`` and ``inner.q_proj`` are q_proj."""

    def __init__(self):
        super().__init__()
        self.q_proj = nn.Linear(8, 8)
        self.xq_proj = nn.Linear(8, 8)
        self.q_projx = nn.Linear(8, 8)
        self.inner = nn.ModuleDict({"q_proj": nn.Linear(8, 8), "xq_proj": nn.Linear(8, 8)})

    def forward(self, x):
        return self.q_proj(x) + self.xq_proj(x) + self.q_projx(x) + self.inner["q_proj"](x) + self.inner["xq_proj"](x)


@functools.lru_cache(maxsize=None)
def _names_context() -> RewriteContext:
    torch.manual_seed(0)
    model = _Names()
    return _context(model, capture(model, {"x": torch.randn(3, 8)}))


def test_match_name_like_peft():
    assert _select(_names_context(), ["q_proj"]) == _peft_selected(_Names(), target_modules=["q_proj"]) == \
        {"q_proj", "inner.q_proj"}


def test_no_match_name_as_substring():
    with pytest.raises(ValueError):  # PEFT: "Target modules {'proj'} not found in the base model"
        _peft_selected(_Names(), target_modules=["proj"])
    with pytest.raises(NoMatchError):
        _select(_names_context(), ["proj"])


def test_match_names_llama_like_peft(select):
    assert select("llama", ["q_proj", "v_proj"]) == _peft_selected(hf_model("llama"),
                                                                   target_modules=["q_proj", "v_proj"])


# -- globs ----------------------------------------------------------------------------------------------------------

def test_match_glob(select):
    peft_regex = r".*\.layers\.1\..*\.v_proj"  # the same set written as PEFT's regex form
    assert select("llama", ["*.layers.1.*.v_proj"]) == _peft_selected(hf_model("llama"), target_modules=peft_regex) \
        == {"model.layers.1.self_attn.v_proj"}
    mlp_linears = _paths(hf_model("llama"), r"model\.layers\.\d\.mlp\.\w+_proj")
    assert len(mlp_linears) == 6 and select("llama", ["model.layers.[0-1].mlp.*_proj"]) == mlp_linears


def test_no_match_glob(select):
    with pytest.raises(NoMatchError):
        select("llama", ["*.layers.2.*"])  # two layers only
    with pytest.raises(NoMatchError):
        select("llama", ["layers.1.*"])  # a glob covers the whole path, not a suffix


# -- a single string is a full-match regex (PEFT's rule) ------------------------------------------------------------

@pytest.mark.parametrize("regex", [r".*\.layers\.0\.(self_attn|mlp)\.(q|down)_proj", r"model\.layers\.1\..*_proj",
                                   r".*(k|v)_proj"])
def test_match_regex_string_like_peft(select, regex):
    expected = _peft_selected(hf_model("llama"), target_modules=regex)
    assert expected and select("llama", regex) == expected


def test_no_match_regex_string_is_a_full_match(select):
    with pytest.raises(ValueError):
        _peft_selected(hf_model("llama"), target_modules="q_proj")
    with pytest.raises(NoMatchError) as error:
        select("llama", "q_proj")
    assert "targets=['q_proj']" in str(error.value)  # the hint: a list entry is a name
    assert select("llama", ["q_proj"])  # the list form is the name form


# -- module types ---------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("family, cls", [("llama", nn.Linear), ("gpt2", Conv1D), ("gpt2", nn.Linear)])
def test_match_module_type(select, fresh_capture, family, cls):
    model, _ = fresh_capture(family)
    expected = {name for name, module in model.named_modules() if isinstance(module, cls)}
    assert expected and select(family, [cls]) == expected


def test_no_match_module_type(select):
    with pytest.raises(NoMatchError, match="Conv2d"):
        select("llama", [nn.Conv2d])


# -- all-linear -----------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("family", ["llama", "gpt2", "bloom", "t5", "whisper", "bert"])
def test_match_all_linear_like_peft(select, family):
    assert select(family, "all-linear") == _peft_selected(hf_model(family), target_modules="all-linear")


@pytest.mark.parametrize("family, head", [("llama", "lm_head"), ("gpt2", "lm_head"), ("bloom", "lm_head"),
                                          ("t5", "lm_head"), ("whisper", "proj_out")])
def test_no_match_all_linear_output_head(select, family, head):
    assert head not in select(family, "all-linear")
    assert head in select(family, [nn.Linear])


def test_match_all_linear_plain_model():
    """A model without ``get_output_embeddings``: the head is read from the graph (what produces the output)."""
    model = mlp()
    ctx = _context(model, capture(model, {"x": torch.randn(4, 16)}))
    assert _select(ctx, "all-linear") == {"fc1"}
    assert _select(ctx, [nn.Linear]) == {"fc1", "fc2"}


def test_no_match_all_linear_only_a_head():
    model = small_cnn()  # conv -> pool -> head: the one linear is the output head
    ctx = _context(model, capture(model, {"x": torch.randn(2, 3, 8, 8)}))
    with pytest.raises(NoMatchError):
        _select(ctx, "all-linear")
    assert _select(ctx, ["head"]) == {"head"}


# -- exclude --------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("exclude", [["down_proj"], r".*\.layers\.0\..*"], ids=["names", "regex"])
def test_match_exclude_like_peft(select, exclude):
    expected = _peft_selected(hf_model("llama"), target_modules="all-linear", exclude_modules=exclude)
    assert expected and select("llama", "all-linear", exclude=exclude) == expected


def test_match_exclude_glob(select):
    chosen = select("llama", "all-linear", exclude=["*.mlp.*"])
    assert chosen == select("llama", "all-linear") - _paths(hf_model("llama"), r".*\.mlp\..*")
    assert chosen == select("llama", ["attention.query", "attention.key", "attention.value", "attention.output"])


def test_no_match_exclude_everything(select):
    with pytest.raises(NoMatchError, match="exclude"):
        select("llama", ["q_proj"], exclude=["q_proj"])


# -- selecting nothing ----------------------------------------------------------------------------------------------

def test_no_match_typo_lists_candidates(select):
    with pytest.raises(ValueError):
        _peft_selected(hf_model("llama"), target_modules=["q_prj"])
    with pytest.raises(NoMatchError) as error:
        select("llama", ["q_prj"])
    assert "q_proj" in error.value.candidates and "q_proj" in str(error.value)


def test_no_match_through_transform():
    model = mlp()
    with pytest.raises(NoMatchError) as error:
        fxpeft.transform(model, fxpeft.LoRA(targets=["fc3"]), example_inputs=(torch.randn(4, 16),))
    assert set(error.value.candidates) >= {"fc1", "fc2"}


def test_match_through_transform():
    model = mlp()
    adapted = fxpeft.transform(model, fxpeft.LoRA(targets=["fc2"]), example_inputs=(torch.randn(4, 16),))
    assert set(adapted.adapter_state_dict()) == {"base_model.model.fc2.lora_A.weight",
                                                 "base_model.model.fc2.lora_B.weight"}
