"""The benchmark's bar, markdown report and plots, all from the result dict that goes to JSON."""

from __future__ import annotations

import os
from pathlib import Path

# NOTE: the targets of the performance issue; the ITL floor assumes 25 GB/s of memory bandwidth
# and reads every fp32 weight once per decode step.
FLOOR_BANDWIDTH_BYTES_PER_S = 25e9
TARGET_TOKENS_PER_S_AT_16 = 500.0
TARGET_TTFT_MS = 50.0
TARGET_ITL_OVER_FLOOR = 1.10


def _fmt(value, digits: int = 1) -> str:
    return "–" if value is None else f"{value:,.{digits}f}"


def one_line(s: dict) -> str:
    """A progress line for the log."""
    if "ttft_ms" not in s:
        return f"{s['num_errors']} of {s['num_requests']} requests failed: {s.get('errors')}"
    return (f"{s['output_tok_per_s']:.1f} out tok/s over {s['wall_s']:.1f} s, TTFT p50 {_fmt(s['ttft_ms']['p50'])} ms, "
            f"ITL p50 {_fmt(s['itl_ms']['p50'])} ms, errors {s['num_errors']}, cpu {s.get('cpu', {})}")


def bar(result: dict) -> list[dict]:
    """Each target of the issue next to the figure measured for it."""
    floor_ms = result["model"]["weight_bytes"] / FLOOR_BANDWIDTH_BYTES_PER_S * 1e3
    runs = result["closed_loop"]
    c1, c16 = runs.get("1", {}), runs.get("16", {})
    p50 = lambda run, key: (run.get(key) or {}).get("p50")  # noqa: E731
    rows = [
        ("output tokens/s at 16 concurrent", TARGET_TOKENS_PER_S_AT_16, c16.get("output_tok_per_s"), ">="),
        ("TTFT p50, 128-token prompt, 1 concurrent (ms)", TARGET_TTFT_MS, p50(c1, "ttft_ms"), "<="),
        ("TTFT p50, 128-token prompt, 16 concurrent (ms)", TARGET_TTFT_MS, p50(c16, "ttft_ms"), "<="),
        (f"single-stream ITL p50 (ms); floor {floor_ms:.2f} ms + 10%", floor_ms * TARGET_ITL_OVER_FLOOR,
         p50(c1, "itl_ms"), "<="),
    ]
    out = []
    for name, target, measured, sense in rows:
        met = None if measured is None else (measured >= target if sense == ">=" else measured <= target)
        ratio = None if not measured else (measured / target if sense == ">=" else target / measured)
        out.append({"target": name, "goal": round(target, 2), "sense": sense, "measured": measured,
                    "met": met, "fraction_of_goal": None if ratio is None else round(ratio, 3)})
    return out


