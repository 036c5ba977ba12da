"""Parity of our π0 (`common.pi0.Pi0Model`, variant "pi0") with `transformers.PI0ForConditionalGeneration` (5.x).

Both models are built tiny (SigLIP 64 wide / 2 layers on 32 px images in 8 px patches = 16 tokens per camera, Gemma VLM
128 wide, expert 64 wide, 2 layers, 4 query heads and 2 KV heads of 16 dims, horizon 8, action dim 8, 3 camera slots,
12 prompt tokens), HF's weights are re-randomised (every parameter, including the zero-initialised RMSNorm weights
and the LayerNorm / bias parameters, so that a wrong norm or bias would show), then copied into ours by name:
HF name -> openpi name (the inverse of transformers' `conversion_mapping.py` entry "pi0") -> ours via
`common.pi0_io.rename_openpi`, loaded with `load_state_strict` (every key mapped, the only dropped key is HF's unused
`model.dit.embed_tokens.weight` = openpi's `gemma_expert.lm_head.weight`). Everything runs in fp32 on CPU.

What is compared (tolerance: 1e-4 of the largest magnitude, elementwise rtol 1e-4):
(a) uint8 -> [-1, 1] pixels (ours `prepare_images` vs `PI0ImageProcessor`'s rescale/mean/std at native size), the
    SigLIP output and the projector (`vlm.get_image_features`): identical definitions.
(b) The VLM prefix: the merged image+text embeddings (text scaled by sqrt(width) exactly once, images not scaled),
    the final-norm hidden states and the per-layer K/V cache (after RoPE), at the valid (non-padding) positions.
(c) The suffix attention mask, the position ids, the predicted velocity (HF `forward(...).logits` against our cached
    `velocity` and our joint `forward_joint`), the flow-matching loss and a 4-step Euler `sample_actions`.

Conventions of HF's PI0 (transformers 5.24.0, `models/pi0/...`) and how they line up with openpi / ours:

1. State token. `modeling_pi0.py` `PI0Model.forward` (block_sequence_ids, L193-208) gives the prefix AND the state
   token block id 0 and the action tokens block id 1, with a causal mask OR'ed with "same block" (`masking_utils.py`
   `blockwise_overlay`, L114-129). Read literally that puts the state into the prefix's bidirectional block (as our
   spec §3.1 says). But HF never lets the prefix see the suffix: the prefix is always computed first by a separate VLM
   pass into a cache (`PI0Model.forward` L160-176, in training too) and only the suffix tokens are queries of the
   dit (`configuration_pi0.py` L129-131 make the dit "causal" + block overlay, the VLM bidirectional). So the
   effective mask is: state sees [valid prefix, itself]; every action token sees [valid prefix, state, all actions] --
   exactly openpi's ar = [1, 1, 0, ..., 0]. `test_suffix_mask_equals_openpi` checks the captured HF mask against ours
   and `test_state_token_block_negative_controls` shows both literal alternatives (state in the action block; state
   in the prefix's bidirectional block of a joint forward, via a monkeypatched `embed_suffix`) break the parity.
2. Camera layout. openpi (and ours) keeps a fixed slot of `image_tokens` per camera; a missing camera is zero-filled
   with image_mask False (its tokens are padding). HF's `PI0Model.embed_prefix` (L119-137) instead fills the image
   placeholders of `input_ids` with the features of the *valid* cameras in order (camera_rank vs
   cumsum(pixel_attention_mask), L127-133), and `PI0Processor.__call__` (`processing_pi0.py` L150-168) writes
   placeholders only for the present cameras and marks the first len(images) slots valid (a missing camera in the
   middle cannot even be expressed). We therefore feed HF the "packed" layout: placeholders for the valid cameras,
   then the prompt, then right padding. Padding takes no position (position = cumsum(mask) - 1 in both) and masked
   keys get weight exactly 0, so the valid tokens see identical inputs. Feeding HF openpi's fixed-slot layout is only
   right when every missing camera comes after all present ones (`test_fixed_slot_layout_is_not_hf_convention`).
3. Time embedding. HF computes the sin-cos embedding in float32 (`PI0TimestepEmbeddings`, L39-59); openpi and ours
   in float64 then cast. With min_period 4e-3 the angles reach ~1.5e3 rad, so fp32 differs by ~1e-4 absolute. The
   velocity tests patch HF's embedding to ours (then agreement is ~1e-6) and `test_time_embedding_precision` pins the
   size of the difference; `test_velocity_unpatched_time_embedding` shows it still stays within 1e-4 relative.
4. Padded prefix *queries*: HF only masks padded keys (`masking_utils.py` `padding_mask_function`, L166-177); ours
   masks padded rows entirely (openpi's `make_att_2d_masks`). Hidden states / K/V at padded positions therefore
   differ and are never used (masked as keys), so only valid positions are compared.
5. Same in both: no division of image features by sqrt(width) (`modeling_paligemma.py` `get_image_features`,
   L123-131), text embedding scaled once (HF inside `GemmaTextScaledWordEmbedding`, `modeling_gemma.py` L50-61 / L363;
   `GemmaModel.forward` does not rescale `inputs_embeds`, so the dit gets the action embeddings unscaled), Gemma RMSNorm
   x*(1+w) in fp32, GeGLU with gelu-tanh, RoPE halves layout theta 1e4, scale head_dim^-0.5, GQA kv head = h // n_rep,
   suffix positions = sum(prefix mask) + arange, the cache cropped back to the prefix between Euler steps (L387), SigLIP
   LayerNorm eps 1e-6 / gelu-tanh, images in [-1, 1].
"""

