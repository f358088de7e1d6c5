"""benchmarks.peers.ratios: which Lepton rows count against the peers."""

from __future__ import annotations

from benchmarks.peers import ratios

GATE_FAILED = "built here with --no-quality-gate: max |logit err| 31.41 > 2 (max)"


def system(peer: str, label: str, precision: str, tok_s: float, ttft_ms: float, itl_ms: float, gate: str = "") -> dict:
    timing = {"w1": {"ttft_ms": {"p50": ttft_ms}, "itl_ms": {"p50": itl_ms}},
              "w2": {"output_tok_per_s": tok_s, "ttft_ms": {"p50": 10 * ttft_ms}}}
    return {"peer": peer, "label": label, "precision": precision, "workloads": timing, "quality_gate": gate}


def rows_by_name(result: dict) -> dict[str, dict]:
    return {r["name"]: r for r in ratios.compute(result)}


def sitting(*lepton: dict) -> dict:
    peers = [system("llamacpp", "llama.cpp Q8_0", "8-bit", 200.0, 180.0, 8.0),
             system("ortgenai", "onnxruntime-genai int4", "4-bit", 300.0, 170.0, 5.5)]
    return {"systems": peers + list(lepton), "floors_ms": {p: 1.0 for p in ratios.PRECISIONS}}


def test_an_export_failing_its_gate_is_named_but_never_counted_against_the_peers():
    q8_0 = system("lepton", "Lepton q8_0", "8-bit", 400.0, 75.0, 8.0, "reused build/onnx/smollm2-q8_0")
    int8 = system("lepton", "Lepton int8", "8-bit", 480.0, 70.0, 8.5, GATE_FAILED)
    rows = rows_by_name(sitting(q8_0, int8))
    any_precision = rows["W2 output tok/s, best Lepton / best peer (any precision)"]
    assert (any_precision["lepton_system"], any_precision["ratio"], any_precision["met"]) == ("Lepton q8_0", 1.333, False)
    assert any_precision["note"] == "not counted: Lepton int8, which fails its quality gate, 480.00 (1.600)"
    eight_bit = rows["W2 output tok/s, 8-bit: best Lepton / best peer"]
    assert (eight_bit["lepton_system"], eight_bit["ratio"], eight_bit["met"]) == ("Lepton q8_0", 2.0, True)
    first_token = rows["W1 TTFT p50, best Lepton / best peer"]
    assert first_token["lepton_system"] == "Lepton q8_0" and "Lepton int8" in first_token["note"]
    between = rows["W1 ITL p50, 8-bit: best Lepton / best peer"]
    assert between["lepton_system"] == "Lepton q8_0" and between["note"] == ""  # NOTE: int8 was slower here
    per_system = [r for r in ratios.compute(sitting(q8_0, int8)) if r["name"].startswith("W1 ITL p50 / bandwidth floor")]
    assert [(r["lepton_system"], r["note"]) for r in per_system] == [("Lepton q8_0", ""),
                                                                        ("Lepton int8", "fails its quality gate")]


def test_a_runner_that_counted_its_greedy_decodes_bytes_is_held_to_their_floor():
    # NOTE: with the lm_head's 4-bit draft a greedy step reads less than the precision's weights: 100 MB at 50 GB/s
    q8_0 = system("lepton", "Lepton q8_0", "8-bit", 400.0, 75.0, 3.0)
    q8_0["decode_reads"] = {"argmax_only": 100_000_000, "full_logits": 120_000_000}
    torch = system("lepton", "Lepton torch fp32", "fp32", 100.0, 300.0, 1.2)
    result = sitting(q8_0, torch) | {"probe": {"read_bandwidth_gbps": {"all_threads": 50.0}}}
    assert ratios.system_floor(q8_0, result) == (2.0, "100.0 MB its greedy decode reads")
    assert ratios.system_floor(torch, result) == (1.0, "fp32 weights")
    rows = [r for r in ratios.compute(result) if r["name"].startswith("W1 ITL p50 / bandwidth floor")]
    assert [(r["name"], r["reference"], r["ratio"], r["met"], r["note"]) for r in rows] == [
        ("W1 ITL p50 / bandwidth floor (100.0 MB its greedy decode reads, 2.00 ms)", 2.0, 1.5, False,
         "the 8-bit weights' floor 1.00 ms: 3.000"),
        ("W1 ITL p50 / bandwidth floor (fp32 weights, 1.00 ms)", 1.0, 1.2, True, "")]


def test_only_failing_exports_leave_the_comparison_empty():
    rows = rows_by_name(sitting(system("lepton", "Lepton int4", "4-bit", 350.0, 60.0, 5.0, GATE_FAILED)))
    four_bit = rows["W2 output tok/s, 4-bit: best Lepton / best peer"]
    assert (four_bit["lepton"], four_bit["ratio"], four_bit["met"]) == (None, None, None)
    assert four_bit["note"] == "not counted: Lepton int4, which fails its quality gate, 350.00 (1.167)"


def test_a_runner_setting_whose_quality_report_failed_is_not_counted_either():
    bf16 = system("lepton", "Lepton bf16", "16-bit", 450.0, 60.0, 5.0, "reused build/onnx/smollm2; bfloat16 weights fail")
    assert not ratios.fails_gate(bf16)
    bf16["gate_failed"] = True
    rows = rows_by_name(sitting(bf16))
    assert rows["W2 output tok/s, 16-bit: best Lepton / best peer"]["lepton"] is None


