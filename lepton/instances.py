"""Engine instances: which of a model's Triton instances this process is, and what it may use.

Triton starts one backend process per instance of `instance_group`. A KIND_GPU instance runs its
engine on its GPU; KIND_CPU instances split the cores available to the server between them (each
pinned to its own, one compute thread a core) and the KV cache budget. Plain Python: the Triton
model (model_repository/lepton/1/model.py) calls it with what Triton hands to `initialize`.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

from lepton.config import EngineConfig

logger = logging.getLogger(__name__)

CPU, GPU = "CPU", "GPU"
ENGINE_MODEL = "lepton"


@dataclass(frozen=True)
class InstanceSlot:
    """One instance of a Triton model, as Triton names and places it."""

    name: str  # Triton's instance name, e.g. lepton_0_1
    kind: str  # CPU or GPU
    device_id: int  # the GPU of a GPU instance; 0 for CPU instances


@dataclass(frozen=True)
class Placement:
    """Where one engine instance runs and its share of the host."""

    index: int  # among all the model's instances, in Triton's order
    num_instances: int
    kind: str  # CPU or GPU
    device_id: int  # the GPU of a GPU instance
    cpu_cores: tuple[int, ...]  # the cores a CPU instance computes on
    cpu_share: int  # instances sharing the host's cores and memory (the model's CPU instances)

    @property
    def label(self) -> str:
        """The value of the `engine` label on this instance's metrics."""
        return str(self.index)

    def describe(self) -> str:
        where = f"GPU {self.device_id}" if self.kind == GPU else f"cores {list(self.cpu_cores)}"
        return f"engine {self.index} of {self.num_instances} on {where}"


def instance_slots(model_config: Mapping[str, Any]) -> list[InstanceSlot]:
    """Every instance of model_config's instance_group, named and ordered as Triton creates them."""
    slots = []
    for group in model_config.get("instance_group", []):
        count = int(group.get("count", 1))
        kind = GPU if group.get("kind") == "KIND_GPU" else CPU
        devices = [int(g) for g in group.get("gpus", [])] if kind == GPU else [0]
        for device_id in devices:
            for c in range(count):
                # NOTE: Triton's naming: the group name, plus "_<c>" only when the group has count > 1.
                name = f"{group['name']}_{c}" if count > 1 else group["name"]
                slots.append(InstanceSlot(name, kind, device_id))
    return slots


def placement_of(args: Mapping[str, str], model_config: Mapping[str, Any],
                 available_cores: Sequence[int]) -> Placement:
    """This instance's placement, from the `args` Triton passes to initialize()."""
    slots = instance_slots(model_config)
    kind = GPU if args.get("model_instance_kind") == GPU else CPU
    me = InstanceSlot(args.get("model_instance_name", ""), kind, int(args.get("model_instance_device_id", 0)))
    if kind == CPU:
        me = dataclasses.replace(me, device_id=0)
    if me not in slots:  # NOTE: an unknown naming scheme: serve as the only instance rather than fail
        logger.warning("instance %s (%s %d) not found in instance_group; using all cores", me.name, kind, me.device_id)
        return Placement(0, 1, kind, me.device_id, tuple(sorted(available_cores)), 1)
    cpu_slots = [s for s in slots if s.kind == CPU]
    cores = split_cores(available_cores, cpu_slots.index(me), len(cpu_slots)) if kind == CPU else ()
    return Placement(slots.index(me), len(slots), kind, me.device_id, cores, max(1, len(cpu_slots)))


def split_cores(cores: Sequence[int], index: int, count: int) -> tuple[int, ...]:
    """Instance index's cores: contiguous, disjoint shares differing by at most one core.

    With more instances than cores, instances share: each gets one core, round robin.
    """
    cores = sorted(cores)
    if count > len(cores):
        return (cores[index % len(cores)],)
    size, extra = divmod(len(cores), count)
    start = index * size + min(index, extra)
    return tuple(cores[start:start + size + (index < extra)])


def instance_config(config: EngineConfig, placement: Placement) -> EngineConfig:
    """config for this instance: its GPU, or its cores' threads and its share of the KV budget."""
    if placement.kind == GPU:
        return dataclasses.replace(config, runner=dataclasses.replace(config.runner, device_id=placement.device_id))
    if placement.cpu_share == 1:
        return config
    runner, cache = config.runner, config.cache
    threads = len(placement.cpu_cores)
    if runner.num_threads > threads:
        logger.warning("num_threads=%d > the %d cores of %s: using %d", runner.num_threads, threads,
                       placement.describe(), threads)
    return dataclasses.replace(
        config,
        runner=dataclasses.replace(runner, num_threads=min(runner.num_threads or threads, threads)),
        # NOTE: the budget is the server's; CPU instances share one host's memory.
        cache=dataclasses.replace(
            cache,
            kv_cache_memory_bytes=cache.kv_cache_memory_bytes // placement.cpu_share,
            kv_cache_memory_fraction=cache.kv_cache_memory_fraction / placement.cpu_share,
        ),
    )


def pin_process(cores: Sequence[int]) -> None:
    """Pin every thread of this process (and the threads it starts later) to cores."""
    for task in os.listdir("/proc/self/task"):
        try:
            os.sched_setaffinity(int(task), cores)
        except ProcessLookupError:  # NOTE: a thread that ended meanwhile
            pass
    os.sched_setaffinity(0, cores)


def set_instance_groups(config, num_instances: int, gpus: Sequence[int] = ()) -> None:
    """Write the engine instances into lepton's ModelConfig message.

    gpus: one KIND_GPU instance on each (a group per GPU); else num_instances KIND_CPU instances.
    """
    # NOTE: lepton_infer is left as it is: it only forwards (BLS), on the CPU, whichever engine answers.
    if not gpus and num_instances < 1:
        raise ValueError(f"instances: must be >= 1, got {num_instances}")
    del config.instance_group[:]
    if gpus:
        for gpu in gpus:
            config.instance_group.add(count=1, kind="KIND_GPU", gpus=[gpu])
    else:
        config.instance_group.add(count=num_instances, kind="KIND_CPU")


def write_instance_groups(repo: Path, num_instances: int, gpus: Sequence[int] = ()) -> None:
    """set_instance_groups on lepton's config.pbtxt in a model repository (nothing to do when neither is given)."""
    if not (num_instances or gpus):
        return
    from google.protobuf import text_format
    from tritonclient.grpc import model_config_pb2

    config_file = repo / ENGINE_MODEL / "config.pbtxt"
    config = text_format.Parse(config_file.read_text(), model_config_pb2.ModelConfig())
    set_instance_groups(config, num_instances, gpus)
    config_file.write_text(text_format.MessageToString(config))
