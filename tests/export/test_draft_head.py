"""The 4-bit draft of a rescored lm_head: steps that read only each row's argmax pick the candidates with it, every
other step reads the exported head unchanged (lepton/runners/draft_head.py)."""

from __future__ import annotations

import math

import numpy as np
import onnx
import pytest

from export.quality import EvalOptions, QualityGate
from export.quantization import QuantizeOptions, quantize_export
from lepton.batch import build_model_input
from lepton.config import CacheConfig, EngineConfig, RunnerConfig
from lepton.runners import make_runner, open_folder
from export.draft_quality import draft_agreement
from lepton.runners.bf16_graph import unavailable as bf16_unavailable
from lepton.runners.draft_head import draft_head_graph, q4_1
from lepton.sampling_params import SamplingParams
from lepton.scheduler import ScheduledSeq, SchedulerOutput
from lepton.sequence import Sequence
from tests.export.conftest import BLOCK_SIZE, cpu_flags
from tests.export.test_q4_1 import greedy

EVAL = EvalOptions(num_windows=2, window_len=32, latency_batch=2, latency_context=24, latency_steps=2)
LENIENT = QualityGate(0.0, math.inf, math.inf, math.inf, math.inf)
HAS_VNNI = {"avx512f", "avx512bw", "avx512vl", "avx512_vnni", "f16c"} <= cpu_flags()
HAS_DRAFT = HAS_VNNI or {"avx2", "fma", "f16c"} <= cpu_flags()
needs_draft = pytest.mark.skipif(not HAS_DRAFT, reason="the draft head runs MatMulQ4's AVX-512 VNNI or AVX2 path only")


@pytest.fixture(scope="module", params=["q8_0", "q4_1", "float32", "bfloat16"])
def served(request, tiny_exports, tmp_path_factory):
    """(export folder, weight_dtype): the rescored 8-bit heads of q8_0 and q4_1, and a float32 export's tied head
    in MatMulF32 and (weight_dtype=bfloat16) MatMulBF16."""
    export, _ = tiny_exports("llama", "dynamo")
    if request.param in ("float32", "bfloat16"):
        if request.param == "bfloat16" and bf16_unavailable():
            pytest.skip(bf16_unavailable())
        return export, "bfloat16" if request.param == "bfloat16" else "export"
    out = tmp_path_factory.mktemp("draft") / request.param
    quantize_export(QuantizeOptions(export, out, request.param, gate=LENIENT, evaluation=EVAL))
    return out, "export"


def runner(served, draft_head: bool = True, attention: str = "slots"):
    export_dir, weight_dtype = served
    config = EngineConfig(model_dir=export_dir, cache=CacheConfig(block_size=BLOCK_SIZE, kv_cache_memory_bytes=4 << 20),
                          runner=RunnerConfig(runner="onnxruntime", attention=attention, draft_head=draft_head,
                                              weight_dtype=weight_dtype))
    return make_runner(open_folder(config), config)