from __future__ import annotations

import math

import pytest
import torch

pi0_hf = pytest.importorskip("transformers.models.pi0")

from common.pi0 import Pi0Config, Pi0Model, make_att_2d_masks, sincos_time  # noqa: E402
from common.pi0_io import load_state_strict, rename_openpi  # noqa: E402

VOCAB = 260
IMAGE_TOKEN = VOCAB  # out of vocabulary, as PaliGemma's 257152 (HF masks it to 0 before embedding)
B, C, S, PATCH, T, H, A = 4, 3, 32, 8, 12, 8, 8
N = (S // PATCH) ** 2  # image tokens per camera
WE = 64  # expert width
RTOL = 1e-4

OURS_CFG = dict(image_size=S, patch=PATCH, vit_width=64, vit_depth=2, vit_heads=2, vit_mlp=128, vocab=VOCAB, depth=2,
                heads=4, kv_heads=2, head_dim=16, vlm_width=128, vlm_mlp=256, expert_width=WE, expert_mlp=128,
                action_dim=A, horizon=H, max_tokens=T, num_cameras=C)


def hf_config():
    gemma = dict(model_type="gemma", num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=16)
    return pi0_hf.PI0Config(
        vlm_config=dict(
            model_type="paligemma",
            text_config=dict(gemma, hidden_size=128, intermediate_size=256, vocab_size=VOCAB),
            vision_config=dict(model_type="siglip_vision_model", hidden_size=64, intermediate_size=128,
                               num_hidden_layers=2, num_attention_heads=2, patch_size=PATCH, image_size=S,
                               vision_use_head=False),
            projection_dim=128, hidden_size=128, vocab_size=VOCAB, image_token_id=IMAGE_TOKEN),
        dit_config=dict(gemma, hidden_size=WE, intermediate_size=128),
        chunk_size=H, max_state_dim=A, max_action_dim=A)


HF_TO_OPENPI = [  # inverse of transformers conversion_mapping.py "pi0" (openpi/lerobot -> HF)
    ("model.vlm.", "paligemma_with_expert.paligemma.model."),
    ("model.dit.", "paligemma_with_expert.gemma_expert.model."),
    ("embed_action_time.", ""),
]


def hf_to_openpi(key: str) -> str:
    if key == "model.dit.embed_tokens.weight":  # HF maps openpi's unused gemma_expert.lm_head here
        return "paligemma_with_expert.gemma_expert.lm_head.weight"
    for hf, openpi in HF_TO_OPENPI:
        if key.startswith(hf):
            return openpi + key[len(hf):]
    return key


@torch.no_grad()
def randomise(model: torch.nn.Module, seed: int = 1) -> None:
    """Every parameter random at a scale that keeps activations O(1): matrices N(0, 1/fan_in), RMSNorm w (used as
    1+w, zero-initialised by HF) N(0, 0.3), LayerNorm weights 1+N(0, 0.3), all biases N(0, 0.3)."""
    g = torch.Generator().manual_seed(seed)
    for name, p in model.named_parameters():
        r = torch.randn(p.shape, generator=g)
        if p.ndim >= 2:
            p.copy_(r / math.sqrt(p[0].numel()))
        elif name.endswith("bias"):
            p.copy_(0.3 * r)
        elif "vision_tower" in name:  # SigLIP LayerNorm weight (1-centred)
            p.copy_(1.0 + 0.3 * r)
        else:  # Gemma RMSNorm weight (used as 1 + w)
            p.copy_(0.3 * r)


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """The models are tiny: one intra-op thread is ~30x faster than two on a shared 2-core box (thread contention)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def models(one_thread):
    torch.manual_seed(0)
    hf = pi0_hf.PI0ForConditionalGeneration(hf_config()).eval()
    randomise(hf)
    openpi_sd = {hf_to_openpi(k): v for k, v in hf.state_dict().items()}
    ours_sd, dropped = rename_openpi(openpi_sd)
    ours = Pi0Model(Pi0Config(**OURS_CFG)).eval()
    report = load_state_strict(ours, ours_sd, dropped)  # raises on any missing / unexpected / mismatched key
    return hf, ours, report


def hf_prefix_inputs(img_masks, tokens, tok_masks, packed: bool = True):
    """HF `input_ids` / `attention_mask` for the same prefix. packed (HF's convention): image placeholders for the
    valid cameras only, then the prompt, then right padding. Not packed: openpi's fixed camera slots."""
    L = C * N + T
    ids, am = torch.zeros(B, L, dtype=torch.long), torch.zeros(B, L, dtype=torch.long)
    for b in range(B):
        n_img = int(img_masks[b].sum()) * N if packed else C * N
        ids[b, :n_img] = IMAGE_TOKEN
        am[b, :n_img] = 1 if packed else img_masks[b].repeat_interleave(N).long()
        ids[b, n_img:n_img + T], am[b, n_img:n_img + T] = tokens[b], tok_masks[b].long()
    return ids, am


@pytest.fixture(scope="module")
def batch():
    g = torch.Generator().manual_seed(2)
    # a missing middle camera, a missing first camera, all present, a missing last camera
    img_masks = torch.tensor([[1, 0, 1], [0, 1, 1], [1, 1, 1], [1, 1, 0]], dtype=torch.bool)
    images = torch.randint(0, 256, (B, C, S, S, 3), generator=g, dtype=torch.uint8)
    images[~img_masks] = 0  # openpi zero-fills a missing camera
    tokens, tok_masks = torch.zeros(B, T, dtype=torch.long), torch.zeros(B, T, dtype=torch.bool)
    for b, n in enumerate([5, 9, T, 7]):  # right-padded prompts
        tokens[b, :n] = torch.randint(3, VOCAB, (n,), generator=g)
        tok_masks[b, :n] = True
    # HF's pixel_values as PI0ImageProcessor makes them at native size (rescale 1/255, mean 0.5, std 0.5 -> [-1, 1]);
    # our model takes the uint8 images and converts them itself (`prepare_images`, compared in test_vision_...)
    from transformers.models.pi0.image_processing_pi0 import PI0ImageProcessor as proc  # class attributes only

    mean, std = (torch.tensor(v).view(3, 1, 1) for v in (proc.image_mean, proc.image_std))
    pixels = (images.permute(0, 1, 4, 2, 3).float() * proc.rescale_factor - mean) / std  # (B, C, 3, S, S)
    ids, am = hf_prefix_inputs(img_masks, tokens, tok_masks)
    return dict(images=images, img_masks=img_masks, tokens=tokens, tok_masks=tok_masks, pixels=pixels, ids=ids, am=am,
                state=torch.randn(B, A, generator=g), x_t=torch.randn(B, H, A, generator=g),
                actions=torch.randn(B, H, A, generator=g), noise=torch.randn(B, H, A, generator=g),
                t=torch.tensor([0.9, 0.37, 0.05, 1.0]))


def assert_close(actual, expected, rtol=RTOL, what=""):
    actual, expected = actual.detach().float(), expected.detach().float()
    assert actual.shape == expected.shape, f"{what}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    scale = expected.abs().max().item()
    err = (actual - expected).abs().max().item()
    assert scale > 1e-3, f"{what}: degenerate reference (max |x| = {scale})"
    assert err <= rtol * scale, f"{what}: max abs err {err:.3g} > {rtol:g} * {scale:.3g}"


@pytest.fixture
def hf_time_fp64(models, monkeypatch):
    """HF's time embedding computed as openpi / ours (float64), see docstring point 3."""
    hf, ours, _ = models
    cfg = ours.cfg
    monkeypatch.setattr(hf.embed_action_time.sinusoid_embeds, "forward",
                        lambda t: sincos_time(t, cfg.expert_width, cfg.min_period, cfg.max_period))


def hf_velocity(hf, bt, x_t=None, t=None, ids=None, am=None):
    return hf(state=bt["state"], noise=bt["x_t"] if x_t is None else x_t, timestep=bt["t"] if t is None else t,
              input_ids=bt["ids"] if ids is None else ids, pixel_values=bt["pixels"],
              pixel_attention_mask=bt["img_masks"], attention_mask=bt["am"] if am is None else am).logits


def ours_velocity(ours, bt):
    prefix = ours.encode_prefix(bt["images"], bt["img_masks"], bt["tokens"], bt["tok_masks"])
    return ours.velocity(prefix, bt["state"], bt["x_t"], bt["t"])[0]


# ------------------------------------------------------------------------------------------------------- tests
def test_weight_mapping_is_complete(models):
    hf, ours, report = models
    assert not report.missing and not report.unexpected and not report.mismatched
    assert report.dropped == ["paligemma_with_expert.gemma_expert.lm_head.weight"]
    n_hf = sum(p.numel() for n, p in hf.named_parameters() if n != "model.dit.embed_tokens.weight")
    assert n_hf == sum(p.numel() for p in ours.parameters())
    # the norms are really randomised (a zero RMSNorm weight would hide a missing "1 +")
    assert ours.vlm.layers[0].input_layernorm.weight.abs().min() > 0
    assert ours.expert.norm.weight.abs().min() > 0
    assert not torch.allclose(ours.vision.post_layernorm.weight, torch.ones(OURS_CFG["vit_width"]))


@torch.no_grad()
def test_vision_tower_and_projector(models, batch):
    hf, ours, _ = models
    px = batch["pixels"].flatten(0, 1)
    ours_px = torch.stack([ours.prepare_images(batch["images"][:, c]) for c in range(C)], dim=1).flatten(0, 1)
    assert_close(ours_px, px, what="uint8 -> [-1, 1] pixels")
    hf_out = hf.model.vlm.get_image_features(px)
    vit = ours.vision(px)
    assert_close(vit, hf_out.last_hidden_state, what="SigLIP last hidden state")
    assert_close(ours.projector.linear(vit), hf_out.pooler_output, what="projector")


@torch.no_grad()
def test_prefix_embeddings_hidden_states_and_kv(models, batch):
    hf, ours, _ = models
    am = batch["am"]
    hf_emb = hf.model.embed_prefix(batch["ids"], batch["pixels"], batch["img_masks"])
    pos = am.cumsum(-1) - 1
    hf_out = hf.model.vlm(inputs_embeds=hf_emb, attention_mask=am, position_ids=pos,
                          token_type_ids=torch.zeros_like(am), use_cache=True)
    emb, pad = ours.embed_prefix(batch["images"], batch["img_masks"], batch["tokens"], batch["tok_masks"])
    prefix = ours.encode_prefix(batch["images"], batch["img_masks"], batch["tokens"], batch["tok_masks"])
    assert torch.equal(pad, prefix.pad_mask)
    for b in range(B):  # same valid tokens, in the same order, at the same positions
        hv, ov = am[b].bool(), pad[b]
        assert hv.sum() == ov.sum()
        assert torch.equal(pos[b, hv], torch.arange(int(ov.sum())))
        assert_close(emb[b, ov], hf_emb[b, hv], what=f"prefix embeddings [{b}]")
        assert_close(prefix.hidden[b, ov], hf_out.last_hidden_state[b, hv], what=f"VLM hidden [{b}]")
        for i, layer in enumerate(hf_out.cache.layers):
            assert_close(prefix.kv[i][0][b][:, ov], layer.keys[b][:, hv], what=f"K layer {i} [{b}]")
            assert_close(prefix.kv[i][1][b][:, ov], layer.values[b][:, hv], what=f"V layer {i} [{b}]")


@torch.no_grad()
def test_suffix_mask_equals_openpi(models, batch):
    """HF's block ids put the state token in block 0 with the prefix, yet the mask the dit receives is openpi's."""
    hf, ours, _ = models
    captured = {}

    def grab(module, args, kwargs):
        captured.update(mask=kwargs["attention_mask"], pos=kwargs["position_ids"])

    handle = hf.model.dit.register_forward_pre_hook(grab, with_kwargs=True)
    try:
        hf_velocity(hf, batch)
    finally:
        handle.remove()
    mask = captured["mask"]
    allowed = mask[:, 0] if mask.dtype == torch.bool else mask[:, 0] == 0  # (B, 1+H, P_hf + 1+H)
    P_hf = batch["am"].shape[1]
    _, spad, sar, _ = ours.embed_suffix(batch["state"], batch["x_t"], batch["t"])
    assert sar[0].tolist() == [1, 1] + [0] * (H - 1)
    suffix = make_att_2d_masks(spad, sar)
    assert torch.equal(allowed[:, :, P_hf:], suffix)  # state: itself only; actions: state + all actions
    assert torch.equal(allowed[:, :, :P_hf], batch["am"].bool()[:, None].expand(-1, 1 + H, -1))  # valid prefix
    n_valid = batch["am"].sum(-1, keepdim=True)
    assert torch.equal(captured["pos"], n_valid + torch.arange(1 + H))  # = ours: sum(prefix mask) + arange


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@torch.no_grad()
def test_velocity_parity(models, batch, hf_time_fp64, attn):
    hf, ours, _ = models
    before = hf.config._attn_implementation
    hf.set_attn_implementation(attn)
    try:
        v_hf = hf_velocity(hf, batch)
    finally:
        hf.set_attn_implementation(before)
    assert_close(ours_velocity(ours, batch), v_hf, what="velocity (cached prefix)")
    v_joint = ours.forward_joint(batch["images"], batch["img_masks"], batch["tokens"], batch["tok_masks"],
                                 batch["state"], batch["x_t"], batch["t"])
    assert_close(v_joint, v_hf, what="velocity (joint forward)")


@torch.no_grad()
def test_velocity_unpatched_time_embedding(models, batch):
    hf, ours, _ = models
    assert_close(ours_velocity(ours, batch), hf_velocity(hf, batch), what="velocity, HF fp32 time embedding")


@torch.no_grad()
def test_time_embedding_precision(models, batch):
    hf, ours, _ = models
    t = torch.cat([batch["t"], torch.linspace(0, 1, 33)])
    ref = sincos_time(t, WE, ours.cfg.min_period, ours.cfg.max_period)
    err = (hf.embed_action_time.sinusoid_embeds(t) - ref).abs().max().item()
    assert err < 1e-3, err  # HF fp32 vs openpi/ours fp64: ~1e-4 at the shortest period


@torch.no_grad()
def test_flow_loss_parity(models, batch, hf_time_fp64):
    hf, ours, _ = models
    out = hf(state=batch["state"], noise=batch["noise"], timestep=batch["t"], actions=batch["actions"],
             input_ids=batch["ids"], pixel_values=batch["pixels"], pixel_attention_mask=batch["img_masks"],
             attention_mask=batch["am"])
    loss = ours.flow_loss(batch["images"], batch["img_masks"], batch["tokens"], batch["tok_masks"], batch["state"],
                          batch["actions"], noise=batch["noise"], t=batch["t"])
    assert loss.shape == (B, H, A)
    assert_close(loss.mean(), out.loss, what="flow-matching loss (HF loss_reduction='mean')")


@torch.no_grad()
def test_sample_actions_parity(models, batch, hf_time_fp64):
    hf, ours, _ = models
    a_hf = hf.sample_actions(batch["state"], batch["ids"], batch["pixels"], noise=batch["noise"].clone(),
                             attention_mask=batch["am"], pixel_attention_mask=batch["img_masks"], num_steps=4)
    prefix = ours.encode_prefix(batch["images"], batch["img_masks"], batch["tokens"], batch["tok_masks"])
    assert_close(ours.sample(prefix, batch["state"], batch["noise"], num_steps=4).actions, a_hf, what="4-step Euler")


@torch.no_grad()
def test_state_token_block_negative_controls(models, batch, hf_time_fp64, monkeypatch):
    """The comparison sees the state token's block: both literal alternatives to openpi's ar = [1, 1, 0...] differ."""
    hf, ours, _ = models
    v_hf = hf_velocity(hf, batch)
    scale = v_hf.abs().max().item()
    original = ours.embed_suffix

    def with_ar(first_two):
        def embed_suffix(*args, **kwargs):
            tokens, pad, ar, cond = original(*args, **kwargs)
            ar = ar.clone()
            ar[:, :2] = torch.tensor(first_two)
            return tokens, pad, ar, cond
        return embed_suffix

    args = (batch["images"], batch["img_masks"], batch["tokens"], batch["tok_masks"], batch["state"], batch["x_t"],
            batch["t"])
    # state in the action block (ar = [1, 0, 0...]): the state token sees the actions
    monkeypatch.setattr(ours, "embed_suffix", with_ar([1, 0]))
    assert (ours.forward_joint(*args) - v_hf).abs().max() > 100 * RTOL * scale
    # state in the prefix's bidirectional block of a joint forward (ar = [0, 1, 0...]): the prefix sees the state
    monkeypatch.setattr(ours, "embed_suffix", with_ar([0, 1]))
    assert (ours.forward_joint(*args) - v_hf).abs().max() > 100 * RTOL * scale
    monkeypatch.setattr(ours, "embed_suffix", original)
    assert_close(ours.forward_joint(*args), v_hf, what="restored")


@pytest.mark.parametrize("name", ["vlm.layers.1.input_layernorm.weight",
                                  "expert.layers.0.post_attention_layernorm.weight", "expert.norm.weight",
                                  "vision.post_layernorm.bias", "projector.linear.bias"])
@torch.no_grad()
def test_parity_is_sensitive_to_norms_and_biases(models, batch, hf_time_fp64, name):
    hf, ours, _ = models
    v_hf = hf_velocity(hf, batch)
    p = dict(ours.named_parameters())[name]
    saved = p.clone()
    try:
        p.add_(0.5)
        assert (ours_velocity(ours, batch) - v_hf).abs().max() > 100 * RTOL * v_hf.abs().max()
    finally:
        p.copy_(saved)


@torch.no_grad()
def test_fixed_slot_layout_is_not_hf_convention(models, batch, hf_time_fp64):
    """openpi's fixed camera slots fed to HF: right only if no missing camera precedes a present one (docstring 2)."""
    hf, ours, _ = models
    ids, am = hf_prefix_inputs(batch["img_masks"], batch["tokens"], batch["tok_masks"], packed=False)
    v_fixed = hf_velocity(hf, batch, ids=ids, am=am)
    v_ours = ours_velocity(ours, batch)
    scale = v_ours.abs().max().item()
    err = (v_fixed - v_ours).flatten(1).abs().amax(-1)
    # masks [1,0,1] and [0,1,1]: HF puts the wrong camera's features into the valid slots
    assert (err[:2] > 100 * RTOL * scale).all(), err
    # masks [1,1,1] and [1,1,0]: identical to the packed layout
    assert (err[2:] <= RTOL * scale).all(), err
