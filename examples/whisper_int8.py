"""Speech recognition: LoRA on an int8 Whisper model, on the CPU, from synthetic spoken digits to a reloaded adapter.

The speech is real synthesized speech: ``espeak-ng`` (Debian's ``espeak-ng`` package: ``apt-get install espeak-ng``)
says one or two digits ("seven", "three one", ...) in a given voice, speed (words per minute) and pitch;
the audio is resampled to 16 kHz and turned into log-mel features by a ``WhisperFeatureExtractor`` built from its
defaults (40 mel bins, 2-second windows: no download). The text side is a word-level tokenizer made here (the ten
digit words and four special tokens), and the model a tiny ``WhisperForConditionalGeneration`` built from a config
that matches it, so that everything runs offline.

What it shows, step by step:

1. Pretraining in full precision, briefly, on clips in four *male* espeak-ng voices: the base model learns to
   transcribe those, and does poorly on the *female* voices of the fine-tuning task (higher pitch, other timbre).
2. The base is saved and loaded back quantized with ``BitsAndBytesConfig(load_in_8bit=True)``, ``device_map="cpu"``
   (bitsandbytes' CPU backend): every linear layer of the encoder and decoder becomes a ``Linear8bitLt``; the
   encoder's two ``Conv1d`` and the output projection stay in float32.
3. ``fxpeft.transform`` adds LoRA (r=8, alpha=16) to every ``q_proj`` and ``v_proj`` (encoder self-attention,
   decoder self- and cross-attention), and the adapters are trained with AdamW on clips in the female voices; the
   int8 weights stay frozen and int8.
4. Word error rate (word-level edit distance over the reference words) on held-out clips in the female voices,
   before and after, from transcriptions made by ``adapted.generate(input_features=..., max_new_tokens=...)``
   (transformers' greedy search over fxpeft's captured graphs: the encoder once per call, one decoder step per
   token with its KV cache). This is ``GenerationMixin.generate``, as for any encoder-decoder, not Whisper's own
   ``generate``: its sequences start with <|startoftranscript|> and end with <|endoftext|>, and Whisper's
   ``language`` / ``task`` / ``return_timestamps`` arguments are not taken (this model has no such tokens).
5. The adapter is saved (PEFT's layout), loaded with ``fxpeft.load_adapter`` onto a freshly loaded int8 base, and
   transcribes the held-out clips with exactly the same tokens.

Run it (about 90 s on one CPU core: held-out word error rate 0.80 -> 0.14; ``--quick``, the shortened run the
tests use, about 45 s: 0.74 -> 0.25)::

    python examples/whisper_int8.py [--quick] [--out DIR] [--seed S]

Needs ``espeak-ng`` on the PATH, ``bitsandbytes`` (the ``quantization`` extra), ``scipy`` (resampling; it comes
with scikit-learn in the ``examples`` extra) and ``tqdm``.
"""

from __future__ import annotations

import argparse
import logging
import random
import shutil
import subprocess
import sys
import tempfile
import time
import wave
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import transformers as tf
from scipy.signal import resample_poly
from tokenizers import Tokenizer
from tokenizers.models import WordLevel
from tokenizers.pre_tokenizers import WhitespaceSplit
from tqdm import tqdm
from transformers import BitsAndBytesConfig, PreTrainedTokenizerFast, WhisperFeatureExtractor

import fxpeft

WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
PAD, START, END, UNKNOWN = "<pad>", "<|startoftranscript|>", "<|endoftext|>", "<unk>"  # token ids 0-3
SAMPLE_RATE = 16_000
WINDOW_SECONDS = 2  # the feature extractor's window: 200 mel frames, 100 encoder positions
MEL_BINS = 40
MAX_WORDS = 2
MAX_NEW_TOKENS = MAX_WORDS + 1  # the words, then <|endoftext|>
# espeak-ng voices ("language+variant"): the base model hears the first group, the adapter learns the second.
PRETRAIN_VOICES = ("en-us", "en-gb", "en-gb-scotland", "en-us+m3")
TASK_VOICES = ("en-us+Alicia", "en+anika", "en-us+whisperf", "en-us+f3")
RULES = [fxpeft.LoRA(targets=["q_proj", "v_proj"], r=8, alpha=16)]


@dataclass(frozen=True)
class Settings:
    """Clip counts and training lengths; ``--quick`` is a shorter run with the same everything else."""

    pretrain_clips: int
    pretrain_steps: int
    task_clips: int
    lora_steps: int
    held_out_clips: int = 48
    batch_size: int = 16
    pretrain_lr: float = 2e-3
    lora_lr: float = 1e-2


