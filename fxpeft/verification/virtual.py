"""Behaviour of a virtual-token adapter: the adapted model against the base model called the way PEFT calls it.

Virtual tokens are part of the graph (``disable_adapters()`` cannot switch them off), so the behaviour checks of
:mod:`~fxpeft.verification.behaviour` cannot run on the adapted model itself. Instead (PEFT's
``PeftModelForCausalLM.forward`` and its seq2seq twin, peft/peft_model.py):

- the adapter's other methods (LoRA, trained copies) are put on a fresh copy of the base model, as their declared
  rules and tensors say, and checked there as usual (disabled: the base outputs bit for bit; merged: within
  rounding of the unmerged outputs); none: the reference is the base model itself;
- then, merged, that model is called with the virtual tokens *the adapter file declares* (PEFT's
  ``prompt_embeddings``): prompt and P-tuning rows as ``inputs_embeds = cat(rows, embed(input_ids))`` with the
  attention mask (and token types) extended and labels given ``-100`` in front (the encoder's inputs for an
  encoder-decoder model); a prefix as ``past_key_values`` laid out as PEFT's ``get_prompt`` lays it out, with the
  attention mask of the prefixed sequence extended. Its outputs must equal the adapted model's within the rounding
  tolerance of :data:`~fxpeft.verification.behaviour.TOLERANCE`, or each differing output is a
  ``virtual-output-differs`` finding.

So a prompt or prefix that is not what the file says (a P-tuning file whose ``prompt_embeddings`` are not its
encoder's output, a graph that reads other rows), or virtual tokens put in another place, are found here.
"""

from __future__ import annotations

import copy
from typing import Any

import torch
from transformers import DynamicCache, EncoderDecoderCache

from fxpeft.api import transform
from fxpeft.capture.export import device_of
from fxpeft.errors import UnsupportedError
from fxpeft.formats.prompt_learning import PROMPT_KEY, transformer_submodules
from fxpeft.graph.tokens import is_encoder_decoder
from fxpeft.methods import method_for, saved_rules
from fxpeft.runtime.virtual_tokens import cache_argument
from fxpeft.verification.behaviour import TOLERANCE, check_behaviour
from fxpeft.verification.report import Findings
from fxpeft.verification.values import max_difference, named_tensors

__all__ = ["NOT_COMPARED", "virtual_adapter", "virtual_tokens_of", "check_virtual_behaviour"]

# Sequence inputs lengthened in front of the real tokens, and their fill (PEFT's, fxpeft/graph/tokens.py's).
_FILLS = {"attention_mask": 1, "token_type_ids": 0, "labels": -100}
NOT_COMPARED = "not compared"  # what check_virtual_behaviour holds when it could not compare


def virtual_adapter(adapted) -> str | None:
    """The name of the adapted model's virtual-token adapter (a method that cannot be gated: its tokens are part of
    the graph), or None."""
    return next((name for name, adapter in adapted.adapters.items()
                 if any(not method_for(rule).gateable for rule in adapter.rules)), None)


def virtual_tokens_of(adapted):
    """(adapter name, site module, its :class:`~fxpeft.adapters.CachedTokens`) of the adapted model's virtual-token
    site, or None when it has none. UnsupportedError (from the site) when its tokens have no cache form."""
    for name, adapter in adapted.adapters.items():
        for site in adapter.site_modules():
            tokens = site.cached_tokens()
            if tokens is not None:
                return name, site, tokens
    return None


@torch.no_grad()
def check_virtual_behaviour(found: Findings, adapted, base_model: torch.nn.Module, probes: dict[str, Any],
                            rules: list, state: dict[str, torch.Tensor]) -> tuple[str, str]:
    """The module docstring, for ``adapted`` whose adapter was declared as ``rules`` with tensors ``state`` (the
    file's); returns (compared, holds)."""
    try:
        _, _, tokens = virtual_tokens_of(adapted)
    except UnsupportedError as error:
        found.note("behaviour", f"the virtual tokens have no form PEFT's forward takes ({error}); outputs were not "
                   "compared.")
        return "virtual tokens", NOT_COMPARED
    declared = state.get(PROMPT_KEY)
    if declared is None:
        found.note("behaviour", f"the adapter has no {PROMPT_KEY}, so there are no declared virtual tokens to "
                   "compare with.")
        return "virtual tokens", NOT_COMPARED
    shapes = ", ".join(f"{k}{list(v.shape)}" for k, v in probes.items() if isinstance(v, torch.Tensor))
    modes = (base_model.training, adapted.training)
    base_model.eval()
    adapted.eval()
    try:
        have = dict(named_tensors(adapted(**probes)))
        others = [rule for rule in saved_rules(rules) if method_for(rule).gateable]  # not Quantize: the base's own
        reference, holds = base_model, "no other adapters"
        if others:
            rest = transform(copy.deepcopy(base_model), others, example_kwargs=probes).eval()
            keys = rest.adapters["default"].peft_keys()
            rest.adapters["default"].load_peft_state_dict({key: value for key, value in state.items() if key in keys})
            holds = "the other adapters: " + check_behaviour(found, rest, base_model, probes)[1]
            try:
                rest.merge()
            except Exception as error:  # reported by check_behaviour above (a note or merge-failed)
                found.note("behaviour", f"the other adapters cannot merge ({type(error).__name__}), so the virtual "
                           "tokens were not compared.")
                return f"outputs on probe inputs {shapes}", holds
            reference = rest.base_model
        fixed = adapted.programs()[0].fixed_kwargs
        want = dict(named_tensors(_call_as_peft(reference, probes, fixed, declared, tokens)))
    finally:
        base_model.train(modes[0])
        adapted.train(modes[1])
    worst = _compare(found, have, want)
    kind = "prefix as past_key_values" if tokens.keys_values is not None else "rows as inputs_embeds in front"
    return (f"outputs on probe inputs {shapes}",
            f"{holds}; with the file's {tokens.count} virtual tokens ({kind}, as PEFT calls the model), the "
            f"{'merged ' if others else ''}base model's {len(have)} output(s) are within {worst:.2g} of the adapted "
            "model's")


