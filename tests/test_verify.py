"""``fxpeft.verify`` and ``fxpeft check``: a clean adapter passes; each kind of tampering is its own finding.

The model is a one-layer llama (hidden 32), so that each capture takes a few seconds, and for tampering with the
graph itself a two-linear MLP (a fraction of a second). Three command-line runs
go through ``python -m fxpeft`` in subprocesses, started together at the beginning of the module so they
run while the in-process tests do; the other tamperings run the command line in process
(``fxpeft.cli.main``), which is the same code minus the interpreter start.
"""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import transformers as tf
from networkx.algorithms.isomorphism import DiGraphMatcher
from safetensors.torch import load_file, save_file

import fxpeft
from fxpeft import cli
from fxpeft.capture.export import capture
from fxpeft.errors import AdapterLoadError
from fxpeft.formats.files import WEIGHTS_NAME
from fxpeft.verification import GraphView, compare_views, verify
from tests.models import mlp

TINY = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1,
            vocab_size=64)
RULES = [fxpeft.LoRA(targets=["q_proj", "v_proj"], r=4, alpha=8)]
Q_PROJ = "model.layers.0.self_attn.q_proj"
aten = torch.ops.aten


def tiny_llama(**overrides) -> tf.LlamaForCausalLM:
    torch.manual_seed(0)
    return tf.LlamaForCausalLM(tf.LlamaConfig(**{**TINY, **overrides})).eval()


def trained(adapted: fxpeft.AdaptedModel) -> fxpeft.AdaptedModel:
    """Give B non-zero values, as training would, so that the adapter changes the outputs."""
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for site in adapted.site_modules():
            site.lora_B.copy_(torch.randn(site.lora_B.shape, generator=generator) * 0.05)
    return adapted


# What each tampering is reported as; a tampering must show its own kind and none of the others'.
TAMPER_KINDS = {"base-weight-changed", "undeclared-site", "extra-op", "base-op-replaced", "base-op-missing",
                "base-op-rewired", "adapter-nonfinite", "adapter-shape-mismatch", "rules-violation",
                "adapter-not-additive", "adapter-misplaced"}


def errors(report) -> set[str]:
    findings = report["findings"] if isinstance(report, dict) else [finding.to_dict() for finding in report]
    return {finding["kind"] for finding in findings if finding["severity"] == "error"}


def copy_adapter(source: Path, target: Path, edit=None) -> Path:
    """Copy an adapter folder; ``edit(state)`` changes its tensors before they are written."""
    target.mkdir()
    (target / "adapter_config.json").write_text((source / "adapter_config.json").read_text())
    state = load_file(str(source / WEIGHTS_NAME))
    if edit is not None:
        edit(state)
    save_file(state, str(target / WEIGHTS_NAME), metadata={"format": "pt"})
    return target


def run_cli(capsys, *args: str) -> tuple[int, str, str]:
    code = cli.main(["check", *map(str, args)])
    out = capsys.readouterr()
    return code, out.out, out.err


def insert_extra_op(graph: torch.fx.Graph, activation) -> str:
    """Edit a graph: multiply an activation's output by 1.001, an op no adapter declares."""
    act = next(node for node in graph.nodes if node.target is activation)
    with graph.inserting_after(act):
        extra = graph.call_function(aten.mul.Tensor, (act, 1.001))
    act.replace_all_uses_with(extra, delete_user_cb=lambda user: user is not extra)
    extra.meta.update(val=act.meta["val"], nn_module_stack=act.meta["nn_module_stack"])
    return extra.name


# The factories ``fxpeft check BASE package.module:factory`` calls: a trained model in memory, tampered with.
TAMPERED = '''
import torch
import transformers
import fxpeft

BASE, ADAPTER = {base!r}, {adapter!r}


def _adapted():
    return fxpeft.load_adapter(transformers.LlamaForCausalLM.from_pretrained(BASE), ADAPTER)


def nudged_base_weight():
    adapted = _adapted()
    with torch.no_grad():
        adapted.base_model.model.layers[0].mlp.down_proj.weight[3, 5] += 1e-3
    return adapted


def extra_op():
    from tests.test_verify import insert_extra_op

    adapted = _adapted()
    program = adapted.programs()[0]
    insert_extra_op(program.graph, torch.ops.aten.silu.default)
    program.finish_rewrite()
    return adapted
'''


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """A base model folder and a trained adapter folder (LoRA r=4 on q_proj and v_proj)."""
    root = tmp_path_factory.mktemp("verify")
    tiny_llama().save_pretrained(root / "base")
    adapted = trained(fxpeft.transform(tiny_llama(), RULES))
    adapted.save_adapter(root / "adapter")
    (root / "tampered_factories.py").write_text(TAMPERED.format(base=str(root / "base"),
                                                                adapter=str(root / "adapter")))
    return SimpleNamespace(root=root, base=root / "base", adapter=root / "adapter", adapted=adapted)


