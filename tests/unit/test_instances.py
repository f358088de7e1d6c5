"""Engine instances: Triton's instance names, core shares, per-instance config, generated instance groups."""

from __future__ import annotations

import os

import pytest
from google.protobuf import text_format
from tritonclient.grpc import model_config_pb2

from client.metrics import parse_engines, server_totals
from lepton.config import EngineConfig
from lepton.instances import (
    InstanceSlot, instance_config, instance_slots, pin_process, placement_of,
    set_instance_groups, split_cores, write_instance_groups,
)

CPU_GROUP = {"instance_group": [{"name": "lepton_0", "kind": "KIND_CPU", "count": 2, "gpus": []}]}
GPU_GROUPS = {"instance_group": [{"name": "lepton_0", "kind": "KIND_GPU", "count": 1, "gpus": [0]},
                                 {"name": "lepton_1", "kind": "KIND_GPU", "count": 1, "gpus": [1]}]}


def _args(name: str, kind: str = "CPU", device_id: int = 0) -> dict[str, str]:
    return {"model_instance_name": name, "model_instance_kind": kind, "model_instance_device_id": str(device_id)}


@pytest.mark.parametrize("cores,count,expected", [
    ([0, 1], 2, [(0,), (1,)]),
    ([0, 1, 2, 3, 4], 2, [(0, 1, 2), (3, 4)]),
    ([4, 2, 6, 8], 4, [(2,), (4,), (6,), (8,)]),
    ([0, 1, 2, 3, 4, 5, 6], 3, [(0, 1, 2), (3, 4), (5, 6)]),
    ([0, 1], 3, [(0,), (1,), (0,)]),  # more instances than cores: one core each, shared
    ([3], 1, [(3,)]),
])
def test_split_cores_gives_disjoint_contiguous_shares(cores, count, expected):
    assert [split_cores(cores, i, count) for i in range(count)] == expected


def test_instance_slots_follow_tritons_naming():
    assert instance_slots(CPU_GROUP) == [InstanceSlot("lepton_0_0", "CPU", 0), InstanceSlot("lepton_0_1", "CPU", 0)]
    one = {"instance_group": [{"name": "lepton_0", "kind": "KIND_CPU", "count": 1}]}
    assert instance_slots(one) == [InstanceSlot("lepton_0", "CPU", 0)]
    assert instance_slots(GPU_GROUPS) == [InstanceSlot("lepton_0", "GPU", 0), InstanceSlot("lepton_1", "GPU", 1)]
    several = {"instance_group": [{"name": "g", "kind": "KIND_GPU", "count": 1, "gpus": [2, 3]}]}
    assert instance_slots(several) == [InstanceSlot("g", "GPU", 2), InstanceSlot("g", "GPU", 3)]


def test_cpu_instances_split_the_cores_and_the_kv_budget():
    config = EngineConfig.from_parameters({"model_dir": "/m", "kv_cache_memory_bytes": "1G"})
    placements = [placement_of(_args(f"lepton_0_{i}"), CPU_GROUP, [0, 1, 2, 3]) for i in range(2)]
    assert [(p.index, p.num_instances, p.cpu_cores, p.label) for p in placements] == \
        [(0, 2, (0, 1), "0"), (1, 2, (2, 3), "1")]
    mine = instance_config(config, placements[1])
    assert mine.runner.num_threads == 2 == mine.runner.compute_threads
    assert mine.cache.kv_cache_memory_bytes == 512 << 20
    assert mine.scheduler == config.scheduler  # NOTE: seats and queue are each engine's own


def test_explicit_threads_are_capped_at_the_instances_cores():
    config = EngineConfig.from_parameters({"model_dir": "/m", "num_threads": "4", "kv_cache_memory_fraction": "0.5"})
    placement = placement_of(_args("lepton_0_0"), CPU_GROUP, [0, 1, 2])
    mine = instance_config(config, placement)
    assert placement.cpu_cores == (0, 1) and mine.runner.num_threads == 2
    assert mine.cache.kv_cache_memory_fraction == 0.25


def test_a_single_cpu_instance_keeps_its_config():
    config = EngineConfig.from_parameters({"model_dir": "/m"})
    one = {"instance_group": [{"name": "lepton_0", "kind": "KIND_CPU", "count": 1}]}
    placement = placement_of(_args("lepton_0"), one, [0, 1])
    assert placement.cpu_share == 1 and placement.cpu_cores == (0, 1)
    assert instance_config(config, placement) == config


