"""diffusers: LoRA on a tiny UNet2DConditionModel and its CLIP text encoder, against diffusers' own PEFT path on
identical weights, compiled whole-graph, and diffusers' and Kohya's LoRA files both ways through diffusers itself
(``pipeline.load_lora_weights``, ``save_lora_weights``)."""

from __future__ import annotations

import copy
import json

import diffusers  # the test extra: a missing one fails, never skips
import peft
import pytest
import torch
from peft.utils import get_peft_model_state_dict
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch._dynamo.utils import counters

import fxpeft
from fxpeft.errors import AdapterLoadError, UnsupportedError
from fxpeft.formats.diffusers import WEIGHTS_NAME, read_diffusers_lora, save_diffusers_lora

ATTENTION = ["to_q", "to_k", "to_v", "to_out.0"]
CONVS = ["conv1", "proj_in"]  # 3x3 resnet convs and the 1x1 transformer input projections
TARGETS = ATTENTION + CONVS
RANKS = {"to_out.0": 2}  # a second rank and alpha, so the files carry per-module values
ALPHAS = {"to_k": 3.0}
VOCAB = 64


def _unet():
    torch.manual_seed(0)
    return diffusers.UNet2DConditionModel(
        sample_size=16, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(32, 64),
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=32, attention_head_dim=8, norm_num_groups=32).eval()


def _text_encoder():
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(1)
    return CLIPTextModel(CLIPTextConfig(hidden_size=32, intermediate_size=37, num_attention_heads=4,
                                        num_hidden_layers=2, vocab_size=VOCAB, projection_dim=32, bos_token_id=0,
                                        eos_token_id=1, pad_token_id=1, max_position_embeddings=77)).eval()


