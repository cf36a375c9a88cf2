"""Training data: prompt sources, real images, the data order, and the text-embedding cache."""

import json
import os

import numpy as np
import pytest
import torch
from PIL import Image

from diffusers_onestep.distill.data import (
    ConditionCache,
    DataError,
    PromptSource,
    batch_indices,
    load_prompts,
    load_real_images,
)
from diffusers_onestep.families import PixArtAlphaAdapter
from diffusers_onestep.testing import TINY_PROMPTS, tiny_components


os.environ.setdefault("HF_DATASETS_OFFLINE", "1")


def test_txt_and_jsonl_sources(tmp_path):
    txt = tmp_path / "p.txt"
    txt.write_text("a cat\n\n  a dog  \n")
    assert load_prompts(str(txt)) == ["a cat", "a dog"]
    jsonl = tmp_path / "p.jsonl"
    jsonl.write_text(json.dumps({"caption": "a cat"}) + "\n\n" + json.dumps({"caption": "a dog"}) + "\n")
    assert load_prompts(str(jsonl), "caption") == ["a cat", "a dog"]
    with pytest.raises(DataError, match="no 'text' field"):
        load_prompts(str(jsonl))


def test_datasets_files_and_folders(tmp_path):
    import datasets

    csv = tmp_path / "p.csv"
    csv.write_text("prompt,id\na cat,1\na dog,2\n")
    assert load_prompts(str(csv), "prompt") == ["a cat", "a dog"]
    parquet = tmp_path / "p.parquet"
    datasets.Dataset.from_dict({"text": ["x", "y", "z"]}).to_parquet(str(parquet))
    assert load_prompts(str(parquet)) == ["x", "y", "z"]
    folder = tmp_path / "saved"
    folder.mkdir()
    (folder / "train.jsonl").write_text("\n".join(json.dumps({"text": t}) for t in ("one", "two")) + "\n")
    assert load_prompts(str(folder)) == ["one", "two"]
    with pytest.raises(DataError, match="has no column 'caption'.*text"):
        load_prompts(str(parquet), "caption")


def test_missing_and_bad_sources(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        load_prompts(str(tmp_path / "nope.txt"))
    with pytest.raises(DataError, match="neither an existing file"):
        load_prompts("not a dataset name!!")
    bad = tmp_path / "p.jsonl"
    bad.write_text("{not json\n")
    with pytest.raises(DataError, match="line 1 is not valid JSON"):
        load_prompts(str(bad))


def test_real_images_from_an_imagefolder(tmp_path):
    folder = tmp_path / "imgs"
    folder.mkdir()
    for i, size in enumerate([(40, 20), (16, 48), (32, 32)]):
        Image.fromarray((np.random.RandomState(i).rand(size[1], size[0], 3) * 255).astype("uint8")).save(
            folder / f"{i}.png"
        )
    (folder / "metadata.jsonl").write_text(
        "\n".join(json.dumps({"file_name": f"{i}.png", "text": f"image {i}"}) for i in range(3)) + "\n"
    )
    images, captions = load_real_images(str(folder), 16, caption_column="text")
    assert images.shape == (3, 3, 16, 16) and images.min() >= -1 and images.max() <= 1
    assert sorted(captions) == ["image 0", "image 1", "image 2"]
    with pytest.raises(DataError, match="no column 'picture'"):
        load_real_images(str(folder), 16, image_column="picture")


def test_batch_order_is_a_pure_function_of_seed_and_step():
    size, batch = 10, 4
    order = [batch_indices(0, step, batch, size) for step in range(5)]
    assert order == [batch_indices(0, step, batch, size) for step in range(5)]  # resumable without state
    flat = sum(order, [])
    assert sorted(flat[:10]) == list(range(10)) and sorted(flat[10:20]) == list(range(10))  # epochs
    assert order != [batch_indices(1, step, batch, size) for step in range(5)]


def test_condition_cache_equals_encoding_on_the_fly():
    adapter = PixArtAlphaAdapter(tiny_components("pixart_alpha"), max_sequence_length=16)
    prompts = TINY_PROMPTS + TINY_PROMPTS[:2]
    cache = ConditionCache(adapter, prompts, batch_size=3)
    assert cache.table.batch_size == len(set(prompts))  # duplicates are encoded once
    direct = adapter.encode_prompt([prompts[i] for i in (5, 0, 3)])
    cached = cache.get([5, 0, 3])
    torch.testing.assert_close(cached.embeds, direct.embeds)
    assert torch.equal(cached.mask, direct.mask)
    on_the_fly = PromptSource(adapter, prompts, cache=False).conditions([5, 0, 3])
    torch.testing.assert_close(on_the_fly.embeds, direct.embeds)
    # with everything cached the text encoders can go
    adapter.drop_text_encoders()
    torch.testing.assert_close(cache.get([0]).embeds, direct[1].embeds)
    with pytest.raises(ValueError, match="pass `prompt_embeds`"):
        adapter.encode_prompt(["a cat"])
