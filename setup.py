"""Packaging for diffusers-onestep.

Install torch first (``pip install torch==2.13.0 -e ".[test]"`` in one command): an unconstrained ``torch``
requirement resolves to a multi-GB CUDA build on a machine without torch. The cap below keeps a plain
``pip install -e .`` on the 2.13 CPU wheel where one is available.
"""

from setuptools import find_packages, setup

install_requires = [
    "torch>=2.1,<2.14",
    "diffusers==0.42.1",
    "transformers>=5,<6",
    "accelerate>=1.0",
    "peft>=0.13",
    "datasets>=3.0",
    "safetensors>=0.4",
    "huggingface-hub>=1.32",
    "numpy",
    "pillow",
    "tqdm",
    "pyyaml",
]

extras = {
    "train": ["tensorboard"],
    "test": ["pytest>=8", "scikit-learn>=1.3", "tensorboard"],
    "docs": ["scikit-learn>=1.3"],
}
extras["dev"] = sorted({dep for deps in extras.values() for dep in deps})

setup(
    name="diffusers-onestep",
    version="0.1.0.dev0",
    description="One-step text-to-image generation and distillation (DMD/DMD2, f-distill, LoRA) for diffusers",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    license="Apache-2.0",
    packages=find_packages(include=["diffusers_onestep", "diffusers_onestep.*"]),
    package_data={"diffusers_onestep": ["py.typed"]},
    python_requires=">=3.10",
    install_requires=install_requires,
    extras_require=extras,
    classifiers=[
        "Programming Language :: Python :: 3",
        "License :: OSI Approved :: Apache Software License",
        "Topic :: Scientific/Engineering :: Artificial Intelligence",
    ],
)
