"""benchmarks/attention.py on the CPU: the block-visit table against the schedule, and the tiny smoke timing path."""

import importlib.util
import json
import pathlib
import sys

import pytest

from cwm_jax.kernels import schedule
from cwm_jax.kernels.splash import splash_visits

BENCHMARKS = pathlib.Path(__file__).resolve().parents[1] / "benchmarks"


@pytest.fixture(scope="module")
def bench():
    """benchmarks/attention.py as a module (its folder on sys.path for `common`, as when run as a script)."""
    with pytest.MonkeyPatch.context() as mp:
        mp.syspath_prepend(str(BENCHMARKS))
        spec = importlib.util.spec_from_file_location("attention_benchmark", BENCHMARKS / "attention.py")
        module = importlib.util.module_from_spec(spec)
        mp.setitem(sys.modules, spec.name, module)  # dataclasses look their module up while the file executes
        spec.loader.exec_module(module)
        yield module


def _table_rows(text: str) -> list[list[str]]:
    """The cells of the last markdown table in `text` (its data rows), which must end the output."""
    lines = text.rstrip("\n").splitlines()
    rows = []
    for line in reversed(lines):
        if not line.startswith("|"):
            break
        rows.append([cell.strip() for cell in line.strip("|").split("|")])
    assert rows, f"the output does not end with a table:\n{text[-2000:]}"
    rows.reverse()
    return rows[2:]  # header and separator


def test_visit_table_matches_the_schedule(bench, tmp_path, capsys):
    path = tmp_path / "visits.json"
    argv = ["--table", "--seq-lens", "1024", "1000", "--window", "256", "--blocks", "128", "256", "--json", str(path)]
    assert bench.main(argv) == 0
    printed = _table_rows(capsys.readouterr().out)
    result = json.loads(path.read_text())
    assert result["mode"] == "table" and len(printed) == len(result["visits"]) == 4
    for cells, row in zip(printed, result["visits"], strict=True):
        T, W, block = int(cells[0]), int(cells[1]), int(cells[2])
        counts = schedule.visit_counts(T, W, block, block)
        assert [int(c) for c in cells[3:7]] == [counts.grid, counts.forward, counts.dq, counts.dkv]
        assert (row["forward"], row["dq"], row["dkv"], row["grid"]) == (
            counts.forward,
            counts.dq,
            counts.dkv,
            counts.grid,
        )
        if T % block == 0:
            assert int(cells[7]) == schedule.closed_form_pairs(T, W, block) == counts.forward
        else:
            assert cells[7] == "-"
        splash = splash_visits(T, W, block, block)
        assert [int(c) for c in cells[9:13]] == [splash["forward"], splash["grid"], splash["dkv"], splash["dkv_grid"]]


def test_smoke_runs_the_timing_path(bench, tmp_path, capsys):
    path = tmp_path / "smoke.json"
    assert bench.main(["--smoke", "--json", str(path)]) == 0
    out = capsys.readouterr().out
    result = json.loads(path.read_text())
    assert result["mode"] == "smoke" and result["checks_ok"]
    rows = result["rows"]
    assert len(rows) == 3 * 2 * 2  # (xla, ours, cudnn stand-in) x (local, global) x (forward, forward+backward)
    assert not [r for r in rows if "error" in r]
    for r in rows:
        assert r["seconds"] > 0 and r["tflops"] > 0 and r["runs"] == 1
        if r["impl"] != "xla":
            assert r["ok"] and set(r["max_abs_err"]) == ({"o"} if r["pass"] == "forward" else {"o", "dq", "dk", "dv"})
    for r in result["ratios"]:
        assert all(r[k] > 0 for k in ("local_vs_cudnn_causal", "local_vs_cudnn_window", "global_vs_cudnn_causal"))
    assert out.index("cuDNN seconds / our seconds") < out.index("| T | impl |")
    assert len(_table_rows(out)) == len(rows)


def test_flop_convention_counts_visible_pairs(bench):
    assert bench.visible_pairs(4, None) == 10
    assert bench.visible_pairs(5, 2) == 1 + 2 * 4  # query 0 sees itself, the others 2 keys
    assert bench.visible_pairs(8, 8) == bench.visible_pairs(8, None)
    setup = bench.Setup(seq_lens=(8,), window=2, B=2, N=3, H=16)
    assert bench.credited_flops(setup, 8, 2, "forward") == 4 * 15 * 16 * 3 * 2
    assert bench.credited_flops(setup, 8, 2, "forward+backward") == 3.5 * 4 * 15 * 16 * 3 * 2


def test_gpu_sweep_smoke_runs_on_cpu():
    """benchmarks/gpu_sweep.py --smoke: one tiny configuration through the interpreted kernel, both passes timed."""
    import subprocess

    out = subprocess.run(
        [sys.executable, str(BENCHMARKS / "gpu_sweep.py"), "--smoke"], capture_output=True, text=True, check=True
    ).stdout
    assert "fwd" in out and "fail" not in out, out
