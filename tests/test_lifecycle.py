"""Adapter lifecycle and two-way PEFT compatibility (issue 3).

Every check holds fxpeft against the real ``peft`` package on the same tiny base: folders written by
``get_peft_model(...).save_pretrained`` load into fxpeft with ``PeftModel.from_pretrained``'s logits (one
case per ``LoraConfig`` field); several adapters save in PEFT's layout and load back in PEFT; adapters
combined with ``add_weighted_adapter`` equal PEFT's; loads that do not fit and saves that fail change
nothing.

Captures are the slow part, so one llama is captured for the module and every PEFT folder is loaded into it
as another adapter (``AdaptedModel.load_adapter``); inactive adapters add exactly zero.
"""

from __future__ import annotations

import json
import os
import stat

import peft
import pytest
import torch
from safetensors.torch import load_file
from torch._dynamo.utils import counters

import fxpeft
from fxpeft.errors import AdapterLoadError, AdapterSaveError, FxpeftError, RuleError, UnsupportedError
from fxpeft.formats.files import CONFIG_NAME, WEIGHTS_NAME
from tests.limits import FileSizeLimit
from tests.models import AUTO_CLASS, CONFIGS, hf_inputs, mlp
from tests.passes.peft_reference import build_without_dropout, call, randomize_peft

INPUTS = hf_inputs("llama")
RTOL, ATOL = 1e-5, 1e-6

# name -> (family, LoraConfig fields, randomize the saved tensors). One case per field fxpeft honours.
CASES = {
    "r_alpha": ("llama", dict(target_modules=["q_proj", "v_proj"], r=4, lora_alpha=16), True),
    "regex_gaussian": ("llama", dict(target_modules=r".*\.(q|k)_proj", r=2, lora_alpha=4,
                                     init_lora_weights="gaussian"), True),
    "exclude_names_init_false": ("llama", dict(target_modules="all-linear", r=2, init_lora_weights=False,
                                               exclude_modules=["down_proj", "model.layers.1.self_attn.k_proj"]),
                                 False),  # PEFT's init_lora_weights=False: B random too, saved as initialised
    "exclude_regex_orthogonal": ("llama", dict(target_modules=["q_proj", "v_proj", "up_proj"], r=4,
                                               exclude_modules=r".*layers\.0\.mlp\..*",
                                               init_lora_weights="orthogonal"), True),
    "dropout": ("llama", dict(target_modules=["q_proj", "v_proj"], r=4, lora_dropout=0.25), True),
    "rslora": ("llama", dict(target_modules=["q_proj", "v_proj"], r=4, lora_alpha=8, use_rslora=True,
                             rank_pattern={"v_proj": 2}), True),
    "patterns": ("llama", dict(target_modules=["q_proj", "v_proj", "down_proj"], r=4, lora_alpha=8,
                               rank_pattern={"q_proj": 2, r"layers\.1\.self_attn\.v_proj": 6},
                               alpha_pattern={"down_proj": 3, "v_proj": 5}), True),
    "layers": ("llama", dict(target_modules=["q_proj", "v_proj"], r=2, layers_to_transform=[1]), True),
    "layers_pattern": ("llama", dict(target_modules=["q_proj", "o_proj"], r=2, layers_to_transform=0,
                                     layers_pattern="layers"), True),
    "fan_in_fan_out": ("gpt2", dict(target_modules=["c_attn", "c_fc"], r=2, fan_in_fan_out=True), True),
    "modules_to_save": ("bert", dict(target_modules="all-linear", r=2, modules_to_save=["classifier"]), True),
    "bias_lora_only": ("mlp", dict(target_modules=["fc1"], r=2, bias="lora_only"), True),
    "bias_all": ("mlp", dict(target_modules=["fc2"], r=2, bias="all"), True),
}
X = (torch.randn(5, 16, generator=torch.Generator().manual_seed(2)),)


def build(family: str) -> torch.nn.Module:
    return mlp() if family == "mlp" else build_without_dropout(family)


def inputs_of(family: str):
    return X if family == "mlp" else hf_inputs(family)


