"""P-tuning as a graph rewrite: prompt tuning whose virtual tokens come out of PEFT's prompt encoder.

The graph rewrite is prompt tuning's (:func:`fxpeft.graph.tokens.extend_sequence`); only the ``[n, d]`` tensor put
in front of the token embeddings differs. It is read from the site module's :attr:`PromptEncoder.prompt`, which
runs PEFT's encoder on its embedding table: ``mlp`` is ``linear-relu-linear-relu-linear``; ``lstm`` is a
bidirectional LSTM followed by ``linear-relu-linear``. The encoder's input does not depend on the call's inputs,
so computing it as the graph input is computing it in the graph; it is written with functional ops and
``aten.lstm`` (not ``nn.LSTM``, which ``torch.compile`` refuses to trace), so a compiled model stays one graph.

Inserted nodes carry ``method="p_tuning"`` at the token embedding's module path, in the roles of
:mod:`fxpeft.graph.tokens` (``extend``, ``check``, ``prompt``, ``splice``, ``embeddings``), as prompt tuning's.

Saved files (:class:`PTuningCodec`, PEFT's ``P_TUNING``) hold PEFT's ``prompt_embeddings`` (the encoder's
*output*, what PEFT saves) and, under ``fxpeft.`` keys PEFT ignores, the encoder's own weights, so fxpeft can
resume training where PEFT cannot. A file without them (PEFT's own) loads as the fixed prompt it is, a
:class:`~fxpeft.rules.PromptTuning` rule, just as PEFT reloads it.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from fxpeft.adapters import CachedTokens, SiteModule, adapter_dtype, init_like_linear
from fxpeft.formats.peft import check_size, int_field, number_field, str_field
from fxpeft.formats.prompt_learning import VirtualTokenCodec, sizes_bound, transformer_submodules
from fxpeft.graph.tokens import prepend_virtual_tokens
from fxpeft.methods import Method, register_method
from fxpeft.rewrite import RewriteContext
from fxpeft.rules import PromptTuning, PTuning, Rule

__all__ = ["PromptEncoder", "PTuningCodec", "PTuningMethod", "apply_ptuning"]

aten = torch.ops.aten
_SAVE_PREFIX = "fxpeft.prompt_encoder."


class PromptEncoder(SiteModule):
    """PEFT's ``PromptEncoder``: an embedding table [total, d] and an MLP or LSTM+MLP head, as flat parameters
    named after PEFT's (``mlp_head.0.weight`` is ``mlp_head_0_weight``; the LSTM's are ``nn.LSTM``'s)."""

    def __init__(self, path: str, rule: PTuning, total: int, token_dim: int, device: torch.device,
                 dtype: torch.dtype):
        super().__init__()
        self.path = path
        self.count = rule.num_virtual_tokens
        self.encoder = rule.encoder
        self.dropout = float(rule.encoder_dropout)
        self.num_layers = rule.encoder_num_layers
        hidden = rule.encoder_hidden_size or token_dim
        self.hidden = hidden
        factory = {"device": device, "dtype": dtype}
        self.embedding = nn.Parameter(torch.empty(total, token_dim, **factory))
        shapes: dict[str, tuple[int, ...]] = {}
        if rule.encoder == "lstm":
            for layer in range(self.num_layers):
                width = token_dim if layer == 0 else 2 * hidden
                for suffix in ("", "_reverse"):
                    shapes[f"weight_ih_l{layer}{suffix}"] = (4 * hidden, width)
                    shapes[f"weight_hh_l{layer}{suffix}"] = (4 * hidden, hidden)
                    shapes[f"bias_ih_l{layer}{suffix}"] = (4 * hidden,)
                    shapes[f"bias_hh_l{layer}{suffix}"] = (4 * hidden,)
            sizes = [(2 * hidden, 2 * hidden), (token_dim, 2 * hidden)]
            self._mlp = ["mlp_head_0", "mlp_head_2"]
        else:
            sizes = [(hidden, token_dim), (hidden, hidden), (token_dim, hidden)]
            self._mlp = ["mlp_head_0", "mlp_head_2", "mlp_head_4"]
        for name, (out_features, in_features) in zip(self._mlp, sizes):
            shapes[f"{name}_weight"] = (out_features, in_features)
            shapes[f"{name}_bias"] = (out_features,)
        self._lstm = [name for name in shapes if not name.startswith("mlp_head")]
        for name, shape in shapes.items():
            setattr(self, name, nn.Parameter(torch.empty(shape, **factory)))
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """PyTorch's defaults, as PEFT's modules get them: normal embeddings, uniform linears and LSTM."""
        if self.embedding.device.type == "meta":
            return
        nn.init.normal_(self.embedding)
        for name in self._mlp:
            init_like_linear(getattr(self, f"{name}_weight"), getattr(self, f"{name}_bias"))
        for name in self._lstm:
            bound = 1 / math.sqrt(self.hidden)
            nn.init.uniform_(getattr(self, name), -bound, bound)

    @property
    def prompt(self) -> torch.Tensor:
        """The encoder's output for every virtual token: what goes in front of the token embeddings."""
        x = self.embedding
        if self.encoder == "lstm":
            weights = [getattr(self, name) for name in self._lstm]
            zeros = x.new_zeros(2 * self.num_layers, 1, self.hidden)
            x = aten.lstm.input(x.unsqueeze(0), [zeros, zeros], weights, True, self.num_layers, self.dropout,
                                self.training, True, True)[0][0]
        for index, name in enumerate(self._mlp):
            x = F.linear(x, getattr(self, f"{name}_weight"), getattr(self, f"{name}_bias"))
            if index < len(self._mlp) - 1:
                x = F.relu(x)
        return x

    def cached_tokens(self) -> CachedTokens:
        """The encoder's first ``n`` outputs, the rows in front of the token embeddings."""
        return CachedTokens(self.count, embeddings=lambda: self.prompt[:self.count])

    def peft_state_dict(self) -> dict[str, torch.Tensor]:
        """PEFT's ``prompt_embeddings`` (the encoder's output), and the encoder's weights under ``fxpeft.`` keys."""
        state = {"prompt_embeddings": self.prompt}
        state[f"{_SAVE_PREFIX}embedding.weight"] = self.embedding
        for name, _ in self.named_parameters():
            if name != "embedding":
                state[_SAVE_PREFIX + _peft_name(name)] = getattr(self, name)
        return state

    @torch.no_grad()
    def load_peft_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        """Load the encoder's weights (the ``fxpeft.`` keys); ``prompt_embeddings`` follows from them."""
        for name, _ in self.named_parameters():
            key = _SAVE_PREFIX + ("embedding.weight" if name == "embedding" else _peft_name(name))
            if key in state:
                getattr(self, name).copy_(state[key].to(self.embedding.device, self.embedding.dtype))


