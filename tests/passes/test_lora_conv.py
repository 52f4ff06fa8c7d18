"""LoRA on convolutions (passes/lora/conv.py) against PEFT 0.21.2's ``lora.Conv1d`` / ``lora.Conv2d`` on identical
weights: graph, logits, gradients, trainable counts, files both ways, merge, several adapters and mixed rows.

Models: a small hand-written net with every conv form PEFT allows (Conv1d with and without stride, Conv2d 3x3, a 1x1
Conv2d (PEFT's matmul merge), a grouped Conv2d and a dilated ``padding="same"`` one, then two linears), a tiny
ResNet (transformers, from a config) and a tiny Whisper, whose encoder starts with two Conv1d (PEFT cannot run LoRA
there: the test holds fxpeft's adapted logits against its merged model).
"""

from __future__ import annotations

import warnings

import peft
import pytest
import torch
import transformers as tf
from torch import nn

import fxpeft
from fxpeft.errors import NoMatchError, RuleError, UnsupportedError
from fxpeft.passes.lora import LoraConvWeights, LoraWeights
from fxpeft.verification import verify
from tests.models import AUTO_CLASS, CONFIGS, hf_inputs
from tests.passes.harness import call, check_pass, per_site
from tests.passes.peft_reference import fxpeft_grads, peft_grads, randomize_peft

CONV_ROLES = {"rows": 6, "conv_A": 1, "conv_B": 1, "row_scale": 1, "scale": 8, "join": 1}
ALL = ["conv1d", "strided", "conv2d", "pointwise", "grouped", "dilated"]
MERGEABLE = ["conv1d", "strided", "conv2d", "pointwise"]


class ConvNet(nn.Module):
    """Conv1d (padded, then strided) on a signal; Conv2d 3x3, 1x1, grouped and dilated on an image; a linear head."""

    def __init__(self):
        super().__init__()
        self.conv1d = nn.Conv1d(4, 8, 3, padding=1)
        self.strided = nn.Conv1d(8, 6, 3, stride=2)
        self.conv2d = nn.Conv2d(3, 8, 3, padding=1)
        self.pointwise = nn.Conv2d(8, 8, 1)
        self.grouped = nn.Conv2d(8, 8, 3, padding=1, groups=2)
        self.dilated = nn.Conv2d(8, 4, 3, padding="same", dilation=2)
        self.mix = nn.Linear(4, 4)
        self.head = nn.Linear(4, 5)

    def forward(self, signal, image):
        s = self.strided(torch.relu(self.conv1d(signal)))
        i = self.dilated(self.grouped(torch.relu(self.pointwise(self.conv2d(image)))))
        return torch.cat([s.flatten(1), self.head(self.mix(i.permute(0, 2, 3, 1))).flatten(1)], dim=1)


def conv_net() -> ConvNet:
    torch.manual_seed(0)
    return ConvNet().eval()