def peft_folder(root, name: str, family: str, fields: dict, randomize: bool, seed: int = 5):
    """A folder written by the real peft package: ``get_peft_model(...).save_pretrained``."""
    model = peft.get_peft_model(build(family), peft.LoraConfig(**fields))
    if randomize:
        randomize_peft(model, seed=seed, scale=0.2)
    model.save_pretrained(root / name)
    return root / name


def peft_logits(family: str, folder, inputs, *more):
    """``PeftModel.from_pretrained`` of ``folder`` (and ``(folder, name)`` pairs loaded and made active)."""
    model = peft.PeftModel.from_pretrained(build(family), folder).eval()
    for sub, name in more:
        model.load_adapter(sub, adapter_name=name)
        model.set_adapter(name)
    with torch.no_grad():
        return call(model, inputs)


def snapshot(adapted: fxpeft.AdaptedModel):
    """What a failed load must leave as it was: adapter names, graphs, every tensor, active adapters."""
    graphs = [[(n.op, str(n.target)) for n in p.graph.nodes] for p in adapted.programs()]
    return (list(adapted.adapters), graphs, {k: v.detach().clone() for k, v in adapted.state_dict().items()},
            adapted.active_adapters)


def assert_same(before, after) -> None:
    assert before[0] == after[0] and before[1] == after[1] and before[3] == after[3]
    assert sorted(before[2]) == sorted(after[2])
    for key, value in before[2].items():
        assert torch.equal(after[2][key], value), key


# -- module fixtures: PEFT folders, and one captured llama that every llama folder loads into ---------------
@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("peft")
    return {name: peft_folder(root, name, family, fields, randomize, seed=5 + i)
            for i, (name, (family, fields, randomize)) in enumerate(CASES.items())}


@pytest.fixture(scope="module")
def llama(folders):
    """llama with case ``r_alpha`` as adapter ``default`` (:func:`fxpeft.load_adapter`); tests add theirs."""
    return fxpeft.load_adapter(build("llama"), folders["r_alpha"], example_kwargs=INPUTS).eval()


def adapter_of(case: str) -> str:
    return "default" if case == "r_alpha" or CASES[case][0] != "llama" else case


def loaded(adapted: fxpeft.AdaptedModel, folder, case: str) -> fxpeft.AdaptedModel:
    """``adapted`` with the folder loaded as the case's adapter (once), the only active one, in eval mode."""
    if adapter_of(case) not in adapted.adapters:
        adapted.load_adapter(folder, adapter_of(case))
    adapted.set_adapter(adapter_of(case))
    return adapted.eval()


# -- 1. PEFT adapters in: every LoraConfig field -----------------------------------------------------------
@pytest.mark.parametrize("case", CASES)
def test_peft_folder_loads_with_peft_logits(case, folders, llama, tmp_path):
    family, fields, _ = CASES[case]
    inputs = inputs_of(family)
    if family == "llama":
        adapted = loaded(llama, folders[case], case)
    else:
        adapted = fxpeft.load_adapter(build(family), folders[case], example_inputs=X if family == "mlp" else None,
                                      example_kwargs=None if family == "mlp" else inputs).eval()
    expected = peft_logits(family, folders[case], inputs)
    with torch.no_grad():
        ours = call(adapted, inputs)
        torch.testing.assert_close(ours, expected, rtol=RTOL, atol=ATOL)
        assert not torch.allclose(ours, call(build(family), inputs), atol=1e-4), "the adapter changed nothing"
    theirs = load_file(folders[case] / WEIGHTS_NAME)
    ours_state = adapted.adapter_state_dict(adapter_of(case))
    assert sorted(ours_state) == sorted(theirs)
    for key, value in theirs.items():
        assert torch.equal(ours_state[key], value), key
    # What fxpeft writes back, PEFT reads to the same logits (and the config keeps the field).
    adapted.save_adapter(tmp_path / "again", adapter_of(case))
    again = json.loads((tmp_path / "again" / CONFIG_NAME).read_text())
    for field, value in fields.items():
        if field not in ("target_modules", "exclude_modules", "fan_in_fan_out"):
            assert again[field] == ([value] if field == "layers_to_transform" and isinstance(value, int)
                                    else value), field
    torch.testing.assert_close(peft_logits(family, tmp_path / "again", inputs), expected, rtol=RTOL, atol=ATOL)


