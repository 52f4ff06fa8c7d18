"""Methods composed in one adapter, trained together: LoRA + IA3, DoRA + prompt tuning, bottleneck + LoRA.

The reference is the eager base model with PEFT's own layers injected for each PEFT method
(``peft.inject_adapter_in_model``, once per method, on disjoint modules: PEFT has no single model that holds two
methods), prompt tuning written out as PEFT's ``PeftModelForCausalLM`` does it (the prompt embeddings in front of the
token embeddings, the mask and labels lengthened), and the bottleneck adapters as forward hooks with the papers'
formula (PEFT has none). On identical tensors, the loss, the logits and every adapter tensor's gradient equal the
reference's, and after one optimizer step over all of them together the next logits still do.
"""

from __future__ import annotations

import peft
import pytest
import torch
import torch.nn.functional as F

import fxpeft
from tests.models import hf_inputs
from tests.passes.harness import add_noise
from tests.passes.peft_reference import build_without_dropout

LORA = fxpeft.LoRA(targets=["q_proj", "v_proj"], r=2, alpha=4)
CASES = {
    "lora+ia3": [LORA, fxpeft.IA3(targets=["k_proj", "down_proj"], feedforward=["down_proj"])],
    "dora+prompt": [fxpeft.LoRA(targets=["q_proj", "v_proj"], r=2, alpha=4, use_dora=True), fxpeft.PromptTuning(3)],
    "bottleneck+lora": [LORA, fxpeft.Bottleneck(reduction_factor=8, non_linearity="relu")],
}


def peft_config(rule):
    """PEFT's config for one of the PEFT methods above (no dropout, as the models have none)."""
    if isinstance(rule, fxpeft.LoRA):
        return peft.LoraConfig(target_modules=list(rule.targets), r=rule.r, lora_alpha=rule.alpha,
                               lora_dropout=0.0, use_dora=rule.use_dora)
    if isinstance(rule, fxpeft.IA3):
        return peft.IA3Config(target_modules=list(rule.targets), feedforward_modules=list(rule.feedforward))
    return None


class Reference:
    """The base model with PEFT's layers injected and the other methods written out, on ``adapted``'s tensors."""

    def __init__(self, adapted: fxpeft.AdaptedModel, rules: list):
        self.model = build_without_dropout("llama")
        for rule in rules:
            config = peft_config(rule)
            if config is not None:
                peft.inject_adapter_in_model(config, self.model)
        state = adapted.adapters["default"].peft_state_dict()
        self.parameters = {}  # fxpeft's key -> the reference's tensor
        for name, parameter in self.model.named_parameters():
            parameter.requires_grad_(".default" in name)
            if ".default" in name:
                key = "base_model.model." + name.replace(".default", "")
                key = key.removesuffix(".weight") if "lora_magnitude_vector" in key else key
                self.parameters[key] = parameter
        self.prompt = None
        if any(isinstance(rule, fxpeft.PromptTuning) for rule in rules):
            self.prompt = self.parameters["prompt_embeddings"] = torch.nn.Parameter(torch.empty(0))
        self.bottlenecks = {}
        if any(isinstance(rule, fxpeft.Bottleneck) for rule in rules):
            for site in adapted.site_modules("default"):
                if hasattr(site, "down_weight"):
                    self.bottlenecks[site.path] = names = {}
                    for part in ("bottleneck_down.weight", "bottleneck_down.bias", "bottleneck_up.weight",
                                 "bottleneck_up.bias"):
                        key = f"base_model.model.{site.path}.{part}"
                        self.parameters[key] = names[part] = torch.nn.Parameter(torch.empty(0))
        assert set(self.parameters) == set(state), set(self.parameters) ^ set(state)
        with torch.no_grad():
            for key, tensor in self.parameters.items():
                tensor.data = state[key].detach().clone()

    def _bottleneck(self, tensors):
        def hook(module, args, h):
            down = F.linear(h, tensors["bottleneck_down.weight"], tensors["bottleneck_down.bias"])
            return h + F.linear(F.relu(down), tensors["bottleneck_up.weight"], tensors["bottleneck_up.bias"])

        return hook

    def __call__(self, input_ids, attention_mask, labels):
        handles = [self.model.get_submodule(path).register_forward_hook(self._bottleneck(tensors))
                   for path, tensors in self.bottlenecks.items()]
        try:
            if self.prompt is None:
                return self.model(input_ids=input_ids, attention_mask=attention_mask, labels=labels)
            batch, tokens = input_ids.shape[0], self.prompt.shape[0]
            embeds = self.model.get_input_embeddings()(input_ids)
            embeds = torch.cat([self.prompt.unsqueeze(0).expand(batch, -1, -1), embeds], dim=1)
            mask = torch.cat([torch.ones(batch, tokens, dtype=attention_mask.dtype), attention_mask], dim=1)
            labels = torch.cat([torch.full((batch, tokens), -100, dtype=labels.dtype), labels], dim=1)
            return self.model(inputs_embeds=embeds, attention_mask=mask, labels=labels)
        finally:
            for handle in handles:
                handle.remove()


@pytest.mark.parametrize("case", sorted(CASES))
def test_methods_composed_in_one_adapter_train_together_as_the_reference(case):
    rules = CASES[case]
    adapted = fxpeft.transform(build_without_dropout("llama"), rules)
    add_noise(adapted, seed=4, scale=0.2)
    reference = Reference(adapted, rules)
    ours = adapted.adapters["default"].peft_state_dict()
    assert adapted.get_nb_trainable_parameters()[0] == sum(t.numel() for t in reference.parameters.values())
    data = hf_inputs("llama", batch=2, seq=7)
    data["labels"] = data["input_ids"].clone()
    optimizers = [torch.optim.SGD(list(ours.values()), lr=0.5),
                  torch.optim.SGD(list(reference.parameters.values()), lr=0.5)]
    adapted.train()
    for step in range(2):
        out, expected = adapted(**data), reference(**data)
        torch.testing.assert_close(out.logits, expected.logits, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(out.loss, expected.loss, rtol=1e-5, atol=1e-5)
        if step == 1:
            break
        for optimizer, loss in zip(optimizers, (out.loss, expected.loss)):
            optimizer.zero_grad()
            loss.backward()
        for key, tensor in ours.items():  # every method's tensors learn, as the reference's do
            assert tensor.grad is not None and tensor.grad.abs().sum() > 0, key
            torch.testing.assert_close(tensor.grad, reference.parameters[key].grad, rtol=1e-4, atol=1e-6,
                                       msg=lambda text, key=key: f"{key}: {text}")
        for optimizer in optimizers:
            optimizer.step()
