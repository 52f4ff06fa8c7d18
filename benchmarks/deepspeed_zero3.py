"""PEFT LoRA and fxpeft LoRA trained under DeepSpeed ZeRO-3 with ``offload_param: cpu`` (issue 19, item 5).

Each contender builds the same llama (tiny by default, ``--hidden``/``--layers``/``--vocab`` for a larger one; same
seed, so the same base weights and the same initial adapter), adds LoRA on ``q_proj``/``v_proj`` (r=4, alpha=8, no
dropout), goes through ``deepspeed.initialize`` with a ZeRO-3 config
that partitions the parameters and offloads them to CPU memory, and trains ``--steps`` steps on the same batches.
One JSON line per contender on stdout (rank 0)::

    {"contender": "peft", "status": "ok", "losses": [...], "peak_mem_mb": ..., "mem_kind": "cuda_max_allocated", ...}

and a failed contender gives ``"status": "fail"`` with the error, its traceback on stderr, and a ``FAIL ...`` line;
the script then exits 1 after the other contenders have run (``--expect-fail NAME``: that contender's failure is an
``XFAIL`` line and does not count). A last line ``SUMMARY deepspeed_zero3: ...`` sums up. Contenders:

* ``peft``: ``peft.get_peft_model``. Its LoRA layers are modules the forward calls, so ZeRO-3's forward pre-hooks
  gather each base weight before it is read.
* ``fxpeft``: ``fxpeft.transform``, then ``fxpeft.distributed.zero3.prepare_zero3(engine)`` after
  ``deepspeed.initialize`` (the model would call it itself on its first call; here it is called to read its ledger).
  Its captured graph reads the base model's parameters by name and never calls the modules
  that own them, so ZeRO-3's module hooks never fire for it; ``prepare_zero3`` gathers each base layer's weights while
  its part of the graph runs (forward, and again for its backward) and the root's (embeddings, final norm, LM head,
  adapters) from the start of the forward to the end of the backward, through DeepSpeed's ``param.all_gather()`` /
  ``param.partition()``; DeepSpeed's own gradient hooks reduce-scatter the adapters' gradients. The line adds
  ``gathered_peak_mb`` (the most fxpeft held gathered at once), ``base_mb`` and ``layer_mb``.

fxpeft must capture every argument signature before ``deepspeed.initialize`` (here: ``example_kwargs`` with the
batch's shapes): a capture afterwards runs torch.export through modules that now carry ZeRO-3's hooks (``AttributeError:
'FakeTensor' object has no attribute 'ds_status'``), and a base built under ``deepspeed.zero.Init`` cannot be
captured at all (its parameters are empty from the start: ``'weight' must be 2-D, got 1-D`` in ``transform``).

Needs: ``deepspeed`` (0.19.8 tried), torch, transformers (5.x), peft, fxpeft (a C++ compiler and ``ninja`` only
with ``--shm-op`` on CPU). Run it with any launcher, or alone (one rank)::

    deepspeed --num_gpus 1 benchmarks/deepspeed_zero3.py
    torchrun --nproc_per_node 2 --master_addr 127.0.0.1 benchmarks/deepspeed_zero3.py       # GPUs, NCCL
    DS_ACCELERATOR=cpu python -m torch.distributed.run --nproc_per_node 2 --master_addr 127.0.0.1 \\
        benchmarks/deepspeed_zero3.py --device cpu                                          # CPU, gloo
    python benchmarks/deepspeed_zero3.py --device cpu --contenders fxpeft --hidden 1024 --layers 8 --vocab 32000

On CPU, DeepSpeed's CPU accelerator wants oneccl_bindings_for_pytorch (and intel_extension_for_pytorch for speed);
without them it falls back to gloo, which is enough here; its shared-memory all-reduce op (JIT-compiled with g++ and
ninja on first use, minutes on 2 cores) is turned off unless ``--shm-op``. ``peak_mem_mb`` is
``torch.cuda.max_memory_allocated`` on CUDA over the training steps (``peak_mem_mb_init``: building, capturing and
``deepspeed.initialize``). On CPU it is the peak RSS sampled every millisecond over the training steps
(``rss_train_growth_mb``: that peak less the RSS when the steps began), and ``cpu_peak_rss_process_mb`` the process's
``ru_maxrss`` (never reset, so it includes building the whole model on every rank, and earlier contenders: use
``--contenders`` with one name per run to compare).
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import re
import resource
import socket
import sys
import threading
import time
import traceback

import torch

CONTENDERS = ("peft", "fxpeft")
TARGETS = ["q_proj", "v_proj"]


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--contenders", default="peft,fxpeft", help=f"comma-separated, from {', '.join(CONTENDERS)}")
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--batch", type=int, default=2, help="micro batch per rank")
    parser.add_argument("--seq", type=int, default=16)
    parser.add_argument("--device", choices=("auto", "cuda", "cpu"), default="auto")
    parser.add_argument("--offload", choices=("cpu", "none"), default="cpu", help="ZeRO-3 offload_param device")
    parser.add_argument("--lr", type=float, default=1e-2)
    parser.add_argument("--hidden", type=int, default=64, help="llama hidden size (intermediate: 2x, heads: hidden/16)")
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--vocab", type=int, default=128)
    parser.add_argument("--shm-op", action="store_true", help="on CPU, let DeepSpeed build and use its shm op")
    parser.add_argument("--expect-fail", default="", help="comma-separated contenders whose failure is expected "
                        "(reported XFAIL, not counted; a pass is reported XPASS)")
    parser.add_argument("--timeout", type=float, default=300, help="seconds a collective may wait (a rank that failed)")
    parser.add_argument("--local_rank", "--local-rank", type=int, default=None, help="set by the deepspeed launcher")
    args = parser.parse_args(argv)
    args.contenders = [name.strip() for name in args.contenders.split(",") if name.strip()]
    args.expect_fail = {name.strip() for name in args.expect_fail.split(",") if name.strip()}
    unknown = sorted((set(args.contenders) | args.expect_fail) - set(CONTENDERS))
    if unknown:
        parser.error(f"unknown contenders {unknown}; choose from {list(CONTENDERS)}")
    return args


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def setup(args):
    """The device, and the process group (one rank of its own when no launcher set one up)."""
    if args.device == "auto":
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.device == "cpu":
        os.environ.setdefault("DS_ACCELERATOR", "cpu")  # before deepspeed is imported: it picks its accelerator then
    if "RANK" not in os.environ:
        os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", LOCAL_WORLD_SIZE="1",
                          MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()))
    import deepspeed  # (ImportError is the caller's clear message)

    if args.device == "cpu" and not args.shm_op:  # gloo's collectives serve; DeepSpeed keeps edits to this table
        deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False

    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if args.device == "cuda":
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
    else:
        device = torch.device("cpu")
    deepspeed.init_distributed(dist_backend="nccl" if args.device == "cuda" else "gloo",
                               timeout=datetime.timedelta(seconds=args.timeout))
    return device


def ds_config(args) -> dict:
    zero = {"stage": 3, "stage3_param_persistence_threshold": 0,  # small tensors are partitioned too
            "stage3_prefetch_bucket_size": 0, "stage3_max_live_parameters": 0, "stage3_max_reuse_distance": 0}
    if args.offload == "cpu":
        zero["offload_param"] = {"device": "cpu", "pin_memory": args.device == "cuda"}
    return {"train_micro_batch_size_per_gpu": args.batch, "gradient_accumulation_steps": 1,
            "zero_optimization": zero, "zero_force_ds_cpu_optimizer": False, "gradient_clipping": 0.0,
            "steps_per_print": 10**9, "wall_clock_breakdown": False}


def llama(args):
    """A llama of ``--hidden``/``--layers``/``--vocab`` (default: the tiny one of the tests), seeded."""
    from transformers import LlamaConfig, LlamaForCausalLM

    heads = max(args.hidden // 16, 1)
    config = LlamaConfig(hidden_size=args.hidden, intermediate_size=2 * args.hidden, num_hidden_layers=args.layers,
                         num_attention_heads=heads, num_key_value_heads=max(heads // 2, 1), vocab_size=args.vocab)
    torch.manual_seed(0)
    return LlamaForCausalLM(config).float()


def batches(args, device) -> list[torch.Tensor]:
    """One batch (per rank) repeated for every step, so that the loss falls if the adapter trains."""
    generator = torch.Generator().manual_seed(1234 + torch.distributed.get_rank())
    ids = torch.randint(0, args.vocab, (args.batch, args.seq), generator=generator).to(device)
    return [ids] * args.steps


def build(name: str, args, example: torch.Tensor):
    """The adapted model for contender ``name``, before deepspeed.initialize (seeded alike for every contender), on
    ``example``'s device: fxpeft captures its graph there (a graph captured on the CPU makes CPU tensors)."""
    model = llama(args).to(example.device)
    torch.manual_seed(1)
    if name == "peft":
        import peft

        config = peft.LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=TARGETS)
        return peft.get_peft_model(model, config)
    import fxpeft

    # Capture now, while the base weights are whole: after deepspeed.initialize a capture would read partitions.
    return fxpeft.transform(model, fxpeft.LoRA(targets=TARGETS, r=4, alpha=8, dropout=0.0),
                            example_kwargs=dict(input_ids=example, labels=example))