def test_per_site_ranks_and_layers(folders, llama):
    """rank_pattern / alpha_pattern / layers_to_transform: the sites and their r and scaling, as PEFT's layers."""
    theirs = peft.PeftModel.from_pretrained(build("llama"), folders["patterns"])
    for name in ("patterns", "layers", "layers_pattern"):
        loaded(llama, folders[name], name)
    sites = {site.path: site for site in llama.site_modules("patterns")}
    for path, site in sites.items():
        layer = theirs.base_model.model.get_submodule(path)
        assert (site.r, site.scaling.item()) == (layer.r["default"], pytest.approx(layer.scaling["default"]))
    assert sites["model.layers.0.self_attn.v_proj"].r == 4 and sites["model.layers.1.self_attn.v_proj"].r == 6
    assert sites["model.layers.0.self_attn.q_proj"].r == 2
    assert {s.path for s in llama.site_modules("layers")} == {"model.layers.1.self_attn.q_proj",
                                                               "model.layers.1.self_attn.v_proj"}
    assert {s.path for s in llama.site_modules("layers_pattern")} == {"model.layers.0.self_attn.q_proj",
                                                                       "model.layers.0.self_attn.o_proj"}


def test_dropout_matches_peft_in_train_mode(folders, llama):
    """Same seed, same masks: only the LoRA input is dropped, as in PEFT (no other adapter has dropout)."""
    adapted = loaded(llama, folders["dropout"], "dropout")
    theirs = peft.PeftModel.from_pretrained(build("llama"), folders["dropout"])
    adapted.train()
    theirs.train()
    try:
        with torch.no_grad():
            for seed in (1, 2):
                torch.manual_seed(seed)
                expected = call(theirs, INPUTS)
                torch.manual_seed(seed)
                torch.testing.assert_close(call(adapted, INPUTS), expected, rtol=RTOL, atol=ATOL)
            torch.manual_seed(3)
            assert not torch.allclose(call(adapted, INPUTS), expected, atol=1e-5)  # the masks are random
    finally:
        adapted.eval()


def test_from_peft_config_and_to_peft_config(llama):
    """``LoRA.from_peft_config`` builds what ``get_peft_model`` builds; ``to_peft_config`` goes back."""
    config = peft.LoraConfig(target_modules=["q_proj", "v_proj", "up_proj"], r=4, lora_alpha=8, lora_dropout=0.1,
                             rank_pattern={"up_proj": 2}, alpha_pattern={"q_proj": 6}, layers_to_transform=[0, 1],
                             layers_pattern="layers", exclude_modules=["model.layers.0.mlp.up_proj"],
                             use_rslora=True, init_lora_weights="gaussian", modules_to_save=["lm_head"])
    rules = fxpeft.LoRA.from_peft_config(config)
    lora = rules[0]
    assert rules[1] == fxpeft.Trainable(targets=["lm_head"])
    assert (lora.r, lora.alpha, lora.dropout, lora.init, lora.use_rslora) == (4, 8, 0.1, "gaussian", True)
    assert (lora.rank_pattern, lora.alpha_pattern, lora.layers) == ((("up_proj", 2),), (("q_proj", 6),), (0, 1))
    assert fxpeft.LoRA.from_peft_config(lora.to_peft_config(["lm_head"])) == rules
    assert fxpeft.Rule.from_dict(json.loads(json.dumps(lora.to_dict()))) == lora

    # Same weights in both: equal logits (the rules on the shared llama, PEFT's model from the same config).
    if "from_config" not in llama.adapters:
        llama.add_adapter("from_config", rules)
    twin = peft.get_peft_model(build("llama"), config)
    llama.adapters["from_config"].load_peft_state_dict(randomize_peft(twin, seed=4))
    llama.set_adapter("from_config")
    llama.eval()
    with torch.no_grad():
        torch.testing.assert_close(call(llama, INPUTS), call(twin.eval(), INPUTS), rtol=RTOL, atol=ATOL)
    assert llama.adapters["from_config"].peft_keys() == {k: tuple(v.shape) for k, v in
                                                         peft.get_peft_model_state_dict(twin).items()}


