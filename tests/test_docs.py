"""docs/inference.md stays true: its tested examples run, and its students table equals presets.PRESETS."""

import os
import re
import shutil

from diffusers_onestep.pipelines.presets import markdown_table


REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
INFERENCE_DOC = os.path.join(REPO, "docs", "inference.md")


def _read(path):
    with open(path, encoding="utf-8") as f:
        return f.read()


def _tested_blocks(text):
    """The fenced python blocks right after a ``<!-- test -->`` line, in document order."""
    return re.findall(r"^<!-- test -->\n```python\n(.*?)^```", text, flags=re.S | re.M)


def test_inference_examples_run(tmp_path, monkeypatch):
    blocks = _tested_blocks(_read(INFERENCE_DOC))
    assert len(blocks) >= 5
    # The examples run from a checkout: an empty folder with the community-pipeline entry files beside them.
    shutil.copytree(os.path.join(REPO, "pipelines"), tmp_path / "pipelines")
    monkeypatch.chdir(tmp_path)
    namespace = {"__name__": "docs_inference"}
    for i, code in enumerate(blocks):
        exec(compile(code, f"docs/inference.md (tested block {i + 1})", "exec"), namespace)
    assert (tmp_path / "cat.png").is_file()
    assert (tmp_path / "my-student" / "model_index.json").is_file()


def test_students_table_matches_presets():
    text = _read(INFERENCE_DOC)
    match = re.search(r"<!-- presets-table:start -->\n(.*?)\n<!-- presets-table:end -->", text, flags=re.S)
    assert match, "docs/inference.md lost its presets-table markers"
    assert match.group(1) == markdown_table(), (
        "docs/inference.md's students table is stale; paste `python -m diffusers_onestep.pipelines.presets`"
    )


def test_benchmark_doc_names_its_command():
    text = _read(os.path.join(REPO, "docs", "benchmarks.md"))
    assert "## Inference overhead" in text
    assert "benchmarks/inference_overhead.py" in text
    assert os.path.isfile(os.path.join(REPO, "benchmarks", "inference_overhead.py"))


def test_evaluation_examples_run(tmp_path, monkeypatch):
    blocks = _tested_blocks(_read(os.path.join(REPO, "docs", "evaluation.md")))
    assert len(blocks) == 2
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("DIFFUSERS_ONESTEP_CACHE", str(tmp_path / "feature-cache"))  # restored after the test
    namespace = {"__name__": "docs_evaluation"}
    for i, code in enumerate(blocks):
        exec(compile(code, f"docs/evaluation.md (tested block {i + 1})", "exec"), namespace)
    assert (tmp_path / "tiny-student" / "evaluation" / "grid.png").is_file()
