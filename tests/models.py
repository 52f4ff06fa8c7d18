"""Tiny models of each family, built from configs (no hub). Hidden 64, 2 layers, seeded."""

from __future__ import annotations

import torch
import transformers as tf
from torch import nn

VOCAB = 128


def _seeded(build):
    def wrapper(*args, **kwargs):
        torch.manual_seed(0)
        model = build(*args, **kwargs)
        model.eval()
        return model

    wrapper.__name__ = build.__name__
    return wrapper


_TEXT = dict(vocab_size=VOCAB)
CONFIGS = {
    "llama": lambda: tf.LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                                     num_key_value_heads=2, **_TEXT),
    "mistral": lambda: tf.MistralConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                         num_attention_heads=4, num_key_value_heads=2, **_TEXT),
    "qwen2": lambda: tf.Qwen2Config(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                                     num_key_value_heads=2, **_TEXT),
    "gpt2": lambda: tf.GPT2Config(n_embd=64, n_layer=2, n_head=4, n_positions=64, bos_token_id=0, eos_token_id=0,
                                   **_TEXT),
    "gpt_neox": lambda: tf.GPTNeoXConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                          num_attention_heads=4, **_TEXT),
    "opt": lambda: tf.OPTConfig(hidden_size=64, ffn_dim=128, num_hidden_layers=2, num_attention_heads=4,
                                 word_embed_proj_dim=64, max_position_embeddings=64, bos_token_id=0, eos_token_id=0,
                                 pad_token_id=1, **_TEXT),
    "falcon": lambda: tf.FalconConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, **_TEXT),
    "bloom": lambda: tf.BloomConfig(hidden_size=64, n_layer=2, n_head=4, **_TEXT),
    "t5": lambda: tf.T5Config(d_model=64, d_ff=128, d_kv=16, num_layers=2, num_heads=4, decoder_start_token_id=0,
                               **_TEXT),
    "mt5": lambda: tf.MT5Config(d_model=64, d_ff=128, d_kv=16, num_layers=2, num_heads=4, decoder_start_token_id=0,
                                 **_TEXT),
    "bart": lambda: tf.BartConfig(d_model=64, encoder_layers=2, decoder_layers=2, encoder_attention_heads=4,
                                   decoder_attention_heads=4, encoder_ffn_dim=128, decoder_ffn_dim=128,
                                   max_position_embeddings=64, **_TEXT),
    "bert": lambda: tf.BertConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128,
                                   max_position_embeddings=64, **_TEXT),
    "roberta": lambda: tf.RobertaConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                         intermediate_size=128, max_position_embeddings=80, pad_token_id=1, **_TEXT),
    "vit": lambda: tf.ViTConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128,
                                 image_size=32, patch_size=8),
    "whisper": lambda: tf.WhisperConfig(d_model=64, encoder_layers=2, decoder_layers=2, encoder_attention_heads=4,
                                         decoder_attention_heads=4, encoder_ffn_dim=128, decoder_ffn_dim=128,
                                         num_mel_bins=16, max_source_positions=32, max_target_positions=64,
                                         decoder_start_token_id=0, pad_token_id=0, **_TEXT),
}

AUTO_CLASS = {
    "llama": tf.AutoModelForCausalLM, "mistral": tf.AutoModelForCausalLM, "qwen2": tf.AutoModelForCausalLM,
    "gpt2": tf.AutoModelForCausalLM, "gpt_neox": tf.AutoModelForCausalLM, "opt": tf.AutoModelForCausalLM,
    "falcon": tf.AutoModelForCausalLM, "bloom": tf.AutoModelForCausalLM,
    "t5": tf.AutoModelForSeq2SeqLM, "mt5": tf.AutoModelForSeq2SeqLM, "bart": tf.AutoModelForSeq2SeqLM,
    "bert": tf.AutoModelForSequenceClassification, "roberta": tf.AutoModelForSequenceClassification,
    "vit": tf.AutoModelForImageClassification, "whisper": tf.AutoModelForSpeechSeq2Seq,
}


_DEPTH_FIELDS = ("num_hidden_layers", "n_layer", "num_layers", "num_decoder_layers", "encoder_layers", "decoder_layers")


@_seeded
def hf_model(family: str, layers: int | None = None):
    """A tiny transformers model of ``family``, in eval mode, with seeded weights; ``layers`` per stack (default 2)."""
    config = CONFIGS[family]()
    for name in _DEPTH_FIELDS if layers is not None else ():
        if hasattr(config, name):
            setattr(config, name, layers)
    kwargs = {"attn_implementation": "eager"} if family == "bloom" else {}
    return AUTO_CLASS[family].from_config(config, **kwargs)


def hf_inputs(family: str, batch: int = 2, seq: int = 9, seed: int = 1) -> dict:
    """Keyword inputs for ``hf_model(family)`` (with labels where the family's head takes them)."""
    g = torch.Generator().manual_seed(seed)
    config = CONFIGS[family]()
    if family == "vit":
        return {"pixel_values": torch.randn(batch, 3, 32, 32, generator=g)}
    if family == "whisper":
        return {"input_features": torch.randn(batch, 16, 64, generator=g),
                "decoder_input_ids": torch.randint(2, VOCAB, (batch, seq), generator=g)}
    ids = torch.randint(2, VOCAB, (batch, seq), generator=g)
    inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    if getattr(config, "is_encoder_decoder", False):
        inputs["decoder_input_ids"] = torch.randint(2, VOCAB, (batch, max(seq - 3, 2)), generator=g)
    return inputs


class MLP(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(16, 32)
        self.act = nn.GELU()
        self.drop = nn.Dropout(0.1)
        self.fc2 = nn.Linear(32, 8)

    def forward(self, x):
        return self.fc2(self.drop(self.act(self.fc1(x))))


class SmallCNN(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.head = nn.Linear(8, 5)

    def forward(self, x):
        return self.head(self.pool(torch.relu(self.bn(self.conv(x)))).flatten(1))


@_seeded
def mlp() -> MLP:
    return MLP()


@_seeded
def small_cnn() -> SmallCNN:
    return SmallCNN()


_MOE = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
            vocab_size=VOCAB)
MOE_CONFIGS = {
    "mixtral": lambda: tf.MixtralConfig(num_local_experts=4, num_experts_per_tok=2, **_MOE),
    "qwen3_moe": lambda: tf.Qwen3MoeConfig(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32, head_dim=8,
                                           **_MOE),
    # experts stored [E, in, out] (``is_transposed``), with 2-D expert biases
    "gpt_oss": lambda: tf.GptOssConfig(num_local_experts=4, num_experts_per_tok=2, head_dim=8,
                                       layer_types=["sliding_attention", "full_attention"], **_MOE),
}

@_seeded
def moe_model(family: str = "mixtral", experts_implementation: str | None = None):
    """A tiny mixture-of-experts causal LM (hidden 32, 2 layers, 4 experts, 2 per token), eval mode, seeded. Its
    experts are raw 3-D parameters (``mlp.experts.gate_up_proj`` / ``down_proj``). ``experts_implementation``:
    transformers' ``"grouped_mm"`` (the default) and ``"batched_mm"`` capture; ``"eager"`` (a loop over the experts
    hit, data-dependent) does not."""
    kwargs = {"experts_implementation": experts_implementation} if experts_implementation else {}
    return tf.AutoModelForCausalLM.from_config(MOE_CONFIGS[family](), **kwargs)