def conv_inputs(batch: int, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(batch, 4, 11, generator=g), torch.randn(batch, 3, 6, 6, generator=g)


INPUTS = [conv_inputs(2), conv_inputs(3, seed=2)]


def lora(targets, **options) -> fxpeft.LoRA:
    return fxpeft.LoRA(targets=targets, **{"r": 2, "alpha": 4, **options})


def peft_model(targets, build=conv_net, **options) -> nn.Module:
    config = dict(target_modules=targets, r=2, lora_alpha=4, lora_dropout=0.0)
    config.update(options)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # PEFT warns that a grouped conv cannot merge
        return peft.get_peft_model(build(), peft.LoraConfig(**config)).eval()


def peft_twin(adapted: fxpeft.AdaptedModel, targets, build=conv_net, **options) -> nn.Module:
    """PEFT's model on ``build()`` holding ``adapted``'s LoRA tensors."""
    model = peft_model(targets, build, **options)
    result = peft.set_peft_model_state_dict(model, adapted.adapter_state_dict())
    assert not result.unexpected_keys
    return model


def twins(targets, build=conv_net, example=INPUTS[0], **options) -> tuple[nn.Module, fxpeft.AdaptedModel]:
    """PEFT's model with random LoRA tensors, and fxpeft's adapted model holding them."""
    theirs = peft_model(targets, build, **options)
    state = randomize_peft(theirs, scale=0.3)
    rule = fxpeft.LoRA(targets=targets, r=options.get("r", 2), alpha=options.get("lora_alpha", 4),
                       rank_pattern=options.get("rank_pattern"), use_rslora=options.get("use_rslora", False))
    kwargs = {"example_kwargs": example} if isinstance(example, dict) else {"example_inputs": example}
    ours = fxpeft.transform(build(), [rule], **kwargs)
    ours.adapters["default"].load_peft_state_dict(state)
    return theirs, ours.eval()


def test_conv_pass_matches_peft_and_gates_and_compiles():
    """Node counts per conv, a fresh adapter is the base bit for bit, disabled / mixed rows, PEFT's logits on both
    batch sizes, and one compiled graph without recompiles."""
    check_pass(conv_net, lora(ALL), inputs=INPUTS, expected_nodes=per_site("lora", ALL, CONV_ROLES),
               reference=lambda adapted: peft_twin(adapted, ALL))


def test_keys_shapes_counts_logits_and_gradients_match_peft():
    theirs, ours = twins(ALL)
    state = peft.get_peft_model_state_dict(theirs)
    assert {k: tuple(v.shape) for k, v in ours.adapter_state_dict().items()} == \
        {k: tuple(v.shape) for k, v in state.items()}
    assert ours.adapter_state_dict()["base_model.model.grouped.lora_B.weight"].shape == (8, 1, 1, 1)  # r / groups
    assert ours.get_nb_trainable_parameters() == theirs.get_nb_trainable_parameters()
    for model in (theirs, ours):
        model.train()
    out_theirs, out_ours = call(theirs, INPUTS[1]), call(ours, INPUTS[1])
    torch.testing.assert_close(out_ours, out_theirs, rtol=1e-5, atol=1e-6)
    out_theirs.pow(2).mean().backward()
    out_ours.pow(2).mean().backward()
    grads = peft_grads(theirs)
    assert sorted(fxpeft_grads(ours)) == sorted(grads)
    for key, grad in fxpeft_grads(ours).items():
        assert grads[key].abs().sum() > 0, key
        torch.testing.assert_close(grad, grads[key], rtol=1e-5, atol=1e-7, msg=lambda m, key=key: f"{key}: {m}")


def test_dora_on_convs_matches_peft():
    """DoRA on Conv1d / Conv2d (3x3, 1x1, strided): PEFT's magnitude at creation (a fresh adapter is the base model bit
    for bit), keys, counts, logits, gradients, merged weights; disabled is the base; mixed rows refused as in PEFT."""
    theirs = peft_model(MERGEABLE, use_dora=True)
    ours = fxpeft.transform(conv_net(), [lora(MERGEABLE, use_dora=True)], example_inputs=INPUTS[0]).eval()
    fresh = peft.get_peft_model_state_dict(theirs)
    assert {k: tuple(v.shape) for k, v in ours.adapter_state_dict().items()} == \
        {k: tuple(v.shape) for k, v in fresh.items()}
    for key, value in ours.adapter_state_dict().items():
        if key.endswith("lora_magnitude_vector"):
            assert torch.equal(value, fresh[key]), key
    base = conv_net().requires_grad_(False)  # frozen, as transform leaves it (oneDNN rounds otherwise)
    with torch.no_grad():
        assert torch.equal(call(ours, INPUTS[0]), call(base, INPUTS[0]))
    ours.adapters["default"].load_peft_state_dict(randomize_peft(theirs, scale=0.3))
    assert ours.get_nb_trainable_parameters() == theirs.get_nb_trainable_parameters()
    for model in (theirs, ours):
        model.train()
    out_theirs, out_ours = call(theirs, INPUTS[1]), call(ours, INPUTS[1])
    torch.testing.assert_close(out_ours, out_theirs, rtol=1e-5, atol=1e-6)
    out_theirs.pow(2).mean().backward()
    out_ours.pow(2).mean().backward()
    grads = {key.replace("lora_magnitude_vector.weight", "lora_magnitude_vector"): grad
             for key, grad in peft_grads(theirs).items()}
    assert sorted(grads) == sorted(fxpeft_grads(ours))
    for key, grad in fxpeft_grads(ours).items():
        torch.testing.assert_close(grad, grads[key], rtol=1e-5, atol=1e-7, msg=lambda m, key=key: f"{key}: {m}")
    ours.eval()
    theirs.eval()
    with torch.no_grad():
        with ours.disable_adapters():
            assert torch.equal(call(ours, INPUTS[0]), call(base, INPUTS[0]))
        with pytest.raises(UnsupportedError, match="DoRA"):
            call(ours, INPUTS[0], adapter_names=["default", "__base__"])
        assert_merge_and_unmerge(ours, theirs, base)


def test_dropout_acts_on_the_conv_input_as_peft():
    """Train mode: a fresh mask per call, and with one seed PEFT's nn.Dropout masks on the conv inputs; eval mode
    drops nothing."""
    targets = ["conv1d", "conv2d"]
    theirs, ours = twins(targets, lora_dropout=0.5)
    ours = fxpeft.transform(conv_net(), [lora(targets, dropout=0.5)], example_inputs=INPUTS[0])
    ours.adapters["default"].load_peft_state_dict(peft.get_peft_model_state_dict(theirs))
    with torch.no_grad():
        ours.train()
        theirs.train()
        assert not torch.equal(call(ours, INPUTS[0]), call(ours, INPUTS[0]))
        for seed in (1, 2):
            torch.manual_seed(seed)
            want = call(theirs, INPUTS[0])
            torch.manual_seed(seed)
            torch.testing.assert_close(call(ours, INPUTS[0]), want, rtol=1e-6, atol=1e-6)
        ours.eval()
        theirs.eval()
        torch.testing.assert_close(call(ours, INPUTS[0]), call(theirs, INPUTS[0]), rtol=1e-6, atol=1e-6)


def test_saved_folders_load_both_ways(tmp_path):
    theirs, ours = twins(ALL)
    ours.save_adapter(tmp_path / "fxpeft")
    loaded = peft.PeftModel.from_pretrained(conv_net(), tmp_path / "fxpeft").eval()
    with torch.no_grad():
        torch.testing.assert_close(call(loaded, INPUTS[0]), call(ours, INPUTS[0]), rtol=1e-6, atol=1e-6)
    theirs.save_pretrained(tmp_path / "peft")
    back = fxpeft.load_adapter(conv_net(), tmp_path / "peft", example_inputs=INPUTS[0]).eval()
    for key, value in peft.get_peft_model_state_dict(theirs).items():
        assert torch.equal(back.adapter_state_dict()[key], value), key
    with torch.no_grad():
        torch.testing.assert_close(call(back, INPUTS[1]), call(theirs, INPUTS[1]), rtol=1e-5, atol=1e-6)


def test_fxpeft_check_knows_conv_keys(tmp_path):
    """Every conv form, a grouped conv's lora_B with r / groups columns included."""
    _, ours = twins(ALL)
    ours.save_adapter(tmp_path)
    # A frozen base, as transform leaves it: oneDNN's conv rounds differently for weights that require grad.
    report = verify(conv_net().requires_grad_(False), str(tmp_path), INPUTS[0])
    assert report.ok, report.summary()


def assert_merge_and_unmerge(ours, theirs, base: torch.nn.Module) -> None:
    """Merge both: the mergeable convs' weights are PEFT's merged weights and the merged model gives the adapted
    outputs; unmerge restores ``base``'s weights (PEFT stays merged)."""
    adapted = call(ours, INPUTS[0])
    ours.merge()
    theirs.merge_adapter()
    for path in MERGEABLE:
        torch.testing.assert_close(ours.base_model.get_parameter(f"{path}.weight"),
                                   theirs.base_model.model.get_submodule(path).base_layer.weight,
                                   rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(call(ours, INPUTS[0]), adapted, rtol=1e-5, atol=1e-6)
    ours.unmerge()
    for name, tensor in base.named_parameters():
        torch.testing.assert_close(ours.base_model.get_parameter(name), tensor, rtol=0, atol=1e-6)


def test_merge_unmerge_and_unload_match_peft():
    """Merged weights are PEFT's merged weights (3x3, 1x1 and Conv1d deltas); the merged model gives the adapted
    outputs; unmerge restores the base weights; merge_and_unload returns the merged base model."""
    theirs, ours = twins(MERGEABLE)
    with torch.no_grad():
        assert_merge_and_unmerge(ours, theirs, conv_net())
        unloaded = ours.merge_and_unload()
        torch.testing.assert_close(call(unloaded, INPUTS[1]), call(theirs, INPUTS[1]), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("path, reason", [("grouped", "groups=2"), ("dilated", "dilated")])
def test_merge_refused_for_grouped_and_dilated_convs(path, reason):
    _, ours = twins(["conv2d", path])
    before = {name: tensor.clone() for name, tensor in ours.base_model.named_parameters()}
    with pytest.raises(UnsupportedError, match=reason):
        ours.merge()
    for name, tensor in ours.base_model.named_parameters():
        assert torch.equal(tensor, before[name]), f"{name} was written by a refused merge"


def test_several_adapters_switch_and_mix_per_row():
    ours = fxpeft.transform(conv_net(), [lora(["conv1d", "grouped"])], example_inputs=INPUTS[0])
    ours.add_adapter("other", [lora(["conv2d", "grouped"], r=4, alpha=2)])
    generator = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for parameter in ours.adapters.parameters():
            parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.3)
    ours.eval()
    single = {}
    with torch.no_grad():
        for name in ("default", "other"):
            ours.set_adapter(name)
            single[name] = call(ours, INPUTS[1])
            torch.testing.assert_close(single[name], call(peft_twin_of(ours, name), INPUTS[1]), rtol=1e-5, atol=1e-6)
        rows = ["other", "__base__", "default"]
        mixed = call(ours, INPUTS[1], adapter_names=rows)
        with ours.disable_adapters():
            base = call(ours, INPUTS[1])
    for index, name in enumerate(rows):
        want = base[index] if name == "__base__" else single[name][index]
        torch.testing.assert_close(mixed[index], want, rtol=1e-5, atol=1e-6)


def peft_twin_of(adapted: fxpeft.AdaptedModel, adapter_name: str) -> nn.Module:
    rule = adapted.adapters[adapter_name].rules[0]
    model = peft_model(list(rule.targets), r=rule.r, lora_alpha=rule.alpha)
    peft.set_peft_model_state_dict(model, adapted.adapter_state_dict(adapter_name))
    return model


def test_selection_by_type_regex_and_all_linear():
    def selected(targets):
        adapted = fxpeft.transform(conv_net(), [fxpeft.LoRA(targets=targets, r=2)], example_inputs=INPUTS[0])
        return {site.path: type(site) for site in adapted.site_modules()}

    assert set(selected([nn.Conv1d])) == {"conv1d", "strided"}
    assert set(selected([nn.Conv2d, nn.Linear])) == {"conv2d", "pointwise", "grouped", "dilated", "mix", "head"}
    assert set(selected(r"(conv.*|head)")) == {"conv1d", "conv2d", "head"}
    assert selected("all-linear") == {"mix": LoraWeights}  # PEFT's rule: linears only, without the output head
    assert set(selected(["*d"])) == {"conv1d", "strided", "conv2d", "grouped", "dilated", "head"}
    assert all(kind is LoraConvWeights for kind in selected(["conv*"]).values())


@pytest.mark.parametrize("bias", ["lora_only", "all"])
def test_trained_biases_of_convs_match_peft(bias):
    """``bias="lora_only"`` trains an adapted conv's bias (PEFT's key ``<conv>.base_layer.bias``); ``"all"`` every bias:
    the same keys and trainable counts as PEFT."""
    theirs = peft_model(["conv2d", "mix"], bias=bias)
    ours = fxpeft.transform(conv_net(), [lora(["conv2d", "mix"], bias=bias)], example_inputs=INPUTS[0])
    assert sorted(ours.adapter_state_dict()) == sorted(peft.get_peft_model_state_dict(theirs))
    assert ours.get_nb_trainable_parameters() == theirs.get_nb_trainable_parameters()


class Padded(nn.Module):
    def __init__(self, **options):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, **options)

    def forward(self, image):
        return self.conv(image)


@pytest.mark.parametrize("rule, options, error, match", [
    (lora(["grouped"], r=3), None, RuleError, "not divisible by the conv's groups=2"),
    (lora(["grouped"], use_dora=True), None, UnsupportedError, "DoRA .* groups=1"),
    (lora(["conv2d"], use_dora=True, dropout=0.1), None, UnsupportedError, "dropout=0.1"),
    (lora(["conv2d"], init="orthogonal"), None, UnsupportedError, "orthogonal"),
    (lora(["conv"]), dict(padding=2, dilation=2), UnsupportedError, "dilation"),
    (lora(["conv"]), dict(padding=1, padding_mode="reflect"), UnsupportedError, "padding_mode='reflect'"),
    (lora(["conv3"]), None, NoMatchError, "conv2d"),
], ids=["rank-vs-groups", "dora-groups", "dora-dropout", "orthogonal", "dilation", "padding-mode", "no-match"])
def test_invalid_conv_sites_are_refused_at_transform(rule, options, error, match):
    if options is None:
        build, example = conv_net, INPUTS[0]
    else:
        build, example = (lambda: Padded(**options)), (torch.randn(2, 3, 8, 8),)
    with pytest.raises(error, match=match):
        fxpeft.transform(build(), [rule], example_inputs=example)


def test_add_weighted_adapter_refuses_conv_sites():
    ours = fxpeft.transform(conv_net(), [lora(["conv2d"])], example_inputs=INPUTS[0])
    with pytest.raises(UnsupportedError, match="convolutions, embeddings"):
        ours.add_weighted_adapter(["default"], [1.0], "combined", combination_type="cat")
    assert set(ours.adapters) == {"default"}


def tiny_resnet() -> nn.Module:
    torch.manual_seed(0)
    config = tf.ResNetConfig(num_channels=3, embedding_size=8, hidden_sizes=[8, 16], depths=[1, 1],
                             layer_type="basic", num_labels=5)
    return tf.ResNetForImageClassification(config).eval()


PIXELS = {"pixel_values": torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(4))}


