"""Training data: prompt sources, real images, the data order, and the text-embedding cache."""

import json
import os

import numpy as np
import pytest
import torch
from PIL import Image

from diffusers_onestep.distill.data import (
    DataError,
    ImageSettings,
    LatentCache,
    PromptSource,
    RealBatches,
    RealImageRows,
    StreamedBatches,
    TextEmbeddingCache,
    aspect_ratio_buckets,
    batch_entries,
    batch_indices,
    bucket_batch_entries,
    fit_image,
    load_prompts,
    nearest_bucket,
    open_real_images,
)
from diffusers_onestep.families import PixArtAlphaAdapter, SDXLAdapter
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


def write_imagefolder(folder, sizes, captions=True):
    folder.mkdir()
    for i, (width, height) in enumerate(sizes):
        array = (np.random.RandomState(i).rand(height, width, 3) * 255).astype("uint8")
        Image.fromarray(array).save(folder / f"{i}.png")
    if captions:
        (folder / "metadata.jsonl").write_text(
            "\n".join(json.dumps({"file_name": f"{i}.png", "text": f"image {i}"}) for i in range(len(sizes))) + "\n"
        )
    return str(folder)


def test_real_images_from_an_imagefolder(tmp_path):
    folder = write_imagefolder(tmp_path / "imgs", [(40, 20), (16, 48), (32, 32)])
    rows = RealImageRows(open_real_images(folder, caption_column="text"), folder, "image", "text", ImageSettings(16))
    pixels, captions = rows.pixels([(0, 0), (1, 0), (2, 0)])
    assert pixels.shape == (3, 3, 16, 16) and pixels.min() >= -1 and pixels.max() <= 1
    assert sorted(captions) == ["image 0", "image 1", "image 2"]
    with pytest.raises(DataError, match="no column 'picture'"):
        open_real_images(folder, image_column="picture")
    assert len(open_real_images(folder, max_samples=2)) == 2


def test_crop_and_flip_are_drawn_per_image_from_the_seed():
    image = Image.fromarray((np.random.RandomState(0).rand(20, 40, 3) * 255).astype("uint8"))
    centered = fit_image(image, 16, 16)
    assert torch.equal(centered, fit_image(image, 16, 16, generator=torch.Generator().manual_seed(1)))
    crops = {
        fit_image(image, 16, 16, center_crop=False, generator=torch.Generator().manual_seed(s)).sum().item()
        for s in range(8)
    }
    assert len(crops) > 1  # the crop offset moves with the generator ...
    again = fit_image(image, 16, 16, center_crop=False, generator=torch.Generator().manual_seed(3))
    assert torch.equal(again, fit_image(image, 16, 16, center_crop=False, generator=torch.Generator().manual_seed(3)))
    flips = [fit_image(image, 16, 16, random_flip=True, generator=torch.Generator().manual_seed(s)) for s in range(8)]
    assert any(torch.equal(f, centered) for f in flips) and any(torch.equal(f, centered.flip(-1)) for f in flips)
    assert all(torch.equal(f, centered) or torch.equal(f, centered.flip(-1)) for f in flips)
    assert fit_image(image, 8, 24).shape == (3, 8, 24)  # a non-square bucket


@pytest.fixture(scope="module")
def tiny_adapter():
    return PixArtAlphaAdapter(tiny_components("pixart_alpha"), max_sequence_length=16)


def real_batches(adapter, rows, world_size, rank, workers=0, cache=None, batch=2):
    return RealBatches(adapter, 1, 0, batch * world_size, rank, batch, rows=rows, cache=cache, num_workers=workers)


def test_lazy_real_batches_resume_and_split_across_processes(tmp_path, tiny_adapter):
    """The lazy path: the batch of a position is the same read in order, after a jump (a resume), by a DataLoader
    worker, and -- split across 2 processes -- the two halves of the 1-process global batch."""
    folder = write_imagefolder(tmp_path / "imgs", [(24, 16), (16, 16), (20, 28), (16, 16), (30, 18)])
    rows = RealImageRows(
        open_real_images(folder), folder, "image", None, ImageSettings(8, center_crop=False, random_flip=True)
    )
    one = real_batches(tiny_adapter, rows, 1, 0, batch=4)
    in_order = [one(p)[0] for p in range(4)]
    assert all(x.shape == tiny_adapter.latent_shape(4, 8, 8) for x in in_order)
    resumed = real_batches(tiny_adapter, rows, 1, 0, batch=4)
    assert torch.equal(resumed(2)[0], in_order[2]) and torch.equal(resumed(3)[0], in_order[3])
    worker = real_batches(tiny_adapter, rows, 1, 0, workers=1, batch=4)
    assert all(torch.equal(worker(p)[0], in_order[p]) for p in range(4))
    halves = [real_batches(tiny_adapter, rows, 2, r) for r in (0, 1)]
    for p in range(4):
        assert torch.equal(torch.cat([h(p)[0] for h in halves]), in_order[p])