def _peft_name(name: str) -> str:
    """``mlp_head_0_weight`` -> ``mlp_head.0.weight``; ``weight_ih_l0`` -> ``lstm_head.weight_ih_l0``."""
    if name.startswith("mlp_head_"):
        _, _, rest = name.partition("mlp_head_")
        index, _, kind = rest.partition("_")
        return f"mlp_head.{index}.{kind}"
    return f"lstm_head.{name}"


def apply_ptuning(rule: PTuning, ctx: RewriteContext) -> None:
    """Put the prompt encoder's ``rule.num_virtual_tokens`` outputs in front of the token embeddings."""
    total = rule.num_virtual_tokens * transformer_submodules(ctx.base_model)  # PEFT keeps 2n rows for seq2seq
    prepend_virtual_tokens(ctx, rule, "ptuning", "prompt", total, lambda path, table: PromptEncoder(
        path, rule, total, table.shape[1], table.device, adapter_dtype(table.dtype)))


class PTuningCodec(VirtualTokenCodec):
    """``peft_type`` P_TUNING (PEFT's ``PromptEncoderConfig``): the encoder's type and sizes.

    PEFT saves only the encoder's output and itself reloads that as a plain prompt (inference mode): a file
    without the encoder's ``fxpeft.`` keys is read as a :class:`~fxpeft.rules.PromptTuning` rule."""

    peft_types = ("P_TUNING",)

    def method_fields(self, rule: PTuning, common: dict[str, Any]) -> dict[str, Any]:
        """``encoder_reparameterization_type`` and the encoder's hidden size, layer count and dropout."""
        return {"encoder_reparameterization_type": rule.encoder.upper(),
                "encoder_hidden_size": rule.encoder_hidden_size or common["token_dim"],
                "encoder_num_layers": rule.encoder_num_layers, "encoder_dropout": rule.encoder_dropout}

    def rule_from_config(self, config: dict[str, Any], num_virtual_tokens: int, saved_keys: set[str] | None) -> Rule:
        """A :class:`~fxpeft.rules.PTuning` rule, or a PromptTuning rule for a file without the encoder's weights."""
        if saved_keys is not None and not any(key.startswith(_SAVE_PREFIX) for key in saved_keys):
            return PromptTuning(num_virtual_tokens)
        encoder = str_field(config, "encoder_reparameterization_type", "MLP").lower()
        hidden, layers = int_field(config, "encoder_hidden_size", None), int_field(config, "encoder_num_layers", 2)
        check_size("encoder_hidden_size", hidden, sizes_bound(saved_keys, _SAVE_PREFIX),
                   "the largest dimension of the file's prompt-encoder tensors")
        shapes = getattr(saved_keys, "shapes", None)
        if encoder == "lstm" and shapes is not None:  # one LSTM layer per weight_ih_l<k> in the file
            check_size("encoder_num_layers", layers, sum(key.startswith(f"{_SAVE_PREFIX}lstm_head.weight_ih_l") and
                                                         not key.endswith("_reverse") for key in shapes),
                       "the number of LSTM layers in the file")
        return PTuning(num_virtual_tokens, encoder=encoder, encoder_hidden_size=hidden, encoder_num_layers=layers,
                       encoder_dropout=number_field(config, "encoder_dropout", 0.0, minimum=0, below=1))


class PTuningMethod(Method):
    """PTuning: virtual tokens are part of the graph, so they apply to every call and row (not gateable)."""

    rule_type = PTuning
    tag = "p_tuning"
    codec = PTuningCodec()
    gateable = False

    def rewrite(self, rule: PTuning, ctx: RewriteContext) -> None:
        """:func:`apply_ptuning`."""
        apply_ptuning(rule, ctx)


register_method(PTuningMethod())
