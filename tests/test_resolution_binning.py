"""PixArt/SANA resolution binning as the native pipelines do it: generate at the nearest aspect-ratio bin of the table
the native pipeline picks by transformer sample size, then resize and center-crop the image to the requested size.

The shared tiny fixtures cannot show it: the native pipelines pick the table by sample size alone, which assumes the
published VAEs (8x for PixArt, 32x for SANA), and the tiny PixArt transformer (sample size 8) has no table while the
tiny SANA one (sample size 32, a 2x VAE, 64 px) would be snapped to the 1024 px table. The models here keep the
published ratio of sample size to image size with tiny widths: PixArt at sample size 32 with an 8x VAE (the 256 px
table), SANA at 16 with a 32x DC-AE (512 px), SANA-Sprint at 32 with a 32x DC-AE (1024 px, its only table).
"""

import numpy as np
import pytest
import torch

from diffusers_onestep.families import get_adapter_class
from diffusers_onestep.testing import native_one_step_pipeline, native_pipeline_class, tiny_components, tiny_fixture


#: family -> (transformer sample size, a requested size off every bin, the bin the native table gives it)
CASES = {
    "pixart_alpha": (32, (200, 300), (208, 304)),
    "pixart_sigma": (32, (200, 300), (208, 304)),
    "sana": (16, (300, 500), (384, 640)),
    "sana_sprint": (32, (700, 1000), (832, 1216)),
}


def _pixart_components(sample_size):
    from diffusers import AutoencoderKL, PixArtTransformer2DModel

    from diffusers_onestep.families.pixart import PIXART_BLOCK_CONFIG

    components = tiny_components("pixart_alpha")
    torch.manual_seed(0)
    components["transformer"] = PixArtTransformer2DModel(
        sample_size=sample_size,
        num_layers=2,
        attention_head_dim=8,
        num_attention_heads=3,
        caption_channels=32,
        cross_attention_dim=24,
        **PIXART_BLOCK_CONFIG,
    ).eval()
    torch.manual_seed(0)
    components["vae"] = AutoencoderKL(  # 8x, as the published PixArt VAE
        block_out_channels=(8, 8, 8, 8),
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        latent_channels=4,
        norm_num_groups=8,
        layers_per_block=1,
    ).eval()
    return components


def _sana_components(family, sample_size):
    from diffusers import AutoencoderDC, SanaTransformer2DModel

    components = tiny_components(family)
    extra = {"qk_norm": "rms_norm_across_heads", "guidance_embeds": True} if family == "sana_sprint" else {}
    torch.manual_seed(0)
    components["transformer"] = SanaTransformer2DModel(
        patch_size=1,
        in_channels=4,
        out_channels=4,
        num_layers=1,
        num_attention_heads=2,
        attention_head_dim=4,
        num_cross_attention_heads=2,
        cross_attention_head_dim=4,
        cross_attention_dim=8,
        caption_channels=8,
        sample_size=sample_size,
        **extra,
    ).eval()
    torch.manual_seed(0)
    components["vae"] = AutoencoderDC(  # 32x, as the published DC-AE
        in_channels=3,
        latent_channels=4,
        attention_head_dim=2,
        encoder_block_types=("ResBlock",) * 6,
        decoder_block_types=("ResBlock",) * 6,
        encoder_block_out_channels=(8,) * 6,
        decoder_block_out_channels=(8,) * 6,
        encoder_qkv_multiscales=((),) * 6,
        decoder_qkv_multiscales=((),) * 6,
        encoder_layers_per_block=(1,) * 6,
        decoder_layers_per_block=(1,) * 6,
        downsample_block_type="conv",
        upsample_block_type="interpolate",
        decoder_norm_types="rms_norm",
        decoder_act_fns="silu",
        scaling_factor=0.41407,
    ).eval()
    return components


@pytest.fixture(scope="module")
def binning_folder(tmp_path_factory):
    """``binning_folder(family)``: a saved native pipeline whose transformer sample size the native pipeline bins."""
    root = tmp_path_factory.mktemp("binning")
    folders = {}

    def get(family):
        if family not in folders:
            sample_size = CASES[family][0]
            components = (
                _pixart_components(sample_size)
                if family.startswith("pixart")
                else _sana_components(family, sample_size)
            )
            pipe = native_pipeline_class(family)(**components, **get_adapter_class(family).native_pipeline_kwargs)
            folders[family] = str(root / family)
            pipe.save_pretrained(folders[family], safe_serialization=True)
        return folders[family]

    return get


