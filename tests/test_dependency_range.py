"""The supported dependency range: pyproject.toml's floors are the versions tests/constraints-oldest.txt pins, and
`make test-oldest` really runs on them."""

import os
from importlib import metadata

import pytest
from packaging.requirements import Requirement
from packaging.version import Version


tomllib = pytest.importorskip("tomllib")

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONSTRAINTS = os.path.join(REPO, "tests", "constraints-oldest.txt")
#: the dependencies whose floors the oldest run tests (torch is installed at 2.13.0 in both venvs)
TESTED_FLOORS = {"diffusers", "transformers", "huggingface-hub", "accelerate", "peft", "datasets", "safetensors"}
#: optional dependencies of the test extra whose floors the oldest run installs too, and the extra that declares them
TESTED_EXTRA_FLOORS = {"gradio": "serve"}


def _requirements():
    with open(os.path.join(REPO, "pyproject.toml"), "rb") as f:
        return {r.name.lower(): r for r in map(Requirement, tomllib.load(f)["project"]["dependencies"])}


def _extra_requirements(extra):
    with open(os.path.join(REPO, "pyproject.toml"), "rb") as f:
        requirements = tomllib.load(f)["project"]["optional-dependencies"][extra]
    return {r.name.lower(): r for r in map(Requirement, requirements)}


def _pins(path=CONSTRAINTS):
    pins = {}
    with open(path) as f:
        for line in f:
            line = line.split("#", 1)[0].strip()
            if line:
                name, version = line.split("==")
                pins[name.strip().lower()] = Version(version.strip())
    return pins


def _floor(requirement):
    floors = [Version(s.version) for s in requirement.specifier if s.operator == ">="]
    assert len(floors) == 1, f"{requirement} needs exactly one `>=` floor"
    return floors[0]


def test_the_oldest_constraints_pin_every_floor():
    requirements, pins = _requirements(), _pins()
    assert TESTED_FLOORS <= set(requirements)
    assert set(pins) == TESTED_FLOORS | set(TESTED_EXTRA_FLOORS)
    for name in sorted(TESTED_FLOORS):
        assert pins[name] == _floor(requirements[name]), f"{name}: pyproject floor and {CONSTRAINTS} pin differ"
        assert requirements[name].specifier.contains(pins[name])
    for name, extra in sorted(TESTED_EXTRA_FLOORS.items()):
        requirement = _extra_requirements(extra)[name]
        assert pins[name] == _floor(requirement), f"{name}: the {extra} extra's floor and {CONSTRAINTS} pin differ"
        # the tests install it through the test extra: the same range as the extra users install
        assert _extra_requirements("test")[name].specifier == requirement.specifier


def test_diffusers_is_a_capped_range_not_a_pin():
    specifier = _requirements()["diffusers"].specifier
    assert not any(s.operator == "==" for s in specifier)
    caps = [Version(s.version) for s in specifier if s.operator == "<"]
    assert len(caps) == 1 and caps[0] > _floor(_requirements()["diffusers"])


@pytest.mark.oldest
def test_the_oldest_run_has_the_pinned_versions():
    # `make test-oldest` names its constraints file; elsewhere (the newest venv) there is nothing to compare
    path = os.environ.get("ONESTEP_CONSTRAINTS")
    if not path:
        pytest.skip("ONESTEP_CONSTRAINTS is set by `make test-oldest`")
    pins = _pins(os.path.join(REPO, path))
    installed = {name: Version(metadata.version(name)) for name in pins}
    assert installed == pins


@pytest.mark.oldest
def test_tiny_tokenizers_encode_the_same_on_every_supported_transformers():
    # transformers 5 builds them from in-memory vocabularies, transformers 4 from the same `tokenizers` pipeline wrapped
    # in the Fast classes: the ids (and so every tiny-model test's numbers) must not depend on which one runs
    from diffusers_onestep.testing import tiny_clip_tokenizer, tiny_gemma_tokenizer, tiny_t5_tokenizer

    prompt = "A photo of a Cat, 3 dogs!"
    expected = {
        "clip": [
            512,
            320,
            79,
            71,
            78,
            83,
            334,
            78,
            325,
            320,
            66,
            64,
            339,
            267,
            274,
            67,
            78,
            70,
            338,
            256,
            513,
            513,
            513,
            513,
        ],
        "clip_pad_bang": [
            512,
            320,
            79,
            71,
            78,
            83,
            334,
            78,
            325,
            320,
            66,
            64,
            339,
            267,
            274,
            67,
            78,
            70,
            338,
            0,
            513,
            0,
            0,
            0,
        ],
        "t5": [3, 2, 12, 7, 4, 3, 2, 42, 61, 79, 3, 71, 14, 60, 2, 1, 0, 0, 0, 0, 0, 0, 0, 0],
        "gemma": [
            2,
            70,
            287,
            276,
            268,
            275,
            280,
            275,
            287,
            275,
            266,
            287,
            261,
            287,
            72,
            261,
            280,
            49,
            287,
            56,
            287,
            264,
            275,
            267,
        ],
    }
    tokenizers = {
        "clip": tiny_clip_tokenizer(),
        "clip_pad_bang": tiny_clip_tokenizer(pad_token="!"),
        "t5": tiny_t5_tokenizer(),
        "gemma": tiny_gemma_tokenizer(),
    }
    for name, tokenizer in tokenizers.items():
        ids = tokenizer(prompt, padding="max_length", max_length=24, truncation=True).input_ids
        assert ids == expected[name], name