@pytest.mark.parametrize("init", ["random", "orthogonal"])
def test_initialisations_as_peft(init):
    """``init="random"`` (PEFT's ``init_lora_weights=False``): A and B as ``nn.Linear`` initialises them;
    ``"orthogonal"``: PEFT's ``orthogonal_init`` tensor for tensor from the same seed, at PEFT's scale written out
    here, both non-zero with ``B @ A = 0``, so the fresh adapter is the base model."""
    adapted = fxpeft.transform(mlp(), [fxpeft.LoRA(targets=["fc1"], r=4, init=init)], example_inputs=X).eval()
    twin = peft.get_peft_model(mlp(), fxpeft.LoRA(targets=["fc1"], r=4, init=init).to_peft_config())
    ours, theirs = adapted.adapter_state_dict(), peft.get_peft_model_state_dict(twin)
    assert {k: v.shape for k, v in ours.items()} == {k: v.shape for k, v in theirs.items()}
    for key in ours:
        assert torch.count_nonzero(ours[key]) == ours[key].numel(), key
        if init == "random":  # kaiming_uniform(a=sqrt(5)): |w| <= 1 / sqrt(fan_in)
            bound = 1 / ours[key].shape[1] ** 0.5
            assert ours[key].abs().max() <= bound and theirs[key].abs().max() <= bound, key
    if init == "orthogonal":
        # Same seed, same draws as PEFT's orthogonal_init (randn [r, r] and its QR, then A's and B's randn): equal
        # tensors, so any other scale or construction fails.
        site, layer = next(adapted.site_modules()), twin.base_model.model.fc1
        torch.manual_seed(7)
        site.reset_parameters()
        torch.manual_seed(7)
        layer.orthogonal_init("default")
        torch.testing.assert_close(site.lora_A, layer.lora_A["default"].weight, rtol=0, atol=0)
        torch.testing.assert_close(site.lora_B, layer.lora_B["default"].weight, rtol=0, atol=0)
        # The scale from the construction: A = (Z Q_odd)^T / 10 with Z [in, r/2] standard normal and Q_odd r/2
        # orthonormal rows, so ||A||^2 = ||Z||^2 / 100 and the mean square of A is (in r/2) / (100 in r) = 1/200
        # (B alike). On a 256 x 256 linear with r = 8 that is a chi-square of 1024 degrees: within 25 %.
        torch.manual_seed(0)
        wide = fxpeft.transform(torch.nn.Sequential(torch.nn.Linear(256, 256)).eval(),
                                [fxpeft.LoRA(targets=["0"], r=8, init="orthogonal")],
                                example_inputs=(torch.randn(2, 256),))
        wide_site = next(wide.site_modules())
        for name in ("lora_A", "lora_B"):
            mean_square = getattr(wide_site, name).square().mean().item()
            assert 0.8 / 200 < mean_square < 1.25 / 200, f"{name}: mean square {mean_square:.3g}, expected 1/200"
        assert (wide_site.lora_B @ wide_site.lora_A).abs().max() < 1e-6
    with torch.no_grad():
        base = mlp().eval()(*X)
        if init == "orthogonal":
            torch.testing.assert_close(adapted(*X), base, rtol=0, atol=1e-6)
            torch.testing.assert_close(twin.eval()(*X), base, rtol=0, atol=1e-6)
        else:
            assert not torch.allclose(adapted(*X), base, atol=1e-4)