def _unet_inputs(batch: int, seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    return {"sample": torch.randn(batch, 4, 16, 16, generator=g), "timestep": torch.randint(0, 1000, (batch,),
            generator=g), "encoder_hidden_states": torch.randn(batch, 7, 32, generator=g)}


def _ids(batch: int = 2) -> torch.Tensor:
    return torch.randint(2, VOCAB, (batch, 9), generator=torch.Generator().manual_seed(5))


def _randomize(adapted) -> None:
    """Non-zero B (and a fresh A), so every LoRA shows in the outputs."""
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for site in adapted.adapters[adapted.active_adapter].site_modules():
            for p in (site.lora_A, site.lora_B):
                p.copy_(torch.randn(p.shape, generator=g) * 0.2)


def _config(targets) -> peft.LoraConfig:
    return peft.LoraConfig(r=4, lora_alpha=8, target_modules=targets, rank_pattern=RANKS, alpha_pattern=ALPHAS)


@pytest.fixture(scope="module")
def models():
    """The base UNet and text encoder, each adapted by fxpeft and by diffusers' PEFT path on identical weights."""
    unet, text_encoder = _unet(), _text_encoder()
    rule = fxpeft.LoRA(targets=TARGETS, r=4, alpha=8, rank_pattern=RANKS, alpha_pattern=ALPHAS)
    ours = fxpeft.transform(copy.deepcopy(unet), [rule], example_kwargs=_unet_inputs(2))
    _randomize(ours)
    theirs = copy.deepcopy(unet)
    theirs.add_adapter(_config(TARGETS))  # diffusers' own PEFT integration
    _copy_into(theirs, ours)
    te_targets = ["q_proj", "k_proj", "v_proj", "out_proj", "fc1"]
    te_rule = fxpeft.LoRA(targets=te_targets, r=4, alpha=8, rank_pattern={"fc1": 2})
    te_ours = fxpeft.transform(copy.deepcopy(text_encoder), [te_rule])
    _randomize(te_ours)
    te_theirs = copy.deepcopy(text_encoder)
    # transformers' add_adapter wants peft >= 0.22 (the project pins 0.21); it is this call and a name check
    peft.inject_adapter_in_model(peft.LoraConfig(r=4, lora_alpha=8, target_modules=te_targets,
                                                 rank_pattern={"fc1": 2}), te_theirs)
    _copy_into(te_theirs, te_ours)
    return {"unet": unet, "text_encoder": text_encoder, "ours": ours, "theirs": theirs, "te_ours": te_ours,
            "te_theirs": te_theirs}


def _copy_into(model, adapted) -> None:
    """fxpeft's LoRA tensors into the PEFT layers of ``model`` (every one of them, and nothing else)."""
    state = {f"{k.removesuffix('.weight')}.default.weight": v for k, v in _peft_keys(adapted).items()}
    result = model.load_state_dict(state, strict=False)
    assert not result.unexpected_keys
    assert not [key for key in result.missing_keys if ".lora_" in key]


def _peft_keys(adapted) -> dict[str, torch.Tensor]:
    """fxpeft's adapter under the keys ``get_peft_model_state_dict`` gives (no ``base_model.model.``)."""
    return {k.removeprefix("base_model.model."): v.clone() for k, v in adapted.adapter_state_dict().items()}


def _grads_ours(adapted) -> dict[str, torch.Tensor]:
    return {f"{site.path}.{name}": getattr(site, name).grad.clone()
            for site in adapted.adapters["default"].site_modules() for name in ("lora_A", "lora_B")}


def _grads_theirs(model) -> dict[str, torch.Tensor]:
    return {f"{name}.{part}": getattr(module, part)["default"].weight.grad.clone()
            for name, module in model.named_modules() if hasattr(module, "lora_A") and "default" in module.lora_A
            for part in ("lora_A", "lora_B")}


def test_unet_lora_equals_diffusers_peft_path_outputs_and_gradients(models):
    ours, theirs = models["ours"], models["theirs"]
    assert len(list(ours.adapters["default"].site_modules())) == len(get_peft_model_state_dict(theirs)) // 2 == 44
    inputs = _unet_inputs(3, seed=1)
    ours.train(), theirs.train()
    try:
        ours.zero_grad(), theirs.zero_grad()
        out, ref = ours(**inputs).sample, theirs(**inputs).sample
        torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
        assert not torch.allclose(ref, models["unet"](**inputs).sample, atol=1e-3)  # the LoRA shows
        (out.square().mean()).backward()
        (ref.square().mean()).backward()
    finally:
        ours.eval(), theirs.eval()
    mine, reference = _grads_ours(ours), _grads_theirs(theirs)
    assert mine.keys() == reference.keys() and len(mine) == 88
    for key, grad in reference.items():
        torch.testing.assert_close(mine[key], grad, rtol=1e-4, atol=1e-6, msg=key)
    assert all(p.grad is None for p in models["unet"].parameters())


def test_text_encoder_lora_equals_peft_outputs_and_gradients(models):
    ours, theirs = models["te_ours"], models["te_theirs"]
    ids = _ids()
    ours.zero_grad(), theirs.zero_grad()
    out = ours(input_ids=ids).last_hidden_state
    ref = theirs(input_ids=ids).last_hidden_state
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    out.sum().backward()
    ref.sum().backward()
    mine, reference = _grads_ours(ours), _grads_theirs(theirs)
    assert mine.keys() == reference.keys() and len(mine) == 20
    for key, grad in reference.items():
        torch.testing.assert_close(mine[key], grad, rtol=1e-4, atol=1e-6, msg=key)


def test_unet_compiles_whole_graph_with_a_dynamic_batch_and_no_recompiles(models):
    ours = models["ours"]
    torch._dynamo.reset()
    counters.clear()
    fast = torch.compile(ours, backend="aot_eager", fullgraph=True, dynamic=True)
    with torch.no_grad(), torch._dynamo.config.patch(error_on_recompile=False):
        for batch in (2, 3):
            inputs = _unet_inputs(batch, seed=batch)
            torch.testing.assert_close(fast(**inputs).sample, ours(**inputs).sample, rtol=1e-5, atol=1e-5)
            torch._dynamo.config.error_on_recompile = True  # batch 3 must reuse batch 2's graph
    assert counters["stats"]["unique_graphs"] == 1
    assert sum(counters["graph_break"].values()) == 0


# -- files ----------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def pipeline(models, tmp_path_factory):
    """A tiny StableDiffusionPipeline with fresh copies of the base UNet and text encoder."""
    from transformers import CLIPTokenizer

    folder = tmp_path_factory.mktemp("tokenizer")
    letters = "abcdefghijklmnopqrstuvwxyz"
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1, **{c: 2 + i for i, c in enumerate(letters)},
             **{c + "</w>": 28 + i for i, c in enumerate(letters)}}
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("#version: 0.2\n")
    tokenizer = CLIPTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt"), model_max_length=77)
    torch.manual_seed(2)
    vae = diffusers.AutoencoderKL(block_out_channels=(32,), down_block_types=("DownEncoderBlock2D",),
                                  up_block_types=("UpDecoderBlock2D",), latent_channels=4, norm_num_groups=32)

    def make():
        return diffusers.StableDiffusionPipeline(
            vae=vae, text_encoder=copy.deepcopy(models["text_encoder"]), tokenizer=tokenizer,
            unet=copy.deepcopy(models["unet"]), scheduler=diffusers.DDIMScheduler(steps_offset=1, clip_sample=False),
            safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    return make


def _same_as_pipeline(pipe, unet, text_encoder) -> None:
    """The pipeline's (LoRA-loaded) UNet and text encoder give the outputs of ``unet`` and ``text_encoder``."""
    inputs, ids = _unet_inputs(2, seed=7), _ids()
    with torch.no_grad():
        torch.testing.assert_close(unet(**inputs).sample, pipe.unet(**inputs).sample, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(text_encoder(input_ids=ids).last_hidden_state,
                                   pipe.text_encoder(input_ids=ids).last_hidden_state, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("format", ["diffusers", "kohya"])
def test_saved_file_loads_into_a_diffusers_pipeline_with_equal_outputs(models, pipeline, tmp_path, format):
    ours, te_ours = models["ours"], models["te_ours"]
    # diffusers 0.42 reads a Kohya file's per-module alphas wrongly on attention layers (it keys them by
    # "...processor.to_k_lora.down.weight", which matches no module, so they fall back to the most common alpha):
    # for its Kohya reader, this file gives every module one alpha.
    if format == "kohya":  # shown, as the README says it: to_k's alpha 3 (scaling 3/4) comes back as the common 8
        save_diffusers_lora(tmp_path / "odd", {"unet": ours}, format=format)
        pipe = pipeline()
        pipe.load_lora_weights(str(tmp_path / "odd"))
        to_k = next(module for name, module in pipe.unet.named_modules() if name.endswith("attn1.to_k"))
        assert list(to_k.scaling.values()) == [8 / 4]
    odd = [site for site in ours.adapters["default"].site_modules() if site.alpha != 8] if format == "kohya" else []
    for site in odd:
        site.set_alpha(8.0)
    try:
        path = save_diffusers_lora(tmp_path, {"unet": ours, "text_encoder": te_ours}, format=format)
        assert path.name == WEIGHTS_NAME
        keys = load_file(path)
        if format == "kohya":
            assert "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q.lora_down.weight" in keys
            assert "lora_te_text_model_encoder_layers_0_self_attn_q_proj.alpha" in keys
        else:
            assert "unet.down_blocks.0.resnets.0.conv1.lora_A.weight" in keys
            assert keys["unet.down_blocks.0.resnets.0.conv1.lora_B.weight"].shape == (32, 4, 1, 1)
            assert "text_encoder.encoder.layers.0.self_attn.q_proj.lora_A.weight" in keys
        pipe = pipeline()
        pipe.load_lora_weights(str(tmp_path))
        _same_as_pipeline(pipe, ours, te_ours)
    finally:
        for site in odd:
            site.set_alpha(3.0)


def test_save_adapter_writes_one_component(models, tmp_path):
    """``save_adapter(format=...)`` writes the UNet's part of the file the test above loads into diffusers."""
    ours = models["ours"]
    for format in ("diffusers", "kohya"):
        ours.save_adapter(tmp_path / format, format=format)
        save_diffusers_lora(tmp_path / f"both-{format}", {"unet": ours, "text_encoder": models["te_ours"]},
                            format=format)
        alone, both = (safe_open(str(folder / WEIGHTS_NAME), "pt") for folder in
                       (tmp_path / format, tmp_path / f"both-{format}"))
        assert set(alone.keys()) == {key for key in both.keys() if key.startswith(("unet.", "lora_unet_"))}
        assert all(torch.equal(alone.get_tensor(key), both.get_tensor(key)) for key in alone.keys())
        if format == "diffusers":
            header = json.loads(both.metadata()["lora_adapter_metadata"])
            assert json.loads(alone.metadata()["lora_adapter_metadata"]) == {
                key: value for key, value in header.items() if key.startswith("unet.")}
            assert header["unet.r"] == 4 and header["unet.lora_alpha"] == 8 and header["text_encoder.r"] == 4


def test_files_written_by_diffusers_load_into_fxpeft_with_equal_outputs(models, tmp_path):
    """diffusers' ``save_lora_weights`` (PEFT's tensors and LoraConfig metadata) and a Kohya file of the same tensors
    load with ``fxpeft.load_adapter``, each equal to the PEFT-adapted models that wrote them."""
    theirs, te_theirs = models["theirs"], models["te_theirs"]
    diffusers.StableDiffusionPipeline.save_lora_weights(
        tmp_path / "diffusers", unet_lora_layers=get_peft_model_state_dict(theirs),
        text_encoder_lora_layers=get_peft_model_state_dict(te_theirs),
        unet_lora_adapter_metadata=theirs.peft_config["default"].to_dict(),
        text_encoder_lora_adapter_metadata=te_theirs.peft_config["default"].to_dict())
    kohya = {}  # the same tensors as sd-scripts names them, alphas included (as half, as sd-scripts saves them)
    for key, value in load_file(tmp_path / "diffusers" / WEIGHTS_NAME).items():
        component, _, rest = key.partition(".")
        module, _, part = rest.rpartition(".lora_")
        name = ("lora_unet_" if component == "unet" else "lora_te_text_model_") + module.replace(".", "_")
        kohya[f"{name}.{'lora_down' if part == 'A.weight' else 'lora_up'}.weight"] = value
        if part == "A.weight":
            layer = (theirs if component == "unet" else te_theirs).get_submodule(module)
            kohya[f"{name}.alpha"] = torch.tensor(layer.scaling["default"] * layer.r["default"], dtype=torch.half)
    save_file(kohya, tmp_path / "kohya.safetensors")
    inputs, ids = _unet_inputs(2, seed=9), _ids()
    with torch.no_grad():
        reference, te_reference = theirs(**inputs).sample, te_theirs(input_ids=ids).last_hidden_state
    unet = fxpeft.load_adapter(models["unet"], tmp_path / "diffusers", example_kwargs=_unet_inputs(2))
    unet.load_adapter(tmp_path / "kohya.safetensors", "kohya")  # into the adapted model, as a second adapter
    for name, path in (("default", tmp_path / "diffusers"), ("kohya", tmp_path / "kohya.safetensors")):
        unet.set_adapter(name)
        sites = list(unet.adapters[name].site_modules())
        assert len(sites) == 44 and [site.r for site in sites].count(2) == 8  # to_out.0's rank
        assert [site.alpha for site in sites].count(3.0) == 8  # to_k's alpha
        text_encoder = fxpeft.load_adapter(copy.deepcopy(models["text_encoder"]), path)
        with torch.no_grad():
            torch.testing.assert_close(unet(**inputs).sample, reference, rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(text_encoder(input_ids=ids).last_hidden_state, te_reference, rtol=1e-5,
                                       atol=1e-5)


def test_files_without_metadata_and_with_unflattened_text_encoder_names(models, tmp_path):
    """No ``lora_adapter_metadata`` means alpha = r (diffusers' reading); ``text_encoder.text_model.*`` keys (written
    for transformers 4's CLIPTextModel) name the modules of the flattened one."""
    te = {f"text_encoder.text_model.{k}": v for k, v in _peft_keys(models["te_ours"]).items()}
    save_file(te, tmp_path / "te.safetensors")
    (rule,), state = read_diffusers_lora(tmp_path / "te.safetensors", models["text_encoder"])
    assert state.keys() == models["te_ours"].adapter_state_dict().keys()
    assert rule.r == 4 and rule.alpha == 4 and rule.alpha_for("encoder.layers.0.mlp.fc1") == 2  # alpha = r
    assert rule.rank_for("encoder.layers.1.mlp.fc1") == 2 and rule.rank_for("encoder.layers.1.self_attn.q_proj") == 4


# -- untrusted files ------------------------------------------------------------------------------------------------
def test_bad_files_are_refused_naming_the_key_and_change_nothing(models, tmp_path):
    unet = models["unet"]
    good = {f"unet.{k}": v for k, v in _peft_keys(models["ours"]).items()}
    key = "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q.lora_A.weight"
    cases = {
        "shape": {**good, key: torch.zeros(4, 31)},
        "module": {**good, "unet.no_such.lora_A.weight": torch.zeros(4, 4)},
        "part": {**good, key.replace("lora_A.weight", "lora_magnitude_vector"): torch.zeros(32)},
        "half": {k: v for k, v in good.items() if k != key},
        "alpha": {"lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q.lora_down.weight": good[key],
                  "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q.lora_up.weight":
                      good[key.replace("lora_A", "lora_B")],
                  "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q.alpha": torch.tensor(
                      float("nan"))},
        "norm": {"lora_unet_down_blocks_0_attentions_0_norm.lora_down.weight": torch.zeros(4, 32),
                 "lora_unet_down_blocks_0_attentions_0_norm.lora_up.weight": torch.zeros(32, 4)},
    }
    before = {name: p.detach().clone() for name, p in unet.named_parameters()}
    grads = {name: p.requires_grad for name, p in unet.named_parameters()}
    for case, state in cases.items():
        save_file(state, tmp_path / f"{case}.safetensors")
        with pytest.raises(AdapterLoadError) as error:
            fxpeft.load_adapter(unet, tmp_path / f"{case}.safetensors")
        assert any(name in str(error.value) for name in ("to_q", "no_such", "attentions.0.norm")), case
    save_file(good, tmp_path / "header.safetensors", metadata={"lora_adapter_metadata": "{not json"})
    with pytest.raises(AdapterLoadError, match="not valid JSON"):
        read_diffusers_lora(tmp_path / "header.safetensors", unet)
    torch.save(good, tmp_path / "pickled.bin")
    with pytest.raises(AdapterLoadError, match="safetensors only"):
        read_diffusers_lora(tmp_path / "pickled.bin", unet)
    save_file({"lora_unet_input_blocks_4_1_proj_in.lora_down.weight": torch.zeros(4, 32),
               "lora_unet_input_blocks_4_1_proj_in.lora_up.weight": torch.zeros(32, 4)}, tmp_path / "sdxl.safetensors")
    with pytest.raises(AdapterLoadError, match="LDM"):
        read_diffusers_lora(tmp_path / "sdxl.safetensors", unet)
    with pytest.raises(UnsupportedError):
        models["ours"].save_adapter(tmp_path / "x", format="comfy")
    assert all(torch.equal(p, before[name]) for name, p in unet.named_parameters())
    assert {name: p.requires_grad for name, p in unet.named_parameters()} == grads
