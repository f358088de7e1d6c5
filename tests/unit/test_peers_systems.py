"""benchmarks.peers.systems: the engine parameters each Lepton variant is served with."""

from __future__ import annotations

from pathlib import Path

from benchmarks.peers.systems import Context, System, lepton_parameters


def test_an_onnx_variant_runs_with_the_kernel_timed_for_it_and_an_explicit_setting_wins():
    ctx = Context(model_dir=Path("m"), workloads={}, ids={}, num_threads=2, lepton_params={}, factory=None, log=print)
    q8_0, torch = System("lepton", "ort-q8_0"), System("lepton", "torch-fp32")
    assert lepton_parameters(q8_0, ctx) == {
        "num_threads": "2", "runner": "onnxruntime", "max_num_seqs": "64", "max_num_batched_tokens": "512",
        "kv_cache_memory_bytes": "1G", "enable_prefix_caching": "true"}
    ctx.kernels["ort-q8_0"] = "onnxruntime"
    assert lepton_parameters(q8_0, ctx)["matmul_kernel"] == "onnxruntime"
    assert lepton_parameters(q8_0, ctx, prefix_caching=False)["matmul_kernel"] == "onnxruntime"
    assert "matmul_kernel" not in lepton_parameters(torch, ctx) and "num_threads" not in lepton_parameters(torch, ctx)
    ctx.lepton_params["matmul_kernel"] = "lepton"
    assert lepton_parameters(q8_0, ctx)["matmul_kernel"] == "lepton"


def test_int8_int4_and_torch_bf16_without_bfloat16_products_are_left_out_by_default_and_run_when_named():
    from benchmarks.peers.__main__ import VARIANTS, default_variants, parse_args

    args = parse_args(["--from-json", "x.json"])  # NOTE: parse_args fills the defaults for this processor
    gated = [v for v in VARIANTS["lepton"] if v not in ("ort-int8", "ort-int4")]
    for cpu, expected in (({"avx2": True}, [v for v in gated if v != "torch-bf16"]),
                          ({"avx512_bf16": True}, gated), ({"amx_bf16": True}, gated)):
        args.lepton_variants = args.llamacpp_variants = None
        skipped = default_variants(args, cpu)
        assert args.lepton_variants == expected and args.llamacpp_variants == list(VARIANTS["llamacpp"])
        assert "int8 and int4" in skipped[0] and "--lepton-variants ort-int8,ort-int4" in skipped[0]
        assert len(skipped) == (1 if "torch-bf16" in expected else 2)
        assert all("AVX512-BF16 / AMX" in why and "--lepton-variants torch-bf16" in why for why in skipped[1:])
    args = parse_args(["--lepton-variants", "torch-bf16,ort-q8_0,ort-int8"])
    assert args.lepton_variants == ["torch-bf16", "ort-q8_0", "ort-int8"]
    assert default_variants(args, {"avx2": True}) == [] and args.lepton_variants == ["torch-bf16", "ort-q8_0", "ort-int8"]
