"""benchmarks/real_size_training.py on tiny components: every case runs through the library's training code."""

import importlib.util
import json
import math
import os

import pytest


BENCHMARK = os.path.join(os.path.dirname(__file__), os.pardir, "benchmarks", "real_size_training.py")


@pytest.fixture(scope="module")
def benchmark():
    spec = importlib.util.spec_from_file_location("real_size_training", BENCHMARK)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_tiny_training_step_reports_every_case(benchmark, capsys):
    code = benchmark.main(["--tiny", "--device", "cpu", "--families", "pixart_sigma", "--steps", "1"])
    assert code == 0
    report = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    cases = report["results"]["pixart_sigma"]
    assert set(cases) == set(benchmark.CASES)
    for case, result in cases.items():
        numbers = [result["peak_gib"], result["step_s"], result["overhead"], *result["passes_s"].values()]
        assert all(math.isfinite(x) and x > 0 for x in numbers), (case, result)
        assert result["optimizer_bytes"] > 0
    # one frozen backbone + two adapters holds fewer bytes than a frozen teacher and two full copies
    shared = sum(cases["dmd2_lora_shared"]["parameter_bytes"].values())
    separate = sum(cases["dmd2_separate"]["parameter_bytes"].values())
    assert shared < separate
    assert (
        cases["dmd2_separate"]["parameter_bytes"]["trainable"]
        == 2 * cases["dmd2_separate"]["parameter_bytes"]["frozen"]
    )
    # f-distill's step runs the discriminator's passes too
    assert "teacher features fwd+bwd (GAN)" in cases["fdistill_lora_shared"]["passes_s"]
