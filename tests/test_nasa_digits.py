"""benchmarks/nasa_digits.py's core on a tiny scale: the bundled digits teacher at one step stands in for a student
(the measurement code is the same); λ = 0 is the image without a negative prompt, so its FD ratio is exactly 1."""

import importlib.util
import os

import pytest


REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def nasa_digits():
    spec = importlib.util.spec_from_file_location("nasa_digits", os.path.join(REPO, "benchmarks", "nasa_digits.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_requests_exclude_or_name_the_negative_digit(nasa_digits):
    prompts, requested, classes = nasa_digits.requests("other", 3, per_digit=2)
    assert len(prompts) == 18 and 3 not in requested and classes == [0, 1, 2, 4, 5, 6, 7, 8, 9]
    prompts, requested, classes = nasa_digits.requests("generic", 3, per_digit=2)
    assert requested is None and set(prompts) == {nasa_digits.GENERIC_PROMPT} and 3 not in classes
    prompts, requested, classes = nasa_digits.requests("self", 3, per_digit=4)
    assert requested == [3] * 4 and classes == [3] and all("3" in p or "three" in p for p in prompts)


def test_measure_on_the_one_step_teacher(nasa_digits):
    from diffusers_onestep import OneStepPipeline
    from diffusers_onestep.demo import digits

    pipe = OneStepPipeline.from_pretrained(digits.TEACHER_DIR, conditioning_timesteps=[400])
    pipe.set_progress_bar_config(disable=True)
    rows = nasa_digits.measure(pipe, [0.0, 1.0], per_digit=2, negative_digits=[1, 7])
    assert [(r["setting"], r["scale"]) for r in rows] == [(s, x) for s in nasa_digits.SETTINGS for x in (0.0, 1.0)]
    for r in rows:
        assert 0.0 <= r["share_k"] <= 1.0
        if r["setting"] == "self":
            assert r["fd"] is None and r["accuracy"] is None
        else:
            assert r["fd"] > 0
        if r["setting"] != "self" and r["scale"] == 0.0:
            assert r["fd_ratio"] == pytest.approx(1.0)
    # λ > 0 changes the images (NASA acts), so at least one FD differs from λ = 0's
    by = {(r["setting"], r["scale"]): r for r in rows}
    assert by[("other", 1.0)]["fd"] != by[("other", 0.0)]["fd"]
    table = nasa_digits.format_table(rows)
    assert table.count("\n") == len(rows) + 1 and "| self | 1 |" in table and "—" in table