def test_peft_config_of_graph_only_targets():
    """Roles, globs and types mean something only against a graph: ``to_peft_config`` says so; a rule with
    ``layers`` and a regex cannot be written either (PEFT applies layers only to a list of names)."""
    with pytest.raises(UnsupportedError, match="attention.query"):
        fxpeft.LoRA(targets=["attention.query"]).to_peft_config()
    with pytest.raises(UnsupportedError, match=r"\*\.q_proj"):
        fxpeft.LoRA(targets=["q_proj"], exclude=["*.q_proj"]).to_peft_config()
    with pytest.raises(UnsupportedError, match="layers"):
        fxpeft.LoRA(targets=r".*q_proj", layers=[0]).to_peft_config()
    with pytest.raises(RuleError, match="layers_pattern"):
        fxpeft.LoRA(targets=["q_proj"], layers_pattern="layers")
    with pytest.raises(RuleError, match="even"):
        fxpeft.LoRA(targets=["q_proj"], r=3, init="orthogonal")
    with pytest.raises(RuleError, match="rank_pattern"):
        fxpeft.LoRA(targets=["q_proj"], rank_pattern={"q_proj": 0})


def test_saving_graph_only_targets_writes_module_paths(llama, tmp_path):
    """A rule PEFT's config cannot express is saved as the module paths it selected; PEFT agrees."""
    if "roles" not in llama.adapters:
        llama.add_adapter("roles", [fxpeft.LoRA(targets=["attention.query", "attention.value"], r=4, alpha=8,
                                                layers=[1], rank_pattern={"v_proj": 2})])
    generator = torch.Generator().manual_seed(9)
    with torch.no_grad():
        for tensor in llama.adapters["roles"].peft_state_dict().values():
            tensor.copy_(torch.randn(tensor.shape, generator=generator) * 0.2)
    llama.set_adapter("roles")
    llama.save_adapter(tmp_path, "roles")
    config = json.loads((tmp_path / CONFIG_NAME).read_text())
    assert config["target_modules"] == ["model.layers.1.self_attn.q_proj", "model.layers.1.self_attn.v_proj"]
    assert config["layers_to_transform"] is None and config["rank_pattern"] == {"v_proj": 2}
    with torch.no_grad():
        torch.testing.assert_close(peft_logits("llama", tmp_path, INPUTS), call(llama, INPUTS), rtol=RTOL,
                                   atol=ATOL)


# -- 2. PEFT adapters out: several adapters, PEFT's layout ------------------------------------------------
def test_several_adapters_save_in_peft_layout(folders, llama, tmp_path):
    """``default`` in the folder, the others in sub-folders; PEFT loads each with fxpeft's logits."""
    for case in ("patterns", "layers"):
        loaded(llama, folders[case], case)
    out = tmp_path / "out"
    llama.save_adapter(out, ["default", "patterns", "layers"])
    assert sorted(os.listdir(out)) == sorted([CONFIG_NAME, WEIGHTS_NAME, "patterns", "layers"])
    for sub in ("patterns", "layers"):
        assert sorted(os.listdir(out / sub)) == sorted([CONFIG_NAME, WEIGHTS_NAME])
    theirs = peft.PeftModel.from_pretrained(build("llama"), out).eval()
    for name in ("patterns", "layers"):
        theirs.load_adapter(out / name, adapter_name=name)
    for name in ("default", "patterns", "layers"):
        theirs.set_adapter(name)
        llama.set_adapter(name)
        with torch.no_grad():
            torch.testing.assert_close(call(theirs, INPUTS), call(llama, INPUTS), rtol=RTOL, atol=ATOL)
    llama.save_adapter(tmp_path / "no_default", ["patterns", "layers"])  # as PEFT: only "default" is at the root
    assert sorted(os.listdir(tmp_path / "no_default")) == ["layers", "patterns"]
    with pytest.raises(FxpeftError, match="nope"):
        llama.save_adapter(tmp_path / "bad", ["default", "nope"])
    assert not (tmp_path / "bad").exists()