def step(seqs: list[Sequence], done: dict[str, int], rows: list[tuple[str, int]]):
    """The rows' (request, new tokens) scheduled after what each has done, blocks laid out one after another."""
    items, first = [], 0
    for seq in seqs:
        count = dict(rows).get(seq.request_id)
        blocks = -(-seq.num_tokens // BLOCK_SIZE)
        if count is not None:
            items.append(ScheduledSeq(seq, done[seq.request_id], count, list(range(first, first + blocks)), True))
            done[seq.request_id] += count
        first += blocks
    return build_model_input(SchedulerOutput(items, sum(n for _, n in rows)), BLOCK_SIZE)


def test_q4_1_draft_codes_lie_within_half_a_step_of_the_weights():
    rng = np.random.default_rng(0)
    weight = (rng.normal(size=(4100, 64)) * rng.uniform(0.01, 1, size=(4100, 1))).astype(np.float32)
    weight[7] = 0.5  # NOTE: a constant row: step 0, every code 0, the minimum the value
    codes, scales, mins = q4_1(weight)
    assert codes.shape == (4100, 2, 32) and codes.max() <= 15
    for values in (scales, mins):  # NOTE: what MatMulQ4 keeps: float16
        np.testing.assert_array_equal(values.astype(np.float16).astype(np.float32), values)
    rebuilt = (codes * scales[..., None] + mins[..., None]).reshape(weight.shape)
    # NOTE: half a step, and the float16 rounding of the minimum (the codes were rounded against it)
    bound = (scales / 2 + np.abs(mins) * 2 ** -10 + 1e-7).repeat(32, axis=1)
    assert (np.abs(rebuilt - weight) <= bound).all()
    assert (codes[7] == 0).all() and scales[7].tolist() == [0, 0] and mins[7].tolist() == [0.5, 0.5]


def test_argmax_only_is_set_when_every_sampled_row_is_greedy_without_logprobs_or_penalties():
    def only(*params: SamplingParams, outputs: int = 0) -> bool:
        seqs = [Sequence(f"r{i}", [5, 6, 7], p, 1 << 10) for i, p in enumerate(params)]
        for seq in seqs:
            seq.output_token_ids.extend([9] * outputs)
        decode = [ScheduledSeq(s, s.num_tokens - 1, 1, [0], True) for s in seqs]
        prompt = [ScheduledSeq(s, 0, s.num_tokens, [0], True) for s in seqs]
        both = {build_model_input(SchedulerOutput(items, len(items)), BLOCK_SIZE).argmax_only
                for items in (decode, prompt)}
        assert len(both) == 1  # NOTE: the decodes-only layout and the general one agree
        return both.pop()

    greedy_params = SamplingParams(temperature=0.0)
    assert only(greedy_params, greedy_params.replace(stop=("x",), ignore_eos=True, max_tokens=64))
    assert not only(greedy_params, SamplingParams(temperature=0.7))
    assert not only(greedy_params.replace(logprobs=0))
    assert not only(greedy_params.replace(repetition_penalty=1.1))
    assert not only(greedy_params.replace(frequency_penalty=0.5))
    assert not only(greedy_params.replace(presence_penalty=-0.5))
    assert not only(greedy_params.replace(min_tokens=3, max_tokens=8), outputs=2)  # NOTE: eos still masked
    assert only(greedy_params.replace(min_tokens=3, max_tokens=8), outputs=3)


@needs_draft
def test_argmax_only_steps_get_the_exported_heads_argmax_and_the_others_its_logits(served):
    draft, plain = runner(served), runner(served, draft_head=False)
    assert draft.draft_head and not plain.draft_head
    vocab = draft.model_config.vocab_size
    rng = np.random.default_rng(3)
    plans = {}
    for argmax_only in (False, True):
        params = SamplingParams(temperature=0.0 if argmax_only else 1.0)
        # NOTE: each request's tokens known ahead (prompt and the decodes' inputs), as a schedule replays them
        seqs = [Sequence(f"r{i}", rng.integers(5, vocab, n + 8).tolist(), params, 1 << 10)
                for i, n in enumerate((19, 4, 30))]
        plans[argmax_only] = (seqs, [[("r0", 19), ("r1", 4)], [("r0", 1), ("r2", 16), ("r1", 1)],
                                     [("r1", 1), ("r2", 14), ("r0", 1)]] + [[("r2", 1), ("r0", 1), ("r1", 1)]] * 3)
    for argmax_only, (seqs, steps) in plans.items():
        for run in (draft, plain):
            run.clear()  # NOTE: empty pools and slots for the second plan
        done_draft, done_plain = ({s.request_id: 0 for s in seqs} for _ in range(2))
        for rows in steps:
            batch = step(seqs, done_draft, rows)
            assert batch.argmax_only is argmax_only
            got, want = draft.execute(batch).numpy(), plain.execute(step(seqs, done_plain, rows)).numpy()
            if not argmax_only:
                np.testing.assert_array_equal(got, want)  # NOTE: the else branch is the exported head, unchanged
                continue
            np.testing.assert_array_equal(got.argmax(axis=1), want.argmax(axis=1))
            best = want.argmax(axis=1)[:, None]
            np.testing.assert_allclose(np.take_along_axis(got, best, 1), np.take_along_axis(want, best, 1), rtol=1e-5)
            assert not np.array_equal(got, want)  # NOTE: the tail is the draft's


@needs_draft
def test_greedy_requests_generate_the_same_tokens_with_the_draft(served):
    export_dir, weight_dtype = served
    assert (greedy(export_dir, max_tokens=12, weight_dtype=weight_dtype)
            == greedy(export_dir, max_tokens=12, weight_dtype=weight_dtype, draft_head="false"))


@needs_draft
def test_the_draft_agrees_with_the_head_on_held_out_text(served):
    export_dir, weight_dtype = served
    result = draft_agreement(export_dir, EvalOptions(num_windows=2, window_len=32), weight_dtype)
    assert result["positions"] == 64 and result["disagreements"] == 0 and result["agreement"] == 1.0


@needs_draft
def test_the_draft_is_off_when_asked_and_where_no_head_it_knows_is(served, tiny_exports, capsys):
    assert not runner(served, draft_head=False).draft_head
    assert "lm_head: as exported for every step (draft_head=false)" in capsys.readouterr().out
    paged = runner(served, attention="paged")  # NOTE: what deterministic=true serves: no draft
    assert not hasattr(paged, "draft_head") and "draft" not in capsys.readouterr().out
    assert runner(served).draft_head
    assert "pick its candidates with a 4-bit draft (MatMulQ4" in capsys.readouterr().out
    with pytest.raises(ValueError, match="served without a draft head"):
        draft_agreement(tiny_exports("qwen2", "dynamo")[0], EvalOptions(num_windows=1, window_len=16))


def test_an_untied_head_or_the_export_graph_itself_is_left_as_it_is(tiny_exports):
    # NOTE: qwen2's untied head keeps only its packed weight once rewritten (nothing to rescore from); an export's
    # graph before Lepton's rewrites has a plain MatMul (float32) or MatMulNBits head
    for kind in ("qwen2", "llama"):
        model = onnx.load(str(tiny_exports(kind, "dynamo")[0] / "model.onnx"))
        before = model.SerializeToString()
        assert draft_head_graph(model) == 0 and model.SerializeToString() == before


@needs_draft
def test_a_greedy_decode_reads_the_drafts_bytes_in_place_of_the_heads(served, capsys):
    # NOTE: the head as each configuration reads it: 8-bit blocks of 32 with a float16 scale (the rescored heads),
    # MatMulF32's float32 or MatMulBF16's bfloat16 rows; the draft: 4-bit codes, float16 d and m a block of 32
    export_dir, weight_dtype = served
    kind = export_dir.name if export_dir.name in ("q8_0", "q4_1") else weight_dtype
    head_bytes_per_weight = {"q8_0": 34 / 32, "q4_1": 34 / 32, "export": 4, "bfloat16": 2}[kind]
    with_draft = runner(served)
    weights = with_draft.model_config.vocab_size * with_draft.model_config.hidden_size
    drafted, plain = with_draft.decode_reads, runner(served, draft_head=False).decode_reads
    assert plain.argmax_only == plain.full_logits == drafted.full_logits
    assert drafted.full_logits - drafted.argmax_only == weights * head_bytes_per_weight - weights * 20 / 32
    assert f"one decode step's weight products read {drafted.argmax_only / 1e6:.1f} MB when only the argmax" \
        in capsys.readouterr().out


@needs_draft
def test_a_chunk_that_samples_nothing_runs_through_the_draft_beside_greedy_rows(served):
    # NOTE: b's chunks sample nothing; in step 2 its chunk after cached tokens runs alone, asking no logits row
    draft, plain = runner(served), runner(served, draft_head=False)
    greedy_params = SamplingParams(temperature=0.0)
    picks = {}
    for name, run in (("draft", draft), ("plain", plain)):
        a = Sequence("a", list(range(100, 120)), greedy_params, 1 << 10)
        b = Sequence("b", list(range(200, 250)), greedy_params, 1 << 10)
        first = build_model_input(SchedulerOutput([ScheduledSeq(a, 0, 20, [0, 1, 2], True),
                                                   ScheduledSeq(b, 0, 16, list(range(3, 10)), False)], 36), BLOCK_SIZE)
        a.output_token_ids.append(7)
        second = build_model_input(SchedulerOutput([ScheduledSeq(a, 20, 1, [0, 1, 2], True),
                                                    ScheduledSeq(b, 16, 16, list(range(3, 10)), False)], 17), BLOCK_SIZE)
        assert first.argmax_only and second.argmax_only
        picks[name] = [run.execute(step).numpy().argmax(axis=1).tolist() for step in (first, second)]
    assert picks["draft"] == picks["plain"] and [len(rows) for rows in picks["draft"]] == [1, 1]
