"""benchmarks/data_scale.py in a reduced mode: two sizes, the latent-cache mode, cold runs only, in this process
(the real measurement starts a process per case)."""

import importlib.util
import json
import math
import os


BENCHMARK = os.path.join(os.path.dirname(__file__), os.pardir, "benchmarks", "data_scale.py")


def test_data_scale_reports_memory_time_and_caches_per_size(capsys):
    spec = importlib.util.spec_from_file_location("data_scale", BENCHMARK)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    argv = ["--sizes", "4", "12", "--resolution", "16", "--image_size", "32", "--modes", "cached", "--in_process"]
    assert module.main(argv + ["--temperatures", "cold"]) == 0
    report = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    small, large = (report["results"]["cached"][size]["cold"] for size in ("4", "12"))
    for case in (small, large):
        assert all(math.isfinite(case[key]) and case[key] > 0 for key in ("rss_mib", "first_step_s", "cache_mib"))
    # the caches on disk grow with the data (three times the images and prompts) ...
    assert 2 < large["cache_mib"] / small["cache_mib"] < 4.5
    assert set(report["ratios"]["cached"]) == {"cold_rss_mib", "cold_first_step_s"}
