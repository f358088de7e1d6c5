"""attention=slots: the fused-attention rewrite gives what the paged graph gives, step after step."""

from __future__ import annotations

import numpy as np
import onnx
import pytest

from lepton.batch import build_model_input
from lepton.config import CacheConfig, EngineConfig, RunnerConfig
from lepton.errors import ConfigError
from lepton.models.llama import ModelConfig
from lepton.runners import make_runner, open_folder
from lepton.runners.onnx_runner import OnnxRunner
from lepton.runners.slot_graph import SLOT_INPUTS, SlotGraphError, slot_graph
from lepton.runners.slot_cache import SCALE_BYTES, dequantize_rows
from lepton.runners.slot_runner import SlotRunner, kv_cache_dtype
from lepton.sampling_params import SamplingParams
from lepton.scheduler import ScheduledSeq, SchedulerOutput
from lepton.sequence import Sequence

BLOCK_SIZE = 8
# NOTE: the same weights and float32 arithmetic; rows are multiplied in other groupings and attention
# sums in another order (seen: up to 5e-5 on SmolLM2, whose logits reach ~30).
ATOL = 1e-4
# NOTE: float16 slots: keys and values rounded to 11 significant bits (seen: 1.8e-3 on the tiny models)
F16_ATOL = 1e-2
# NOTE: 8-bit rows: each value within half a step (max|row| / 254) of what was written
I8_ATOL = 0.1


def runner(export_dir, attention: str, deterministic: bool = False, kernel: str = "auto", kv_cache_dtype: str = "auto"):
    config = EngineConfig(model_dir=export_dir, cache=CacheConfig(block_size=BLOCK_SIZE, kv_cache_memory_bytes=4 << 20),
                          runner=RunnerConfig(runner="onnxruntime", attention=attention, deterministic=deterministic,
                                              attention_kernel=kernel, kv_cache_dtype=kv_cache_dtype))
    return make_runner(open_folder(config), config)