QUICK = Settings(pretrain_clips=400, pretrain_steps=500, task_clips=192, lora_steps=150)
FULL = Settings(pretrain_clips=800, pretrain_steps=1000, task_clips=384, lora_steps=400)


@dataclass(frozen=True)
class Clip:
    """One synthesized utterance: its words, and the audio (float32 samples at 16 kHz)."""

    text: str
    voice: str
    audio: np.ndarray


# -- speech -------------------------------------------------------------------------------------------------------
def say(text: str, voice: str, speed: int, pitch: int, scratch: Path) -> np.ndarray:
    """``text`` spoken by espeak-ng (``speed`` in words per minute, ``pitch`` 0-99), as float32 samples at 16 kHz."""
    path = scratch / "clip.wav"
    subprocess.run(["espeak-ng", "-v", voice, "-s", str(speed), "-p", str(pitch), "-w", str(path), text],
                   check=True, capture_output=True)
    with wave.open(str(path)) as file:
        rate = file.getframerate()
        samples = np.frombuffer(file.readframes(file.getnframes()), dtype=np.int16).astype(np.float32) / 32768
    divisor = np.gcd(rate, SAMPLE_RATE)
    return resample_poly(samples, SAMPLE_RATE // divisor, rate // divisor).astype(np.float32)


def make_clips(rng: random.Random, count: int, voices: tuple[str, ...], scratch: Path) -> list[Clip]:
    """``count`` clips of one or two random digits, each in a random voice of ``voices``, at a random speed
    (140-200 words per minute) and pitch (25-75)."""
    clips = []
    for _ in range(count):
        text = " ".join(rng.choice(WORDS) for _ in range(rng.randint(1, MAX_WORDS)))
        voice = rng.choice(voices)
        clips.append(Clip(text, voice, say(text, voice, rng.randint(140, 200), rng.randint(25, 75), scratch)))
    return clips


# -- text side and model ------------------------------------------------------------------------------------------
def build_tokenizer() -> PreTrainedTokenizerFast:
    """A word-level tokenizer over the ten digit words (ids 4-13) and Whisper's special tokens (ids 0-3)."""
    vocab = {token: i for i, token in enumerate((PAD, START, END, UNKNOWN, *WORDS))}
    core = Tokenizer(WordLevel(vocab, unk_token=UNKNOWN))
    core.pre_tokenizer = WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=core, pad_token=PAD, bos_token=START, eos_token=END,
                                   unk_token=UNKNOWN)


def feature_extractor() -> WhisperFeatureExtractor:
    return WhisperFeatureExtractor(feature_size=MEL_BINS, sampling_rate=SAMPLE_RATE, chunk_length=WINDOW_SECONDS)


def whisper_config(tokenizer: PreTrainedTokenizerFast) -> tf.WhisperConfig:
    """A tiny Whisper (width 64, two encoder and two decoder layers) for the tokenizer's vocabulary: decoding starts
    at <|startoftranscript|> and ends at <|endoftext|>; none of Whisper's default token suppression (its ids are
    the real Whisper vocabulary's)."""
    return tf.WhisperConfig(
        vocab_size=len(tokenizer), num_mel_bins=MEL_BINS, d_model=64, encoder_layers=2, decoder_layers=2,
        encoder_attention_heads=4, decoder_attention_heads=4, encoder_ffn_dim=256, decoder_ffn_dim=256,
        max_source_positions=WINDOW_SECONDS * 50, max_target_positions=16, dropout=0.0, attention_dropout=0.0,
        activation_dropout=0.0, pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id, decoder_start_token_id=tokenizer.bos_token_id,
        suppress_tokens=None, begin_suppress_tokens=None)


def features(extractor: WhisperFeatureExtractor, clips: list[Clip]) -> torch.Tensor:
    """Log-mel features ``[clips, 40, 200]``, every clip padded to the 2-second window."""
    return extractor([clip.audio for clip in clips], sampling_rate=SAMPLE_RATE, return_tensors="pt").input_features


def labels(tokenizer: PreTrainedTokenizerFast, clips: list[Clip]) -> torch.Tensor:
    """Each clip's word ids then <|endoftext|>, padded with -100 (ignored by the loss). The model puts
    <|startoftranscript|> in front (``decoder_start_token_id``) for its decoder's inputs."""
    rows = [tokenizer(clip.text).input_ids + [tokenizer.eos_token_id] for clip in clips]
    width = max(map(len, rows))
    return torch.tensor([row + [-100] * (width - len(row)) for row in rows])


def load_int8(folder: Path) -> tf.WhisperForConditionalGeneration:
    return tf.WhisperForConditionalGeneration.from_pretrained(
        folder, quantization_config=BitsAndBytesConfig(load_in_8bit=True), device_map="cpu", dtype=torch.float32)