@pytest.mark.oldest
@pytest.mark.parametrize("family", list(CASES))
def test_binning_equals_the_native_pipeline_at_an_off_bin_size(family, binning_folder, load_student, run):
    folder = binning_folder(family)
    _, (height, width), expected_bin = CASES[family]
    pipe = load_student(folder, family)
    adapter = pipe.adapter
    assert adapter.default_resolution == adapter.resolution_bins()["1.0"][0]  # the table of the model's own size
    assert adapter.binned_size(height, width) == expected_bin

    native, kwargs = native_one_step_pipeline(family, folder, tiny_fixture(family).parity_timesteps)
    kwargs.update(height=height, width=width, use_resolution_binning=True)
    expected = run(native, **kwargs)
    images = run(pipe, height=height, width=width)  # binning is on by default here
    assert images.shape == expected.shape == (1, height, width, 3)
    assert np.abs(images - expected).max() <= 1e-5
    assert np.array_equal(images, run(pipe, height=height, width=width, use_resolution_binning=True))
    # the latents are those of the bin; the decoded image is resized back only after decoding
    latents = run(pipe, height=height, width=width, output_type="latent")
    assert tuple(latents.shape[-2:]) == tuple(s // adapter.vae_scale_factor for s in expected_bin)


@pytest.mark.parametrize("family", ["pixart_alpha", "sana"])
def test_binning_off_generates_at_the_requested_size(family, binning_folder, load_student, run):
    folder = binning_folder(family)
    pipe = load_student(folder, family)
    multiple = pipe.adapter.resolution_multiple
    height, width = 6 * multiple, 10 * multiple  # a valid size that is no bin
    assert pipe.adapter.binned_size(height, width) != (height, width)
    raw = run(pipe, height=height, width=width, use_resolution_binning=False)
    latents = run(pipe, height=height, width=width, use_resolution_binning=False, output_type="latent")
    assert raw.shape == (1, height, width, 3)
    factor = pipe.adapter.vae_scale_factor
    assert tuple(latents.shape[-2:]) == (height // factor, width // factor)
    native, kwargs = native_one_step_pipeline(family, folder, tiny_fixture(family).parity_timesteps)
    kwargs.update(height=height, width=width, use_resolution_binning=False)
    assert np.abs(raw - run(native, **kwargs)).max() <= 1e-5
    binned = run(pipe, height=height, width=width)
    assert binned.shape == raw.shape and np.abs(binned - raw).max() > 1e-3  # generated at the bin, then resized


def test_tiny_fixtures_are_not_binned_by_default_and_true_does_what_the_native_pipeline_does(student):
    # PixArt: the native pipeline refuses a transformer of sample size 8 with binning on ("Invalid sample size").
    pixart = student("pixart_alpha").adapter
    assert pixart.binned_size(8, 8) == (8, 8)
    with pytest.raises(
        ValueError,
        match=r"^`use_resolution_binning=True` needs a transformer of sample_size 32, 64, "
        r"128, as PixArtAlphaPipeline does; this one has 8\.$",
    ):
        pixart.binned_size(8, 8, use_resolution_binning=True)
    with pytest.raises(
        ValueError, match="needs a transformer of sample_size 32, 64, 128, 256, as PixArtSigmaPipeline"
    ):
        student("pixart_sigma").adapter.binned_size(8, 8, use_resolution_binning=True)
    # SANA: sample size 32 means the 1024 px table to the native pipeline, whatever the VAE; a 64 px model stays 64 px
    # unless binning is asked for.
    sana = student("sana").adapter
    assert sana.default_resolution == 64 and sana.binned_size(64, 64) == (64, 64)
    assert sana.binned_size(64, 64, use_resolution_binning=True) == (1024, 1024)
    assert sana.binned_size(64, 32, use_resolution_binning=False) == (64, 32)
    # SDXL's pipeline has no binning
    sdxl = student("sdxl").adapter
    assert sdxl.binned_size(72, 40) == (72, 40)
    with pytest.raises(
        ValueError,
        match=r"^SDXL students have no resolution binning \(StableDiffusionXLPipeline has "
        r"none\); drop `use_resolution_binning`\.$",
    ):
        sdxl.binned_size(72, 40, use_resolution_binning=True)


def test_resize_to_requested_is_the_native_resize_and_crop():
    from diffusers.image_processor import PixArtImageProcessor

    images = torch.randn(2, 3, 32, 48, generator=torch.Generator().manual_seed(0))
    adapter_cls = get_adapter_class("pixart_alpha")
    assert adapter_cls.resize_to_requested(images, 32, 48) is images
    resized = adapter_cls.resize_to_requested(images, 20, 40)
    assert resized.shape == (2, 3, 20, 40)
    assert torch.equal(resized, PixArtImageProcessor.resize_and_crop_tensor(images, 40, 20))
