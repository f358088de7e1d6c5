"""The soak's report: JSON, markdown and plots, all from the dict benchmarks.soak.run() builds."""

from __future__ import annotations

import json
import textwrap
from pathlib import Path


def write_report(report: dict, out_dir: Path) -> list[Path]:
    """soak.json, soak.md and img/soak_*.png under out_dir; the paths written."""
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = [out_dir / "soak.json"]
    paths[0].write_text(json.dumps(report, indent=1, default=str) + "\n")
    images = plots(report, out_dir / "img")
    doc = out_dir / "soak.md"
    doc.write_text("\n".join(markdown(report, [p.relative_to(out_dir) for p in images])) + "\n")
    return [*paths, doc, *images]


def _fmt(value, digits: int = 1) -> str:
    return "–" if value is None else f"{value:,.{digits}f}"


def _percentiles(values: dict) -> str:
    return " / ".join(_fmt(values.get(p)) for p in ("p50", "p90", "p99"))


def markdown(report: dict, images: list[Path]) -> list[str]:
    s, v, o = report["summary"], report["verdict"], report["options"]
    after = [x for x in report["samples"] if x["t_s"] >= o["warmup_s"] and x["rss_mib"] is not None]
    first, last = (after[0], after[-1]) if after else ({}, {})
    lines = [
        "# Soak", "",
        f"`{report['command']}` — {report['date']}, code {report['code'].get('head', '?')}"
        f"{' (uncommitted changes)' if report['code'].get('uncommitted') else ''}.", "",
        f"**{'PASSED' if v['passed'] else 'FAILED'}**" + (": " + "; ".join(v["failures"]) if v["failures"] else ""), "",
        f"{o['concurrency']} concurrent gRPC streams for {o['duration_s']:.0f} s (warm-up {o['warmup_s']:.0f} s), "
        f"prompts of {o['prompt_tokens'][0]}–{o['prompt_tokens'][1]} tokens (log-uniform), "
        f"{o['output_tokens'][0]}–{o['output_tokens'][1]} output tokens each (uniform, ignore_eos, greedy); "
        f"a sample every {o['interval_s']:.0f} s. Server: {report['target']['grpc_url']}, model "
        f"`{report['target']['model_dir']}`.", "",
        "| figure | value |", "|---|---|",
        f"| requests completed / failed | {s['completed']:,} / {s['errors']:,} |",
        f"| output tokens / prompt tokens | {s['output_tokens']:,} / {s['prompt_tokens']:,} |",
        f"| output tokens/s | {_fmt(s['output_tok_per_s'])} |",
        f"| TTFT p50 / p90 / p99 (ms) | {_percentiles(s['ttft_ms'])} |",
        f"| ITL p50 / p90 / p99 (ms) | {_percentiles(s['itl_ms'])} |",
        f"| RSS after warm-up → at the end (MiB) | {_fmt(first.get('rss_mib'))} → {_fmt(last.get('rss_mib'))} |",
        f"| RSS growth, first to last fifth after warm-up (MiB) | {_fmt(v['rss_growth_mib'])} "
        f"(bound {o['rss_bound_mib']}) |",
        f"| RSS slope after warm-up (MiB/hour, least squares) | {_fmt(v['rss_slope_mib_per_hour'], 2)} |",
        f"| threads after warm-up → at the end | {first.get('threads', '–')} → {last.get('threads', '–')} "
        f"(growth {_fmt(v['thread_growth'], 0)}, bound {o['thread_bound']}) |",
        f"| KV cache usage, max | {_fmt((s['kv_cache_usage_max'] or 0) * 100)} % |",
        f"| waiting requests, max | {s['num_waiting_max']} |",
        f"| engine idle at the end (no request, no KV block) | {'yes' if report['idle_at_end'] else 'no'} |",
        "",
        "RSS and threads are summed over the server's process tree (tritonserver, its Python backend stubs and",
        "their watchers), read from `/proc/<pid>/status`; KV and queue figures are Lepton's gauges on the",
        "metrics port; TTFT and ITL percentiles in the plots are per sampling window (requests that ended in it).",
        "",
    ]
    return lines + [f"![{p.stem}]({p})" for p in images]


def plots(report: dict, img_dir: Path) -> list[Path]:
    """RSS and threads, KV and queue, latency percentiles over the run, as PNG files."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    img_dir.mkdir(parents=True, exist_ok=True)
    samples, options = report["samples"], report["options"]
    t = [s["t_s"] / 60 for s in samples]
    title = "\n".join(textwrap.wrap(f"soak, {options['concurrency']} streams: {report['command']}", 110))
    paths = []

    fig, ax = plt.subplots(figsize=(8, 4))
    if samples and samples[0]["rss_mib"] is not None:
        ax.plot(t, [s["rss_mib"] for s in samples], label="RSS, server tree (MiB)")
        ax2 = ax.twinx()
        ax2.plot(t, [s["threads"] for s in samples], color="gray", lw=0.8, label="threads")
        ax2.set_ylabel("threads")
        ax2.legend(fontsize=8, loc="lower right")
    ax.axvline(options["warmup_s"] / 60, color="red", lw=0.8, ls="--", label="end of warm-up")
    ax.set(xlabel="minutes", ylabel="MiB")
    ax.set_title(title, fontsize=7)
    ax.legend(fontsize=8, loc="upper left")
    paths.append(_save(plt, fig, img_dir / "soak_memory.png"))

    fig, ax = plt.subplots(figsize=(8, 4))
    ax.plot(t, [s["kv_cache_usage"] * 100 for s in samples], label="KV cache usage (%)")
    ax.plot(t, [s["num_running"] for s in samples], label="running")
    ax.plot(t, [s["num_waiting"] for s in samples], label="waiting")
    ax.set(xlabel="minutes")
    ax.set_title(title, fontsize=7)
    ax.legend(fontsize=8)
    paths.append(_save(plt, fig, img_dir / "soak_kv.png"))

    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for ax, key, name in ((axes[0], "ttft_ms", "TTFT"), (axes[1], "itl_ms", "ITL")):
        for p, style in (("p50", "-"), ("p99", ":")):
            ax.plot(t, [s[key].get(p) for s in samples], style, label=f"{name} {p}")
        ax.set(xlabel="minutes", ylabel="ms", title=f"{name} per window")
        ax.legend(fontsize=8)
    fig.suptitle(title, fontsize=7)
    paths.append(_save(plt, fig, img_dir / "soak_latency.png"))
    return paths


def _save(plt, fig, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