def test_prefix_caching_is_judged_cold_and_with_the_prefix_cached_first():
    q8_0 = system("lepton", "Lepton q8_0", "8-bit", 400.0, 75.0, 8.0)
    q8_0["workloads"] |= {"prefix": {"ttft_ms": {"p50": 1200.0}}, "prefix_warm": {"ttft_ms": {"p50": 150.0}}}
    q8_0 |= {"prefix_no_caching": {"ttft_ms": {"p50": 10000.0}}, "prefix_warm_no_caching": {"ttft_ms": {"p50": 9000.0}}}
    rows = rows_by_name(sitting(q8_0))
    cold = rows["shared prefix TTFT p50, caching on / off"]
    assert (cold["ratio"], cold["met"], cold["goal"]) == (0.12, False, "<= 0.1")
    warm = rows["shared prefix cached first, TTFT p50, caching on / off"]
    assert (warm["ratio"], warm["met"], warm["reference_system"]) == (0.017, True, "Lepton q8_0, no prefix caching")


def test_the_warm_prefix_run_has_its_own_prefix_and_a_request_before_it():
    import tokenizers

    from benchmarks.peers.workloads import QUICK, build_workloads
    from benchmarks.workload import PromptFactory
    from lepton.server import PROJECT_ROOT

    factory = PromptFactory(tokenizers.Tokenizer.from_file(str(PROJECT_ROOT / "build/models/demo/tokenizer.json")), 0)
    workloads = build_workloads(factory, QUICK)
    cold, warm = workloads["prefix"], workloads["prefix_warm"]
    assert len(warm.specs) == len(cold.specs) == warm.concurrency and not cold.warmup
    (first,) = warm.warmup
    assert first.max_tokens == 1 and first.request_id == "prefix_warm-0"
    shared = first.prompt.split("\nUser 0:")[0]
    assert all(s.prompt.startswith(shared + f"\nUser {i + 1}:") for i, s in enumerate(warm.specs))
    assert not cold.specs[0].prompt.startswith(shared)  # NOTE: the cold run cannot have cached it


def test_through_triton_against_in_process_is_judged_on_back_to_back_pairs():
    q8_0 = system("lepton", "Lepton q8_0", "8-bit", 400.0, 75.0, 8.0)
    q8_0["w2_in_process"] = {"output_tok_per_s": 600.0}  # NOTE: the first pair's; minutes later the machine moved
    q8_0["w2_pairs"] = [{"served": {"output_tok_per_s": 400.0}, "in_process": {"output_tok_per_s": 420.0}},
                        {"served": {"output_tok_per_s": 500.0}, "in_process": {"output_tok_per_s": 510.0}}]
    row = rows_by_name(sitting(q8_0))["W2 output tok/s, through Triton / engine in process"]
    assert (row["lepton"], row["reference"], row["ratio"], row["met"]) == (450.0, 465.0, 0.968, True)
    del q8_0["w2_pairs"]  # NOTE: a sitting from before the pairs: its one served and one in-process run
    row = rows_by_name(sitting(q8_0))["W2 output tok/s, through Triton / engine in process"]
    assert (row["lepton"], row["reference"], row["ratio"]) == (400.0, 600.0, 0.667)


def test_fresh_prompts_keep_the_shape_and_share_no_prefix():
    import tokenizers

    from benchmarks.peers.workloads import QUICK, build_workloads, with_fresh_prompts
    from benchmarks.workload import PromptFactory
    from lepton.server import PROJECT_ROOT

    factory = PromptFactory(tokenizers.Tokenizer.from_file(str(PROJECT_ROOT / "build/models/demo/tokenizer.json")), 0)
    w2 = build_workloads(factory, QUICK)["w2"]
    again = with_fresh_prompts(factory, w2, "w2-again")
    assert (len(again.specs), again.concurrency, again.name) == (len(w2.specs), w2.concurrency, "w2")
    assert {(s.num_prompt_tokens, s.max_tokens) for s in again.specs} == {(s.num_prompt_tokens, s.max_tokens) for s in w2.specs}
    assert not {s.prompt[:40] for s in again.specs} & {s.prompt[:40] for s in w2.specs}
    assert again.specs[0].request_id == "w2-again-0"


def test_the_served_run_sent_by_perf_analyzer_is_a_ratio_of_its_own_beside_loadgens():
    q8_0 = system("lepton", "Lepton q8_0", "8-bit", 400.0, 75.0, 8.0)
    q8_0["w2_pairs"] = [{"served": {"output_tok_per_s": 400.0}, "in_process": {"output_tok_per_s": 500.0}},
                        {"served": {"output_tok_per_s": 420.0}, "in_process": {"output_tok_per_s": 520.0}}]
    q8_0["w2_perf_analyzer"] = {"served": {"output_tok_per_s": 480.0}, "in_process": {"output_tok_per_s": 500.0}}
    older = system("lepton", "Lepton fp32", "fp32", 300.0, 150.0, 16.0)  # NOTE: a sitting from before it
    rows = [r for r in ratios.compute(sitting(q8_0, older)) if "through Triton" in r["name"]]
    assert [(r["name"], r["lepton_system"], r["ratio"], r["met"]) for r in rows] == [
        ("W2 output tok/s, through Triton / engine in process", "Lepton q8_0", 0.804, False),
        ("W2 output tok/s, through Triton / engine in process", "Lepton fp32", None, None),
        ("W2 output tok/s, through Triton (perf_analyzer's client) / engine in process", "Lepton q8_0", 0.96, True)]
    q8_0["w2_perf_analyzer"]["served"] = {"error": "RuntimeError: perf_analyzer failed (1)"}
    rows = [r for r in ratios.compute(sitting(q8_0)) if "perf_analyzer" in r["name"]]
    assert [(r["ratio"], r["met"]) for r in rows] == [(None, None)]
