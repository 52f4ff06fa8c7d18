"""The models, data and LoRA settings every contender shares.

A :class:`Workload` builds one seeded model and one seeded batch, and says which LoRA to put on it, both as a
``peft.LoraConfig`` and as an ``fxpeft.LoRA`` rule with the same fields. ``--quick`` shrinks every size
(hidden 64, 2 layers, vocabulary 1000, batch 2 x 16) so the whole run is a smoke test.
"""

from __future__ import annotations

import dataclasses
import os

import torch
import transformers as tf

import fxpeft

__all__ = ["Sizes", "Workload", "WORKLOADS", "sizes_for"]


@dataclasses.dataclass(frozen=True)
class Sizes:
    hidden: int
    layers: int
    heads: int
    intermediate: int
    vocab: int
    batch: int
    seq: int
    mixed_batch: int  # rows of the mixed-adapter batch (one adapter name per row, up to 16 adapters)
    mixed_seq: int
    new_tokens: int  # tokens each ``generate`` call produces (greedy, never stopping early)


FULL = Sizes(hidden=512, layers=4, heads=8, intermediate=1376, vocab=32000, batch=4, seq=128,
             mixed_batch=16, mixed_seq=64, new_tokens=32)
QUICK = Sizes(hidden=64, layers=2, heads=4, intermediate=172, vocab=1000, batch=2, seq=16, mixed_batch=16, mixed_seq=8,
              new_tokens=8)


LAYERS_VARIABLE = "FXPEFT_BENCH_LAYERS"  # set by ``--layers``; fresh child processes inherit it


def sizes_for(quick: bool) -> Sizes:
    """The sizes of every workload; ``--layers N`` (``FXPEFT_BENCH_LAYERS``) changes the depth alone."""
    sizes = QUICK if quick else FULL
    layers = os.environ.get(LAYERS_VARIABLE)
    return dataclasses.replace(sizes, layers=int(layers)) if layers else sizes


@dataclasses.dataclass(frozen=True)
class Workload:
    """One model family with one LoRA setting. ``key`` is the letter the issue uses: (a), (b), (c)."""

    key: str
    title: str
    family: str  # "llama" or "t5"
    targets: str | tuple[str, ...]
    r: int
    dropout: float = 0.0
    bits: int | None = None  # 4: the base is loaded in 4 bits (NF4, fp32 compute), as a QLoRA user loads it

    @property
    def alpha(self) -> int:
        return 2 * self.r

    def build(self, sizes: Sizes, device: str = "cpu") -> torch.nn.Module:
        """The base model, seeded, fp32, in train mode (every contender copies this one)."""
        torch.manual_seed(0)
        if self.family == "llama":
            config = tf.LlamaConfig(hidden_size=sizes.hidden, intermediate_size=sizes.intermediate,
                                    num_hidden_layers=sizes.layers, num_attention_heads=sizes.heads,
                                    num_key_value_heads=sizes.heads, vocab_size=sizes.vocab)
            model = tf.LlamaForCausalLM(config)
        else:
            config = tf.T5Config(d_model=sizes.hidden, d_ff=sizes.intermediate, d_kv=sizes.hidden // sizes.heads,
                                 num_layers=sizes.layers, num_heads=sizes.heads, vocab_size=sizes.vocab,
                                 decoder_start_token_id=0, pad_token_id=0)
            model = tf.T5ForConditionalGeneration(config)
        if self.bits == 4:
            model = _reloaded_in_4_bits(model, device)
        return model.to(device).train()

    def batch(self, sizes: Sizes, batch: int | None = None, seq: int | None = None, labels: bool = True,
              device: str = "cpu", seed: int = 1) -> dict[str, torch.Tensor]:
        """Token ids, an all-ones mask and (``labels=True``) labels; T5's labels are half as long."""
        batch, seq = batch or sizes.batch, seq or sizes.seq
        g = torch.Generator().manual_seed(seed)
        ids = torch.randint(1, sizes.vocab, (batch, seq), generator=g)
        inputs = {"input_ids": ids, "attention_mask": torch.ones(batch, seq, dtype=torch.long)}
        if labels:
            inputs["labels"] = ids if self.family == "llama" else \
                torch.randint(1, sizes.vocab, (batch, max(seq // 2, 1)), generator=g)
        return {name: tensor.to(device) for name, tensor in inputs.items()}

    def rule(self) -> fxpeft.LoRA:
        return fxpeft.LoRA(targets=self.targets, r=self.r, alpha=self.alpha, dropout=self.dropout)

    def prepare_for_peft(self, model: torch.nn.Module) -> torch.nn.Module:
        """What a PEFT user does to a quantized base before ``get_peft_model`` (without activation checkpointing,
        which fxpeft does not do either: both then compute the same thing)."""
        if self.bits is None:
            return model
        from peft import prepare_model_for_kbit_training

        return prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)

    def peft_config(self):
        """The same LoRA as a PEFT config (with the task type a PEFT user would give)."""
        from peft import LoraConfig

        targets = list(self.targets) if isinstance(self.targets, tuple) else self.targets
        task = "CAUSAL_LM" if self.family == "llama" else "SEQ_2_SEQ_LM"
        return LoraConfig(r=self.r, lora_alpha=self.alpha, lora_dropout=self.dropout, target_modules=targets,
                          task_type=task)


def _reloaded_in_4_bits(model: torch.nn.Module, device: str) -> torch.nn.Module:
    """``model`` saved and loaded again through transformers' ``BitsAndBytesConfig`` (NF4, float32 compute): every
    linear but the head in 4 bits, as QLoRA users load a base."""
    import tempfile

    with tempfile.TemporaryDirectory(prefix="fxpeft-bench-") as folder:
        model.save_pretrained(folder)
        config = tf.BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                       bnb_4bit_compute_dtype=torch.float32)
        placement = {"device_map": {"": device}} if device != "cpu" else {}
        return tf.AutoModelForCausalLM.from_pretrained(folder, quantization_config=config, **placement)


WORKLOADS = {
    "a": Workload("a", "llama-like, LoRA r=8 on q/v", "llama", ("q_proj", "v_proj"), r=8),
    "b": Workload("b", "llama-like, LoRA r=16 on all linears, dropout 0.05", "llama", "all-linear", r=16,
                  dropout=0.05),
    "c": Workload("c", "T5-like seq2seq, LoRA r=8 on q/v", "t5", ("q", "v"), r=8),
    "d": Workload("d", "llama-like on a 4-bit NF4 base (QLoRA), LoRA r=8 on q/v", "llama", ("q_proj", "v_proj"),
                  r=8, bits=4),
}
