"""LoRA on embeddings (passes/lora/embedding.py) against PEFT 0.21.2's ``lora.Embedding`` on identical weights: graph,
logits, gradients, trainable counts, files both ways, merge, several adapters and mixed rows.

Models: llama's ``embed_tokens`` (untied), gpt2's ``wte`` (tied to ``lm_head``: LoRA applies at the lookup only, as in
PEFT, and a merge, which would change the head too, is refused) and bart's ``embed_tokens`` (the encoder's and the
decoder's lookups of the ``shared`` tensor, tied to ``lm_head``; scaled by ``embed_scale``, which PEFT multiplies
into the adapter's output; a padding token, whose row PEFT's lookup in ``A`` gives no gradient).
"""

from __future__ import annotations

import re

import peft
import pytest
import torch
from safetensors.torch import load_file, save_file

import fxpeft
from fxpeft.errors import NoMatchError, UnsupportedError
from fxpeft.formats.peft import without_base_layers
from fxpeft.graph.sites import EmbeddingSite
from fxpeft.passes.lora import LoraEmbeddingWeights
from fxpeft.verification import verify
from tests.models import AUTO_CLASS, CONFIGS, hf_inputs
from tests.passes.harness import call, check_pass, per_site
from tests.passes.peft_reference import fxpeft_grads, randomize_peft

EMBEDDING_ROLES = {"rows": 6, "embedding_A": 2, "embedding_B": 2, "row_scale": 1, "scale": 8, "join": 1}
PAD = 1  # bart's pad_token_id
DEPTH_FIELDS = ("num_hidden_layers", "n_layer", "encoder_layers", "decoder_layers")


def one_layer(family: str) -> torch.nn.Module:
    """``tests.models``' tiny ``family`` with one layer per stack and every dropout 0 (as ``build_without_dropout``)."""
    config = CONFIGS[family]()
    for name, value in list(vars(config).items()):
        if name in DEPTH_FIELDS and isinstance(value, int):
            setattr(config, name, 1)
        elif "drop" in name and isinstance(value, float):
            setattr(config, name, 0.0)
    torch.manual_seed(0)
    return AUTO_CLASS[family].from_config(config).eval()


def bart_scaled() -> torch.nn.Module:
    """Tiny bart whose token embeddings scale their output by 8 (``scale_embedding``), as Gemma's do."""
    model = one_layer("bart")
    for module in (model.model.shared, model.model.encoder.embed_tokens, model.model.decoder.embed_tokens):
        module.embed_scale = 8.0
    return model


def bart_inputs(batch: int = 2) -> dict:
    inputs = hf_inputs("bart", batch)
    inputs["input_ids"][:, -1] = PAD
    inputs["decoder_input_ids"][:, -1] = PAD
    return inputs


BUILD = {"llama": lambda: one_layer("llama"), "gpt2": lambda: one_layer("gpt2"), "bart": bart_scaled}
INPUTS = {"llama": hf_inputs("llama"), "gpt2": hf_inputs("gpt2"), "bart": bart_inputs()}
TARGETS = {"llama": ["embed_tokens", "q_proj"], "gpt2": ["wte"], "bart": ["embed_tokens"]}


