"""benchmarks.peers.report: the section docs/benchmarks.md copies from the Triton scheduling reports."""

from __future__ import annotations

from benchmarks.peers.report import triton_scheduling

INSTANCES = """# Engine instances

**Result: one instance stays the default** (measured).
Second line of the result.

Other prose.

    nice -n 19 .venv/bin/python -m benchmarks.instances      # this report

| a | b |
|---|---|
| 1 | 2 |

Ratios to the first setup:

| model | ratio |
|---|---|
| demo | 0.51 |
"""

STATELESS = """# Stateless

`python -m benchmarks.stateless` (`make perf-stateless`) starts a fresh server.

## The settings kept

| model | batching |
|---|---|
| `tokenizer` | on |

One more line.

## Tokenizer

`python -m benchmarks.stateless --models tokenizer --setups off:1,on:1`

| rows | not copied |
|---|---|
"""


def test_copies_the_conclusion_commands_and_last_table_of_instances_and_the_settings_kept(tmp_path):
    (tmp_path / "benchmarks-instances.md").write_text(INSTANCES)
    (tmp_path / "benchmarks-triton.md").write_text(STATELESS)
    text = "\n".join(triton_scheduling(tmp_path))
    instances = text[text.index("### Engine instances"):text.index("### Tokenizer")]
    assert "**Result: one instance stays the default** (measured).\nSecond line of the result.\n\n```bash" in instances
    assert "Other prose" not in instances and "| 1 | 2 |" not in instances
    assert "```bash\nnice -n 19 .venv/bin/python -m benchmarks.instances      # this report\n```" in instances
    assert instances.rstrip().endswith("Ratios to the first setup:\n\n| model | ratio |\n|---|---|\n| demo | 0.51 |")
    stateless = text[text.index("### Tokenizer and embeddings"):]
    assert "| `tokenizer` | on |\n\nOne more line.\n\nMade by" in stateless
    assert "not copied" not in stateless and "make perf-stateless" not in stateless
    assert stateless.rstrip().endswith("- `python -m benchmarks.stateless --models tokenizer --setups off:1,on:1`")


def test_without_the_reports_only_the_heading_remains(tmp_path):
    lines = triton_scheduling(tmp_path)
    assert lines[1].startswith("## Triton's scheduling") and "###" not in "\n".join(lines)
