"""Rank script: ``fxpeft.distributed.fully_shard`` on other families than llama, against one process.

GPT-2 (``transformer.h.N``, Conv1D linears) and T5 (``encoder.block.N`` and
``decoder.block.N``; the first encoder block writes its position buckets in place) each get one FSDP2 unit per
numbered layer, found in the graph. Two SGD steps on each rank's half of a batch in eval mode (these configs have
dropout, whose masks would differ between a rank's half and the same rows in one process), gradients on; the
reference is one process over the same halves, gradients accumulated. Reported: the sharded layers, both losses and
the largest difference of the gathered final adapter.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

import fxpeft
import fxpeft.distributed as fd
from tests.distributed.ranks.common import main, start
from tests.models import hf_inputs, hf_model

TARGETS = {"gpt2": ["c_attn"], "t5": ["q", "v"]}


def build(family: str, example: dict) -> fxpeft.AdaptedModel:
    adapted = fxpeft.transform(hf_model(family), [fxpeft.LoRA(targets=TARGETS[family], r=4, alpha=8)],
                               example_kwargs=example)
    generator = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for parameter in adapted.adapters.parameters():
            parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.1)
    return adapted.eval()


def loss_of(model, inputs: dict) -> torch.Tensor:
    return model(**inputs)[0].float().pow(2).mean()  # the first output: logits or the last hidden state


def run(family: str, rank: int, world: int) -> dict:
    inputs = hf_inputs(family, batch=2 * world, seq=8)
    halves = [{key: value[r * 2:(r + 1) * 2] for key, value in inputs.items()} for r in range(world)]
    reference = build(family, halves[0])
    optimizer = torch.optim.SGD([p for p in reference.parameters() if p.requires_grad], lr=0.5)
    expected = []
    for _ in range(2):
        total = 0.0
        for half in halves:
            loss = loss_of(reference, half) / world
            loss.backward()
            total += loss.item()
        optimizer.step()
        optimizer.zero_grad()
        expected.append(total)
    adapted = fd.fully_shard(build(family, halves[0]))
    optimizer = torch.optim.SGD([p for p in adapted.parameters() if p.requires_grad], lr=0.5)
    losses = []
    for _ in range(2):
        loss = loss_of(adapted, halves[rank])
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        mean = loss.detach().clone()
        dist.all_reduce(mean)
        losses.append(mean.item() / world)
    with fd.gathered_adapters(adapted):
        ours = adapted.adapter_state_dict()
        difference = max((ours[k] - v).abs().max().item() for k, v in reference.adapter_state_dict().items())
    return {"layers": list(fd.layer_modules(adapted)), "losses": losses, "expected_losses": expected,
            "adapter_difference": difference}


def body() -> dict:
    rank, world = start()
    return {family: run(family, rank, world) for family in TARGETS}


if __name__ == "__main__":
    main(body)