def plots(result: dict, img_dir: Path) -> list[Path]:
    """Throughput, TTFT and ITL against concurrency, as PNG files."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    img_dir.mkdir(parents=True, exist_ok=True)
    runs = result["closed_loop"]
    levels = sorted(int(c) for c in runs if "ttft_ms" in runs[c])
    hf = result.get("baseline_hf", {})
    floor_ms = result["model"]["weight_bytes"] / FLOOR_BANDWIDTH_BYTES_PER_S * 1e3
    paths = []

    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot(levels, [runs[str(c)]["output_tok_per_s"] for c in levels], "o-", label="Lepton (Triton, gRPC stream)")
    if "output_tok_per_s" in hf:
        ax.axhline(hf["output_tok_per_s"], color="gray", ls="--", label="transformers generate, 1 at a time")
    ax.plot([16], [TARGET_TOKENS_PER_S_AT_16], "r*", ms=12, label="target at 16 concurrent")
    ax.set(xscale="log", yscale="log", xlabel="concurrent requests", ylabel="output tokens/s", title="Throughput")
    ax.set_xticks(levels, [str(c) for c in levels])
    ax.legend(fontsize=8)
    paths.append(_save(fig, img_dir / "bench_throughput.png"))

    for key, title, line, line_label in (
        ("ttft_ms", "Time to first token", TARGET_TTFT_MS, "target 50 ms"),
        ("itl_ms", "Inter-token latency", floor_ms, f"bandwidth floor {floor_ms:.1f} ms"),
    ):
        fig, ax = plt.subplots(figsize=(6, 4))
        for p, style in (("p50", "o-"), ("p90", "s--"), ("p99", "^:")):
            ax.plot(levels, [runs[str(c)][key][p] for c in levels], style, label=f"Lepton {p}")
        if hf.get(key, {}).get("p50") is not None:
            ax.plot([1], [hf[key]["p50"]], "kx", ms=10, label="transformers p50")
        ax.axhline(line, color="red", lw=0.8, label=line_label)
        ax.set(xscale="log", yscale="log", xlabel="concurrent requests", ylabel="ms", title=title)
        ax.set_xticks(levels, [str(c) for c in levels])
        ax.legend(fontsize=8)
        paths.append(_save(fig, img_dir / f"bench_{key.removesuffix('_ms')}.png"))
    timeline = (result.get("kv_fragmentation") or {}).get("timeline")
    if timeline:
        paths.append(_kv_plot(plt, timeline, result["kv_fragmentation"], img_dir / "bench_kv.png"))
    return paths


def _kv_plot(plt, timeline: list, fragmentation: dict, path: Path) -> Path:
    """KV slots held next to tokens stored, over the highest-concurrency run."""
    t, blocks, running, tokens = zip(*timeline)
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot(t, [b * fragmentation["block_size"] for b in blocks], label="slots held (kv_blocks_used × block_size)")
    ax.plot(t, tokens, label="tokens stored (client estimate, decoding requests)")
    ax.set(xlabel="s since the run started", ylabel="tokens", title=f"KV pool at c={fragmentation['concurrency']}")
    ax2 = ax.twinx()
    ax2.plot(t, running, color="gray", lw=0.6, label="num_running")
    ax2.set_ylabel("num_running")
    ax.legend(fontsize=8, loc="upper left")
    ax2.legend(fontsize=8, loc="lower right")
    return _save(fig, path)


def _save(fig, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    fig.clf()
    return path


def _latency_cells(s: dict, key: str) -> str:
    d = s.get(key) or {}
    return " / ".join(_fmt(d.get(p)) for p in ("p50", "p90", "p99"))


def _run_row(name: str, s: dict) -> str:
    if "ttft_ms" not in s:
        return f"| {name} | {s.get('num_requests')} | failed: {s.get('errors')} |" + " |" * 6
    cpu = s.get("cpu", {})
    return (f"| {name} | {s['num_requests'] - s['num_errors']}/{s['num_requests']} | {s['output_tok_per_s']:.1f} | "
            f"{_latency_cells(s, 'ttft_ms')} | {_latency_cells(s, 'itl_ms')} | {_latency_cells(s, 'e2e_ms')} | "
            f"{s['wall_s']:.1f} | {_fmt(cpu.get('client_cores'), 2)} / {_fmt(cpu.get('server_cores'), 2)} |")


RUN_HEADER = (
    "| run | ok/sent | out tok/s | TTFT ms p50/p90/p99 | ITL ms p50/p90/p99 | end-to-end ms p50/p90/p99 "
    "| wall s | cores client/server |\n|---|---|---|---|---|---|---|---|"
)


def markdown(result: dict, images: list[Path], doc_dir: Path) -> str:
    """docs/benchmarks-serving.md: command, machine, bar, tables, plots and how each figure is measured."""
    m, p = result["machine"], result["parameters"]
    lines = [
        "# Serving benchmarks", "",
        "Generated by `benchmarks/serving.py`; rerun it rather than editing the figures by hand.", "",
        f"- **Date**: {result['date']} (finished {result.get('finished', '?')})",
        f"- **Command**: `{result['command'].strip()}`",
        f"- **Machine**: {m['nproc']} cores ({m['cpu_model']}), {m['mem_gib']} GiB, no GPU; torch {m['torch']} "
        f"({m['torch_threads_client']} threads in the benchmark process), transformers {m['transformers']}, tritonclient {m['tritonclient']}; "
        f"load average (1/5/15 min) at start {', '.join(f'{x:.2f}' for x in m['loadavg_at_start'])}, at end "
        f"{', '.join(f'{x:.2f}' for x in m.get('loadavg_at_end', ()))} (above about 1, other jobs "
        "shared the 2 cores); measured read bandwidth "
        f"(torch sum of 512 MiB) {m['read_bandwidth_gbps']['1_thread']} GB/s with 1 thread, "
        f"{m['read_bandwidth_gbps']['all_threads']} GB/s with all",
        f"- **Model**: SmolLM-135M shape (hidden 576, 30 layers, 9 heads / 3 KV heads, vocab 49152, tied), "
        f"seeded random fp32 weights, {result['model']['weight_bytes'] / 1e6:.1f} MB",
        f"- **Engine parameters**: {', '.join(f'`{k}={v}`' for k, v in p['engine'].items())}",
        f"- **Closed loop**: prompts of exactly {p['prompt_tokens']} tokens (BOS included), {p['output_tokens']} "
        f"output tokens, greedy, ignore_eos; max({p['requests_factor']}·c, {p['min_requests']}) requests per level",
    ]
    for server in result.get("servers", []):
        code = server.get("code") or {}
        lines.append(f"- **Server `{server['name']}`** started {server['started']}: engine at commit "
                     f"`{code.get('head', '?')}`, {len(code.get('uncommitted', []))} uncommitted file(s) "
                     "under lepton/ and model_repository/")
    lines += [f"- **Note** (added after the run): {note}" for note in result.get("annotations", [])]
    lines += ["", "## The bar", "", "| target | goal | measured | met | reached (1 = goal) |", "|---|---|---|---|---|"]
    for row in result["bar"]:
        met = "–" if row["met"] is None else ("yes" if row["met"] else "**no**")
        lines.append(f"| {row['target']} | {row['sense']} {row['goal']:g} | {_fmt(row['measured'])} | {met} | "
                     f"{_fmt(row['fraction_of_goal'], 3)} |")
    lines += ["", "## Closed loop (c requests in flight)", "", RUN_HEADER]
    if "baseline_hf" in result:
        lines.append(_run_row("transformers generate, c=1", result["baseline_hf"]))
    for c, s in result["closed_loop"].items():
        lines.append(_run_row(f"Lepton c={c}", s))
    lines += _ratios("Lepton c=1 over transformers generate (same prompts)",
                     result["closed_loop"].get("1", {}), result.get("baseline_hf", {}))
    lines += ["", f"Staggered arrivals: {p['poisson_requests']} requests, Poisson at {p['poisson_rate']}/s (seed "
              f"{p['seed']}), prompts {p['poisson_prompt'][0]}–{p['poisson_prompt'][1]} tokens, outputs "
              f"{p['poisson_output'][0]}–{p['poisson_output'][1]} tokens.", "", RUN_HEADER,
              _run_row("Lepton, Poisson", result["poisson"])]
    lines += _prefix_section(result) + _fragmentation_section(result)
    lines += ["", "## Plots", ""]
    lines += [f"![{img.stem}]({os.path.relpath(img, doc_dir)})" for img in images]
    lines += ["", METHOD]
    return "\n".join(lines) + "\n"


def _prefix_section(result: dict) -> list[str]:
    p = result["parameters"]
    lines = ["", f"## Shared prefix: {p['prefix_requests']} requests sent at once behind one "
             f"{p['prefix_tokens']}-token system prompt (+{p['prefix_suffix_tokens']}-token suffix each, "
             f"{p['prefix_output_tokens']} output tokens), fresh server each", "",
             "| prefix caching | TTFT ms p50/p90/p99 | total s | out tok/s | cache hits / queries (tokens) | hit rate |",
             "|---|---|---|---|---|---|"]
    for label, s in result["prefix_caching"].items():
        if "ttft_ms" not in s:
            lines.append(f"| {label} | failed: {s.get('errors')} | | | | |")
            continue
        d = s["metrics_delta"]
        hits, queries = d["lepton_prefix_cache_hits_total"], d["lepton_prefix_cache_queries_total"]
        rate = _fmt(hits / queries, 3) if queries else "–"
        lines.append(f"| {label} | {_latency_cells(s, 'ttft_ms')} | {s['wall_s']:.2f} | {s['output_tok_per_s']:.1f} | "
                     f"{hits:,.0f} / {queries:,.0f} | {rate} |")
    caching = result["prefix_caching"]
    lines += _ratios("caching on over caching off", caching.get("on", {}), caching.get("off", {}))
    return lines


def _ratios(title: str, run: dict, reference: dict) -> list[str]:
    """One line of run / reference ratios of the medians and the throughput."""
    if "ttft_ms" not in run or "ttft_ms" not in reference:
        return []
    ratio = lambda a, b: "–" if not a or not b else f"{a / b:.2f}×"  # noqa: E731
    return ["", f"Ratios, {title}: TTFT p50 {ratio(run['ttft_ms']['p50'], reference['ttft_ms']['p50'])}, "
            f"ITL p50 {ratio(run['itl_ms']['p50'], reference['itl_ms']['p50'])}, end-to-end p50 "
            f"{ratio(run['e2e_ms']['p50'], reference['e2e_ms']['p50'])}, output tokens/s "
            f"{ratio(run['output_tok_per_s'], reference['output_tok_per_s'])}, wall "
            f"{ratio(run['wall_s'], reference['wall_s'])}."]


def _fragmentation_section(result: dict) -> list[str]:
    f = result.get("kv_fragmentation") or {}
    if not f:
        return []
    ratio = f["slots_per_stored_token"]
    return ["", f"## KV pool occupancy at c={f['concurrency']}", "",
            f"`lepton_kv_blocks_used` and `lepton_num_running` sampled every {result['parameters']['metrics_interval']} s "
            f"({f['num_samples']} samples, {f['num_steady_samples']} in steady decoding). Slots held "
            f"(blocks × {f['block_size']}) per token stored: p50 {_fmt(ratio['p50'], 3)}, p90 {_fmt(ratio['p90'], 3)}, "
            f"mean {_fmt(ratio['mean'], 3)}; internal waste {_fmt((f['internal_waste_fraction_p50'] or 0) * 100)} % "
            f"of held slots. Peak {f['max_kv_blocks_used']} blocks in use, {f['max_num_running']} running."]


METHOD = """## How each figure is measured

