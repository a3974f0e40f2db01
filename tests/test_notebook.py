"""notebooks/inference.ipynb executed end to end with nbclient on the tiny random model (no downloads).

The parameters cell is replaced to pick MODEL = "tiny" and a temporary WORK_DIR. The kernel is this interpreter (a
"python3" kernel spec written to a temporary JUPYTER_PATH, which comes first in the search, so a user's own "python3"
spec cannot pick another Python), so it imports the cwm_jax under test; the parameters cell also asserts that.
"""

import json
import sys
from pathlib import Path

import nbclient
import nbformat

NOTEBOOK = Path(__file__).resolve().parents[1] / "notebooks" / "inference.ipynb"


def _outputs_text(cell) -> str:
    parts = []
    for out in cell.get("outputs", []):
        if out.get("output_type") == "stream":
            parts.append(out.get("text", ""))
        elif out.get("output_type") in ("execute_result", "display_data"):
            parts.append(out.get("data", {}).get("text/plain", ""))
    return "".join(parts)


def test_committed_notebook_has_no_outputs():
    nb = nbformat.read(NOTEBOOK, as_version=4)
    nbformat.validate(nb)
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert all(not c.outputs and c.execution_count is None for c in code)
    assert sum("parameters" in c.metadata.get("tags", []) for c in code) == 1


def test_inference_notebook_runs_on_tiny_model(tmp_path, monkeypatch):
    spec = tmp_path / "jupyter" / "kernels" / "python3"
    spec.mkdir(parents=True)
    argv = [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"]
    (spec / "kernel.json").write_text(json.dumps({"argv": argv, "display_name": "Python 3", "language": "python"}))
    monkeypatch.setenv("JUPYTER_PATH", str(tmp_path / "jupyter"))
    nb = nbformat.read(NOTEBOOK, as_version=4)
    (params,) = [c for c in nb.cells if "parameters" in c.metadata.get("tags", [])]
    params.source = (
        params.source
        + f'\nMODEL = "tiny"\nWORK_DIR = {str(tmp_path / "work")!r}\nMAX_NEW_TOKENS = 24\n'
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
    assert any("nothing to do" in t for t in texts), "the install cell should not install when cwm_jax is importable"
    assert not any(t.strip() == "skipped" for t in texts), texts
    (chat,) = [c for c in code if "gen.chat(" in c.source]
    chat_lines = _outputs_text(chat).splitlines()
    assert any(line.startswith("reasoning:") for line in chat_lines), chat_lines
    assert any(line.startswith("answer:") for line in chat_lines), chat_lines
    (trace,) = [c for c in code if "gen.predict_trace(" in c.source]
    assert "frame(s)" in _outputs_text(trace) or "the tiny model is random" in _outputs_text(trace)
    assert (tmp_path / "work" / "tiny-orbax" / "config.json").is_file()
