"""The notebooks executed end to end with nbclient on tiny models (no downloads): notebooks/inference.ipynb on the tiny
random model, notebooks/neural_debugger.ipynb on the tiny model trained on traces (tests/conftest.py).

The parameters cell is extended to pick MODEL = "tiny" and a temporary WORK_DIR. The kernel is this interpreter (a
"python3" kernel spec written to a temporary JUPYTER_PATH, which comes first in the search, so a user's own "python3"
spec cannot pick another Python), so it imports the cwm_jax under test; the parameters cell also asserts that.
"""

import json
import sys
from pathlib import Path

import nbclient
import nbformat
import pytest

NOTEBOOKS = Path(__file__).resolve().parents[1] / "notebooks"
NOTEBOOK = NOTEBOOKS / "inference.ipynb"
DEBUGGER = NOTEBOOKS / "neural_debugger.ipynb"


def _outputs_text(cell) -> str:
    parts = []
    for out in cell.get("outputs", []):
        if out.get("output_type") == "stream":
            parts.append(out.get("text", ""))
        elif out.get("output_type") in ("execute_result", "display_data"):
            parts.append(out.get("data", {}).get("text/plain", ""))
    return "".join(parts)


@pytest.mark.parametrize("notebook", [NOTEBOOK, DEBUGGER], ids=lambda p: p.name)
def test_committed_notebook_has_no_outputs(notebook):
    nb = nbformat.read(notebook, as_version=4)
    nbformat.validate(nb)
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert all(not c.outputs and c.execution_count is None for c in code)
    assert sum("parameters" in c.metadata.get("tags", []) for c in code) == 1


def _execute(tmp_path, monkeypatch, params: str, notebook=NOTEBOOK) -> list:
    """Run the notebook with its parameters cell extended by `params` (MODEL = "tiny" and a temporary WORK_DIR come
    first); returns the executed code cells, after checking that none errored or was skipped."""
    spec = tmp_path / "jupyter" / "kernels" / "python3"
    spec.mkdir(parents=True)
    argv = [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"]
    (spec / "kernel.json").write_text(json.dumps({"argv": argv, "display_name": "Python 3", "language": "python"}))
    monkeypatch.setenv("JUPYTER_PATH", str(tmp_path / "jupyter"))
    nb = nbformat.read(notebook, as_version=4)
    (cell,) = [c for c in nb.cells if "parameters" in c.metadata.get("tags", [])]
    cell.source = (
        cell.source
        + f'\nMODEL = "tiny"\nWORK_DIR = {str(tmp_path / "work")!r}\n{params}\n'
        + f"import sys\nassert sys.executable == {sys.executable!r}, sys.executable\n"
    )
    client = nbclient.NotebookClient(
        nb, timeout=120, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}
    )
    client.execute()  # raises CellExecutionError on the first cell that errors

    code = [c for c in nb.cells if c.cell_type == "code"]
    errors = [o for c in code for o in c.outputs if o.output_type == "error"]
    assert not errors, errors
    texts = [_outputs_text(c) for c in code]
    assert not any(t.strip() == "skipped" for t in texts), texts
    return code


def _cell(code, snippet: str) -> str:
    (cell,) = [c for c in code if snippet in c.source]
    return _outputs_text(cell)


def test_inference_notebook_runs_on_tiny_model(tmp_path, monkeypatch):
    code = _execute(tmp_path, monkeypatch, "MAX_NEW_TOKENS = 24")
    texts = [_outputs_text(c) for c in code]
    assert any("nothing to do" in t for t in texts), "the install cell should not install when cwm_jax is importable"
    memory = _cell(code, "serving.choose_bits(")
    assert "not reported" in memory and "weights: float" in memory, memory  # CPU: "auto" keeps the float weights
    chat_lines = _cell(code, "gen.chat(").splitlines()
    assert any(line.startswith("reasoning:") for line in chat_lines), chat_lines
    assert any(line.startswith("answer:") for line in chat_lines), chat_lines
    trace = _cell(code, "gen.predict_trace(")
    assert "frame(s)" in trace or "the tiny model is random" in trace
    assert (tmp_path / "work" / "tiny-orbax" / "config.json").is_file()
    assert not (tmp_path / "work" / "tiny-orbax" / "quantization.json").exists()


def test_inference_notebook_runs_int8_on_tiny_model(tmp_path, monkeypatch):
    """BITS = "8": the convert cell quantizes the tiny checkpoint and the rest runs on the int8 model."""
    code = _execute(tmp_path, monkeypatch, 'BITS = "8"\nMAX_NEW_TOKENS = 8')
    assert "weights: int8" in _cell(code, "serving.choose_bits(")
    quantized = tmp_path / "work" / "tiny-orbax-int8"
    assert (quantized / "config.json").is_file() and (quantized / "quantization.json").is_file()
    assert "int8 (per output channel, quantized head) weights" in _cell(code, "Generator.from_checkpoint(")
    assert any(line.startswith("answer:") for line in _cell(code, "gen.chat(").splitlines())


def test_neural_debugger_notebook_runs_on_the_trace_model(tmp_path, monkeypatch, trained_trace_model):
    """The debugger notebook on the tiny model trained on traces, with the release's example and a real run."""
    params = f"CHECKPOINT = {str(trained_trace_model['trained'])!r}\nCALL = 'f(\"r\")'"
    code = _execute(tmp_path, monkeypatch, params, notebook=DEBUGGER)
    assert 'real run of f("r"): ok' in _cell(code, "run.trace(")
    assert "-> def f(c):" in _cell(code, "run.trace(")  # the session starts at the real call frame
    steps = _cell(code, "def show(command)")
    assert steps.count("[step] predicted") == 2 and "[next] predicted" in steps and "real      ->" in steps
    assert "output exact:" in _cell(code, "evaluate.score(")
