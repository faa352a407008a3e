"""Legacy Attention.forward drops keyword arguments our processor's signature does not name: guard against it."""
import inspect

import pytest
import torch
from diffusers.models import attention_processor as ap
from diffusers.models.transformers import transformer_hunyuan_video as hv
from diffusers.models.transformers import transformer_qwenimage as qw

import attnproc
from attnproc.processor import AttnProcessor

STOCK = [ap.AttnProcessor2_0, ap.JointAttnProcessor2_0, ap.CogVideoXAttnProcessor2_0,
         hv.HunyuanVideoAttnProcessor2_0, qw.QwenDoubleStreamAttnProcessor2_0]
COMMON = {"self", "attn", "hidden_states", "encoder_hidden_states", "attention_mask", "args", "kwargs"}


@pytest.mark.parametrize("stock", STOCK, ids=lambda c: c.__name__)
def test_every_stock_keyword_is_named(stock):
    ours = set(inspect.signature(AttnProcessor.__call__).parameters)
    theirs = set(inspect.signature(stock.__call__).parameters) - COMMON
    assert theirs <= ours, f"{stock.__name__} takes {sorted(theirs - ours)}, which Attention.forward would drop"


def test_qwenimage_with_padded_text():
    from diffusers import QwenImageTransformer2DModel

    torch.manual_seed(0)
    model = QwenImageTransformer2DModel(patch_size=2, in_channels=16, out_channels=4, num_layers=2,
                                        attention_head_dim=16, num_attention_heads=2, joint_attention_dim=16,
                                        guidance_embeds=False, axes_dims_rope=(4, 6, 6)).eval()
    b, h, w, text = 2, 6, 5, 7
    mask = torch.ones(b, text, dtype=torch.long)
    mask[:, 5:] = 0
    kwargs = dict(hidden_states=torch.randn(b, h * w, 16), encoder_hidden_states=torch.randn(b, text, 16),
                  encoder_hidden_states_mask=mask, timestep=torch.full((b,), 0.5), img_shapes=[[(1, h, w)]] * b,
                  return_dict=False)
    with torch.no_grad():
        stock = model(**kwargs)[0]
        handle = attnproc.apply(model, "probe")
        out = model(**kwargs)[0]
    assert (out - stock).abs().max() <= 1e-5
    layouts = {s.layout for s in handle.method.sites}
    assert {(lay.grid, lay.text_len, lay.text_position, lay.text_valid) for lay in layouts} == {
        ((1, h, w), text, "before", 5)}
    assert attnproc.remove(model)
    with torch.no_grad():
        assert torch.equal(model(**kwargs)[0], stock)