@torch.no_grad()
def seed_adapters(model: torch.nn.Module, layers: int) -> None:
    """The same initial LoRA weights under both libraries (each draws its own otherwise): ``lora_A`` of layer ``i``'s
    ``q_proj``/``v_proj`` from a generator seeded by the site, ``lora_B`` zero, as PEFT starts it."""
    sites = 0
    for name, param in model.named_parameters():
        found = re.search(r"layers[./](\d+)[./]self_attn[./]([qv])_proj\.lora_([AB])", name)
        if not param.requires_grad or found is None:
            continue
        layer, proj, which = found.groups()
        if which == "B":
            param.zero_()
            continue
        generator = torch.Generator().manual_seed(100 * int(layer) + (proj == "v"))
        bound = 1 / math.sqrt(param.shape[1])
        param.copy_(torch.rand(param.shape, generator=generator) * 2 * bound - bound)
        sites += 1
    if sites != 2 * layers:  # layers x (q_proj, v_proj)
        names = [name for name, _ in model.named_parameters()]
        raise LookupError(f"seed_adapters found {sites} lora_A weights, not {2 * layers}, among {names}")


def base_weight(model: torch.nn.Module) -> torch.nn.Parameter:
    """layer 0's q_proj base weight, under either wrapper (PEFT: ``...q_proj.base_layer.weight``)."""
    for name, param in model.named_parameters():
        if "layers.0.self_attn.q_proj" in name and name.endswith("weight") and "lora" not in name:
            return param
    raise LookupError("no layers.0.self_attn.q_proj weight")


