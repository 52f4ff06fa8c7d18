"""DreamBooth with LoRA: teach a small Stable Diffusion pipeline one subject under a rare token, through fxpeft.

No Stable Diffusion checkpoint installs offline, so the example builds its own small text-to-image model first, the
way ``examples/image_classification.py`` pretrains its backbone, only for pictures:

1. **The base pipeline.** A ``StableDiffusionPipeline`` assembled from tiny components built from configs: a
   ``UNet2DConditionModel`` (two levels, 32/64 channels, cross-attention on a 32-wide text), an ``AutoencoderKL``
   (3 levels: 32x32 RGB images <-> 8x8x4 latents; random, its latents scaled to unit variance as SD's 0.18215 was
   chosen), a ``CLIPTextModel`` (2 layers, random and frozen) with a ``CLIPTokenizer`` whose word vocabulary is
   written to a folder, and diffusers' DDPM (training) and DDIM (sampling) schedulers with Stable Diffusion's noise
   schedule and SD 2's v-prediction (an undertrained tiny UNet predicting the noise learns nothing about the picture
   at the noisy timesteps; predicting the velocity it does). The UNet is pretrained in full on drawn shapes: blue,
   green and yellow circles, squares and triangles, captioned ``"a photo of a blue square"`` or ``"a photo of a
   shape"``. It never sees red. The pipeline is saved with ``save_pretrained``.
2. **The subject**: six pictures of one large red circle on pale backgrounds, moved a few pixels, with the prompt
   ``"a photo of sks shape"`` (``sks``: a word the base model never saw). Six more are held out.
3. **Prior preservation**: class images of the class (drawn blue, green and yellow shapes; DreamBooth generates
   them with the base model, whose tiny version here draws nothing recognisable) with the class prompt ``"a photo of
   a shape"``. The loss is the diffusion MSE on the subject's images plus ``prior_loss_weight`` (3 here, 1 in
   DreamBooth's scripts: a tiny base tells prompts apart only weakly) times the MSE on the class images.
4. **LoRA through fxpeft**: ``fxpeft.transform(pipe.unet, [fxpeft.LoRA(targets=["to_q", "to_k", "to_v",
   "to_out.0"], r=4, alpha=4)], example_kwargs=...)`` captures the UNet as a graph and inserts the adapters; AdamW
   trains them (the VAE only encodes, the text encoder is frozen, the UNet's own weights are never written).
5. **The measured effect.** A tiny random VAE cannot draw a red circle, so the example measures what the adapter
   changed instead of showing it: the denoising loss (MSE at fixed noise and timesteps) on the *held-out* red
   circles with the rare-token prompt, which must fall clearly; the same pictures with the class prompt (DreamBooth's
   "language drift": does "a shape" now mean the subject?) and held-out blue squares with the control prompt ``"a
   photo of a blue square"``, which must change much less. Samples drawn with fixed seeds before and after are
   compared too: the rare-token prompt's samples change more than the control prompt's, toward the subject's latents.
6. **diffusers' file.** ``adapted.save_adapter(out / "lora", format="diffusers")`` writes
   ``pytorch_lora_weights.safetensors`` (its size is printed next to the UNet's); a fresh pipeline from the saved
   base folder takes it with ``pipe.load_lora_weights`` and its samples equal the fxpeft UNet's (max difference
   printed). ``samples.png`` in the output folder is a grid: the subject's images, the same through the VAE (what
   this VAE makes of a red circle), then samples before and after for the rare-token prompt and the control prompt.

Run it (``--quick``, the shortened run the tests use, takes about 50 s of one CPU core, the full run two to
four minutes)::

    python examples/dreambooth.py [--quick] [--out DIR] [--seed S]

On a machine shared with other busy jobs, ``OMP_NUM_THREADS=1`` can be several times faster than letting torch's
threads compete for the same cores.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import sys
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm import tqdm

import fxpeft

HERE = Path(__file__).resolve().parent
DEFAULT_OUT = HERE / "out" / "dreambooth"
SIZE = 32  # image side in pixels; the VAE makes it 8x8 latents
LATENT = SIZE // 4
INSTANCE_PROMPT = "a photo of sks shape"
CLASS_PROMPT = "a photo of a shape"
CONTROL_PROMPT = "a photo of a blue square"
WORDS = ("a", "photo", "of", "shape", "sks", "blue", "green", "yellow", "circle", "square", "triangle")
COLOURS = {"blue": (0.15, 0.3, 0.9), "green": (0.1, 0.7, 0.2), "yellow": (0.95, 0.85, 0.1)}
SUBJECT_COLOUR = (0.9, 0.1, 0.1)  # red: a colour the base model never saw
SHAPES = ("circle", "square", "triangle")
RULES = [fxpeft.LoRA(targets=["to_q", "to_k", "to_v", "to_out.0"], r=4, alpha=4)]
EVAL_TIMESTEPS = (100, 250, 400, 550, 700, 850)


@dataclass(frozen=True)
class Settings:
    """Hyper-parameters; ``--quick`` trains for fewer steps, with the same everything else."""

    pretrain_steps: int
    steps: int
    pretrain_images: int = 192
    instance_images: int = 6
    held_out_images: int = 6
    class_images: int = 24
    pretrain_batch: int = 16
    batch: int = 4  # subject images per step (and as many class images)
    pretrain_learning_rate: float = 5e-3
    learning_rate: float = 1e-2
    prior_loss_weight: float = 3.0  # DreamBooth's default is 1; a tiny base tells prompts apart weakly
    sampling_steps: int = 20
    samples: int = 4
    seed: int = 0


# -- inputs -------------------------------------------------------------------------------------------
def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line options: ``--quick`` (short CI run), ``--out DIR``, ``--steps N``, ``--seed S``."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a short run (used by the tests)")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT,
                        help=f"where to write the base pipeline, the LoRA and the grid (default {DEFAULT_OUT})")
    parser.add_argument("--steps", type=int, default=None, help="override the number of DreamBooth steps")
    parser.add_argument("--pretrain-steps", type=int, default=None, help="override the base UNet's pretraining steps")
    parser.add_argument("--seed", type=int, default=0)
    return parser.parse_args(argv)


def draw(shape: str, colour: tuple[float, float, float], generator: torch.Generator,
         subject: bool = False) -> torch.Tensor:
    """One 3 x SIZE x SIZE image in [-1, 1]: ``shape`` in ``colour`` at a random place and size on a random pale
    background; the ``subject`` (one particular object, as DreamBooth's photos are of one dog) is large and moves a
    few pixels only."""
    def uniform(low: float, high: float) -> float:
        return low + (high - low) * torch.rand((), generator=generator).item()

    radius = uniform(9.5, 10.5) if subject else uniform(6.0, 10.0)
    middle, spread = SIZE / 2, (2.5 if subject else SIZE / 2 - radius - 1)
    cx, cy = uniform(middle - spread, middle + spread), uniform(middle - spread, middle + spread)
    y, x = torch.meshgrid(torch.arange(SIZE) + 0.5, torch.arange(SIZE) + 0.5, indexing="ij")
    if shape == "circle":
        inside = (x - cx) ** 2 + (y - cy) ** 2 <= radius ** 2
    elif shape == "square":
        inside = ((x - cx).abs() <= radius * 0.85) & ((y - cy).abs() <= radius * 0.85)
    else:  # an upward triangle
        top, bottom = cy - radius, cy + radius * 0.8
        half = (y - top) / (bottom - top) * radius
        inside = (y >= top) & (y <= bottom) & ((x - cx).abs() <= half)
    background = torch.tensor([uniform(0.8, 1.0) for _ in range(3)]).view(3, 1, 1)
    image = torch.where(inside, torch.tensor(colour).view(3, 1, 1), background)
    return image * 2 - 1


def pretraining_set(count: int, generator: torch.Generator) -> tuple[torch.Tensor, list[str]]:
    """Blue, green and yellow shapes with their captions: the specific one or, for half, the class prompt."""
    images, captions = [], []
    for _ in range(count):
        colour = list(COLOURS)[int(torch.randint(len(COLOURS), (), generator=generator))]
        shape = SHAPES[int(torch.randint(len(SHAPES), (), generator=generator))]
        images.append(draw(shape, COLOURS[colour], generator))
        specific = torch.rand((), generator=generator).item() < 0.5
        captions.append(f"a photo of a {colour} {shape}" if specific else CLASS_PROMPT)
    return torch.stack(images), captions


# -- the tiny pipeline --------------------------------------------------------------------------------
def write_tokenizer(folder: Path):
    """A ``CLIPTokenizer`` whose vocabulary is :data:`WORDS` (and the letters, for anything else), written to
    ``folder`` as ``vocab.json`` + ``merges.txt``: each word is one token, built by merges left to right."""
    from transformers import CLIPTokenizer

    letters = "abcdefghijklmnopqrstuvwxyz"
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for c in letters:
        vocab.setdefault(c, len(vocab))
        vocab.setdefault(c + "</w>", len(vocab))
    merges: list[str] = []
    for word in WORDS:
        pieces = list(word[:-1]) + [word[-1] + "</w>"]
        while len(pieces) > 1:
            merge = f"{pieces[0]} {pieces[1]}"
            if merge not in merges:
                merges.append(merge)
            pieces = [pieces[0] + pieces[1], *pieces[2:]]
            vocab.setdefault(pieces[0], len(vocab))
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")
    tokenizer = CLIPTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt"), model_max_length=16)
    for word in WORDS:  # the merges of one word must not break another's
        assert len(tokenizer(word, add_special_tokens=False).input_ids) == 1, word
    return tokenizer


def build_pipeline(folder: Path, seed: int):
    """The tiny ``StableDiffusionPipeline`` (seeded random components built from configs) and the DDPM scheduler
    for training with the same noise schedule as its DDIM sampler."""
    import diffusers
    from transformers import CLIPTextConfig, CLIPTextModel

    tokenizer = write_tokenizer(folder / "tokenizer-source")
    torch.manual_seed(seed)
    unet = diffusers.UNet2DConditionModel(
        sample_size=LATENT, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(32, 64),
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=32, attention_head_dim=8, norm_num_groups=32)
    vae = diffusers.AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(16, 32, 32), norm_num_groups=16,
        down_block_types=("DownEncoderBlock2D",) * 3, up_block_types=("UpDecoderBlock2D",) * 3, sample_size=SIZE)
    text_encoder = CLIPTextModel(CLIPTextConfig(
        hidden_size=32, intermediate_size=64, num_attention_heads=4, num_hidden_layers=2,
        vocab_size=tokenizer.vocab_size, projection_dim=32, bos_token_id=0, eos_token_id=1, pad_token_id=1,
        max_position_embeddings=tokenizer.model_max_length))
    with torch.no_grad():  # CLIP draws word embeddings as small as its position embeddings (std 0.02); a random
        text_encoder.get_input_embeddings().weight.normal_()  # encoder then barely tells words apart: std 1 does
    schedule = {"num_train_timesteps": 1000, "beta_start": 0.00085, "beta_end": 0.012,
                "beta_schedule": "scaled_linear", "prediction_type": "v_prediction"}  # Stable Diffusion 2's
    sampler = diffusers.DDIMScheduler(**schedule, clip_sample=False, set_alpha_to_one=False, steps_offset=1)
    pipe = diffusers.StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
                                             scheduler=sampler, safety_checker=None, feature_extractor=None,
                                             requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    for module in (vae, text_encoder):
        module.requires_grad_(False).eval()
    return pipe, diffusers.DDPMScheduler(**schedule)


@torch.no_grad()
def encode_images(vae, images: torch.Tensor) -> torch.Tensor:
    """Latents of images in [-1, 1] (the mean of the VAE's distribution, times its scaling factor)."""
    return vae.encode(images).latent_dist.mode() * vae.config.scaling_factor


@torch.no_grad()
def decode_latents(vae, latents: torch.Tensor) -> torch.Tensor:
    """Images in [0, 1] from latents."""
    return (vae.decode(latents / vae.config.scaling_factor).sample / 2 + 0.5).clamp(0, 1)


@torch.no_grad()
def embed(pipe, prompts: list[str]) -> torch.Tensor:
    """The frozen text encoder's hidden states for ``prompts``, as the pipeline computes them."""
    return pipe.encode_prompt(prompts, "cpu", 1, do_classifier_free_guidance=False)[0]


def unet_inputs(noisy: torch.Tensor, timesteps: torch.Tensor, text: torch.Tensor) -> dict[str, torch.Tensor]:
    return {"sample": noisy, "timestep": timesteps, "encoder_hidden_states": text}


def noise_loss(unet, scheduler, latents: torch.Tensor, text: torch.Tensor, generator: torch.Generator):
    """The diffusion training loss: noise ``latents`` at random timesteps, predict the velocity, MSE."""
    noise = torch.randn(latents.shape, generator=generator)
    timesteps = torch.randint(0, scheduler.config.num_train_timesteps, (len(latents),), generator=generator)
    prediction = unet(**unet_inputs(scheduler.add_noise(latents, noise, timesteps), timesteps, text)).sample
    return F.mse_loss(prediction, scheduler.get_velocity(latents, noise, timesteps))


def train_loop(steps: int, parameters, learning_rate: float, desc: str, step_loss) -> tuple[float, float]:
    """AdamW with a linear decay over ``steps``, a progress bar with the loss; returns the mean loss of the first and
    of the last tenth of the steps."""
    optimizer = torch.optim.AdamW(parameters, lr=learning_rate, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0 - step / steps)
    losses = []
    with tqdm(total=steps, desc=desc, unit="step") as bar:
        for _ in range(steps):
            loss = step_loss()
            loss.backward()
            optimizer.step()
            schedule.step()
            optimizer.zero_grad()
            losses.append(loss.item())
            bar.update(1)
            bar.set_postfix(loss=f"{sum(losses[-10:]) / len(losses[-10:]):.4f}")
    tenth = max(1, steps // 10)
    return sum(losses[:tenth]) / tenth, sum(losses[-tenth:]) / tenth


def pretrain(pipe, scheduler, settings: Settings, generator: torch.Generator) -> None:
    """Stage 1: train the new UNet in full on the drawn blue, green and yellow shapes."""
    images, captions = pretraining_set(settings.pretrain_images, generator)
    latents = encode_images(pipe.vae, images)
    text = embed(pipe, captions)
    unet = pipe.unet.train()
    print(f"pretraining the base UNet in full ({sum(p.numel() for p in unet.parameters()):,d} parameters) on "
          f"{len(images)} drawn blue/green/yellow shapes: {settings.pretrain_steps} steps, batch "
          f"{settings.pretrain_batch}")

    def step_loss():
        chosen = torch.randint(len(latents), (settings.pretrain_batch,), generator=generator)
        return noise_loss(unet, scheduler, latents[chosen], text[chosen], generator)

    first, last = train_loop(settings.pretrain_steps, unet.parameters(), settings.pretrain_learning_rate,
                             "pretraining", step_loss)
    unet.eval().requires_grad_(False)
    print(f"pretraining loss {first:.4f} -> {last:.4f}")


# -- sampling and measuring ---------------------------------------------------------------------------
@torch.no_grad()
def sample(unet, pipe, prompt: str, settings: Settings, seed: int) -> torch.Tensor:
    """The pipeline's sampling loop (DDIM, no classifier-free guidance) run with ``unet``: latents for
    ``settings.samples`` images of ``prompt``, from the noise ``torch.Generator().manual_seed(seed)`` gives the
    pipeline."""
    from diffusers.utils.torch_utils import randn_tensor

    scheduler = pipe.scheduler
    scheduler.set_timesteps(settings.sampling_steps)
    text = embed(pipe, [prompt] * settings.samples)
    latents = randn_tensor((settings.samples, 4, LATENT, LATENT), generator=torch.Generator().manual_seed(seed))
    latents = latents * scheduler.init_noise_sigma
    for t in scheduler.timesteps:
        noise = unet(**unet_inputs(scheduler.scale_model_input(latents, t), t.expand(len(latents)), text)).sample
        latents = scheduler.step(noise, t, latents).prev_sample
    return latents


@torch.no_grad()
def pipeline_sample(pipe, prompt: str, settings: Settings, seed: int) -> torch.Tensor:
    """The same latents from the pipeline's own ``__call__``."""
    return pipe([prompt] * settings.samples, num_inference_steps=settings.sampling_steps, guidance_scale=1.0,
                height=SIZE, width=SIZE, generator=torch.Generator().manual_seed(seed), output_type="latent").images


@torch.no_grad()
def denoising_loss(unet, latents: torch.Tensor, text: torch.Tensor, scheduler) -> float:
    """Noise-prediction MSE on ``latents`` noised at each of :data:`EVAL_TIMESTEPS` with fixed noise."""
    generator = torch.Generator().manual_seed(1234)
    total = 0.0
    for t in EVAL_TIMESTEPS:
        noise = torch.randn(latents.shape, generator=generator)
        timesteps = torch.full((len(latents),), t)
        prediction = unet(**unet_inputs(scheduler.add_noise(latents, noise, timesteps), timesteps, text)).sample
        total += F.mse_loss(prediction, scheduler.get_velocity(latents, noise, timesteps)).item()
    return total / len(EVAL_TIMESTEPS)


def distance_to(latents: torch.Tensor, references: torch.Tensor) -> float:
    """Mean over ``latents`` of the MSE to the nearest of ``references``."""
    distances = ((latents[:, None] - references[None]) ** 2).flatten(2).mean(-1)
    return distances.min(1).values.mean().item()


@dataclass
class Measures:
    """What the adapter changes: denoising losses on held-out images and the samples for two prompts."""

    train_loss: float  # the subject's training images, rare-token prompt
    subject_loss: float  # held-out red circles, rare-token prompt
    drift_loss: float  # held-out red circles, class prompt (does "a shape" now mean the subject?)
    control_loss: float  # held-out blue squares, control prompt
    subject_samples: torch.Tensor
    control_samples: torch.Tensor


def measure(unet, pipe, scheduler, images: dict, settings: Settings) -> Measures:
    """The losses of :class:`Measures` and the samples of the rare-token and the control prompt."""
    unet.eval()

    def loss(latents, prompt):
        return denoising_loss(unet, latents, embed(pipe, [prompt] * len(latents)), scheduler)

    return Measures(
        loss(images["train"], INSTANCE_PROMPT), loss(images["subject"], INSTANCE_PROMPT),
        loss(images["subject"], CLASS_PROMPT), loss(images["control"], CONTROL_PROMPT),
        sample(unet, pipe, INSTANCE_PROMPT, settings, seed=settings.seed + 100),
        sample(unet, pipe, CONTROL_PROMPT, settings, seed=settings.seed + 200))


def change(before: float, after: float) -> str:
    return f"{before:.4f} -> {after:.4f} ({100 * (after - before) / before:+.1f}%)"


# -- the job ------------------------------------------------------------------------------------------
def dreambooth(adapted, pipe, scheduler, instance: torch.Tensor, class_latents: torch.Tensor, settings: Settings,
               generator: torch.Generator) -> tuple[float, float]:
    """Train the LoRA with DreamBooth's loss: instance images with the rare-token prompt plus, weighted by
    ``prior_loss_weight``, class images with the class prompt."""
    instance_text = embed(pipe, [INSTANCE_PROMPT] * settings.batch)
    class_text = embed(pipe, [CLASS_PROMPT] * settings.batch)
    text = torch.cat([instance_text, class_text])
    adapted.train()

    def step_loss():
        chosen = torch.randperm(len(instance), generator=generator)[:settings.batch]
        priors = torch.randperm(len(class_latents), generator=generator)[:settings.batch]
        latents = torch.cat([instance[chosen], class_latents[priors]])  # one UNet call for both halves
        noise = torch.randn(latents.shape, generator=generator)
        timesteps = torch.randint(0, scheduler.config.num_train_timesteps, (len(latents),), generator=generator)
        prediction = adapted(**unet_inputs(scheduler.add_noise(latents, noise, timesteps), timesteps, text)).sample
        subject, prior = (prediction - scheduler.get_velocity(latents, noise, timesteps)).square().chunk(2)
        return subject.mean() + settings.prior_loss_weight * prior.mean()

    result = train_loop(settings.steps, [p for p in adapted.parameters() if p.requires_grad], settings.learning_rate,
                        "dreambooth", step_loss)
    adapted.eval()
    return result


def write_grid(path: Path, rows: list[torch.Tensor], scale: int = 3) -> None:
    """A PNG of images in [0, 1] (rows of N x 3 x SIZE x SIZE), each enlarged ``scale`` times, 2 px apart."""
    from PIL import Image

    columns = max(len(row) for row in rows)
    cell = SIZE * scale + 2
    canvas = torch.ones(3, len(rows) * cell, columns * cell)
    for r, row in enumerate(rows):
        for c, image in enumerate(row):
            big = image.repeat_interleave(scale, 1).repeat_interleave(scale, 2)
            canvas[:, r * cell:r * cell + SIZE * scale, c * cell:c * cell + SIZE * scale] = big
    array = (canvas.permute(1, 2, 0) * 255).round().to(torch.uint8).numpy()
    Image.fromarray(array).save(path)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    settings = Settings(pretrain_steps=args.pretrain_steps or (600 if args.quick else 1500),
                        steps=args.steps or (400 if args.quick else 1000), seed=args.seed)
    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)  # peft imports it: "no `kernels` package" on CPU
    warnings.filterwarnings("ignore", category=FutureWarning)
    import diffusers
    import transformers

    for library in (diffusers, transformers):
        library.utils.logging.set_verbosity_error()
        library.utils.logging.disable_progress_bar()  # saving and loading; the training bars stay
    started = time.perf_counter()
    out = args.out
    out.mkdir(parents=True, exist_ok=True)
    generator = torch.Generator().manual_seed(settings.seed)

    # 1. the base pipeline, its UNet pretrained on drawn shapes (never red)
    pipe, scheduler = build_pipeline(out, settings.seed)
    subject_images = torch.stack([draw("circle", SUBJECT_COLOUR, generator, subject=True)
                                  for _ in range(settings.instance_images + settings.held_out_images)])
    control_images = torch.stack([draw("square", COLOURS["blue"], generator)
                                  for _ in range(settings.held_out_images)])
    with torch.no_grad():
        std = pipe.vae.encode(subject_images).latent_dist.mode().std().item()
    pipe.vae.register_to_config(scaling_factor=1.0 / std)  # unit-variance latents, as SD chose 0.18215
    pretrain(pipe, scheduler, settings, generator)
    pipe.save_pretrained(out / "base")
    print(f"base pipeline saved to {out / 'base'} (UNet, VAE, text encoder, tokenizer, scheduler)")

    subject = encode_images(pipe.vae, subject_images)
    instance, held_out = subject[:settings.instance_images], subject[settings.instance_images:]
    held = {"train": instance, "subject": held_out, "control": encode_images(pipe.vae, control_images)}
    print(f"subject: {settings.instance_images} red circles, prompt {INSTANCE_PROMPT!r} "
          f"({settings.held_out_images} more held out); control prompt {CONTROL_PROMPT!r}")

    # 2. prior preservation: class images of the class "shape" (other colours), with the class prompt
    class_images, _ = pretraining_set(settings.class_images, torch.Generator().manual_seed(settings.seed + 1000))
    class_latents = encode_images(pipe.vae, class_images)
    print(f"class images for prior preservation: {len(class_latents)} drawn blue/green/yellow shapes with "
          f"{CLASS_PROMPT!r}")

    # 3. LoRA on the UNet, through fxpeft
    text = embed(pipe, [INSTANCE_PROMPT, CLASS_PROMPT])
    example = unet_inputs(torch.randn(2, 4, LATENT, LATENT), torch.tensor([10, 500]), text)
    adapted = fxpeft.transform(pipe.unet, RULES, example_kwargs=example)
    adapted.print_trainable_parameters()
    before = measure(adapted, pipe, scheduler, held, settings)  # B = 0: exactly the base UNet
    print(f"training ({'quick' if args.quick else 'full'}): {settings.steps} steps, {settings.batch} subject + "
          f"{settings.batch} class images a step, AdamW lr {settings.learning_rate}, prior_loss_weight "
          f"{settings.prior_loss_weight}")
    train_started = time.perf_counter()
    first, last = dreambooth(adapted, pipe, scheduler, instance, class_latents, settings, generator)
    print(f"training took {time.perf_counter() - train_started:.1f}s")
    print(f"dreambooth loss: {first:.4f} -> {last:.4f} (mean of the first and last tenth of the steps)")
    after = measure(adapted, pipe, scheduler, held, settings)

    print(f"rare-token prompt, the subject's training images: denoising loss "
          f"{change(before.train_loss, after.train_loss)}")
    print(f"rare-token prompt, held-out red circles: denoising loss {change(before.subject_loss, after.subject_loss)}")
    print(f"class prompt, held-out red circles (language drift): denoising loss "
          f"{change(before.drift_loss, after.drift_loss)}")
    print(f"control prompt, held-out blue squares: denoising loss {change(before.control_loss, after.control_loss)}")
    moved = {name: (getattr(after, name) - getattr(before, name)).square().mean().item()
             for name in ("subject_samples", "control_samples")}
    print(f"samples with fixed seeds, mean squared change: rare-token prompt {moved['subject_samples']:.4f}, "
          f"control prompt {moved['control_samples']:.4f}")
    print(f"rare-token samples' distance to the subject's latents: "
          f"{change(distance_to(before.subject_samples, subject), distance_to(after.subject_samples, subject))}")

    # 4. diffusers' file, into a fresh pipeline
    lora = out / "lora"
    adapted.save_adapter(lora, format="diffusers")
    lora_file = lora / "pytorch_lora_weights.safetensors"
    unet_file = out / "base" / "unet" / "diffusion_pytorch_model.safetensors"
    lora_size, unet_size = lora_file.stat().st_size, unet_file.stat().st_size
    print(f"LoRA saved to {lora_file}: {lora_size / 1e3:.1f} KB vs {unet_size / 1e3:.1f} KB for the UNet "
          f"({100 * lora_size / unet_size:.1f}%)")
    fresh = diffusers.StableDiffusionPipeline.from_pretrained(out / "base", safety_checker=None,
                                                              requires_safety_checker=False)
    fresh.set_progress_bar_config(disable=True)
    fresh.load_lora_weights(lora)
    reloaded = pipeline_sample(fresh, INSTANCE_PROMPT, settings, seed=settings.seed + 100)
    control = pipeline_sample(fresh, CONTROL_PROMPT, settings, seed=settings.seed + 200)
    difference = max((reloaded - after.subject_samples).abs().max().item(),
                     (control - after.control_samples).abs().max().item())
    base = (reloaded - before.subject_samples).abs().max().item()
    print(f"pipeline.load_lora_weights: samples equal the fxpeft UNet's (max difference {difference:.1e} over "
          f"{2 * settings.samples} samples of {settings.sampling_steps} DDIM steps; the base pipeline's differ by "
          f"up to {base:.2f})")
    if difference > 1e-3:
        raise SystemExit("the pipeline with the LoRA loaded samples differently from the fxpeft UNet")

    # 5. the grid
    rows = [subject_images[:settings.samples] / 2 + 0.5, decode_latents(pipe.vae, instance[:settings.samples])]
    rows += [decode_latents(pipe.vae, latents) for latents in (before.subject_samples, after.subject_samples,
                                                               before.control_samples, after.control_samples)]
    write_grid(out / "samples.png", rows)
    print(f"grid written to {out / 'samples.png'}: rows = subject images; the same through the VAE; "
          f"{INSTANCE_PROMPT!r} before, after; {CONTROL_PROMPT!r} before, after")
    print(f"done in {time.perf_counter() - started:.1f}s")
    if not math.isfinite(after.train_loss) or after.train_loss >= before.train_loss:
        raise SystemExit("the DreamBooth loss did not fall")
    return 0


if __name__ == "__main__":
    sys.exit(main())