def test_peft_multi_adapter_folder_loads_in_fxpeft(folders, llama, tmp_path):
    """PEFT's ``save_pretrained`` of two adapters; fxpeft loads the root and the sub-folder."""
    theirs = peft.PeftModel.from_pretrained(build("llama"), folders["r_alpha"])
    theirs.load_adapter(folders["patterns"], adapter_name="second")
    theirs.save_pretrained(tmp_path)
    assert (tmp_path / "second" / CONFIG_NAME).is_file() and (tmp_path / CONFIG_NAME).is_file()
    llama.load_adapter(tmp_path, "peft_root")
    llama.load_adapter(tmp_path / "second", "peft_second")
    theirs.eval()
    for ours, name in (("peft_root", "default"), ("peft_second", "second")):
        theirs.set_adapter(name)
        llama.set_adapter(ours)
        with torch.no_grad():
            torch.testing.assert_close(call(llama, INPUTS), call(theirs, INPUTS), rtol=RTOL, atol=ATOL)


def test_new_folders_get_the_umask_mode_as_in_peft(llama, tmp_path):
    """``mkdtemp`` makes private (0700) folders; a saved adapter folder has the mode PEFT's has."""
    llama.save_adapter(tmp_path / "ours", ["default", "patterns"] if "patterns" in llama.adapters else ["default"])
    theirs = peft.PeftModel.from_pretrained(build("llama"), tmp_path / "ours")
    theirs.save_pretrained(tmp_path / "theirs")
    mode = stat.S_IMODE(os.stat(tmp_path / "theirs").st_mode)
    assert stat.S_IMODE(os.stat(tmp_path / "ours").st_mode) == mode
    mask = os.umask(0)
    os.umask(mask)
    assert mode == 0o777 & ~mask
    for sub in os.listdir(tmp_path / "ours"):
        if (tmp_path / "ours" / sub).is_dir():
            assert stat.S_IMODE(os.stat(tmp_path / "ours" / sub).st_mode) == mode


def _tree(folder):
    return {str(path.relative_to(folder)): path.read_bytes() if path.is_file() else None
            for path in sorted(folder.rglob("*"))}


def test_failed_save_of_several_adapters_changes_nothing(tmp_path):
    """A write that fails half way (the second adapter's file) leaves a new folder absent and an existing one,
    sub-folders and unrelated files included, byte for byte as it was."""
    adapted = fxpeft.transform(mlp(), [fxpeft.LoRA(targets=["fc1"], r=2)], example_inputs=X)
    adapted.add_adapter("big", [fxpeft.LoRA(targets=["fc1", "fc2"], r=64)])
    with FileSizeLimit(4096), pytest.raises(AdapterSaveError):
        adapted.save_adapter(tmp_path / "new", ["default", "big"])
    assert os.listdir(tmp_path) == []
    small = fxpeft.transform(mlp(), [fxpeft.LoRA(targets=["fc2"], r=1)], example_inputs=X)
    small.add_adapter("big", [fxpeft.LoRA(targets=["fc1"], r=1)])
    small.save_adapter(tmp_path / "old", ["default", "big"])
    (tmp_path / "old" / "README.md").write_text("notes\n")
    (tmp_path / "old" / "big" / "notes.txt").write_text("kept\n")
    before = _tree(tmp_path / "old")
    with FileSizeLimit(4096), pytest.raises(AdapterSaveError):
        adapted.save_adapter(tmp_path / "old", ["default", "big"])
    assert _tree(tmp_path / "old") == before
    assert os.listdir(tmp_path) == ["old"]
    adapted.save_adapter(tmp_path / "old", ["default", "big"])  # without the limit: replaced, notes kept
    after = _tree(tmp_path / "old")
    assert after["README.md"] == b"notes\n" and after["big/notes.txt"] == b"kept\n"
    assert json.loads(after[f"big/{CONFIG_NAME}"])["r"] == 64 and json.loads(after[CONFIG_NAME])["r"] == 2
    two_rules = fxpeft.transform(mlp(), [fxpeft.LoRA(targets=["fc1"], r=2)], example_inputs=X)
    two_rules.add_adapter("split", [fxpeft.LoRA(targets=["fc1"]), fxpeft.LoRA(targets=["fc2"], r=2)])
    with pytest.raises(UnsupportedError, match="one LoRA rule"):  # checked before anything is written
        two_rules.save_adapter(tmp_path / "unsaveable", ["default", "split"])
    assert os.listdir(tmp_path) == ["old"]