# -- training and evaluation --------------------------------------------------------------------------------------
def train(model: torch.nn.Module, inputs: torch.Tensor, targets: torch.Tensor, steps: int, batch_size: int,
          lr: float, seed: int, desc: str) -> float:
    """AdamW on the model's trainable parameters (linear warm-up over 10% of the steps, then linear decay) with
    random batches; returns the mean loss of the last ten steps."""
    parameters = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(parameters, lr=lr, weight_decay=0.0)
    warmup = max(1, steps // 10)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: min((step + 1) / warmup, (steps - step) / (steps - warmup)))
    generator = torch.Generator().manual_seed(seed)
    model.train()
    losses = []
    with tqdm(range(steps), desc=desc, unit="step", disable=None) as bar:
        for _ in bar:
            rows = torch.randint(0, len(inputs), (batch_size,), generator=generator)
            loss = model(input_features=inputs[rows], labels=targets[rows]).loss
            loss.backward()
            optimizer.step()
            schedule.step()
            optimizer.zero_grad()
            losses.append(loss.item())
            bar.set_postfix(loss=f"{loss.item():.3f}")
    model.eval()
    return sum(losses[-10:]) / len(losses[-10:])


@torch.no_grad()
def transcribe(model, tokenizer: PreTrainedTokenizerFast, inputs: torch.Tensor) -> tuple[list[str], torch.Tensor]:
    """Greedy transcriptions by the model's ``generate`` (decoded words) and the generated token ids."""
    model.eval()
    tokens = model.generate(input_features=inputs, max_new_tokens=MAX_NEW_TOKENS, do_sample=False, num_beams=1)
    return [" ".join(text.split()) for text in tokenizer.batch_decode(tokens, skip_special_tokens=True)], tokens


def word_error_rate(references: list[str], hypotheses: list[str]) -> float:
    """Word-level edit distance (substitutions, insertions, deletions) summed over the clips, over the number of
    reference words."""
    errors = words = 0
    for reference, hypothesis in zip(references, hypotheses):
        ref, hyp = reference.split(), hypothesis.split()
        row = list(range(len(hyp) + 1))  # distances from the empty reference prefix
        for i, word in enumerate(ref, 1):
            diagonal, row[0] = row[0], i
            for j, heard in enumerate(hyp, 1):
                diagonal, row[j] = row[j], min(row[j] + 1, row[j - 1] + 1, diagonal + (word != heard))
        errors += row[-1]
        words += len(ref)
    return errors / words


def report(when: str, clips: list[Clip], said: list[str]) -> float:
    rate = word_error_rate([clip.text for clip in clips], said)
    right = sum(text == clip.text for text, clip in zip(said, clips))
    print(f"held-out word error rate {when} LoRA training: {rate:.3f} ({right}/{len(clips)} clips transcribed "
          "exactly)")
    return rate


def show(clips: list[Clip], said: list[str], count: int = 8) -> None:
    print("held-out clips transcribed by the reloaded adapter (through adapted.generate):")
    for clip, text in list(zip(clips, said))[:count]:
        mark = "ok" if text == clip.text else "  "
        print(f"  {mark} {clip.voice:<15} said {clip.text!r:<22} heard {text!r}")


# -- the job ------------------------------------------------------------------------------------------------------
def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a short run (used by the tests)")
    parser.add_argument("--out", type=Path, default=None,
                        help="where to save the base model and the adapter (default: a temporary directory)")
    parser.add_argument("--seed", type=int, default=0)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if shutil.which("espeak-ng") is None:
        raise SystemExit("espeak-ng is not on the PATH: install it (Debian/Ubuntu: apt-get install espeak-ng)")
    settings = QUICK if args.quick else FULL
    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)  # "inputs will be cast to float16" on every call
    tf.logging.set_verbosity_error()
    tf.utils.logging.disable_progress_bar()
    out = args.out or Path(tempfile.mkdtemp(prefix="fxpeft-whisper-int8-"))
    started = time.perf_counter()

    rng = random.Random(args.seed)
    with tempfile.TemporaryDirectory() as scratch:
        pretrain_clips = make_clips(rng, settings.pretrain_clips, PRETRAIN_VOICES, Path(scratch))
        task_clips = make_clips(rng, settings.task_clips, TASK_VOICES, Path(scratch))
        held_out = make_clips(rng, settings.held_out_clips, TASK_VOICES, Path(scratch))
        held_out_pretrain = make_clips(rng, settings.held_out_clips, PRETRAIN_VOICES, Path(scratch))
    longest = max(len(clip.audio) for clip in pretrain_clips + task_clips + held_out) / SAMPLE_RATE
    print(f"speech: espeak-ng, {len(pretrain_clips)} pretraining clips (voices {', '.join(PRETRAIN_VOICES)}), "
          f"{len(task_clips)} fine-tuning and {len(held_out)} held-out clips (voices {', '.join(TASK_VOICES)}); "
          f"one or two digits each, up to {longest:.2f}s ({time.perf_counter() - started:.1f}s)")

    tokenizer, extractor = build_tokenizer(), feature_extractor()
    pretrain_inputs, pretrain_targets = features(extractor, pretrain_clips), labels(tokenizer, pretrain_clips)
    task_inputs, task_targets = features(extractor, task_clips), labels(tokenizer, task_clips)
    held_out_inputs, held_out_pretrain_inputs = features(extractor, held_out), features(extractor, held_out_pretrain)

    torch.manual_seed(args.seed)
    base = tf.WhisperForConditionalGeneration(whisper_config(tokenizer))
    loss = train(base, pretrain_inputs, pretrain_targets, settings.pretrain_steps, settings.batch_size,
                 settings.pretrain_lr, args.seed, "pretraining (fp32)")
    print(f"pretrained the base model in full precision: {settings.pretrain_steps} steps, last loss {loss:.3f} "
          f"({time.perf_counter() - started:.1f}s)")
    base.save_pretrained(out / "base")
    tokenizer.save_pretrained(out / "base")
    extractor.save_pretrained(out / "base")
    del base

    model = load_int8(out / "base")
    q_proj = model.model.encoder.layers[0].self_attn.q_proj
    packed = q_proj.weight.detach().clone()
    int8_layers = sum(type(m).__name__ == "Linear8bitLt" for m in model.modules())
    print(f"reloaded in int8: {int8_layers} layers are {type(q_proj).__module__}.{type(q_proj).__name__} "
          f"(weight {packed.dtype}); conv1/conv2 {model.model.encoder.conv1.weight.dtype}, proj_out "
          f"{model.proj_out.weight.dtype}")

    example = {"input_features": task_inputs[:2], "labels": task_targets[:2]}
    adapted = fxpeft.transform(model, RULES, example_kwargs=example)
    adapted.print_trainable_parameters()
    said, _ = transcribe(adapted, tokenizer, held_out_pretrain_inputs)
    rate = word_error_rate([clip.text for clip in held_out_pretrain], said)
    print(f"base model on held-out clips in the pretraining voices: word error rate {rate:.3f}")
    said, _ = transcribe(adapted, tokenizer, held_out_inputs)
    report("before", held_out, said)

    lora_started = time.perf_counter()
    loss = train(adapted, task_inputs, task_targets, settings.lora_steps, settings.batch_size, settings.lora_lr,
                 args.seed, "LoRA on the int8 model")
    print(f"LoRA training: {settings.lora_steps} steps, batch {settings.batch_size}, AdamW lr {settings.lora_lr}, "
          f"last loss {loss:.3f} ({time.perf_counter() - lora_started:.1f}s)")
    said, tokens = transcribe(adapted, tokenizer, held_out_inputs)
    report("after", held_out, said)
    said_pretrain, _ = transcribe(adapted, tokenizer, held_out_pretrain_inputs)
    rate = word_error_rate([clip.text for clip in held_out_pretrain], said_pretrain)
    print(f"adapted model on held-out clips in the pretraining voices: word error rate {rate:.3f}")
    if not (torch.equal(q_proj.weight, packed) and q_proj.weight.dtype == torch.int8):
        raise SystemExit("the int8 base weights changed")
    print("int8 base weights unchanged: yes")

    adapted.save_adapter(out / "adapter")
    size = sum(f.stat().st_size for f in (out / "adapter").iterdir())
    base_size = (out / "base" / "model.safetensors").stat().st_size
    print(f"adapter saved to {out / 'adapter'}: {size / 1e6:.3f} MB on disk vs {base_size / 1e6:.3f} MB for the "
          "full-precision base")

    reloaded = fxpeft.load_adapter(load_int8(out / "base"), out / "adapter", example_kwargs=example)
    said_again, tokens_again = transcribe(reloaded, tokenizer, held_out_inputs)
    if not torch.equal(tokens_again, tokens):
        raise SystemExit("the reloaded adapter transcribes the held-out clips differently")
    print(f"reloaded adapter on a fresh int8 base: identical transcriptions (the same tokens) of all "
          f"{len(held_out)} held-out clips")
    show(held_out, said_again)
    print(f"done in {time.perf_counter() - started:.1f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
