"""Rules are data: they validate themselves, round-trip through JSON, and reading them never runs code."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import fxpeft
from fxpeft.errors import RuleError
from fxpeft.rules import LoRA, Rule, as_rule_list

_NAMES = st.sampled_from(["q_proj", "k_proj", "v_proj", "o_proj", "fc1", "c_attn"])


@settings(max_examples=60, derandomize=True, deadline=None)
@given(targets=st.lists(_NAMES, min_size=1, max_size=4, unique=True), r=st.integers(1, 64),
       alpha=st.integers(1, 128), dropout=st.sampled_from([0.0, 0.05, 0.5]), use_rslora=st.booleans(),
       bias=st.sampled_from(["none", "all", "lora_only"]),
       ranks=st.dictionaries(_NAMES, st.integers(1, 16), max_size=2))
def test_lora_rules_round_trip_through_json(targets, r, alpha, dropout, use_rslora, bias, ranks):
    rule = LoRA(targets=targets, r=r, alpha=alpha, dropout=dropout, use_rslora=use_rslora, bias=bias,
                rank_pattern=ranks)
    assert Rule.from_dict(json.loads(json.dumps(rule.to_dict()))) == rule


def test_a_module_type_target_round_trips_when_its_module_is_imported():
    rule = LoRA(targets=[torch.nn.Linear])
    assert Rule.from_dict(json.loads(json.dumps(rule.to_dict()))) == rule


def test_reading_a_rules_file_never_imports_a_module():
    """A type named in a rules file is looked up among imported modules, never imported: a stranger's file could
    otherwise run any module's import-time code. Checked in a fresh interpreter, where the module is not loaded."""
    script = (
        "import sys, fxpeft\n"
        "from fxpeft.rules import Rule\n"
        "assert 'this' not in sys.modules\n"
        "try:\n"
        "    Rule.from_dict({'method': 'lora', 'targets': [{'type': 'this:X'}]})\n"
        "except fxpeft.errors.RuleError as error:\n"
        "    print('refused:', error)\n"
        "assert 'this' not in sys.modules\n")
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "refused:" in result.stdout and "not imported" in result.stdout


def test_as_rule_list_names_the_caller_and_the_bad_entry():
    assert as_rule_list(LoRA(targets=["q"]), "transform()") == [LoRA(targets=["q"])]
    with pytest.raises(RuleError, match=r"add_adapter\(\) takes fxpeft rules .* got 'q_proj'"):
        as_rule_list(["q_proj"], "add_adapter()")
    with pytest.raises(RuleError, match="needs at least one rule"):
        as_rule_list([], "transform()")
    with pytest.raises(RuleError, match="takes fxpeft rules"):
        fxpeft.transform(torch.nn.Linear(2, 2), 3, example_inputs=(torch.randn(1, 2),))


def test_two_rule_types_cannot_share_a_method_name():
    with pytest.raises(RuleError, match="Two rule types are named 'lora'"):
        class Impostor(Rule):  # noqa: F841
            method = "lora"
