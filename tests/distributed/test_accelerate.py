"""Accelerate 1.15 over an adapted model on a CPU host, 2 ranks: which launches give DDP, and that DDP trains as one
process would.

Rank side: tests/distributed/ranks/accelerate_ddp.py (3 AdamW steps through ``Accelerator.prepare``; rank 0 adds
the single-process reference over the whole global batches). What Accelerate does on CPU, as measured here:

- ``torchrun`` + ``Accelerator(cpu=True)``: DDP on gloo (``MULTI_CPU``); equals the single-process run;
  ``save_state``/``load_state`` resume to the same adapter.
- ``accelerate launch`` with a config ``distributed_type: MULTI_GPU, num_processes: 2`` starts 2 processes through
  torchrun; with ``Accelerator(cpu=True)`` in the script that is the same correct DDP. The config's ``use_cpu: true``
  does not reach the script on this path (the multi-GPU launcher does not set ``ACCELERATE_USE_CPU``), so a plain
  ``Accelerator()`` there finds no GPU and says ``DistributedType.NO``: each rank trains alone on the whole data
  (no sharding, no all-reduce), twice the work, without an error or a warning, although Accelerate did start a
  2-rank gloo group. ``ACCELERATE_USE_CPU=true`` in the launch's environment fixes that without a code change.
- ``distributed_type: MULTI_CPU, num_processes: 2`` (the CPU choice ``accelerate config`` offers) starts **one**
  process: Accelerate's multi-CPU launch goes through mpirun or a launch per node, never torchrun.
- FSDP2 (``FullyShardedDataParallelPlugin(fsdp_version=2)``, or a config ``distributed_type: FSDP`` with
  ``fsdp_version: 2``): on CPU Accelerate keeps ``MULTI_CPU`` and wraps the model in DDP; the plugin is dropped
  (``AcceleratorState`` switches to FSDP only for accelerator device types) without a warning. The tests below pin
  these facts so that a change in Accelerate shows up here.
"""

from __future__ import annotations

import sys

import pytest
import torch
import yaml

from tests.distributed.launch import RANKS, run_launcher, run_ranks

TOL = dict(rtol=1e-5, atol=1e-6)  # DDP's shard average against one batch: float rounding only (measured < 2e-7)
ADAPTER_BYTES = 1792 * 4  # LoRA r=4 on q/v of the tiny llama, float32

MULTI_GPU = {"distributed_type": "MULTI_GPU", "num_processes": 2, "use_cpu": True}
MULTI_CPU = {"distributed_type": "MULTI_CPU", "num_processes": 2, "use_cpu": True}
FSDP2 = {"distributed_type": "FSDP", "num_processes": 2, "use_cpu": True,
         "fsdp_config": {"fsdp_version": 2, "fsdp_auto_wrap_policy": "NO_WRAP", "fsdp_reshard_after_forward": True,
                         "fsdp_offload_params": False, "fsdp_state_dict_type": "SHARDED_STATE_DICT",
                         "fsdp_cpu_ram_efficient_loading": False}}


def accelerate_launch(tmp_path, config: dict, *args: str, world_size: int = 2, env: dict | None = None) -> list[dict]:
    """``accelerate launch --config_file <config as YAML>`` of the rank script on 127.0.0.1 and a free port (through
    ``python -m accelerate.commands.launch``: the venv's, whatever ``PATH`` says); ``env``: extra variables."""
    path = tmp_path / "accelerate.yaml"
    path.write_text(yaml.safe_dump({"compute_environment": "LOCAL_MACHINE", "num_machines": 1, "machine_rank": 0,
                                    "mixed_precision": "no", **config}))
    return run_launcher(lambda port: [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(path),
                                      "--main_process_ip", "127.0.0.1", "--main_process_port", str(port),
                                      str(RANKS / "accelerate_ddp.py"), *args], world_size=world_size, env=env)


def _assert_same_as_single_process(ranks: list[dict]) -> None:
    """Each rank's loss is its shard's; their mean is the global batch's. Both ranks end with the same adapter
    (bitwise), equal to the single-process run's, which moved away from the initial one."""
    reference = ranks[0]["reference"]
    shard_losses = torch.tensor([r["losses"] for r in ranks])
    torch.testing.assert_close(shard_losses.mean(0), torch.tensor(reference["losses"]), **TOL)
    for name, expected in reference["adapter"].items():
        assert ranks[0]["adapter"][name] == ranks[1]["adapter"][name], name
        torch.testing.assert_close(torch.tensor(ranks[0]["adapter"][name]), torch.tensor(expected), **TOL, msg=name)
        assert (torch.tensor(expected) - torch.tensor(reference["initial"][name])).abs().max() > 1e-3, name