def test_load_in_place_does_not_recompile(folders, tmp_path):
    """New tensors (and alpha) of the same shapes load into the compiled model's adapter: one graph."""
    first = peft_folder(tmp_path, "first", "llama", dict(target_modules=["q_proj", "v_proj"], r=4, lora_alpha=8),
                        True, seed=21)
    second = peft_folder(tmp_path, "second", "llama", dict(target_modules=["q_proj", "v_proj"], r=4, lora_alpha=32,
                                                           lora_dropout=0.0), True, seed=22)
    adapted = fxpeft.load_adapter(build("llama"), first, example_kwargs=INPUTS).eval()
    torch._dynamo.reset()
    counters.clear()
    # Recompiles are dynamo's decision (its guards on the module, its tensors and the code), whatever the
    # backend; the "eager" backend skips Inductor's code generation, most of a minute on this CPU.
    fast = torch.compile(adapted, fullgraph=True, dynamic=True, backend="eager")
    with torch.no_grad():
        torch.testing.assert_close(fast(**INPUTS).logits, peft_logits("llama", first, INPUTS), rtol=RTOL, atol=1e-5)
        adapted.load_adapter(second, "default")
        torch.testing.assert_close(fast(**INPUTS).logits, peft_logits("llama", second, INPUTS), rtol=RTOL, atol=1e-5)
    assert counters["stats"]["unique_graphs"] == 1
    assert json.loads(json.dumps(adapted.adapters["default"].rules[0].to_dict()))["alpha"] == 32


# -- 3. Combining adapters -----------------------------------------------------------------------------------
COMBINE = {  # name -> (combination_type, adapters, weights, svd_rank)
    "cat": ("cat", ["comb_a", "comb_c"], [0.7, -0.4], None),
    "svd": ("svd", ["comb_a", "comb_c"], [1.0, 0.5], None),
    "svd_rank": ("svd", ["comb_a", "comb_b"], [0.6, 0.9], 3),
    "linear": ("linear", ["comb_a", "comb_b"], [0.8, -0.3], None),
    "single": ("svd", ["comb_b"], [2.0], None),
}
SOURCES = {"comb_a": dict(target_modules=["q_proj", "v_proj"], r=4, lora_alpha=8),
           "comb_b": dict(target_modules=["v_proj", "o_proj"], r=4, lora_alpha=16),
           "comb_c": dict(target_modules=["q_proj"], r=2, lora_alpha=4)}


@pytest.fixture(scope="module")
def combined_pair(llama, tmp_path_factory):
    """The same three adapters loaded in PEFT and in the shared llama."""
    root = tmp_path_factory.mktemp("sources")
    theirs = None
    for i, (name, fields) in enumerate(SOURCES.items()):
        folder = peft_folder(root, name, "llama", fields, True, seed=30 + i)
        if theirs is None:
            theirs = peft.PeftModel.from_pretrained(build("llama"), folder, adapter_name=name).eval()
        else:
            theirs.load_adapter(folder, adapter_name=name)
        llama.load_adapter(folder, name)
    return llama, theirs


@pytest.mark.parametrize("name", COMBINE)
def test_add_weighted_adapter_matches_peft(name, combined_pair):
    ours, theirs = combined_pair
    combination_type, adapters, weights, svd_rank = COMBINE[name]
    theirs.add_weighted_adapter(adapters, weights, name, combination_type=combination_type, svd_rank=svd_rank)
    ours.add_weighted_adapter(adapters, weights, name, combination_type=combination_type, svd_rank=svd_rank)
    config, rule = theirs.peft_config[name], ours.adapters[name].rules[0]
    assert (rule.r, rule.alpha) == (config.r, config.lora_alpha)
    assert set(rule.targets) == set(config.target_modules)
    # The tensors are PEFT's bit for bit (same operations in the same order, SVD included).
    expected = peft.get_peft_model_state_dict(theirs, adapter_name=name)
    state = ours.adapter_state_dict(name)
    assert sorted(state) == sorted(expected)
    for key, value in expected.items():
        assert torch.equal(state[key], value), key
    theirs.set_adapter(name)
    ours.set_adapter(name)
    with torch.no_grad():
        # PEFT keeps the SVD's factor A as a strided view (LAPACK's column-major Vh); fxpeft copies it into a
        # contiguous parameter, so the matmuls sum in another order: equal tensors, logits within ~3e-7.
        torch.testing.assert_close(call(ours, INPUTS), call(theirs, INPUTS), rtol=RTOL, atol=ATOL)
    assert name not in ours.active_adapters or ours.active_adapters == [name]