def test_resnet_convs_match_peft():
    """A tiny ResNet's Conv2d (7x7 stride 2, 3x3, a strided 1x1 shortcut) with rsLoRA and a per-site rank: keys,
    counts, logits and gradients as PEFT's."""
    theirs, ours = twins(["convolution"], build=tiny_resnet, example=PIXELS, rank_pattern={"shortcut.convolution": 4},
                         use_rslora=True)
    assert {site.path for site in ours.site_modules()} == \
        {name for name, module in tiny_resnet().named_modules() if isinstance(module, nn.Conv2d)}
    shortcut = "base_model.model.resnet.encoder.stages.1.layers.0.shortcut.convolution"
    assert ours.adapter_state_dict()[f"{shortcut}.lora_A.weight"].shape == (4, 8, 1, 1)
    assert ours.get_nb_trainable_parameters() == theirs.get_nb_trainable_parameters()
    for model in (theirs, ours):
        model.train()
    out_theirs, out_ours = call(theirs, PIXELS), call(ours, PIXELS)
    torch.testing.assert_close(out_ours, out_theirs, rtol=1e-5, atol=1e-5)
    out_theirs.pow(2).mean().backward()
    out_ours.pow(2).mean().backward()
    grads = peft_grads(theirs)
    assert sorted(grads) == sorted(fxpeft_grads(ours))
    for key, grad in fxpeft_grads(ours).items():
        torch.testing.assert_close(grad, grads[key], rtol=1e-4, atol=1e-6, msg=lambda m, key=key: f"{key}: {m}")