class Schedule:
    """Requests with fixed token lists and block tables; each step is (request, new tokens) in scheduled order."""

    def __init__(self, vocab_size: int) -> None:
        self.rng = np.random.default_rng(1)
        self.vocab_size = vocab_size
        self.seqs: dict[str, Sequence] = {}
        self.tables: dict[str, list[int]] = {}
        self.done: dict[str, int] = {}
        self.next_block = 0

    def add(self, request: str, tokens: list[int], shared_blocks: list[int] = (), cached: int = 0) -> None:
        self.seqs[request] = Sequence(request, tokens, SamplingParams(), 1 << 20)
        own = -(-len(tokens) // BLOCK_SIZE) - len(shared_blocks)
        self.tables[request] = list(shared_blocks) + list(range(self.next_block, self.next_block + own))
        self.next_block += own
        self.done[request] = cached

    def tokens(self, count: int) -> list[int]:
        return self.rng.integers(5, self.vocab_size, count).tolist()

    def step(self, rows: list[tuple[str, int]]):
        items = [ScheduledSeq(self.seqs[r], self.done[r], n, self.tables[r], True) for r, n in rows]
        for request, count in rows:
            self.done[request] += count
        return build_model_input(SchedulerOutput(items, sum(n for _, n in rows)), BLOCK_SIZE)


def run_schedule(paged, slots) -> float:
    """Prompts, chunked prefill beside decodes, batches that shrink and grow, a prefix-cache hit and
    a request id reused for other tokens; returns the largest logit difference."""
    plan = Schedule(paged.model_config.vocab_size)
    for request, length in (("a", 21), ("b", 5), ("c", 40)):
        plan.add(request, plan.tokens(length + 12))
    steps = [[("a", 21), ("b", 5)], [("a", 1), ("c", 16), ("b", 1)], [("b", 1), ("c", 24), ("a", 1)]]
    steps += [[("c", 1), ("a", 1), ("b", 1)]] * 3 + [[("c", 1)], [("a", 1), ("b", 1)]]
    worst = 0.0
    for rows in steps:
        batch = plan.step(rows)
        worst = max(worst, float(np.abs(paged.execute(batch).numpy() - slots.execute(batch).numpy()).max()))
    # NOTE: d and e share a's first two blocks (16 tokens, computed by a) and start after them: two
    # chunks after cached tokens in one step run through the paged graph, alone and beside decodes.
    for request in ("d", "e"):
        plan.add(request, plan.seqs["a"].all_token_ids[:16] + plan.tokens(20), plan.tables["a"][:2], cached=16)
    # NOTE: b finished; a new request named b with other tokens and blocks must not see the old slot.
    plan.add("b", plan.tokens(30))
    for rows in [[("d", 8), ("e", 8)], [("d", 4), ("a", 1), ("e", 4), ("c", 1)], [("b", 9), ("d", 1)],
                 [("a", 1), ("b", 1), ("c", 1), ("d", 1), ("e", 1)]]:
        batch = plan.step(rows)
        worst = max(worst, float(np.abs(paged.execute(batch).numpy() - slots.execute(batch).numpy()).max()))
    return worst


@pytest.mark.parametrize("kernel", ["lepton", "onnxruntime"])
@pytest.mark.parametrize("kind,exporter", [("llama", "torchscript"), ("llama", "dynamo"), ("qwen2", "torchscript"),
                                           ("llama3_rope", "torchscript")])
def test_slots_give_the_paged_graphs_logits_and_pools(tiny_exports, kind, exporter, kernel):
    export_dir, _ = tiny_exports(kind, exporter)
    paged, slots = runner(export_dir, "paged"), runner(export_dir, "slots", kernel=kernel)
    assert type(paged) is OnnxRunner and type(slots) is SlotRunner and slots.attention_kernel == kernel
    # NOTE: Lepton's SlotAttention writes the pools itself; after GroupQueryAttention's runs the runner copies them
    assert slots.pools_in_graph == (kernel == "lepton")
    assert run_schedule(paged, slots) <= ATOL
    for ref, got in zip(paged.k_pools + paged.v_pools, slots.k_pools + slots.v_pools):
        np.testing.assert_allclose(got, ref, atol=ATOL, rtol=0)
    assert slots.slots.moves >= 1, "the schedule should have moved a decode row down"
    assert slots.slots.refills >= 2, "the prefix hits and the row moved out should have been refilled"
    assert slots.paged_runs == 2, "the two steps with two chunks after cached tokens run the paged graph"
    assert slots.repeated_steps == 2, "the second and third of three steps of c, a, b decodes repeat the first"


@pytest.mark.parametrize("kv_cache_dtype,transient", [("float32", False), ("float32", True), ("float16", True),
                                                      ("int8", True)])
def test_decodes_of_the_same_requests_as_the_step_before_give_the_same_bits(tiny_exports, kv_cache_dtype, transient):
    export_dir, _ = tiny_exports("llama", "torchscript")
    fast, full = (runner(export_dir, "slots", kernel="lepton", kv_cache_dtype=kv_cache_dtype) for _ in range(2))
    full._repeat_decodes = lambda batch: None  # NOTE: every step through run_step's whole bookkeeping
    fast.transient_logits = transient  # NOTE: as the engine sets it; full's logits are new arrays every step
    plan = Schedule(fast.model_config.vocab_size)
    for request, length in (("a", 21), ("b", 5), ("c", 14)):
        plan.add(request, plan.tokens(length + 40))
    # NOTE: decodes crossing block boundaries, the order of the rows changed, a prompt beside them, a row
    # gone, then clear() (the slots dropped) and the same requests decoding on
    steps = [[("a", 21), ("b", 5)]] + [[("a", 1), ("b", 1)]] * 12 + [[("b", 1), ("a", 1)]] * 3
    steps += [[("b", 1), ("a", 1), ("c", 14)]] + [[("b", 1), ("a", 1), ("c", 1)]] * 4 + [[("a", 1), ("c", 1)]] * 3
    expected_repeats = 11 + 2 + 3 + 2
    kept = []  # NOTE: every step's logits as returned: without transient_logits no step may overwrite another's
    for number, rows in enumerate(steps):
        batch = plan.step(rows)
        repeats = fast.repeated_steps
        got = fast.execute(batch).numpy()
        np.testing.assert_array_equal(got, full.execute(batch).numpy(), err_msg=f"step {number}")
        kept.append((got, got.copy()))
        # NOTE: with transient_logits a repeated step's logits are in the runner's own buffer, any other step's new
        assert np.shares_memory(got, fast._logits) == (transient and fast.repeated_steps > repeats), number
        ours, theirs = fast.slots, full.slots
        assert (ours.length, ours.owner, ours.last_used) == (theirs.length, theirs.owner, theirs.last_used), number
        assert [t.tolist() for t in ours.tables] == [t.tolist() for t in theirs.tables], number
        assert (ours.refills, ours.moves) == (theirs.refills, theirs.moves), number
    for ours, theirs in zip(fast.k_pools + fast.v_pools, full.k_pools + full.v_pools):
        np.testing.assert_array_equal(ours, theirs)
    for ours, theirs in ((fast.slots.key_store, full.slots.key_store), (fast.slots.value_store, full.slots.value_store)):
        np.testing.assert_array_equal(ours, theirs)
    assert fast.repeated_steps == expected_repeats and full.repeated_steps == 0
    if not transient:
        for number, (got, copy) in enumerate(kept):
            np.testing.assert_array_equal(got, copy, err_msg=f"step {number}'s logits changed after it")
    fast.clear()
    full.clear()
    for number in range(3):  # NOTE: after clear() the slots are refilled from the (zeroed) pools, not reused
        batch = plan.step([("a", 1), ("c", 1)])
        np.testing.assert_array_equal(fast.execute(batch).numpy(), full.execute(batch).numpy(), err_msg=f"after clear {number}")
    assert fast.repeated_steps == expected_repeats + 2


@pytest.mark.parametrize("kind,exporter", [("llama", "dynamo"), ("qwen2", "torchscript")])
def test_float16_slots_give_the_paged_graphs_logits_within_their_rounding(tiny_exports, kind, exporter):
    export_dir, _ = tiny_exports(kind, exporter)
    paged, slots = runner(export_dir, "paged"), runner(export_dir, "slots", kv_cache_dtype="float16")
    assert slots.kv_cache_dtype == "float16" and slots.slots.dtype == np.float16
    assert runner(export_dir, "slots").kv_cache_dtype == "float32"  # NOTE: auto: a float32 export stays float32
    worst = run_schedule(paged, slots)
    print(f"float16 slots: largest logit difference {worst:.2e}")
    assert worst <= F16_ATOL
    for ref, got in zip(paged.k_pools + paged.v_pools, slots.k_pools + slots.v_pools):
        np.testing.assert_allclose(got, ref, atol=F16_ATOL, rtol=2 ** -10)
    assert slots.slots.refills >= 2 and slots.paged_runs == 2


@pytest.mark.parametrize("kind,exporter", [("llama", "dynamo"), ("qwen2", "torchscript")])
def test_8_bit_slots_give_the_paged_graphs_logits_within_their_rounding(tiny_exports, kind, exporter):
    export_dir, _ = tiny_exports(kind, exporter)
    paged, slots = runner(export_dir, "paged"), runner(export_dir, "slots", kv_cache_dtype="int8")
    assert slots.kv_cache_dtype == "int8" and slots.slots.dtype == np.uint8
    worst = run_schedule(paged, slots)
    print(f"8-bit slots: largest logit difference {worst:.2e}")
    assert 0 < worst <= I8_ATOL
    cache, cfg = slots.slots, slots.model_config
    assert cache.key_store.dtype == np.uint8 and cache.key_store.shape[-1] == cfg.head_dim + SCALE_BYTES
    # NOTE: the pools hold exactly the values of the slots' rows (code x scale) for the tokens the slot graph
    # computed (d's and e's chunks ran through the paged graph, which writes float32 rows into the pools)
    checked = 0
    for slot, length in enumerate(cache.length):
        if cache.owner[slot] not in ("a", "b", "c") or not length:
            continue
        checked += 1
        for pools, store in ((slots.k_store, cache.key_store), (slots.v_store, cache.value_store)):
            rows = pools[:, cache.tables[slot]].reshape(cfg.num_layers, -1, cfg.num_kv_heads, cfg.head_dim)[:, :length]
            np.testing.assert_array_equal(rows.transpose(0, 2, 1, 3), dequantize_rows(store[:, slot, :, :length]))
    assert checked == 3
    assert cache.refills >= 2 and slots.paged_runs == 2


def test_the_kv_cache_dtype_setting():
    assert kv_cache_dtype("auto", "lepton", approximate=True) == "float16"
    assert kv_cache_dtype("auto", "lepton", approximate=False) == "float32"
    assert kv_cache_dtype("auto", "onnxruntime", approximate=True) == "float32"
    assert kv_cache_dtype("float32", "lepton", approximate=True) == "float32"
    assert kv_cache_dtype("int8", "lepton", approximate=False) == "int8"  # NOTE: only when asked
    for setting in ("float16", "int8"):
        with pytest.raises(RuntimeError, match=f"kv_cache_dtype={setting}: Lepton's SlotAttention is not available"):
            kv_cache_dtype(setting, "onnxruntime", approximate=True)
    base = {"model_dir": "m", "runner": "onnxruntime", "kv_cache_dtype": "float16"}
    for extra, why in [({"runner": "torch"}, "runner=onnxruntime only"),
                       ({"attention": "paged"}, "not with attention=paged"),
                       ({"deterministic": "true"}, "not with deterministic=true"),
                       ({"attention_kernel": "onnxruntime"}, "Lepton's SlotAttention only")]:
        for dtype in ("float16", "int8"):
            with pytest.raises(ConfigError, match=f"kv_cache_dtype: {dtype} slots need attention=slots .*{why}"):
                EngineConfig.from_parameters({**base, **extra, "kv_cache_dtype": dtype})
    with pytest.raises(ConfigError, match="kv_cache_dtype: must be one of auto, float32, float16, int8, got 'fp8'"):
        EngineConfig.from_parameters({**base, "kv_cache_dtype": "fp8"})


def test_run_returns_the_steps_keys_and_values_as_the_paged_graph_does(tiny_exports):
    export_dir, _ = tiny_exports("llama", "torchscript")
    paged, slots = runner(export_dir, "paged"), runner(export_dir, "slots")
    plan = Schedule(paged.model_config.vocab_size)
    for request in ("a", "b"):
        plan.add(request, plan.tokens(30))
    for rows in ([("a", 21), ("b", 5)], [("a", 1), ("b", 9)], [("b", 1), ("a", 1)]):
        batch = plan.step(rows)
        for ref, got in zip(paged.run(batch), slots.run(batch)):
            assert got.shape == ref.shape
            np.testing.assert_allclose(got, ref, atol=ATOL, rtol=0)


def test_steps_over_the_slot_budget_run_through_the_paged_graph(tiny_exports):
    export_dir, _ = tiny_exports("llama", "torchscript")
    paged, slots = runner(export_dir, "paged"), runner(export_dir, "slots")
    pools = sum(pool.nbytes for pool in slots.k_pools + slots.v_pools)
    budget = slots.slots.max_bytes
    assert budget == max(4 * pools, 256 << 20)  # NOTE: 4x the pools, at least 256 MiB (unless memory is short)
    steps, execute = [], slots.execute

    def every_other_step_over_budget(batch):
        # NOTE: a budget below one slot for even steps: they run paged and free the slots; odd steps
        # refill from the pools what they need.
        slots.slots.max_bytes = budget if len(steps) % 2 else 1
        steps.append(slots.slots.max_bytes)
        return execute(batch)

    slots.execute = every_other_step_over_budget
    assert run_schedule(paged, slots) <= ATOL
    for ref, got in zip(paged.k_pools + paged.v_pools, slots.k_pools + slots.v_pools):
        np.testing.assert_allclose(got, ref, atol=ATOL, rtol=0)
    # NOTE: of the 6 even steps, the one of two prefix hits alone has no slot rows: it runs paged anyway.
    assert len(steps) == 12 and slots.over_budget_steps == 5 and slots.paged_runs == 2
    assert slots.slots.nbytes > 0 and slots.slots.refills >= 6


def test_the_rewrite_leaves_one_fused_attention_per_layer_and_no_pool_reads(tiny_exports):
    export_dir, manifest = tiny_exports("llama", "torchscript")
    cfg = manifest.model_config
    half = cfg.head_dim // 2
    tables = np.zeros((cfg.max_position_embeddings, half), np.float32)
    model = slot_graph(onnx.load(str(export_dir / manifest.model_file)), cfg, tables, tables)
    ops = [node.op_type for node in model.graph.node]
    assert ops.count("GroupQueryAttention") == cfg.num_layers
    lepton = slot_graph(onnx.load(str(export_dir / manifest.model_file)), cfg, tables, tables, kernel="lepton")
    assert [node.op_type for node in lepton.graph.node].count("SlotAttention") == cfg.num_layers
    assert "GroupQueryAttention" not in [node.op_type for node in lepton.graph.node]
    assert {o.domain: o.version for o in lepton.opset_import}["ai.lepton"] == 1
    assert "ScatterND" not in ops and "Softmax" not in ops, "the paged attention's ops should be gone"
    names = [i.name for i in model.graph.input]
    assert names[: len(SLOT_INPUTS)] == list(SLOT_INPUTS)
    assert not [n for n in names if "pool" in n or n in ("block_tables", "positions", "token_slot")]
    onnx.checker.check_model(model)


def test_a_graph_of_another_model_is_refused_with_the_counts(tiny_exports):
    export_dir, manifest = tiny_exports("llama", "torchscript")
    cfg = ModelConfig(**{**manifest.model_config.__dict__, "num_layers": manifest.model_config.num_layers + 1})
    tables = np.zeros((cfg.max_position_embeddings, cfg.head_dim // 2), np.float32)
    with pytest.raises(SlotGraphError, match=f"for {cfg.num_layers} layers"):
        slot_graph(onnx.load(str(export_dir / manifest.model_file)), cfg, tables, tables)


def test_attention_setting_picks_the_runner(tiny_exports):
    export_dir, _ = tiny_exports("llama", "torchscript")
    assert type(runner(export_dir, "slots")) is SlotRunner
    assert type(runner(export_dir, "paged")) is OnnxRunner
    assert type(runner(export_dir, "auto")) is SlotRunner
    # NOTE: deterministic=true was measured batch-invariant on the paged graph only.
    assert type(runner(export_dir, "auto", deterministic=True)) is OnnxRunner
    with pytest.raises(ConfigError, match="deterministic=true serves attention=paged"):
        runner(export_dir, "slots", deterministic=True)
    with pytest.raises(ConfigError, match="attention: must be one of auto, slots, paged, got 'fused'"):
        EngineConfig.from_parameters({"model_dir": str(export_dir), "attention": "fused"})


@pytest.mark.parametrize("attention", ["slots", "paged"])
def test_spin_settings_reach_every_session_and_spinning_stops_after_a_run(tiny_exports, attention):
    export_dir, _ = tiny_exports("llama", "torchscript")

    def spinning(spin_wait: str, **extra: str) -> list[tuple[str, str, str | None]]:
        config = EngineConfig.from_parameters({"model_dir": str(export_dir), "runner": "onnxruntime",
                                               "attention": attention, "spin_wait": spin_wait,
                                               "kv_cache_memory_bytes": "4M", "block_size": str(BLOCK_SIZE),
                                               **extra})
        built = make_runner(open_folder(config), config)
        sessions = [built.session] + ([built.paged_session] if attention == "slots" else [])
        return [(entry(s, "session.intra_op.allow_spinning"), entry(s, "session.force_spinning_stop"),
                 entry(s, "session.intra_op.spin_duration_us")) for s in sessions]

    def entry(session, key: str) -> str | None:
        try:
            return session.get_session_options().get_session_config_entry(key)
        except RuntimeError:  # NOTE: onnxruntime's answer for an entry never set
            return None

    count = 2 if attention == "slots" else 1
    assert spinning("true") == [("1", "1", "100")] * count  # NOTE: the default duration
    assert spinning("true", spin_duration_us="20") == [("1", "1", "20")] * count
    assert spinning("true", spin_duration_us="0") == [("1", "1", None)] * count  # NOTE: ONNX Runtime's own
    assert spinning("false") == [("0", "1", None)] * count  # NOTE: no spinning to bound
    defaults = EngineConfig.from_parameters({"model_dir": str(export_dir)}).runner
    assert (defaults.spin_wait, defaults.spin_duration_us) == (True, 100)
    with pytest.raises(ConfigError, match="spin_wait: expected bool, got 'sometimes'"):
        EngineConfig.from_parameters({"model_dir": str(export_dir), "spin_wait": "sometimes"})
    with pytest.raises(ConfigError, match="spin_duration_us: expected int, got '-5'"):
        EngineConfig.from_parameters({"model_dir": str(export_dir), "spin_duration_us": "-5"})
    with pytest.raises(ConfigError, match="spin_duration_us: must be >= 0, got -5"):
        EngineConfig(model_dir=export_dir, runner=RunnerConfig(runner="onnxruntime", spin_duration_us=-5))
