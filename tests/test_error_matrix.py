"""Every refused input: one actionable sentence; the CLI exits 2 before loading a model and writes nothing; and
docs/errors.md lists the message verbatim."""

import os
import re

import error_cases
import pytest
from error_cases import all_cases, build_context, make_previous_run


os.environ.setdefault("HF_HUB_OFFLINE", "1")
CASES = all_cases()
DOC = os.path.join(error_cases.REPO, "docs", "errors.md")


@pytest.fixture(scope="module")
def context(tmp_path_factory):
    ctx = build_context(str(tmp_path_factory.mktemp("errors")))
    make_previous_run(ctx)
    return ctx


@pytest.fixture
def no_model_loading(monkeypatch):
    import diffusers

    def refuse(*args, **kwargs):
        raise AssertionError("a model was loaded before the input was refused")

    monkeypatch.setattr(diffusers.DiffusionPipeline, "from_pretrained", refuse)


def test_the_matrix_is_large():
    assert len(CASES) >= 25
    assert {c.area for c in CASES} >= {"OneStepPipeline.__call__", "loading", "OneStepScheduler", "training CLI"}


@pytest.mark.parametrize("case", CASES, ids=[f"{c.area}: {c.name}" for c in CASES])
def test_refusal(case, context, request):
    if case.cli:
        request.getfixturevalue("no_model_loading")
        before = set(os.listdir(context["root"]))
    message = case.run(context)
    assert "\n" not in message and message.strip() == message
    if not (case.cli and message.startswith("argument ")):  # argparse's own usage errors have their format
        assert message.endswith("."), message
        # one sentence: no full stop followed by a new capitalised sentence
        assert not re.search(r"\.\s+[A-Z]", message.replace("e.g. ", "").replace("i.e. ", "")), message
    if case.cli:
        assert context["last_exit_code"] == 2
        assert set(os.listdir(context["root"])) == before, "nothing may be written"
        assert not os.path.exists(context["out"])
    with open(DOC, encoding="utf-8") as f:
        doc = f.read()
    assert error_cases.normalise(message, context).replace("|", "\\|") in doc, (
        f"docs/errors.md is stale for {case.name!r}: run python tests/error_cases.py"
    )


def test_pickle_payload_did_not_run(context):
    # by name: the rows are listed for the doc, and their positions move as rows are added
    case = next(c for c in error_cases.loading_cases() if c.name == "legacy .bin holding a pickle payload")
    case.run(context)
    assert not os.path.exists(context["marker"])