def test_latent_cache_is_built_once_in_the_frozen_dtype_and_reused(tmp_path, tiny_adapter, monkeypatch):
    folder = write_imagefolder(tmp_path / "imgs", [(24, 16), (16, 16), (20, 28), (16, 16)])
    rows = RealImageRows(open_real_images(folder, caption_column="text"), folder, "image", "text", ImageSettings(8))
    cache = LatentCache(tiny_adapter, rows, str(tmp_path / "cache"), dtype=torch.bfloat16)
    assert cache.path.endswith(".arrow") and os.path.isfile(cache.path)
    lazy = real_batches(tiny_adapter, rows, 1, 0, batch=4)
    cached = real_batches(tiny_adapter, rows, 1, 0, cache=cache, batch=4)
    (expected, captions), (got, got_captions) = lazy(0), cached(0)
    assert captions == got_captions
    # the cache holds the lazily encoded latents of epoch 0, rounded to bfloat16
    assert torch.equal(got, expected.to(torch.bfloat16).float())
    # a second run with the same images, VAE and settings maps the same file and encodes nothing
    monkeypatch.setattr(tiny_adapter, "encode_images", lambda *a, **k: pytest.fail("re-encoded"))
    again = LatentCache(tiny_adapter, rows, str(tmp_path / "cache"), dtype=torch.bfloat16)
    assert again.path == cache.path and torch.equal(again.get([0, 1])[0], cache.get([0, 1])[0])
    # other settings are another cache
    flipped = RealImageRows(open_real_images(folder), folder, "image", None, ImageSettings(8, random_flip=True))
    monkeypatch.undo()
    assert LatentCache(tiny_adapter, flipped, str(tmp_path / "cache")).path != cache.path


def test_aspect_ratio_buckets(tmp_path, tiny_adapter):
    buckets = aspect_ratio_buckets(tiny_adapter, 16)
    multiple = tiny_adapter.vae_scale_factor * tiny_adapter.patch_size
    assert (16, 16) in buckets and len(buckets) > 3
    assert all(h % multiple == 0 and w % multiple == 0 for h, w in buckets)
    # SDXL's pipeline has no table of its own: PixArt's 1024 px one (SDXL's multi-aspect sizes), scaled
    sdxl = SDXLAdapter(tiny_components("sdxl"))
    assert sdxl.resolution_bins() is None
    from diffusers.pipelines.pixart_alpha.pipeline_pixart_alpha import ASPECT_RATIO_1024_BIN

    sdxl_buckets = aspect_ratio_buckets(sdxl, 1024)
    assert set(sdxl_buckets) == {(int(h), int(w)) for h, w in ASPECT_RATIO_1024_BIN.values()}
    tall, wide = nearest_bucket(buckets, 40, 20), nearest_bucket(buckets, 20, 40)
    assert buckets[tall][0] > buckets[tall][1] and buckets[wide][0] < buckets[wide][1]
    # every epoch sees every image once at least, in batches of one bucket each; the order is a function of the step
    members = [[0, 1, 2], [3], [4, 5, 6, 7, 8]]
    epoch = [bucket_batch_entries(0, step, 2, members) for step in range(2 + 1 + 3)]
    assert {i for _, entries in epoch for i, e in entries} == set(range(9))
    assert all({i for i, _ in entries} <= set(members[b]) for b, entries in epoch)
    assert epoch == [bucket_batch_entries(0, step, 2, members) for step in range(6)]
    folder = write_imagefolder(tmp_path / "imgs", [(32, 16), (16, 32), (16, 16), (34, 16)], captions=False)
    rows = RealImageRows(open_real_images(folder), folder, "image", None, ImageSettings(16, buckets=buckets))
    assert len(rows.members) == 3  # wide, tall and square
    lazy = real_batches(tiny_adapter, rows, 1, 0, batch=2)
    shapes = {tuple(lazy(p)[0].shape[-2:]) for p in range(6)}
    assert len(shapes) == 3


def write_shards(folder, count=6, per_shard=3):
    import io
    import tarfile

    folder.mkdir()
    for shard in range(0, count, per_shard):
        with tarfile.open(folder / f"shard-{shard // per_shard:05d}.tar", "w") as tar:
            for i in range(shard, min(count, shard + per_shard)):
                png = io.BytesIO()
                Image.fromarray((np.random.RandomState(i).rand(12, 12, 3) * 255).astype("uint8")).save(png, "PNG")
                for name, data in ((f"{i:04d}.png", png.getvalue()), (f"{i:04d}.txt", f"image {i}".encode())):
                    info = tarfile.TarInfo(name)
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
    return str(folder)