def _assert_ddp(ranks: list[dict]) -> None:
    """Accelerate set up DDP on gloo over both ranks, sharded the data, all-reduced only the adapter gradients and
    left the base weights alone; and the run equals the single-process one."""
    assert [r["rank"] for r in ranks] == [0, 1]
    for result in ranks:
        assert result["distributed_type"] == "DistributedType.MULTI_CPU" and result["backend"] == "gloo"
        assert result["num_processes"] == result["dist_world"] == 2
        assert result["wrapper"] == "DistributedDataParallel" and result["dtensor_params"] == 0
        assert result["shards_ok"] == [True] * 3  # rank r got rows 2r, 2r+1 of each global batch
        assert result["trainable_bytes"] == ADAPTER_BYTES and result["step_bytes"] == [ADAPTER_BYTES] * 3
        assert result["frozen_changed"] == []
    _assert_same_as_single_process(ranks)


def test_torchrun_with_a_cpu_accelerator_is_ddp_and_resumes(tmp_path):
    ranks = run_ranks("accelerate_ddp.py")
    _assert_ddp(ranks)
    for result in ranks:  # save_state after step 2, load_state into fresh weights, step 3: the same adapter
        assert result["fresh_differs"]
        assert result["resume_loss"] == result["losses"][-1]
        assert result["resumed_adapter"] == result["adapter"]


def test_accelerate_launch_multi_gpu_config_with_a_cpu_accelerator_is_ddp(tmp_path):
    _assert_ddp(accelerate_launch(tmp_path, MULTI_GPU, "--no-resume"))


def test_accelerate_launch_multi_gpu_config_with_a_default_accelerator_trains_each_rank_alone(tmp_path):
    """Pinned pitfall: 2 processes and a live gloo group, yet Accelerate says ``NO``: no DDP, no sharding, no
    all-reduce; each rank trains the whole data by itself (here to the single-process result, twice)."""
    ranks = accelerate_launch(tmp_path, MULTI_GPU, "--no-resume", "--default")
    assert [r["rank"] for r in ranks] == [0, 1]
    for result in ranks:
        assert result["distributed_type"] == "DistributedType.NO" and result["backend"] is None
        assert result["num_processes"] == 1 and result["dist_world"] == 2
        assert result["wrapper"] == "AdaptedLlamaForCausalLM" and result["step_bytes"] == [0] * 3
        torch.testing.assert_close(torch.tensor(result["losses"]), torch.tensor(ranks[0]["reference"]["losses"]),
                                   **TOL)


def test_accelerate_use_cpu_in_the_environment_makes_a_default_accelerator_ddp(tmp_path):
    """The fix for the pitfall above that needs no change to a training script: ``ACCELERATE_USE_CPU=true`` in the
    launch's environment (the config's ``use_cpu`` does not set it on the multi-GPU path)."""
    _assert_ddp(accelerate_launch(tmp_path, MULTI_GPU, "--no-resume", "--default", env={"ACCELERATE_USE_CPU": "true"}))


def test_accelerate_launch_multi_cpu_config_starts_one_process(tmp_path):
    """Pinned pitfall: ``num_processes: 2`` is ignored; one process, not distributed (``run_launcher`` also fails
    if a second rank reports)."""
    (only,) = accelerate_launch(tmp_path, MULTI_CPU, "--no-resume", world_size=1)
    assert only["rank"] == 0 and only["distributed_type"] == "DistributedType.NO"
    assert only["num_processes"] == only["dist_world"] == 1 and only["wrapper"] == "AdaptedLlamaForCausalLM"


@pytest.mark.parametrize("how", ["plugin-under-torchrun", "config-under-accelerate-launch"])
def test_fsdp2_on_cpu_falls_back_to_ddp_silently(tmp_path, how):
    """Pinned fact: asking for FSDP2 on a CPU host gives DDP (``MULTI_CPU``, no plugin, no DTensor parameters),
    which trains correctly. When Accelerate starts honouring FSDP2 on CPU this test fails: then fxpeft's FSDP2
    path (tests/distributed/*fsdp*) is what Accelerate runs and this expectation must change."""
    if how == "plugin-under-torchrun":
        ranks = run_ranks("accelerate_ddp.py", "--no-resume", "--fsdp2")
    else:
        ranks = accelerate_launch(tmp_path, FSDP2, "--no-resume")
    for result in ranks:
        assert not result["fsdp_plugin"] and not result["is_fsdp2"]
    _assert_ddp(ranks)