@pytest.fixture(scope="module", autouse=True)
def subprocess_runs(saved):
    """Start the three ``python -m fxpeft check`` runs at once; the tests at the end of the module read them."""
    root = saved.root
    nan_dir = copy_adapter(saved.adapter, root / "nan", lambda state: state[f"base_model.model.{Q_PROJ}.lora_B.weight"]
                           .__setitem__((2, 1), float("nan")))
    truncated = copy_adapter(saved.adapter, root / "truncated")
    data = (truncated / WEIGHTS_NAME).read_bytes()
    (truncated / WEIGHTS_NAME).write_bytes(data[: len(data) // 2])
    allowed = root / "allowed_rules.json"
    allowed.write_text(json.dumps([{"method": "lora", "targets": ["q_proj", "v_proj", "k_proj"], "r": 8}]))
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")
    commands = {
        "clean": ["--json", "--rules", str(allowed)],
        "nan": [],
        "truncated": [],
    }
    adapters = {"clean": saved.adapter, "nan": nan_dir, "truncated": truncated}
    runs = {name: subprocess.Popen([sys.executable, "-m", "fxpeft", "check", str(saved.base), str(adapters[name]),
                                    *extra], cwd=root, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                   text=True)
            for name, extra in commands.items()}
    results = {}

    def result(name):
        if name not in results:
            out, err = runs[name].communicate(timeout=300)
            results[name] = SimpleNamespace(code=runs[name].returncode, out=out, err=err)
        return results[name]

    yield SimpleNamespace(result=result, nan_dir=nan_dir, truncated=truncated)
    for process in runs.values():
        if process.poll() is None:
            process.kill()
            process.communicate()


# -- the graph comparison ----------------------------------------------------------------------------------
def test_graph_view_mapping_agrees_with_networkx_isomorphism(saved):
    """The anchored walk and networkx's VF2 agree: the adapted graph minus its adapters is the base graph,
    and with one op inserted it is not."""
    fresh = capture(tiny_llama())
    fresh.graph.eliminate_dead_code()
    base = GraphView(fresh.graph, fresh.sources)
    program = saved.adapted.programs()[0]
    adapted = GraphView(program.graph, program.sources)
    assert len(adapted.tagged) > 0
    assert sum(source.kind == "adapter" for _, source in adapted.adapter_inputs) == 6  # A, B, scaling at two sites
    assert set(adapted.names).isdisjoint(name for name, _, _ in adapted.tagged)

    def vf2(view):
        return DiGraphMatcher(view.graph, base.graph, node_match=lambda a, b: a["local"] == b["local"],
                              edge_match=lambda a, b: a["slots"] == b["slots"]).is_isomorphic()

    result = compare_views(base, adapted)
    assert result.isomorphic and len(result.mapping) == len(base.names) == len(adapted.names)
    assert not result.extra and not result.missing and not result.replaced
    assert vf2(adapted)

    tampered = copy.deepcopy(program.graph_module)
    name = insert_extra_op(tampered.graph, aten.silu.default)
    view = GraphView(tampered.graph, program.sources)
    result = compare_views(base, view)
    assert not result.isomorphic and result.extra == [name] and not result.missing and not result.replaced
    assert result.downstream > 0
    assert not vf2(view)


@pytest.mark.filterwarnings("ignore:.*LeafSpec.*:FutureWarning")  # torch's pytree, on deepcopy of a graph
def test_a_base_op_reading_another_input_is_rewired(saved):
    """The embedding reads attention_mask instead of input_ids (what a capture from a call passing one tensor
    for two arguments, as in ``labels=input_ids``, can produce): same ops, other data flow."""
    adapted = copy.deepcopy(saved.adapted)
    program = adapted.programs()[0]
    embedding = next(node for node in program.graph.nodes if node.target is aten.embedding.default)
    mask = next(node for node in program.graph.nodes if node.name == "attention_mask")
    embedding.args = (embedding.args[0], mask)
    program.finish_rewrite()
    report = verify(tiny_llama(), adapted)
    assert errors(report) & TAMPER_KINDS == {"base-op-rewired"}, report.summary()
    rewired = [f for f in report if f.kind == "base-op-rewired"]
    assert [(f.subject, f.module) for f in rewired] == [(embedding.name, "model.embed_tokens")]
    assert rewired[0].details["inputs"] == ["p_model_embed_tokens_weight", "attention_mask"]
    assert rewired[0].details["base_inputs"] == ["p_model_embed_tokens_weight", "input_ids"]


# Graph-level tampering of a small non-transformers model (its captures take a fraction of a second).
MLP_INPUTS = (torch.randn(4, 16),)


def test_clean_mlp_passes_and_a_replaced_base_op_is_named_with_its_module():
    adapted = trained(fxpeft.transform(mlp(), [fxpeft.LoRA(targets=["fc1"], r=2)], example_inputs=MLP_INPUTS))
    report = verify(mlp(), adapted, MLP_INPUTS)
    assert report.ok, report.summary()
    program = adapted.programs()[0]
    act = next(node for node in program.graph.nodes if node.target is aten.gelu.default)
    act.target = aten.relu.default
    program.finish_rewrite()
    report = verify(mlp(), adapted, MLP_INPUTS)
    structural = [f for f in report if f.kind in ("base-op-replaced", "base-op-missing", "extra-op")]
    assert [(f.kind, f.subject, f.module) for f in structural] == [("base-op-replaced", act.name, "act")]
    assert errors(report) & TAMPER_KINDS == {"base-op-replaced"}
    assert "aten.gelu.default" in structural[0].message and "aten.relu.default" in structural[0].message
    assert "disabled-output-differs" in errors(report)  # the changed op changes the outputs too


def test_adapter_nodes_at_a_site_the_config_does_not_declare():
    """An adapter whose graph has LoRA at fc2 while its config declares only fc1."""
    adapted = fxpeft.transform(mlp(), [fxpeft.LoRA(targets=["fc1", "fc2"], r=2)], example_inputs=MLP_INPUTS)
    adapter = adapted.adapters["default"]
    declared = fxpeft.LoRA(targets=["fc1"], r=2)
    adapter.rules, adapter.selected = [declared], {declared: ["fc1"]}
    report = verify(mlp(), adapted, MLP_INPUTS)
    undeclared = [f for f in report if f.kind == "undeclared-site"]
    assert errors(report) & TAMPER_KINDS == {"undeclared-site"}, report.summary()
    assert {f.module for f in undeclared} == {"fc2"}
    # the graph's nodes, the adapter inputs it reads, and the adapter's tensors are each reported
    assert any("node(s) of adapter 'default' at fc2" in f.message for f in undeclared)
    assert any("reads 'lora:fc2' of adapter 'default'" in f.message for f in undeclared)
    assert {"base_model.model.fc2.lora_A.weight", "base_model.model.fc2.lora_B.weight"} <= \
        {f.subject for f in undeclared}


def test_clean_trained_model_in_memory_and_rules_violations(saved):
    report = verify(tiny_llama(), saved.adapted, rules=[{"method": "lora", "targets": ["q_proj"], "r": 2}])
    assert errors(report) == {"rules-violation"}, report.summary()
    violations = sorted((f.subject, f.message) for f in report if f.kind == "rules-violation")
    assert violations == [(Q_PROJ, "LoRA rank 4 exceeds the rules' r=2."),
                          ("model.layers.0.self_attn.v_proj",
                           "the adapter puts LoRA on this module, which no rule allows.")]
    statuses = {check.name: check.status for check in report.checks}
    assert statuses["graph structure"] == statuses["base weights"] == statuses["adapter tensors"] == "ok"
    assert statuses["rules"] == "fail"
    assert not any(f.kind == "disabled-output-differs" for f in report), report.summary()


def test_adapter_updates_that_are_not_base_plus_update():
    """fc1's update multiplies instead of adding; fc2's update is tagged as fc1's (added to another output)."""
    adapted = trained(fxpeft.transform(mlp(), [fxpeft.LoRA(targets=["fc1", "fc2"], r=2)], example_inputs=MLP_INPUTS))
    graph = adapted.programs()[0].graph
    join = next(node for node in graph.nodes if node.target is aten.add.Tensor
                and node.meta.get("fxpeft", {}).get("site") == "fc1")
    join.target = aten.mul.Tensor
    for node in graph.nodes:
        if node.meta.get("fxpeft", {}).get("site") == "fc2":
            node.meta["fxpeft"] = {**node.meta["fxpeft"], "site": "fc1"}
    adapted.programs()[0].finish_rewrite()
    report = verify(mlp(), adapted, MLP_INPUTS)
    assert errors(report) & TAMPER_KINDS == {"adapter-not-additive", "adapter-misplaced"}, report.summary()
    not_additive = [f for f in report if f.kind == "adapter-not-additive"]
    act = next(node for node in graph.nodes if node.target is aten.gelu.default)
    assert [(f.subject, f.module) for f in not_additive] == [(act.name, "act")]
    assert f"reads the adapter node {join.name}" in not_additive[0].message
    misplaced = [f for f in report if f.kind == "adapter-misplaced"]
    assert len(misplaced) == 1 and misplaced[0].module == "fc1" and "the output of fc2" in misplaced[0].message


def test_trainable_copies_stand_for_their_base_tensors(tmp_path):
    """modules_to_save and trained biases are adapter-owned copies the graph reads instead of base tensors:
    the graph still corresponds to the base graph, and the base tensors are unchanged."""
    rules = [fxpeft.LoRA(targets=["fc1"], r=2, bias="lora_only"), fxpeft.Trainable(targets=["fc2"])]
    adapted = fxpeft.transform(mlp(), rules, example_inputs=MLP_INPUTS)
    with torch.no_grad():
        for parameter in adapted.adapters.parameters():
            parameter.add_(0.1)
    adapted.save_adapter(tmp_path / "adapter")
    for target in (adapted, tmp_path / "adapter"):
        report = verify(mlp(), target, MLP_INPUTS)
        statuses = {check.name: check.status for check in report.checks}
        assert statuses["adapter tensors"] == statuses["graph structure"] == statuses["base weights"] == "ok", \
            report.summary()
        assert "at the 4 declared site(s)" in next(c.result for c in report.checks if c.name == "adapter tensors")


def square_mlp() -> torch.nn.Sequential:
    """Two linears, the first square (16 -> 16): a LoRA update transposed by mistake still fits its weight."""
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(16, 16), torch.nn.GELU(), torch.nn.Linear(16, 8)).eval()


def test_a_base_op_taken_out_of_the_adapted_graph():
    """The activation is cut out of the adapted graph (fc2 reads fc1's output directly): the base graph's gelu has
    no counterpart, the op after it reads another value, and the outputs differ."""
    adapted = trained(fxpeft.transform(mlp(), [fxpeft.LoRA(targets=["fc1"], r=2)], example_inputs=MLP_INPUTS))
    program = adapted.programs()[0]
    act = next(node for node in program.graph.nodes if node.target is aten.gelu.default)
    act.replace_all_uses_with(act.args[0])
    program.graph.erase_node(act)
    program.finish_rewrite()
    report = verify(mlp(), adapted, MLP_INPUTS)
    missing = [f for f in report if f.kind == "base-op-missing"]
    assert [(f.subject, f.module) for f in missing] == [(act.name, "act")], report.summary()
    assert "aten.gelu.default" in missing[0].message
    assert errors(report) & TAMPER_KINDS == {"base-op-missing", "base-op-rewired"}, report.summary()
    assert "disabled-output-differs" in errors(report)


def test_base_model_without_a_tensor_the_adapted_graph_reads():
    """The base model given to verify has no ``fc2.bias``, which the adapted graph reads."""
    adapted = trained(fxpeft.transform(mlp(), [fxpeft.LoRA(targets=["fc1"], r=2)], example_inputs=MLP_INPUTS))
    base = mlp()
    base.fc2.bias = None
    report = verify(base, adapted, MLP_INPUTS)
    missing = [f for f in report if f.kind == "base-weight-missing"]
    assert [(f.subject, f.module) for f in missing] == [("fc2.bias", "fc2")], report.summary()
    assert "which the base model does not have" in missing[0].message


def test_merge_that_raises_is_a_finding():
    """A site whose merge cannot find its base weight: ``merge()`` raises inside verify, reported, not raised."""
    adapted = trained(fxpeft.transform(square_mlp(), [fxpeft.LoRA(targets=["0"], r=2)], example_inputs=MLP_INPUTS))
    next(adapted.site_modules()).weight_fqn = "0.no_such_weight"
    report = verify(square_mlp(), adapted, MLP_INPUTS)
    assert errors(report) == {"merge-failed"}, report.summary()
    failed = next(f for f in report if f.kind == "merge-failed")
    assert failed.subject == "merge()" and "AttributeError" in failed.message and "no_such_weight" in failed.message
    assert torch.equal(adapted.base_model[0].weight, square_mlp()[0].weight), "a failed merge changed the weight"


def test_merge_that_adds_another_update():
    """A site that merges ``(B @ A)^T`` (the layout flag of a Conv1D set on a square nn.Linear): the merged model's
    outputs are not the unmerged ones; unmerging still gives the base weights back."""
    adapted = trained(fxpeft.transform(square_mlp(), [fxpeft.LoRA(targets=["0"], r=2)], example_inputs=MLP_INPUTS))
    next(adapted.site_modules()).fan_in_fan_out = True
    report = verify(square_mlp(), adapted, MLP_INPUTS)
    assert errors(report) == {"merged-output-differs"}, report.summary()
    differs = next(f for f in report if f.kind == "merged-output-differs")
    assert differs.subject == "output" and differs.details["max_abs_diff"] > 100 * differs.details["tolerance"]
    torch.testing.assert_close(adapted.base_model[0].weight, square_mlp()[0].weight, rtol=0, atol=0)


def test_adapter_file_without_a_declared_tensor(saved, tmp_path):
    """A folder whose config declares q_proj but whose file lacks its ``lora_B``."""
    key = f"base_model.model.{Q_PROJ}.lora_B.weight"
    folder = copy_adapter(saved.adapter, tmp_path / "missing", lambda state: state.pop(key))
    report = verify(tiny_llama(), folder)
    assert errors(report) == {"adapter-key-missing"}, report.summary()
    assert [(f.subject, f.details["expected"]) for f in report.failures] == [(key, [32, 4])]
    assert [check.status for check in report.checks if check.name == "behaviour"] == ["skipped"]


def test_adapter_keys_for_modules_the_base_does_not_have(saved, tmp_path):
    """A LoRA tensor for a module that is no linear of the base, and a plain tensor the base does not have."""
    lora_key = "base_model.model.model.layers.0.self_attn.rotary.lora_A.weight"
    plain_key = "base_model.model.model.layers.0.self_attn.gate.weight"

    def add(state):
        state[lora_key] = torch.zeros(4, 32)
        state[plain_key] = torch.zeros(4, 32)

    report = verify(tiny_llama(), copy_adapter(saved.adapter, tmp_path / "unknown", add))
    assert errors(report) == {"unknown-site"}, report.summary()
    assert sorted(f.subject for f in report.failures) == sorted([lora_key, plain_key])
    message = next(f for f in report.failures if f.subject == lora_key).message
    assert "not a linear, convolution or embedding module of this base model" in message
    statuses = {check.name: check.status for check in report.checks}
    assert statuses["graph structure"] == statuses["behaviour"] == "skipped"  # it does not fit this base


def test_keys_that_are_no_adapter_tensor(saved, tmp_path):
    """A DoRA magnitude vector in a LoRA adapter's file, and a key outside PEFT's layout."""
    dora_key = f"base_model.model.{Q_PROJ}.lora_magnitude_vector"

    def add(state):
        state[dora_key] = torch.ones(32)
        state["optimizer.step"] = torch.zeros(1)

    report = verify(tiny_llama(), copy_adapter(saved.adapter, tmp_path / "not_adapter", add))
    assert errors(report) == {"not-adapter-key"}, report.summary()
    assert sorted(f.subject for f in report.failures) == sorted([dora_key, "optimizer.step"])
    assert all("not an adapter tensor in PEFT's layout" in f.message for f in report.failures)


def test_config_whose_targets_select_nothing(saved, tmp_path):
    """A config whose ``target_modules`` name no module of this base."""
    folder = copy_adapter(saved.adapter, tmp_path / "unmatched")
    config = json.loads((folder / "adapter_config.json").read_text())
    config["target_modules"] = ["qkv_proj"]
    (folder / "adapter_config.json").write_text(json.dumps(config))
    report = verify(tiny_llama(), folder)
    assert errors(report) == {"targets-unmatched"}, report.summary()
    assert "qkv_proj" in report.failures[0].message and report.failures[0].subject == "default"
    statuses = {check.name: check.status for check in report.checks}
    assert statuses["graph structure"] == statuses["behaviour"] == "skipped"


# Every kind of error finding fxpeft/verification can emit, and a test of this module that triggers it (and names it).
KIND_TESTS = {
    "base-weight-changed": "test_base_weight_nudged_by_1e_3",
    "base-weight-missing": "test_base_model_without_a_tensor_the_adapted_graph_reads",
    "undeclared-site": "test_adapter_nodes_at_a_site_the_config_does_not_declare",
    "unknown-site": "test_adapter_keys_for_modules_the_base_does_not_have",
    "not-adapter-key": "test_keys_that_are_no_adapter_tensor",
    "adapter-key-missing": "test_adapter_file_without_a_declared_tensor",
    "adapter-nonfinite": "test_nan_in_an_adapter_tensor_exits_1_and_names_it",
    "adapter-shape-mismatch": "test_adapter_made_for_another_base",
    "config-mismatch": "test_config_that_disagrees_with_its_tensors",
    "targets-unmatched": "test_config_whose_targets_select_nothing",
    "rules-violation": "test_clean_trained_model_in_memory_and_rules_violations",
    "extra-op": "test_extra_op_inserted_into_the_adapted_graph",
    "base-op-replaced": "test_clean_mlp_passes_and_a_replaced_base_op_is_named_with_its_module",
    "base-op-missing": "test_a_base_op_taken_out_of_the_adapted_graph",
    "base-op-rewired": "test_a_base_op_reading_another_input_is_rewired",
    "adapter-not-additive": "test_adapter_updates_that_are_not_base_plus_update",
    "adapter-misplaced": "test_adapter_updates_that_are_not_base_plus_update",
    "disabled-output-differs": "test_clean_mlp_passes_and_a_replaced_base_op_is_named_with_its_module",
    "merge-failed": "test_merge_that_raises_is_a_finding",
    "merged-output-differs": "test_merge_that_adds_another_update",
    "virtual-output-differs": "test_virtual_tokens_that_are_not_what_the_file_says",
}


def test_every_finding_kind_is_triggered_by_a_test():
    """The kinds in fxpeft/verification's source (``found.add("kind", ...)``, ``Finding("kind", ...)``) are exactly
    those of ``KIND_TESTS``, and each listed test exists here and names its kind: a new kind needs a test."""
    import inspect
    import re

    import fxpeft.verification

    root = Path(fxpeft.verification.__file__).parent
    pattern = re.compile(r"(?:\.add|\bFinding)\(\s*\"([a-z]+(?:-[a-z]+)+)\"")
    emitted = {kind for path in root.glob("*.py") for kind in pattern.findall(path.read_text())}
    assert emitted == set(KIND_TESTS), (sorted(emitted - set(KIND_TESTS)), sorted(set(KIND_TESTS) - emitted))
    for kind, name in KIND_TESTS.items():
        assert kind in inspect.getsource(globals()[name]), f"{name} does not name {kind!r}"


# -- tamperings through the command line, in process --------------------------------------------------------
def test_adapter_tensor_at_an_undeclared_site(saved, tmp_path, capsys):
    k_proj = "model.layers.0.self_attn.k_proj"

    def add_k_proj(state):
        state[f"base_model.model.{k_proj}.lora_A.weight"] = torch.zeros(4, 32)
        state[f"base_model.model.{k_proj}.lora_B.weight"] = torch.zeros(16, 4)

    folder = copy_adapter(saved.adapter, tmp_path / "extra_key", add_k_proj)
    code, out, err = run_cli(capsys, saved.base, folder, "--json")
    report = json.loads(out)
    assert code == 1 and not report["ok"], err
    failing = [f for f in report["findings"] if f["severity"] == "error"]
    assert errors(report) & TAMPER_KINDS == {"undeclared-site"}
    assert sorted(f["subject"] for f in failing) == [f"base_model.model.{k_proj}.lora_A.weight",
                                                     f"base_model.model.{k_proj}.lora_B.weight"]
    assert all(f["module"] == k_proj and "does not declare" in f["message"] for f in failing)
    statuses = {check["name"]: check["status"] for check in report["checks"]}
    assert statuses["graph structure"] == "ok" and statuses["behaviour"] == "skipped"


def test_adapter_made_for_another_base(saved, tmp_path, capsys):
    other = tmp_path / "wider_base"
    tiny_llama(hidden_size=48).save_pretrained(other)
    code, out, err = run_cli(capsys, other, saved.adapter, "--json")
    report = json.loads(out)
    assert code == 1, err
    failing = [f for f in report["findings"] if f["severity"] == "error"]
    assert errors(report) == {"adapter-shape-mismatch"}  # nothing else is compared on a base it does not fit
    lora_a = next(f for f in failing if f["subject"] == f"base_model.model.{Q_PROJ}.lora_A.weight")
    assert lora_a["details"] == {"shape": [4, 32], "expected": [4, 48]}
    assert "another base model" in lora_a["message"]


def test_config_that_disagrees_with_its_tensors(saved, tmp_path):
    folder = copy_adapter(saved.adapter, tmp_path / "r8")
    config = json.loads((folder / "adapter_config.json").read_text())
    config["r"] = 8
    (folder / "adapter_config.json").write_text(json.dumps(config))
    report = verify(tiny_llama(), folder)
    assert errors(report) == {"config-mismatch"}, report.summary()
    mismatches = sorted(f.subject for f in report if f.kind == "config-mismatch")
    assert mismatches == sorted(f"base_model.model.model.layers.0.self_attn.{p}_proj.lora_{m}.weight"
                                for p in "qv" for m in "AB")
    assert all("the config says r=8 but this tensor has rank 4" in f.message for f in report.failures)
    assert [check.status for check in report.checks if check.name == "behaviour"] == ["skipped"]


def test_base_weight_nudged_by_1e_3(saved, capsys, monkeypatch):
    monkeypatch.syspath_prepend(str(saved.root))
    code, out, err = run_cli(capsys, saved.base, "tampered_factories:nudged_base_weight", "--json")
    report = json.loads(out)
    assert code == 1, err
    changed = [f for f in report["findings"] if f["kind"] == "base-weight-changed"]
    assert [f["subject"] for f in changed] == ["model.layers.0.mlp.down_proj.weight"]
    assert changed[0]["details"]["changed"] == 1
    assert changed[0]["details"]["max_abs_diff"] == pytest.approx(1e-3, rel=1e-3)
    assert errors(report) & TAMPER_KINDS == {"base-weight-changed"}


def test_extra_op_inserted_into_the_adapted_graph(saved, capsys, monkeypatch):
    monkeypatch.syspath_prepend(str(saved.root))
    code, out, err = run_cli(capsys, saved.base, "tampered_factories:extra_op")
    assert code == 1, err
    extra = [line for line in out.splitlines() if "[extra-op]" in line]
    assert len(extra) == 1 and "(model.layers.0.mlp.act_fn)" in extra[0] and "aten.mul.Tensor(silu, 1.001)" in extra[0]
    result = out.splitlines()[-1]
    assert result.startswith("result: FAIL") and "1 extra-op" in result
    assert [kind for kind in TAMPER_KINDS if kind in result] == ["extra-op"]


def test_usage_errors_exit_2_with_a_message(saved, tmp_path, capsys):
    code, out, err = run_cli(capsys, saved.base, tmp_path / "missing")
    assert code == 2 and "does not exist" in err and not out
    code, out, err = run_cli(capsys, tmp_path, saved.adapter)
    assert code == 2 and "has no config.json" in err
    (tmp_path / "rules.json").write_text('{"method": "lora"}')
    code, out, err = run_cli(capsys, saved.base, saved.adapter, "--rules", tmp_path / "rules.json")
    assert code == 2 and "JSON list of rule objects" in err


# -- tamperings through ``python -m fxpeft`` ------------------------------------------------------------------
def test_clean_adapter_passes_with_exit_0_and_json_output(subprocess_runs):
    run = subprocess_runs.result("clean")
    assert run.code == 0, run.out + run.err
    report = json.loads(run.out)
    assert report["ok"] is True
    assert [f for f in report["findings"] if f["severity"] == "error"] == []
    checks = {check["name"]: check for check in report["checks"]}
    assert set(checks) == {"fresh capture", "adapter tensors", "rules", "graph structure", "base weights", "behaviour"}
    assert all(check["status"] == "ok" for check in checks.values()), checks
    assert "correspond node for node" in checks["graph structure"]["result"]
    assert "bit for bit" in checks["behaviour"]["result"] and "tolerance" in checks["behaviour"]["result"]


def test_nan_in_an_adapter_tensor_exits_1_and_names_it(subprocess_runs):
    run = subprocess_runs.result("nan")
    assert run.code == 1, run.out + run.err
    key = f"base_model.model.{Q_PROJ}.lora_B.weight"
    assert f"[adapter-nonfinite] {key}: 1 NaN and 0 Inf of 128 values" in run.out
    assert run.out.splitlines()[-1] == "result: FAIL, 1 adapter-nonfinite"


def test_truncated_safetensors_exits_2_with_a_clear_message(subprocess_runs, saved):
    run = subprocess_runs.result("truncated")
    assert run.code == 2 and not run.out
    assert "truncated or corrupt" in run.err and str(subprocess_runs.truncated) in run.err
    assert "Traceback" not in run.err
    with pytest.raises(AdapterLoadError, match="truncated or corrupt"):
        verify(tiny_llama(), subprocess_runs.truncated)


# -- virtual tokens: prompt, P-tuning and prefix tuning, alone and beside LoRA ------------------------------------
VIRTUAL_RULES = {"prompt": [fxpeft.PromptTuning(3)], "ptuning": [fxpeft.PTuning(3, encoder_hidden_size=8)],
                 "prefix": [fxpeft.PrefixTuning(3)],
                 "composed": [*RULES, fxpeft.PrefixTuning(2, projection=8), fxpeft.Trainable(targets=["lm_head"])]}

VIRTUAL_FACTORIES = '''
import torch
import transformers
import fxpeft

BASE, PROMPT = {base!r}, {prompt!r}


def nudged_prompt_base():
    adapted = fxpeft.load_adapter(transformers.LlamaForCausalLM.from_pretrained(BASE), PROMPT)
    with torch.no_grad():
        adapted.base_model.model.layers[0].mlp.down_proj.weight[3, 5] += 1e-3
    return adapted
'''


def random_values(adapted: fxpeft.AdaptedModel) -> fxpeft.AdaptedModel:
    """Random adapter values, as training would give."""
    generator = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for parameter in adapted.adapters.parameters():
            parameter.add_(torch.randn(parameter.shape, generator=generator) * 0.1)
    return adapted.eval()


@pytest.fixture(scope="module")
def virtual(saved):
    """Saved virtual-token adapters on the base of ``saved`` (each kind of VIRTUAL_RULES), and a factories module."""
    folders = {}
    for kind, rules in VIRTUAL_RULES.items():
        folders[kind] = saved.root / f"virtual_{kind}"
        random_values(fxpeft.transform(tiny_llama(), rules)).save_adapter(folders[kind])
    (saved.root / "virtual_factories.py").write_text(VIRTUAL_FACTORIES.format(base=str(saved.base),
                                                                               prompt=str(folders["prompt"])))
    return folders


@pytest.mark.parametrize("kind", sorted(VIRTUAL_RULES))
def test_virtual_token_adapters_pass_fxpeft_check(saved, virtual, capsys, kind):
    """Formerly exit 2 (the behaviour checks needed disable_adapters()): the graph is the base graph on the
    lengthened sequence, and the base model called with the file's virtual tokens as PEFT calls it gives the
    adapted outputs (the LoRA beside them checked as usual)."""
    code, out, err = run_cli(capsys, saved.base, virtual[kind], "--json")
    assert code == 0, out + err
    report = json.loads(out)
    checks = {check["name"]: check for check in report["checks"]}
    assert all(check["status"] == "ok" for check in checks.values()), checks
    assert "correspond node for node" in checks["graph structure"]["result"]
    behaviour = checks["behaviour"]["result"]
    assert "as PEFT calls the model" in behaviour
    assert ("prefix as past_key_values" if kind in ("prefix", "composed") else "rows as inputs_embeds") in behaviour
    if kind == "composed":
        assert "the other adapters: adapters disabled, 1 output(s) equal the base model's bit for bit" in behaviour


def test_a_prefix_folder_saved_by_peft_passes(saved, tmp_path, capsys):
    import peft

    theirs = peft.get_peft_model(tiny_llama(), peft.PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=3))
    with torch.no_grad():
        theirs.prompt_encoder["default"].embedding.weight.normal_()
    theirs.save_pretrained(str(tmp_path / "peft_prefix"))
    code, out, err = run_cli(capsys, saved.base, tmp_path / "peft_prefix")
    assert code == 0, out + err
    assert out.splitlines()[-1].startswith("result: OK")