def peak_memory(device) -> tuple[float, str]:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20, "cuda_max_allocated"
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, "cpu_peak_rss_process"


def rss_mb() -> float:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


class RssPeak:
    """The peak RSS of this process while the block runs, sampled every millisecond by a thread (CPU runs)."""

    def __enter__(self):
        self.start = self.peak = rss_mb()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def _sample(self):
        while not self._stop.wait(0.001):
            self.peak = max(self.peak, rss_mb())

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, rss_mb())


def parameter_mb(parameters) -> float:
    """Megabytes of these parameters whole (ZeRO-3's ``ds_numel``: their size before partitioning)."""
    return sum(getattr(p, "ds_numel", p.numel()) * p.element_size() for p in parameters) / 2**20


def run_contender(name: str, args, device, data: list[torch.Tensor]) -> dict:
    import deepspeed

    result: dict = {"contender": name, "status": "fail", "stage": "build", "losses": []}
    began = time.perf_counter()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    try:
        model = build(name, args, data[0])
        seed_adapters(model, args.layers)
        trainable = [param for param in model.parameters() if param.requires_grad]
        result["trainable_params"] = sum(param.numel() for param in trainable)
        result["stage"] = "initialize"
        optimizer = torch.optim.AdamW(trainable, lr=args.lr)
        engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, config=ds_config(args))
        units = None
        if name == "fxpeft":
            from fxpeft.distributed.zero3 import prepare_zero3

            units = prepare_zero3(engine)
            layers = [unit.module for unit in units.layers.values()]
            result["base_mb"] = round(parameter_mb(model.base_model.parameters()), 3)
            result["layer_mb"] = round(max(parameter_mb(layer.parameters()) for layer in layers), 3)
        weight = base_weight(model)
        result["weight_numel_after_init"] = weight.numel()  # what a read by name sees: 0 when partitioned
        result["weight_ds_numel"] = getattr(weight, "ds_numel", None)
        result["weight_ds_status"] = str(getattr(weight, "ds_status", None))
        result["weight_device_after_init"] = str(getattr(weight, "ds_tensor", weight).device)
        result["peak_mem_mb_init"] = round(peak_memory(device)[0], 2)
        if device.type == "cuda":  # peak_mem_mb: the training steps only
            torch.cuda.reset_peak_memory_stats(device)
        with RssPeak() as rss:
            for step, ids in enumerate(data):
                result["stage"] = f"step {step} forward"
                loss = engine(input_ids=ids, labels=ids).loss
                result["stage"] = f"step {step} backward"
                engine.backward(loss)
                result["stage"] = f"step {step} optimizer"
                engine.step()
                result["losses"].append(loss.item())
        result["rss_train_start_mb"], result["rss_train_peak_mb"] = round(rss.start, 2), round(rss.peak, 2)
        result["rss_train_growth_mb"] = round(rss.peak - rss.start, 2)
        if units is not None:
            result["gathered_peak_mb"] = round(units.ledger.peak_bytes / 2**20, 3)
        if not all(math.isfinite(value) for value in result["losses"]):
            raise FloatingPointError(f"non-finite losses {result['losses']}")
        if len(result["losses"]) > 1 and result["losses"][-1] >= result["losses"][0]:  # the same batch every step
            raise AssertionError(f"the adapter did not train: losses {result['losses']} on one repeated batch")
        result["status"], result["stage"] = "ok", "done"
    except Exception as error:  # a contender's failure is a result: report it and go on with the next
        result["error"] = f"{type(error).__name__}: {error}"[:2000]
        print(f"[rank {torch.distributed.get_rank()}] {name} failed at {result['stage']}:\n{traceback.format_exc()}",
              file=sys.stderr, flush=True)
    result["seconds"] = round(time.perf_counter() - began, 3)
    if device.type == "cuda":
        result["peak_mem_mb"], result["mem_kind"] = round(peak_memory(device)[0], 2), "cuda_max_allocated"
    else:
        result["peak_mem_mb"], result["mem_kind"] = result.get("rss_train_peak_mb"), "cpu_rss_peak_training_steps"
        result["cpu_peak_rss_process_mb"] = round(peak_memory(device)[0], 2)
    return result


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        device = setup(args)
    except ImportError as error:
        print(f"FAIL deepspeed_zero3: cannot import deepspeed ({error!r}); pip install deepspeed (it imports hjson, "
              "msgpack, einops, pydantic, psutil, tqdm; ninja and a C++ compiler build its CPU ops)", file=sys.stderr)
        return 2
    import deepspeed

    rank, world = torch.distributed.get_rank(), torch.distributed.get_world_size()
    versions = {"torch": torch.__version__, "deepspeed": deepspeed.__version__, "device": str(device),
                "world_size": world, "offload_param": args.offload,
                "accelerator": deepspeed.get_accelerator().device_name(),
                "backend": torch.distributed.get_backend()}
    for package in ("transformers", "peft", "fxpeft"):
        try:
            versions[package] = getattr(__import__(package), "__version__", "?")
        except ImportError as error:
            versions[package] = f"missing: {error}"
    if rank == 0:
        print(json.dumps({"versions": versions}), flush=True)
    data = batches(args, device)
    failed, results = [], {}
    for name in args.contenders:
        result = run_contender(name, args, device, data)
        result["rank"] = rank
        reference = results.get("peft")
        if name != "peft" and reference and reference["status"] == "ok" and result["status"] == "ok":
            result["loss_max_abs_diff_vs_peft"] = max(abs(a - b) for a, b in zip(result["losses"], reference["losses"]))
        results[name] = result
        expected = name in args.expect_fail
        if result["status"] != "ok":
            word = "XFAIL" if expected else "FAIL"
            print(f"{word} {name} (rank {rank}) at {result['stage']}: {result.get('error')}", file=sys.stderr,
                  flush=True)
            if not expected:
                failed.append(name)
        elif expected and rank == 0:
            print(f"XPASS {name}: expected to fail, but it trained", file=sys.stderr, flush=True)
        if rank == 0 or result["status"] != "ok":
            print(json.dumps(result), flush=True)
    if rank == 0:
        xfail = sorted(args.expect_fail & set(results))
        print(f"SUMMARY deepspeed_zero3: {sum(r['status'] == 'ok' for r in results.values())}/{len(results)} "
              "contenders ok" + (f", failed: {', '.join(failed)}" if failed else "")
              + (f", expected to fail: {', '.join(xfail)}" if xfail else ""), flush=True)
    torch.distributed.barrier()
    torch.distributed.destroy_process_group()
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
