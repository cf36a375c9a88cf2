"""Shared fixtures. Everything runs offline on tiny random components (diffusers_onestep.testing).

The environment is set before anything imports huggingface_hub, diffusers or transformers: offline Hub and
datasets, and a private ``HF_MODULES_CACHE`` (diffusers copies community-pipeline files there) so the tests never
write into the user's Hugging Face folders. Torch runs one intra-op thread (see below).
"""

import atexit
import os
import shutil
import tempfile


os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
if "HF_MODULES_CACHE" not in os.environ:
    _modules_cache = tempfile.mkdtemp(prefix="onestep-test-hf-modules-")
    os.environ["HF_MODULES_CACHE"] = _modules_cache
    atexit.register(shutil.rmtree, _modules_cache, True)

import pytest  # noqa: E402
import torch  # noqa: E402
from training_utils import hub_account  # noqa: E402


# The tiny models gain nothing from intra-op threads, and on a loaded 2-core machine two threads per process made
# each call ~10x slower (threads spinning against other processes); one thread keeps the suite fast and stable.
torch.set_num_threads(1)


@pytest.fixture(scope="session")
def native_folder(tmp_path_factory):
    """``native_folder(family)``: path of a saved tiny native pipeline of ``family`` (built once per session)."""
    from diffusers_onestep.testing import save_tiny_native_pipeline

    root = tmp_path_factory.mktemp("native")
    folders = {}

    def get(family: str) -> str:
        if family not in folders:
            folders[family] = save_tiny_native_pipeline(family, str(root / family))
        return folders[family]

    return get


@pytest.fixture(scope="session")
def student_folder(tmp_path_factory, native_folder):
    """``student_folder(family)``: a tiny student saved by ``OneStepPipeline.save_pretrained`` (parity timesteps)."""
    root = tmp_path_factory.mktemp("students")
    folders = {}

    def get(family: str) -> str:
        if family not in folders:
            pipe = _load_student(native_folder(family), family)
            folders[family] = str(root / family)
            pipe.save_pretrained(folders[family])
        return folders[family]

    return get


def _load_student(folder: str, family: str, **kwargs):
    """``OneStepPipeline.from_pretrained(folder)`` at the family's parity timesteps, progress bar off."""
    from diffusers_onestep import OneStepPipeline
    from diffusers_onestep.testing import tiny_fixture

    timesteps = tiny_fixture(family).parity_timesteps
    if timesteps is not None:
        kwargs.setdefault("conditioning_timesteps", timesteps)
    pipe = OneStepPipeline.from_pretrained(folder, **kwargs)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="session")
def student(native_folder):
    """``student(family)``: a loaded tiny OneStepPipeline, shared by the tests that only call it (do not mutate)."""
    pipes = {}

    def get(family: str):
        if family not in pipes:
            pipes[family] = _load_student(native_folder(family), family)
        return pipes[family]

    return get


def _run(pipe, prompt="a photo of a cat", seed=0, **kwargs):
    kwargs.setdefault("output_type", "np")
    return pipe(prompt, generator=torch.Generator().manual_seed(seed), **kwargs).images


@pytest.fixture(scope="session")
def load_student():
    """``load_student(folder, family, **kw)``: ``OneStepPipeline.from_pretrained`` at the family's parity
    timesteps (``testing.tiny_fixture(family).parity_timesteps``) with the progress bar off -- a fresh pipeline the test may mutate."""
    return _load_student


@pytest.fixture(scope="session")
def run():
    """``run(pipe, prompt=..., seed=0, **kw)``: one call with a fresh seeded generator, ``output_type="np"``;
    returns the images array (works for OneStepPipeline and native pipelines alike)."""
    return _run


@pytest.fixture
def hub_cache(tmp_path, monkeypatch):
    """An empty Hugging Face Hub cache for this test: ``huggingface_hub``, diffusers and transformers resolve repo ids
    there (offline), and :func:`diffusers_onestep.testing.save_to_hub_cache` writes there by default."""
    import huggingface_hub.constants

    cache = tmp_path / "hub"
    cache.mkdir()
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))
    return str(cache)


@pytest.fixture
def hub_calls(monkeypatch):
    """``huggingface_hub.create_repo`` and ``upload_folder`` replaced by recorders (uploads are tested at the
    huggingface_hub API boundary), and ``whoami`` by :func:`training_utils.hub_account`'s write token: the dict holds
    ``"create": (repo_id, kwargs)`` and ``"upload": kwargs``."""
    import huggingface_hub

    calls = {}

    def create_repo(repo_id, **kwargs):
        calls["create"] = (repo_id, kwargs)
        return huggingface_hub.RepoUrl(f"https://huggingface.co/{repo_id}")

    def upload_folder(**kwargs):
        calls["upload"] = kwargs

    monkeypatch.setattr(huggingface_hub, "whoami", hub_account())
    monkeypatch.setattr(huggingface_hub, "create_repo", create_repo)
    monkeypatch.setattr(huggingface_hub, "upload_folder", upload_folder)
    return calls


@pytest.fixture(scope="session")
def quick_demo(tmp_path_factory):
    """``diffusers-onestep demo --quick`` run once per session: (output folder, printed output). Its digits student
    (``out / "student"``) serves tests/test_serve.py, its metrics tests/test_demo.py."""
    import subprocess
    import sys

    from training_utils import REPO, env

    out = tmp_path_factory.mktemp("demo") / "demo-output"
    result = subprocess.run(
        [sys.executable, "-m", "diffusers_onestep.demo", "--quick", "--output_dir", str(out)],
        env=env(),
        capture_output=True,
        text=True,
        timeout=600,
        cwd=REPO,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return out, result.stdout + result.stderr