def one_layer_whisper() -> nn.Module:
    config = CONFIGS["whisper"]()
    config.encoder_layers = config.decoder_layers = 1
    torch.manual_seed(0)
    return AUTO_CLASS["whisper"].from_config(config).eval()


def test_whisper_encoder_convs_adapt_and_merge():
    """Whisper's encoder Conv1d (``conv2`` strided) take LoRA from the graph; the merged model (PEFT's conv delta,
    held against PEFT above) gives the adapted logits. PEFT itself cannot run these: Whisper's forward reads
    ``conv1.stride``, which PEFT's wrapper does not have."""
    inputs = hf_inputs("whisper")
    adapted = fxpeft.transform(one_layer_whisper(), [lora(["conv1", "conv2"])], example_kwargs=inputs)
    assert {site.path for site in adapted.site_modules()} == {"model.encoder.conv1", "model.encoder.conv2"}
    generator = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for parameter in adapted.adapters.parameters():
            parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.1)
        adapted.eval()
        base = call(one_layer_whisper(), inputs)
        logits = call(adapted, inputs)
        assert not torch.allclose(logits, base, atol=1e-3)
        torch.testing.assert_close(call(adapted.merge_and_unload(), inputs), logits, rtol=1e-4, atol=1e-5)
    theirs = peft.get_peft_model(one_layer_whisper(), peft.LoraConfig(target_modules=["conv1", "conv2"], r=2))
    with pytest.raises(AttributeError, match="stride"):  # the README's claim: PEFT cannot run these
        theirs(**inputs)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_base_matches_peft(dtype):
    """Over a half-precision base the adapter stays float32 (PEFT's autocast_adapter_dtype); outputs are PEFT's."""
    theirs = peft_model(MERGEABLE, lambda: conv_net().to(dtype))
    state = randomize_peft(theirs, scale=0.3)
    inputs = tuple(tensor.to(dtype) for tensor in INPUTS[0])
    ours = fxpeft.transform(conv_net().to(dtype), [lora(MERGEABLE)], example_inputs=inputs).eval()
    ours.adapters["default"].load_peft_state_dict(state)
    assert {parameter.dtype for parameter in ours.adapters.parameters()} == {torch.float32}
    with torch.no_grad():
        got, want = call(ours, inputs), call(theirs, inputs)
    assert got.dtype == want.dtype == dtype
    torch.testing.assert_close(got, want, rtol=0, atol=0)