def test_add_weighted_adapter_errors(combined_pair):
    ours, _ = combined_pair
    before = snapshot(ours)
    with pytest.raises(RuleError, match="same r|one rank"):
        ours.add_weighted_adapter(["comb_a", "comb_c"], [1.0, 1.0], "bad", combination_type="linear")
    with pytest.raises(UnsupportedError, match="ties"):
        ours.add_weighted_adapter(["comb_a", "comb_b"], [1.0, 1.0], "bad", combination_type="ties")
    with pytest.raises(RuleError, match="weights"):
        ours.add_weighted_adapter(["comb_a", "comb_b"], [1.0], "bad")
    with pytest.raises(RuleError, match="exists already"):
        ours.add_weighted_adapter(["comb_a", "comb_b"], [1.0, 1.0], "comb_c", combination_type="cat")
    with pytest.raises(RuleError, match="svd_rank 70 exceeds"):
        ours.add_weighted_adapter(["comb_a", "comb_b"], [1.0, 1.0], "bad", svd_rank=70)
    assert_same(before, snapshot(ours))


# -- 4. Loads that do not fit change nothing -----------------------------------------------------------------
def test_load_adapter_into_a_wrong_base_names_every_key(llama, tmp_path):
    config = CONFIGS["llama"]()
    config.hidden_size, config.intermediate_size, config.head_dim = 32, 64, 8
    torch.manual_seed(0)
    other = peft.get_peft_model(AUTO_CLASS["llama"].from_config(config),
                                peft.LoraConfig(target_modules=["q_proj", "v_proj"], r=4))
    other.save_pretrained(tmp_path / "small")
    llama.eval()
    before = snapshot(llama)
    with pytest.raises(AdapterLoadError) as info:
        llama.load_adapter(tmp_path / "small", "small")
    assert len(info.value.mismatches) == 8  # A and B of q_proj and v_proj in 2 layers
    assert "shape mismatch at base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight" in str(info.value)
    assert_same(before, snapshot(llama))
    # The same folder onto an existing adapter's name: refused, naming the keys; the adapter keeps its tensors.
    with pytest.raises(AdapterLoadError, match="another shape") as info:
        llama.load_adapter(tmp_path / "small", "default")
    assert len(info.value.mismatches) == 8
    assert_same(before, snapshot(llama))


def test_load_adapter_for_missing_modules_changes_nothing(llama, folders, tmp_path):
    config = json.loads((folders["r_alpha"] / CONFIG_NAME).read_text())
    config["target_modules"] = ["q_projection"]
    (tmp_path / CONFIG_NAME).write_text(json.dumps(config))
    (tmp_path / WEIGHTS_NAME).write_bytes((folders["r_alpha"] / WEIGHTS_NAME).read_bytes())
    llama.eval()
    before = snapshot(llama)
    with pytest.raises(AdapterLoadError, match="q_projection"):
        llama.load_adapter(tmp_path, "missing")
    assert_same(before, snapshot(llama))
    # Other targets, other keys: an existing name refuses them too.
    config["target_modules"] = ["k_proj"]
    (tmp_path / CONFIG_NAME).write_text(json.dumps(config))
    with pytest.raises(AdapterLoadError, match="missing base_model.model.model.layers.0.self_attn.k_proj"):
        llama.load_adapter(tmp_path, "missing")
    assert_same(before, snapshot(llama))