def test_webdataset_shards_stream_in_a_resumable_order(tmp_path):
    """webdataset shards as a stream: every process reads the same global batches (its half of them), a new
    shuffled order each epoch, and a stream started at a later position gives the batches it had there."""
    folder = write_shards(tmp_path / "shards")
    stream = open_real_images(folder, "png", "txt", streaming=True)
    images = ImageSettings(8, seed=3)

    def batches(start, mine=slice(0, 4), count=4):
        out = StreamedBatches(stream, folder, "png", "txt", images, 4, mine, start, buffer_size=4)
        return [item for _, (_, item) in zip(range(count), out)]

    whole = batches(0)
    assert [set(b["captions"]) <= {f"image {i}" for i in range(6)} for b in whole] == [True] * 4
    epoch0 = [c for b in whole[:1] for c in b["captions"]]
    assert len(set(epoch0)) == 4
    later = batches(2, count=2)
    assert [b["captions"] for b in later] == [b["captions"] for b in whole[2:]]
    assert all(torch.equal(a["pixels"], b["pixels"]) for a, b in zip(later, whole[2:]))
    halves = [batches(0, slice(r * 2, r * 2 + 2)) for r in (0, 1)]
    for p in range(4):
        assert halves[0][p]["captions"] + halves[1][p]["captions"] == whole[p]["captions"]
    # and as a map-style dataset (webdataset builder, converted once)
    assert len(open_real_images(folder, "png", "txt")) == 6
    with pytest.raises(DataError, match="no column 'image'"):
        open_real_images(folder, streaming=True)


def test_batch_order_is_a_pure_function_of_seed_and_step():
    assert [e for _, e in batch_entries(0, 2, 4, 10)] == [0, 0, 1, 1]  # the epoch of each sample
    size, batch = 10, 4
    order = [batch_indices(0, step, batch, size) for step in range(5)]
    assert order == [batch_indices(0, step, batch, size) for step in range(5)]  # resumable without state
    flat = sum(order, [])
    assert sorted(flat[:10]) == list(range(10)) and sorted(flat[10:20]) == list(range(10))  # epochs
    assert order != [batch_indices(1, step, batch, size) for step in range(5)]


def test_text_embedding_cache_equals_encoding_on_the_fly(tmp_path, tiny_adapter, monkeypatch):
    adapter = PixArtAlphaAdapter(tiny_components("pixart_alpha"), max_sequence_length=16)
    prompts = TINY_PROMPTS + TINY_PROMPTS[:2]
    cache = TextEmbeddingCache(adapter, prompts, str(tmp_path), batch_size=3)
    assert len(cache) == len(set(prompts))  # duplicates are encoded once
    source = PromptSource(adapter, prompts, cache)
    direct = adapter.encode_prompt([prompts[i] for i in (5, 0, 3)])
    cached = source.conditions([5, 0, 3])
    torch.testing.assert_close(cached.embeds, direct.embeds)
    assert torch.equal(cached.mask, direct.mask)
    on_the_fly = PromptSource(adapter, prompts).conditions([5, 0, 3])
    torch.testing.assert_close(on_the_fly.embeds, direct.embeds)
    # stored in the frozen dtype: bfloat16 halves the file, and reads back as the rounded float32 values
    half = TextEmbeddingCache(adapter, prompts, str(tmp_path), dtype=torch.bfloat16)
    assert half.path != cache.path and os.path.getsize(half.path) < 0.6 * os.path.getsize(cache.path)
    assert torch.equal(half.get([prompts[5]]).embeds, direct.embeds[:1].to(torch.bfloat16).float())
    # a second run (or another process) maps the same file without encoding; other prompts are another file
    monkeypatch.setattr(
        adapter,
        "encode_prompt",
        lambda texts, device=None: (
            adapter._encode(texts[:1], device) if len(texts) == 1 else pytest.fail("re-encoded")
        ),
    )
    again = TextEmbeddingCache(adapter, prompts, str(tmp_path))
    assert again.path == cache.path
    monkeypatch.undo()
    assert TextEmbeddingCache(adapter, prompts[:3], str(tmp_path)).path != cache.path
    # with everything cached the text encoders can go
    adapter.drop_text_encoders()
    torch.testing.assert_close(source.conditions([0]).embeds, direct[1].embeds)
    with pytest.raises(ValueError, match="pass `prompt_embeds`"):
        adapter.encode_prompt(["a cat"])