def peft_grads(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Gradients of PEFT's trainable tensors under PEFT's saved keys (``lora_embedding_A.default`` -> ``..._A``)."""
    return {re.sub(r"\.default(?=\.|$)", "", name): p.grad for name, p in model.named_parameters() if p.requires_grad}


def peft_model(family: str, targets, **options) -> torch.nn.Module:
    config = dict(target_modules=list(targets), r=2, lora_alpha=4, lora_dropout=0.0)
    config.update(options)
    return peft.get_peft_model(BUILD[family](), peft.LoraConfig(**config)).eval()


def twins(family: str, targets=None, **options) -> tuple[torch.nn.Module, fxpeft.AdaptedModel]:
    """PEFT's model with random LoRA tensors, and fxpeft's adapted model holding them."""
    targets = targets or TARGETS[family]
    theirs = peft_model(family, targets, **options)
    state = randomize_peft(theirs, scale=0.3)
    rule = fxpeft.LoRA(targets=targets, r=options.get("r", 2), alpha=options.get("lora_alpha", 4),
                       dropout=options.get("lora_dropout", 0.0))
    ours = fxpeft.transform(BUILD[family](), [rule], example_kwargs=INPUTS[family])
    adapter = ours.adapters["default"]
    # PEFT also saves the base embedding weight of a target named embed_tokens (save_embedding_layers): equal to the
    # base model's, it is checked and left out, as fxpeft.load_adapter does
    adapter.load_peft_state_dict(without_base_layers(state, adapter.peft_keys(), ours.base_model, "PEFT's state"))
    return theirs, ours.eval()


@pytest.fixture(scope="module")
def pairs():
    """``pairs(family)``: :func:`twins` of ``family`` with its default targets, made once per module."""
    made: dict[str, tuple] = {}

    def get(family: str) -> tuple[torch.nn.Module, fxpeft.AdaptedModel]:
        if family not in made:
            made[family] = twins(family)
        return made[family]

    return get


@pytest.fixture(scope="module")
def llama(pairs):
    return pairs("llama")


def test_llama_embedding_pass_matches_peft_and_compiles():
    """Node counts, a fresh adapter (A = 0) is the base bit for bit, disabled / mixed rows, PEFT's logits on two
    sizes, one compiled graph without recompiles."""
    def reference(adapted):
        model = peft_model("llama", ["embed_tokens"])
        peft.set_peft_model_state_dict(model, adapted.adapter_state_dict())
        return model

    check_pass(BUILD["llama"], fxpeft.LoRA(targets=["embed_tokens"], r=2, alpha=4),
               inputs=[hf_inputs("llama", 2, 9), hf_inputs("llama", 3, 12)],
               expected_nodes=per_site("lora", ["model.embed_tokens"], EMBEDDING_ROLES), reference=reference)


@pytest.mark.parametrize("family", ["llama", "gpt2", "bart"])
def test_keys_counts_logits_and_gradients_match_peft(family, pairs):
    theirs, ours = pairs(family)
    state = peft.get_peft_model_state_dict(theirs)
    extra = {key for key in state if ".base_layer." in key}  # PEFT's copy of the base embedding (not an adapter tensor)
    assert extra == ({"base_model.model.model.embed_tokens.base_layer.weight"} if family == "llama" else set())
    assert {k: tuple(v.shape) for k, v in ours.adapter_state_dict().items()} == \
        {k: tuple(v.shape) for k, v in state.items() if k not in extra}
    assert any(key.endswith(".lora_embedding_A") for key in state)
    assert ours.get_nb_trainable_parameters() == theirs.get_nb_trainable_parameters()
    inputs = INPUTS[family]
    try:
        for model in (theirs, ours):
            model.train()
            model.zero_grad(set_to_none=True)
        out_theirs, out_ours = call(theirs, inputs), call(ours, inputs)
        torch.testing.assert_close(out_ours, out_theirs, rtol=1e-5, atol=1e-5)
        out_theirs.pow(2).mean().backward()
        out_ours.pow(2).mean().backward()
    finally:
        theirs.eval()
        ours.eval()
    grads = peft_grads(theirs)
    assert sorted(fxpeft_grads(ours)) == sorted(grads)
    for key, grad in fxpeft_grads(ours).items():
        assert grads[key].abs().sum() > 0, key
        torch.testing.assert_close(grad, grads[key], rtol=1e-4, atol=1e-6, msg=lambda m, key=key: f"{key}: {m}")
    if family == "bart":  # the padding token's column of A gets no gradient (PEFT's lookup passes padding_idx)
        grad_a = fxpeft_grads(ours)["base_model.model.model.encoder.embed_tokens.lora_embedding_A"]
        assert torch.count_nonzero(grad_a[:, PAD]) == 0 and torch.count_nonzero(grad_a) > 0


def test_saved_folders_load_both_ways_and_check_knows_the_keys(llama, tmp_path):
    theirs, ours = llama
    ours.save_adapter(tmp_path / "fxpeft")
    loaded = peft.PeftModel.from_pretrained(BUILD["llama"](), tmp_path / "fxpeft").eval()
    with torch.no_grad():
        torch.testing.assert_close(call(loaded, INPUTS["llama"]), call(ours, INPUTS["llama"]), rtol=1e-6, atol=1e-6)
    theirs.save_pretrained(tmp_path / "peft")
    back = fxpeft.load_adapter(BUILD["llama"](), tmp_path / "peft", example_kwargs=INPUTS["llama"]).eval()
    for key, value in back.adapter_state_dict().items():
        assert torch.equal(peft.get_peft_model_state_dict(theirs)[key], value), key
    # fxpeft check knows the lora_embedding_A / _B keys, and PEFT's copy of the base embedding in its own folder
    # (model.embed_tokens.base_layer.weight) is the base, unchanged; a copy that differs is flagged
    for folder in ("fxpeft", "peft"):
        report = verify(BUILD["llama"](), str(tmp_path / folder), INPUTS["llama"])
        assert report.ok, (folder, report.summary())
    state = load_file(tmp_path / "peft" / "adapter_model.safetensors")
    state["base_model.model.model.embed_tokens.base_layer.weight"][3, 0] += 1
    save_file(state, tmp_path / "peft" / "adapter_model.safetensors")
    report = verify(BUILD["llama"](), str(tmp_path / "peft"), INPUTS["llama"])
    assert not report.ok and "full copy of the base tensor model.embed_tokens.weight" in report.summary()


def test_merge_unmerge_and_unload_match_peft(llama):
    """The merged embedding weight is PEFT's merged weight; the merged model gives the adapted logits; unmerge restores
    the base weight; merge_and_unload returns the merged base model."""
    theirs, ours = llama
    inputs = INPUTS["llama"]
    base = BUILD["llama"]().model.embed_tokens.weight
    with torch.no_grad():
        adapted = call(ours, inputs)
        try:
            ours.merge()
            theirs.merge_adapter()
            torch.testing.assert_close(ours.base_model.model.embed_tokens.weight,
                                       theirs.base_model.model.model.embed_tokens.base_layer.weight, rtol=0, atol=0)
            assert not torch.allclose(ours.base_model.model.embed_tokens.weight, base)
            torch.testing.assert_close(call(ours, inputs), adapted, rtol=1e-5, atol=1e-5)
        finally:
            ours.unmerge()
            theirs.unmerge_adapter()
        torch.testing.assert_close(ours.base_model.model.embed_tokens.weight, base, rtol=0, atol=1e-6)
        torch.testing.assert_close(call(ours, inputs), adapted, rtol=1e-5, atol=1e-5)


def test_merge_of_a_tied_embedding_is_refused(pairs):
    """gpt2's wte is lm_head's weight: merging LoRA into it would change the head, which the adapter leaves alone."""
    _, ours = pairs("gpt2")
    before = ours.base_model.transformer.wte.weight.clone()
    with pytest.raises(UnsupportedError, match="lm_head"):
        ours.merge()
    assert torch.equal(ours.base_model.transformer.wte.weight, before)
    # wpe looks up [1, seq] positions shared by every row: the per-row gate cannot apply, refused at transform
    with pytest.raises(UnsupportedError, match="not one row per batch row"):
        ours.add_adapter("positions", [fxpeft.LoRA(targets=["wpe"], r=2)])
    assert set(ours.adapters) == {"default"}


def test_initial_values_and_no_dropout_as_peft(llama):
    """A = 0 and B normal (a fresh adapter is the base model); init='random': both random (PEFT's torch.randn). PEFT
    applies no dropout on an embedding's branch: with dropout=0.5, train mode gives the eval output."""
    site = EmbeddingSite("embed", "embed.weight", num_embeddings=10, embedding_dim=6)
    fresh = LoraEmbeddingWeights(site, fxpeft.LoRA(targets=["embed"], r=3), torch.device("cpu"), torch.float32)
    assert torch.count_nonzero(fresh.lora_A) == 0 and torch.count_nonzero(fresh.lora_B) == 18
    assert fresh.lora_A.shape == (3, 10) and fresh.lora_B.shape == (6, 3)
    torch.manual_seed(7)
    random = LoraEmbeddingWeights(site, fxpeft.LoRA(targets=["embed"], r=3, init="random"), torch.device("cpu"),
                                  torch.float32)
    torch.manual_seed(7)
    assert torch.equal(random.lora_A, torch.randn(3, 10)) and torch.equal(random.lora_B, torch.randn(6, 3))
    _, ours = llama
    ours.add_adapter("dropped", [fxpeft.LoRA(targets=["embed_tokens"], r=2, dropout=0.5)])
    try:
        ours.set_adapter("dropped")
        with torch.no_grad():
            for parameter in ours.adapters["dropped"].parameters():
                parameter.normal_()
            evaluated = call(ours, INPUTS["llama"])
            ours.train()
            assert torch.equal(call(ours, INPUTS["llama"]), evaluated)
    finally:
        ours.eval()
        ours.set_adapter("default")
        ours.delete_adapter("dropped")


def test_two_adapters_switch_and_mix_per_row(llama):
    _, ours = llama
    ours.add_adapter("other", [fxpeft.LoRA(targets=["embed_tokens"], r=4, alpha=2)])
    try:
        generator = torch.Generator().manual_seed(2)
        with torch.no_grad():
            for parameter in ours.adapters["other"].parameters():
                parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.3)
            inputs = hf_inputs("llama", 3)
            single = {}
            for name in ("default", "other"):
                ours.set_adapter(name)
                single[name] = call(ours, inputs)
            rows = ["other", "__base__", "default"]
            mixed = call(ours, inputs, adapter_names=rows)
            with ours.disable_adapters():
                base = call(ours, inputs)
        for index, name in enumerate(rows):
            want = base[index] if name == "__base__" else single[name][index]
            torch.testing.assert_close(mixed[index], want, rtol=1e-5, atol=1e-5)
        with pytest.raises(UnsupportedError, match="convolutions, embeddings"):
            ours.add_weighted_adapter(["default", "other"], [1.0, 1.0], "combined", combination_type="cat")
    finally:
        ours.set_adapter("default")
        ours.delete_adapter("other")


def test_a_shared_module_the_forward_never_calls_is_no_site(pairs):
    """bart's (and t5's) ``shared`` is tied to the embeddings the forward calls, but never called itself: PEFT wraps it
    and its LoRA changes nothing; fxpeft selects from the graph, where the lookups are ``embed_tokens``."""
    _, ours = pairs("bart")
    with pytest.raises(NoMatchError, match=r"targets \['shared'\] selected no"):
        ours.add_adapter("shared", [fxpeft.LoRA(targets=["shared"], r=2)])
    assert set(ours.adapters) == {"default"}


def test_bfloat16_base_matches_peft_and_merges_as_peft():
    """Over a bfloat16 base the adapter stays float32; outputs and the merged weight (the delta cast to bfloat16
    first, PEFT's ``Embedding.merge``) are PEFT's."""
    dtype = torch.bfloat16
    theirs = peft.get_peft_model(one_layer("llama").to(dtype), peft.LoraConfig(target_modules=["embed_tokens"], r=2,
                                                                               lora_alpha=4)).eval()
    state = randomize_peft(theirs, scale=0.3)
    ours = fxpeft.transform(one_layer("llama").to(dtype), [fxpeft.LoRA(targets=["embed_tokens"], r=2, alpha=4)],
                            example_kwargs=INPUTS["llama"]).eval()
    adapter = ours.adapters["default"]
    adapter.load_peft_state_dict(without_base_layers(state, adapter.peft_keys(), ours.base_model, "PEFT's state"))
    with torch.no_grad():
        torch.testing.assert_close(call(ours, INPUTS["llama"]), call(theirs, INPUTS["llama"]), rtol=0, atol=0)
        ours.merge()
        theirs.merge_adapter()
    assert torch.equal(ours.base_model.model.embed_tokens.weight,
                       theirs.base_model.model.model.embed_tokens.base_layer.weight)


def test_ensure_weight_tying_at_a_tied_embedding_is_refused_not_split_in_two():
    """PEFT's ensure_weight_tying=True ties the head's LoRA to the tied embedding's; fxpeft refuses it at a tied
    site (before touching the model) instead of giving the two modules independent LoRAs, and takes it elsewhere."""
    model = AUTO_CLASS["gpt2"].from_config(CONFIGS["gpt2"]())
    with pytest.raises(UnsupportedError, match="ensure_weight_tying=True at transformer.wte.*lm_head.weight"):
        fxpeft.transform(model, peft.LoraConfig(target_modules=["wte"], r=2, ensure_weight_tying=True))
    assert all(parameter.requires_grad for parameter in model.parameters())
    config = peft.LoraConfig(target_modules=["c_attn"], r=2, ensure_weight_tying=True)
    adapted = fxpeft.transform(model, config)
    theirs = peft.get_peft_model(AUTO_CLASS["gpt2"].from_config(CONFIGS["gpt2"]()), config)
    assert adapted.get_nb_trainable_parameters() == theirs.get_nb_trainable_parameters()