def _call_as_peft(model: torch.nn.Module, probes: dict[str, Any], fixed: dict[str, Any], declared: torch.Tensor,
                  tokens) -> Any:
    n = tokens.count
    seq2seq = is_encoder_decoder(model)
    kwargs = {**probes, **fixed}
    if tokens.embeddings is not None:  # prompt and P-tuning: rows in front of the token embeddings
        ids = kwargs.pop("input_ids")
        embeddings = model.get_input_embeddings()(ids)
        rows = declared[:n].to(embeddings.device, embeddings.dtype).unsqueeze(0).expand(ids.shape[0], -1, -1)
        for name, fill in _FILLS.items():
            value = kwargs.get(name)
            if isinstance(value, torch.Tensor) and value.dim() == 2 and value.shape[1] == ids.shape[1] and \
                    not (seq2seq and name == "labels"):
                kwargs[name] = torch.cat([value.new_full((value.shape[0], n), fill), value], 1)
        return model(inputs_embeds=torch.cat([rows, embeddings], 1), **kwargs)
    mask = "decoder_attention_mask" if seq2seq else "attention_mask"
    carrier = kwargs["decoder_input_ids" if seq2seq and "decoder_input_ids" in kwargs else "input_ids"]
    batch = carrier.shape[0]
    if isinstance(kwargs.get(mask), torch.Tensor):
        kwargs[mask] = torch.cat([kwargs[mask].new_ones((batch, n)), kwargs[mask]], 1)
    if "use_cache" in kwargs:
        kwargs["use_cache"] = True
    kwargs[cache_argument(model)] = _prefix_cache(model, declared, tokens, batch)
    return model(**kwargs)


def _prefix_cache(model: torch.nn.Module, declared: torch.Tensor, tokens, batch: int):
    """The prefix as PEFT's ``get_prompt`` lays it out: [n, layers * 2 * kv_dim] viewed per layer and head (the key
    and value heads' sizes read off the site's cache form), doubled for an encoder-decoder model, each layer's
    (key, value) in a DynamicCache (the self-attention one of an EncoderDecoderCache)."""
    heads, _, head_dim = tokens.keys_values()[0][0].shape
    n = tokens.count
    dtype = next(model.parameters()).dtype
    past = declared.to(device_of(model), dtype).view(n, -1, heads, head_dim)
    past = past.unsqueeze(0).expand(batch, -1, -1, -1, -1)
    submodules = transformer_submodules(model)
    if submodules == 2:
        past = torch.cat([past, past], dim=2)
    layers = past.permute([2, 0, 3, 1, 4]).split(2 * submodules)
    pairs = [(layer[0], layer[1]) for layer in layers]
    if submodules == 2:
        return EncoderDecoderCache(DynamicCache(pairs), DynamicCache())
    return DynamicCache(pairs)


def _compare(found: Findings, have: dict[str, torch.Tensor], want: dict[str, torch.Tensor]) -> float:
    """A ``virtual-output-differs`` finding for each output of the adapted model farther from the reference's than
    the tolerance; returns the largest difference."""
    worst = 0.0
    for name, value in have.items():
        other = want.get(name)
        difference = max_difference(value, other) if other is not None else float("inf")
        if value.is_floating_point():
            rtol, atol = TOLERANCE.get(value.dtype, (1e-4, 1e-5))
            tolerance = atol + rtol * float(value.abs().max()) if value.numel() else atol
        else:
            tolerance = 0.0
        worst = max(worst, difference)
        if difference > tolerance:
            found.add("virtual-output-differs", name, f"the base model called with the file's virtual tokens as PEFT "
                      f"calls it gives another {name}: it differs from the adapted model's by up to {difference:.3g} "
                      f"(tolerance {tolerance:.3g}). The adapted model's virtual tokens are not what its file "
                      "declares, or are put in another place.", max_abs_diff=difference, tolerance=tolerance)
    return worst