def test_gpu_instances_run_on_their_gpu_with_the_whole_budget():
    config = EngineConfig.from_parameters({"model_dir": "/m", "runner": "tensorrt", "kv_cache_memory_bytes": "4G"})
    placement = placement_of(_args("lepton_1", "GPU", 1), GPU_GROUPS, [0, 1])
    assert (placement.index, placement.num_instances, placement.kind, placement.cpu_cores) == (1, 2, "GPU", ())
    mine = instance_config(config, placement)
    assert mine.runner.device_id == 1 and mine.cache.kv_cache_memory_bytes == 4 << 30


def test_an_unknown_instance_serves_alone():
    placement = placement_of(_args("other_7"), CPU_GROUP, [0, 1])
    assert (placement.index, placement.num_instances, placement.cpu_cores) == (0, 1, (0, 1))


def _config():
    config = model_config_pb2.ModelConfig(name="lepton")
    config.instance_group.add(count=1, kind="KIND_CPU")
    return config


def _groups(config) -> list[str]:
    return [" ".join(text_format.MessageToString(g).split()) for g in config.instance_group]


def test_generated_cpu_instance_groups():
    config = _config()
    set_instance_groups(config, 3)
    assert _groups(config) == ["count: 3 kind: KIND_CPU"]


def test_generated_gpu_instance_groups_put_one_instance_on_each_gpu():
    config = _config()
    set_instance_groups(config, 0, gpus=(0, 1))
    assert _groups(config) == ["count: 1 gpus: 0 kind: KIND_GPU", "count: 1 gpus: 1 kind: KIND_GPU"]


def test_the_served_repository_gets_the_instances_and_lepton_infer_stays(tmp_path):
    from lepton.server import SOURCE_REPOSITORY

    for model in ("lepton", "lepton_infer"):
        (tmp_path / model).mkdir()
        (tmp_path / model / "config.pbtxt").write_text((SOURCE_REPOSITORY / model / "config.pbtxt").read_text())
    forwarder = (tmp_path / "lepton_infer" / "config.pbtxt").read_text()
    write_instance_groups(tmp_path, 2)
    config = text_format.Parse((tmp_path / "lepton" / "config.pbtxt").read_text(), model_config_pb2.ModelConfig())
    assert _groups(config) == ["count: 2 kind: KIND_CPU"] and config.model_transaction_policy.decoupled
    assert (tmp_path / "lepton_infer" / "config.pbtxt").read_text() == forwarder


def test_zero_instances_are_refused():
    with pytest.raises(ValueError, match="instances: must be >= 1"):
        set_instance_groups(_config(), 0)


def test_pin_process_pins_every_thread(tmp_path):
    import threading

    before = os.sched_getaffinity(0)
    core = min(before)
    started, stop = threading.Event(), threading.Event()
    worker = threading.Thread(target=lambda: (started.set(), stop.wait()))
    worker.start()
    started.wait()
    try:
        pin_process([core])
        assert os.sched_getaffinity(worker.native_id) == {core} == os.sched_getaffinity(0)
    finally:
        stop.set()
        worker.join()
        os.sched_setaffinity(0, before)


def test_metrics_of_engine_instances_sum_to_the_servers():
    text = "\n".join([
        "# TYPE lepton_num_waiting gauge",
        'lepton_num_waiting{engine="0"} 3', 'lepton_num_waiting{engine="1"} 4',
        'lepton_kv_blocks_used{engine="0"} 10', 'lepton_kv_blocks_used{engine="1"} 30',
        'lepton_kv_blocks_total{engine="0"} 100', 'lepton_kv_blocks_total{engine="1"} 100',
        'lepton_kv_cache_usage{engine="0"} 0.1', 'lepton_kv_cache_usage{engine="1"} 0.3',
        'lepton_time_to_first_token_seconds_bucket{engine="1",le="+Inf"} 5',
        'nv_inference_count{model="lepton",version="1"} 8',
    ])
    engines = parse_engines(text)
    assert engines["0"] == {"lepton_num_waiting": 3, "lepton_kv_blocks_used": 10, "lepton_kv_blocks_total": 100,
                            "lepton_kv_cache_usage": 0.1}
    totals = server_totals(engines)
    assert totals["lepton_num_waiting"] == 7 and totals["lepton_kv_blocks_used"] == 40
    assert totals["lepton_kv_cache_usage"] == pytest.approx(0.2)
    assert totals["lepton_time_to_first_token_seconds_bucket"] == 5 and "nv_inference_count" not in totals
    assert server_totals(parse_engines("lepton_num_running 2")) == {"lepton_num_running": 2}