- **Server**: `lepton.server.TritonServer` starts the real `tritonserver` on free loopback ports with the
  engine parameters above written into `config.pbtxt`; each server gets 4 short warm-up requests first.
- **Client**: one `tritonclient.grpc.aio` client on one asyncio loop; every request gets a gRPC stream of
  its own (`ModelStreamInfer`) carrying tensor-style inputs (`max_tokens`, `temperature=0`,
  `ignore_eos=true`, `stream=true`). c workers each send their next request as soon as the previous
  one finished. The `cores client/server` column is CPU seconds over wall seconds of this process and
  of the tritonserver process tree; it shows whether the client competes for the 2 cores.
- **TTFT**: send → first response carrying text. **ITL**: time between consecutive responses divided by the
  `num_output_tokens` delta between them (the server sends one response per token with text; tokens
  held back by the detokenizer are attributed to the next response); pooled over all tokens of a run.
  **End-to-end**: send → final response. **out tok/s**: output tokens of all requests / (last final
  response − first send).
- **transformers baseline**: `LlamaForCausalLM.generate` in this process, greedy,
  `min_new_tokens = max_new_tokens`, same prompts as Lepton c=1, one at a time, after a warm-up call.
  TTFT and ITL come from a streamer that timestamps each `put()` (first put = prompt, then one per token).
- **Model**: the rows of the tied embedding of ids that decode to no complete text (ids beyond the demo
  tokenizer's 4,096, special and partial-byte tokens) are scaled by 0.01, so greedy decoding picks
  printable tokens and every token reaches the client as a response; the compute per token is unchanged.
- **KV occupancy**: tokens stored is estimated on the client as the sum over decoding requests of
  prompt + tokens received − 1 (the newest token's K/V is written by the next step); only samples where
  the server's `num_running` equals the client's count of decoding requests and nothing waits are used.
- **Shared prefix**: hit and query counters are deltas of `lepton_prefix_cache_hits_total` /
  `lepton_prefix_cache_queries_total` over the run (tokens).
- **Noise**: the machine is shared and has 2 cores; other jobs change the speed from minute to minute
  (see the load averages above). Compare figures within one run (same command, same date), and
  prefer medians and ratios over absolute values.
- **The bar**: the issue's targets; the ITL floor is the fp32 weight bytes read once per decode step at
  25 GB/s.
"""
