"""The discriminator head on any trunk feature size, batch 1 included (a 1×1 bottleneck used to break GroupNorm)."""

import pytest
import torch

from diffusers_onestep.distill.config import MethodConfig, RolesConfig
from diffusers_onestep.distill.methods import build_method
from diffusers_onestep.distill.models import Batch, RandomSource
from diffusers_onestep.distill.roles import BackboneRoles, DiscriminatorHead
from diffusers_onestep.families import SDXLAdapter
from diffusers_onestep.testing import TINY_PROMPTS, tiny_sdxl_components


def stock_groupnorm_logits(head, features):
    """The head with torch's own GroupNorm modules (its behaviour before group merging)."""
    return head.out(head.body(features.float()).mean(dim=(2, 3))).squeeze(-1)


@pytest.mark.parametrize("channels", [4, 24, 32, 64, 1280])
def test_batch_one_on_a_one_by_one_map_trains(channels):
    torch.manual_seed(0)
    head = DiscriminatorHead(channels).train()
    features = torch.randn(1, channels, 1, 1, requires_grad=True)
    logit = head(features)
    assert logit.shape == (1,) and torch.isfinite(logit).all()
    logit.sum().backward()
    for name, parameter in head.named_parameters():
        assert parameter.grad is not None and parameter.grad.abs().max() > 0, name
    assert features.grad.abs().max() > 0


def test_a_one_by_one_map_is_no_longer_judged_by_the_bias_alone():
    """With one channel per group a 1×1 map normalized to zero: every sample got the same logit, no gradient."""
    torch.manual_seed(0)
    head = DiscriminatorHead(32).train()
    features = torch.randn(4, 32, 1, 1)
    with torch.no_grad():
        stock = stock_groupnorm_logits(head, features)
        logits = head(features)
    assert torch.allclose(stock, stock[0].expand(4))  # the defect: a constant
    assert logits.std() > 1e-3


@pytest.mark.parametrize("channels,size,batch", [(32, 8, 2), (64, 8, 1), (128, 2, 1), (1280, 1, 1), (1280, 16, 2)])
def test_maps_whose_groups_hold_three_values_are_unchanged(channels, size, batch):
    """Where every group of both blocks already normalizes three values or more the head is exactly the stock one."""
    torch.manual_seed(0)
    head = DiscriminatorHead(channels).train()
    features = torch.randn(batch, channels, size, size)
    torch.testing.assert_close(head(features), stock_groupnorm_logits(head, features), rtol=0, atol=0)


def test_state_dict_keys_are_those_of_the_stock_head():
    """Checkpoints written before the change load: the head still holds torch GroupNorm modules."""
    head = DiscriminatorHead(32)
    assert sorted(head.state_dict()) == sorted(
        [
            "body.0.weight",
            "body.0.bias",
            "body.1.weight",
            "body.1.bias",
            "body.3.weight",
            "body.3.bias",
            "body.4.weight",
            "body.4.bias",
            "out.weight",
            "out.bias",
        ]
    )
    assert isinstance(head.body[1], torch.nn.GroupNorm) and head.body[1].num_groups == 32


def test_three_level_sdxl_unet_with_batch_one_trains_its_head():
    """The reported case: a 3-level SDXL UNet whose bottleneck is 1×1, --train_batch_size 1, f-distill (JS)."""
    from diffusers import UNet2DConditionModel

    components = tiny_sdxl_components()
    torch.manual_seed(0)
    components["unet"] = UNet2DConditionModel(
        block_out_channels=(8, 16, 32),
        layers_per_block=1,
        sample_size=4,
        in_channels=4,
        out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        attention_head_dim=(2, 4, 8),
        use_linear_projection=True,
        addition_embed_type="text_time",
        addition_time_embed_dim=8,
        transformer_layers_per_block=1,
        projection_class_embeddings_input_dim=80,
        cross_attention_dim=64,
        norm_num_groups=1,
    ).eval()
    adapter = SDXLAdapter(components, max_sequence_length=8)
    roles = BackboneRoles(adapter, RolesConfig(lora_rank=2), discriminator=True)
    method = build_method(MethodConfig(divergence="js", guidance_scale=3.0).validate(), roles, [399])
    condition = adapter.encode_prompt(TINY_PROMPTS[:1])
    noise = torch.randn(adapter.latent_shape(1, 8, 8), generator=torch.Generator().manual_seed(0))
    batch = Batch(condition=condition, noise=noise, real=torch.randn_like(noise), real_condition=condition)
    with torch.no_grad():
        _, features = adapter.denoise(noise, 0.5, condition, return_features=True)
    assert features.shape[-2:] == (1, 1)

    # the student step judges the batch-1 fakes alone (f-distill's density ratio): this raised in GroupNorm
    loss, logs = method.student_step(batch, RandomSource.from_seed(0))
    loss.backward()
    assert torch.isfinite(loss) and "student/dm_weight_mean" in logs
    roles.end_phase()
    # the critic step judges real and fake together; before, a 1×1 map gave every sample the same logit and the
    # head's convolutions no gradient
    loss, logs = method.critic_step(batch, RandomSource.from_seed(1))
    loss.backward()
    assert torch.isfinite(loss) and "critic/discriminator_loss" in logs
    for name, parameter in roles.discriminator_head.named_parameters():
        assert parameter.grad is not None and parameter.grad.abs().max() > 1e-6, name
