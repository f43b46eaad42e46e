"""benchmarks/RESULTS.md is what results_tables.py makes of the committed JSON, and every
result renders with its command, date, machine and load averages."""

import json
import os
import re

from test_benchmarks import import_bench

results_tables = import_bench("results_tables")
bc = import_bench("bench_common")


def test_results_md_is_up_to_date():
    """RESULTS.md cannot drift from benchmarks/results/: after a benchmark writes new JSON
    there, run python benchmarks/results_tables.py and commit both."""
    assert results_tables.RESULTS_MD.read_text() == results_tables.render(), \
        "benchmarks/RESULTS.md is out of date: run python benchmarks/results_tables.py"


def test_every_committed_result_renders():
    files = results_tables.result_files()
    assert files, "no JSON under benchmarks/results/"
    for path, result in files:
        assert results_tables.benchmark_of(path, result) in results_tables.RENDERERS, path
        text = results_tables.section(path, result)
        assert re.search(r"\n    ([A-Z_]+=\S+ )*python ", text), f"{path}: no command"
        assert "- date: " in text and "- machine: " in text and "- load average" in text
        assert "\n| " in text, f"{path}: no table"
        if "loadavg_start" in result.get("machine", {}):  # written since the field exists
            assert "predates" not in text


def test_write_json_records_the_run(tmp_path, monkeypatch):
    """A result written through bench_common carries its command (with the ADAMX_*
    variables), its start and end (UTC) and the load averages at both, and renders them."""
    for name in [k for k in os.environ if k.startswith("ADAMX_")]:  # (CI sets some)
        monkeypatch.delenv(name)
    monkeypatch.setenv("ADAMX_MNIST_DIR", "/data/mnist")
    monkeypatch.setattr("sys.argv", ["benchmarks/clip_step.py", "--threads", "2"])
    facts = bc.machine_facts()
    records = [dict(case="plain", loop=name, median_s=t, ratio=t / 0.04, elements=100,
                    threads=2) for name, t in (("torch clip + fused", 0.04), ("adamx", 0.03))]
    path = bc.write_json(tmp_path / "results" / "clip" / "clip_step.json",
                         dict(benchmark="clip_step", machine=facts, config={"repeats": 3},
                              records=records))
    result = json.loads(path.read_text())
    assert result["command"] == ("ADAMX_MNIST_DIR=/data/mnist python benchmarks/clip_step.py "
                                 "--threads 2")
    m = result["machine"]
    for key in ("started_utc", "finished_utc"):
        assert m[key].endswith("Z") and m[key][10] == "T"
    assert m["started_utc"] <= m["finished_utc"]
    for key in ("loadavg_start", "loadavg_end"):
        assert len(m[key]) == 3 and all(x >= 0 for x in m[key])
    text = results_tables.render(tmp_path / "results")
    assert "    ADAMX_MNIST_DIR=/data/mnist python benchmarks/clip_step.py --threads 2" in text
    assert f"- date: {m['started_utc']} to {m['finished_utc']} (UTC)" in text
    assert "at the start" in text and "predates" not in text
    assert re.search(r"\| plain +\| adamx +\| +30\.00 ms \| +0\.750 \|", text)
