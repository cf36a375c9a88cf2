"""Tiny offline stand-ins for the evaluation's feature networks, in the layouts their real loaders read.

* :func:`save_tiny_inception`: a TorchScript module with clean-fid's interface (``layers`` maps a normalised
  ``[N, 3, 299, 299]`` batch to pool features) saved as ``inception-2015-12-05.pt``, the file clean-fid downloads.
* :func:`save_tiny_clip`: a CLIP folder (``CLIPModel``, its tokenizer and ``CLIPImageProcessor``) built from
  transformers configs, as ``openai/clip-vit-large-patch14`` is laid out on the Hub.

Nothing is downloaded; the weights are random (seeded), so the numbers they give mean nothing beyond the tests.
"""

from __future__ import annotations

import os

import torch


class _TinyInceptionLayers(torch.nn.Module):
    def __init__(self, feature_dim: int):
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 8, kernel_size=7, stride=4)
        self.head = torch.nn.Linear(8 * 4 * 4, feature_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.nn.functional.adaptive_avg_pool2d(torch.relu(self.conv(x)), 4)
        return self.head(x.flatten(1)).reshape(x.shape[0], -1, 1, 1)


class _TinyInception(torch.nn.Module):
    def __init__(self, feature_dim: int):
        super().__init__()
        self.layers = _TinyInceptionLayers(feature_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x)


def save_tiny_inception(folder: str, feature_dim: int = 16, seed: int = 0) -> str:
    """Write a tiny TorchScript "Inception" as ``folder/inception-2015-12-05.pt``; returns the file."""
    from ..evaluation import INCEPTION_FILE

    torch.manual_seed(seed)
    os.makedirs(folder, exist_ok=True)
    path = os.path.join(folder, INCEPTION_FILE)
    torch.jit.script(_TinyInception(feature_dim).eval()).save(path)
    return path


def save_tiny_clip(folder: str, seed: int = 0, image_size: int = 32) -> str:
    """Write a tiny CLIP model folder (model, tokenizer, image processor); returns the folder."""
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel

    from .components import tiny_clip_tokenizer

    torch.manual_seed(seed)
    config = CLIPConfig(
        text_config={
            "hidden_size": 32,
            "intermediate_size": 37,
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
            "vocab_size": 514,
            "max_position_embeddings": 77,
            "bos_token_id": 512,
            "eos_token_id": 513,
            "pad_token_id": 513,
        },
        vision_config={
            "hidden_size": 32,
            "intermediate_size": 37,
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
            "image_size": image_size,
            "patch_size": 8,
        },
        projection_dim=16,
    )
    CLIPModel(config).eval().save_pretrained(folder)
    tiny_clip_tokenizer().save_pretrained(folder)
    CLIPImageProcessor(
        size={"shortest_edge": image_size}, crop_size={"height": image_size, "width": image_size}
    ).save_pretrained(folder)
    return folder