def test_virtual_tokens_that_are_not_what_the_file_says(saved, virtual, tmp_path, capsys):
    """A P-tuning file whose ``prompt_embeddings`` (what PEFT loads) are not its encoder's output (what fxpeft
    computes), and a prefix graph that reads each layer's values as its keys: ``virtual-output-differs``."""
    def nudge(state):
        state["prompt_embeddings"][1] += 0.5

    folder = copy_adapter(virtual["ptuning"], tmp_path / "ptuning", nudge)
    code, out, err = run_cli(capsys, saved.base, folder, "--json")
    report = json.loads(out)
    assert code == 1, err
    assert errors(report) == {"virtual-output-differs"}
    differs = next(f for f in report["findings"] if f["kind"] == "virtual-output-differs")
    assert differs["subject"] == "logits" and differs["details"]["max_abs_diff"] > 10 * differs["details"]["tolerance"]
    statuses = {check["name"]: check["status"] for check in report["checks"]}
    assert statuses["graph structure"] == statuses["adapter tensors"] == statuses["base weights"] == "ok"

    adapted = random_values(fxpeft.transform(tiny_llama(), [fxpeft.PrefixTuning(3)]))
    assert verify(tiny_llama(), adapted).ok
    program = adapted.programs()[0]
    keys = [node for node in program.graph.nodes if node.meta.get("fxpeft", {}).get("role") == "key"
            and node.target is aten.select.int]
    assert len(keys) == 1
    keys[0].args = (keys[0].args[0], 1, keys[0].args[2] + 1)  # the value rows of the layer, read as its keys
    program.finish_rewrite()
    report = verify(tiny_llama(), adapted)
    assert errors(report) == {"virtual-output-differs"}, report.summary()


def test_virtual_token_adapter_on_a_changed_base_or_graph(saved, virtual, capsys, monkeypatch):
    """A prompt-tuning model whose base weight was nudged after loading, and one whose graph has an op no adapter
    declares, fail their checks with those findings."""
    monkeypatch.syspath_prepend(str(saved.root))
    code, out, err = run_cli(capsys, saved.base, "virtual_factories:nudged_prompt_base", "--json")
    report = json.loads(out)
    assert code == 1, err
    changed = [f["subject"] for f in report["findings"] if f["kind"] == "base-weight-changed"]
    assert changed == ["model.layers.0.mlp.down_proj.weight"]
    assert errors(report) & TAMPER_KINDS == {"base-weight-changed"}

    adapted = random_values(fxpeft.transform(tiny_llama(), [fxpeft.PromptTuning(3)]))
    program = adapted.programs()[0]
    insert_extra_op(program.graph, aten.silu.default)
    program.finish_rewrite()
    report = verify(tiny_llama(), adapted)
    assert errors(report) & TAMPER_KINDS == {"extra-op"}, report.summary()
    extra = [f for f in report if f.kind == "extra-op"]
    assert len(extra) == 1 and extra[0].module == "model.layers.0.mlp.act_fn"
