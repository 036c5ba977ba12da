"""π0 / π0.5 module: shapes, masks, prefix cache, flow matching, sampling hooks, tokenizers, norm stats, checkpoints."""

import json
import math

import numpy as np
import pytest
import torch

from common.pi0 import (Pi0Config, Pi0Model, PromptPrefixCache, euler_step, gaussian_log_prob, make_att_2d_masks, rope, sincos_time)
from common.pi0_io import (ByteTokenizer, NormStats, Pi0Processor, SentencePieceTokenizer, check_tokenizer,
                           discretize_state, load_openpi, load_pi0, rename_openpi, save_openpi, save_pi0,
                           to_openpi_names, tokenize_prompt)


def randomised(cfg: Pi0Config, seed: int = 0) -> Pi0Model:
    """A model whose zero-initialised pieces (norm weights, adaptive-norm denses) are random, so tests can fail."""
    torch.manual_seed(seed)
    model = Pi0Model(cfg)
    for name, p in model.named_parameters():
        if "norm" in name:
            torch.nn.init.normal_(p, std=0.2)
    return model.eval()


def inputs(cfg: Pi0Config, B: int = 3, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    images = torch.randint(0, 256, (B, cfg.num_cameras, 48, 64, 3), generator=g, dtype=torch.uint8)
    img_masks = torch.ones(B, cfg.num_cameras, dtype=torch.bool)
    if cfg.num_cameras:
        img_masks[1, -1] = False  # a missing camera
    lengths = torch.tensor([5, 12, cfg.max_tokens])[:B]
    tokens = torch.randint(4, cfg.vocab, (B, cfg.max_tokens), generator=g)
    tok_masks = torch.arange(cfg.max_tokens)[None] < lengths[:, None]
    state = torch.randn(B, cfg.action_dim, generator=g)
    x_t = torch.randn(B, cfg.horizon, cfg.action_dim, generator=g)
    t = torch.rand(B, generator=g)
    return images, img_masks, tokens, tok_masks, state, x_t, t


VARIANTS = [Pi0Config.tiny(), Pi0Config.tiny(variant="pi05")]


def test_mask_blocks_match_openpi():
    H = 4  # π0 suffix: [state] + H actions, ar = [1, 1, 0, 0, 0] after a 3-token prefix (one padded)
    pad = torch.tensor([[True, True, False] + [True] * (1 + H)])
    ar = torch.tensor([[0, 0, 0, 1, 1, 0, 0, 0]])
    m = make_att_2d_masks(pad, ar)[0]
    assert m[:2, :2].all() and not m[:3, 3:].any()  # prefix bidirectional, never sees the suffix
    assert not m[:, 2].any() and not m[2, :].any()  # padding masked both ways
    assert m[3, :2].all() and m[3, 3] and not m[3, 4:].any()  # the state token sees prefix + itself only
    assert m[4:, 3:].all() and m[4:, :2].all()  # action tokens: one bidirectional block (not causal)


def test_rope_and_time_embedding():
    x = torch.randn(1, 5, 2, 8)
    pos = torch.arange(5)[None]
    y = rope(x, pos, 10_000.0)
    assert torch.allclose(y.norm(dim=-1), x.norm(dim=-1), atol=1e-5)  # a rotation
    assert torch.allclose(y[:, 0], x[:, 0])  # position 0 unchanged
    # relative: <rope(q, m), rope(k, n)> depends on m - n only
    q, k = torch.randn(1, 1, 1, 8), torch.randn(1, 1, 1, 8)
    dot = lambda m, n: (rope(q, torch.tensor([[m]]), 1e4) * rope(k, torch.tensor([[n]]), 1e4)).sum()  # noqa: E731
    assert torch.allclose(dot(7, 3), dot(14, 10), atol=1e-5)
    emb = sincos_time(torch.tensor([0.0, 1.0]), 8, 4e-3, 4.0)
    assert emb.shape == (2, 8) and torch.allclose(emb[0], torch.tensor([0.0] * 4 + [1.0] * 4))
    assert math.isclose(emb[1, 0].item(), math.sin(2 * math.pi / 4e-3), abs_tol=1e-5)
    # one time for the whole batch (expanded, as sampling passes it) is embedded once: the same rows
    t = torch.tensor(0.37).expand(3)
    assert torch.equal(sincos_time(t, 8, 4e-3, 4.0), sincos_time(t.contiguous(), 8, 4e-3, 4.0))


@pytest.mark.parametrize("cfg", VARIANTS, ids=["pi0", "pi05"])
def test_cached_denoising_equals_joint_forward(cfg):
    model = randomised(cfg)
    images, img_masks, tokens, tok_masks, state, x_t, t = inputs(cfg)
    with torch.no_grad():
        joint = model.forward_joint(images, img_masks, tokens, tok_masks, state, x_t, t)
        prefix = model.encode_prefix(images, img_masks, tokens, tok_masks)
        kv_before = [k.clone() for k, _ in prefix.kv]
        v, h = model.velocity(prefix, state, x_t, t)
        model.velocity(prefix, state, x_t, t * 0.5)  # a second step must not grow or change the cache
    assert v.shape == (3, cfg.horizon, cfg.action_dim) and h.shape == (3, cfg.horizon, cfg.expert_width)
    assert torch.allclose(v, joint, atol=1e-5)
    assert all(k.shape[2] == cfg.prefix_len and torch.equal(k, k0) for (k, _), k0 in zip(prefix.kv, kv_before))
    assert prefix.hidden.shape == (3, cfg.prefix_len, cfg.vlm_width)


@pytest.mark.parametrize("cfg", VARIANTS, ids=["pi0", "pi05"])
def test_padding_and_masked_camera_do_not_leak(cfg):
    model = randomised(cfg)
    images, img_masks, tokens, tok_masks, state, x_t, t = inputs(cfg)
    images2, tokens2 = images.clone(), tokens.clone()
    images2[1, -1] = 255 - images2[1, -1]  # the masked camera of sample 1
    tokens2[0, 5:] = 7  # the padding of sample 0
    with torch.no_grad():
        a = model.forward_joint(images, img_masks, tokens, tok_masks, state, x_t, t)
        b = model.forward_joint(images2, img_masks, tokens2, tok_masks, state, x_t, t)
        images2[0, 0] = 255 - images2[0, 0]  # a visible camera does matter
        c = model.forward_joint(images2, img_masks, tokens2, tok_masks, state, x_t, t)
    assert torch.allclose(a, b, atol=1e-6)
    assert not torch.allclose(a[0], c[0], atol=1e-4)


def test_pi0_state_token_and_pi05_conditioning():
    cfg = Pi0Config.tiny()
    model = randomised(cfg)
    images, img_masks, tokens, tok_masks, state, x_t, t = inputs(cfg)
    with torch.no_grad():
        a = model.forward_joint(images, img_masks, tokens, tok_masks, state, x_t, t)
        b = model.forward_joint(images, img_masks, tokens, tok_masks, state + 1, x_t, t)
    assert not torch.allclose(a, b)  # π0 sees the state
    cfg5 = Pi0Config.tiny(variant="pi05")
    model5 = randomised(cfg5)
    names = dict(model5.named_parameters())
    assert "expert.layers.0.input_layernorm.dense.weight" in names and "expert.norm.dense.bias" in names
    assert "expert.layers.0.input_layernorm.weight" not in names and "state_proj.weight" not in names
    assert "vlm.layers.0.input_layernorm.weight" in names  # the VLM's norms stay standard
    fresh = Pi0Model(cfg5)  # zero-initialised adaptive denses: scale = shift = gate = 0 at init
    assert all((p == 0).all() for n, p in fresh.named_parameters() if ".dense." in n)
    with torch.no_grad():
        a5 = model5.forward_joint(images, img_masks, tokens, tok_masks, state, x_t, t)
        b5 = model5.forward_joint(images, img_masks, tokens, tok_masks, state + 1, x_t, t)
        c5 = model5.forward_joint(images, img_masks, tokens, tok_masks, state, x_t, t * 0.3)
    assert torch.allclose(a5, b5)  # π0.5 (pi05_libero default) has no state input
    assert not torch.allclose(a5, c5)  # time enters through the adaptive norms


def test_flow_loss_follows_openpi():
    cfg = Pi0Config.tiny()
    model = randomised(cfg)
    images, img_masks, tokens, tok_masks, state, actions, t = inputs(cfg)
    noise = torch.randn_like(actions)
    loss = model.flow_loss(images, img_masks, tokens, tok_masks, state, actions, noise=noise, t=t)
    x_t = t[:, None, None] * noise + (1 - t[:, None, None]) * actions
    v = model.forward_joint(images, img_masks, tokens, tok_masks, state, x_t, t)
    assert loss.shape == actions.shape and torch.allclose(loss, (v - (noise - actions)) ** 2, atol=1e-6)
    # the default time draw, as flow_loss makes it: Beta(1.5, 1) * 0.999 + 0.001, in [0.001, 1]
    seen = []
    model.forward_joint = lambda *a: (seen.append(a[-1]), torch.zeros_like(a[-2]))[1]
    n = 20000
    torch.manual_seed(0)
    model.flow_loss(images[:1].expand(n, *images.shape[1:]), img_masks[:1].expand(n, *img_masks.shape[1:]),
                    tokens[:1].expand(n, -1), tok_masks[:1].expand(n, -1), state[:1].expand(n, -1),
                    actions[:1].expand(n, -1, -1))
    (ts,) = seen
    assert ts.shape == (n,) and ts.min() >= 0.001 and ts.max() <= 1.0
    assert abs(ts.mean().item() - (0.6 * 0.999 + 0.001)) < 0.01  # Beta(1.5, 1): mean 0.6, P(t < 0.5) = 0.354
    assert abs((ts < 0.5).float().mean().item() - 0.5 ** 1.5 * 1.0) < 0.015


def test_gaussian_log_prob_is_the_normal_density():
    """Against torch's Normal: every Flow-SDE / Flow-Noise likelihood is built from it; std 0 (a deterministic step)
    contributes 0."""
    torch.manual_seed(0)
    x, mean, std = torch.randn(64, 5), torch.randn(64, 5), torch.rand(64, 5) * 2 + 0.01
    torch.testing.assert_close(gaussian_log_prob(x, mean, std), torch.distributions.Normal(mean, std).log_prob(x))
    std[:, 0] = 0
    assert (gaussian_log_prob(x, mean, std)[:, 0] == 0).all()


def test_sampling_is_euler_from_noise_to_data_with_a_hook():
    cfg = Pi0Config.tiny()
    model = randomised(cfg)
    images, img_masks, tokens, tok_masks, state, x_t, _ = inputs(cfg)
    with torch.no_grad():
        prefix = model.encode_prefix(images, img_masks, tokens, tok_masks)
        out = model.sample(prefix, state, x_t, num_steps=4)
        x, t = x_t.clone(), 1.0  # openpi's loop: while t >= -dt/2: x += dt * v(x, t)
        while t >= 0.25 / 2:
            x = x - 0.25 * model.velocity(prefix, state, x, torch.tensor(t))[0]
            t -= 0.25
    assert torch.allclose(out.actions, x, atol=1e-5) and torch.equal(out.chain[:, 0], x_t)
    assert out.chain.shape == (3, 5, cfg.horizon, cfg.action_dim) and (out.stds == 0).all()
    seen = []

    def noisy(i, x_t, v, h, t, d):  # where RL injects noise: a fixed std on step 2 only
        seen.append((i, float(t), float(d), h.shape))
        mean, _ = euler_step(i, x_t, v, h, t, d)
        return mean, torch.full_like(mean, 0.1 if i == 2 else 0.0)

    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        out = model.sample(prefix, state, x_t, num_steps=4, step_fn=noisy, generator=g)
    assert [s[0] for s in seen] == [0, 1, 2, 3] and [s[1] for s in seen] == [1.0, 0.75, 0.5, 0.25]
    assert all(math.isclose(s[2], 0.25, abs_tol=1e-6) for s in seen)
    logp = gaussian_log_prob(out.chain[:, 3], out.means[:, 2], out.stds[:, 2])
    assert torch.isfinite(logp).all() and (gaussian_log_prob(out.chain[:, 2], out.means[:, 1], out.stds[:, 1]) == 0).all()
    # recompute the recorded transition with gradients (what PPO does)
    mean, std, _ = model.transition(prefix, state, out.chain[:, 2], 2, 4, noisy)
    assert torch.allclose(mean, out.means[:, 2], atol=1e-5)
    lp = gaussian_log_prob(out.chain[:, 3], mean, std).sum()
    lp.backward()
    assert model.expert.layers[0].mlp.up_proj.weight.grad is not None


def test_mlp_expert_conditions_on_state_noise_time_and_visible_prefix(tmp_path):
    cfg = Pi0Config.tiny(expert="mlp", expert_width=96)
    model = randomised(cfg)
    images, img_masks, tokens, tok_masks, state, x_t, t = inputs(cfg)
    with torch.no_grad():
        joint = model.forward_joint(images, img_masks, tokens, tok_masks, state, x_t, t)
        prefix = model.encode_prefix(images, img_masks, tokens, tok_masks)
        v, h = model.velocity(prefix, state, x_t, t)
        images2, tokens2 = images.clone(), tokens.clone()
        images2[1, -1] = 255 - images2[1, -1]  # masked camera and padding: no effect
        tokens2[0, 5:] = 7
        v_masked = model.forward_joint(images2, img_masks, tokens2, tok_masks, state, x_t, t)
        changed = [model.forward_joint(images, img_masks, tokens, tok_masks, *args) for args in
                   ((state + 1, x_t, t), (state, x_t.flip(1), t), (state, x_t, 1 - t))]
    assert v.shape == (3, cfg.horizon, cfg.action_dim) and h.shape == (3, cfg.horizon, cfg.expert_width)
    assert torch.allclose(v, joint, atol=1e-6) and torch.allclose(v, v_masked, atol=1e-6)
    assert all(not torch.allclose(v, c, atol=1e-4) for c in changed)  # state, the whole noisy chunk and t all matter
    loss = model.flow_loss(images, img_masks, tokens, tok_masks, state, x_t)
    loss.mean().backward()
    assert model.expert.net[0].weight.grad.abs().sum() > 0 and model.action_out_proj.weight.grad is not None
    save_pi0(tmp_path / "mlp", model, None)
    loaded = load_pi0(tmp_path / "mlp")[0]
    assert loaded.cfg.expert == "mlp" and all(torch.equal(a, b) for a, b in zip(model.state_dict().values(),
                                                                                 loaded.state_dict().values()))
    with pytest.raises(ValueError, match="openpi has no 'mlp'"):
        save_openpi(tmp_path / "openpi", model)
    bf16 = Pi0Model(cfg).to_mixed_bf16()  # the MLP expert stays fp32 (it is the "head")
    assert bf16.expert.net[0].weight.dtype == torch.float32


def test_pi05_adaptive_norm_is_openpis_scale_shift_gate():
    """openpi's π0.5 adaptive RMSNorm: Dense(cond) gives (scale, shift, gate) in that order, y = rms(x)(1 + scale) +
    shift, and the residual adds y * gate. Pinned on chosen values: a swap of the three passes every self-consistency
    test (cached = joint, time matters)."""
    from common.pi0 import RMSNorm, gated_residual

    norm = RMSNorm(4, cond_dim=3)
    with torch.no_grad():
        norm.dense.bias.copy_(torch.tensor([0.5] * 4 + [-0.25] * 4 + [2.0] * 4))  # (the dense's weight: zeros)
    x = torch.randn(2, 5, 4)
    y, gate = norm(x, torch.randn(2, 3))
    rms = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6)
    assert torch.allclose(y, rms * 1.5 - 0.25, atol=1e-6) and torch.allclose(gate, torch.full_like(gate, 2.0))
    assert torch.allclose(gated_residual(x, y, gate), x + 2.0 * y)


def test_pi05_action_expert_against_openpis_wiring_written_out():
    """π0.5's action expert, written out from openpi's pi0.py / gemma.py (the parity test covers π0 only; there is
    no π0.5 in transformers): the time MLP in -> swish -> out -> swish conditions every adaptive RMSNorm; each
    layer's attention and MLP outputs are added through their norms' gates; the action tokens, one bidirectional
    block, see every real prefix token and each other, at positions after the prefix's real tokens; the final norm is
    adaptive too. The VLM's cached keys and values (checked against transformers for π0) are taken as they are."""
    import torch.nn.functional as F

    cfg = Pi0Config.tiny(variant="pi05")
    model = randomised(cfg)
    images, img_masks, tokens, tok_masks, state, x_t, t = inputs(cfg)
    with torch.no_grad():
        prefix = model.encode_prefix(images, img_masks, tokens, tok_masks)
        got = model.velocity(prefix, state, x_t, t)[0]

        def adaptive_norm(norm, x, cond):
            scale, shift, gate = (cond @ norm.dense.weight.T + norm.dense.bias).chunk(3, dim=-1)
            rms = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6)
            return rms * (1 + scale[:, None]) + shift[:, None], gate[:, None]

        B, H, D = x_t.shape[0], cfg.horizon, cfg.head_dim
        temb = sincos_time(t, cfg.expert_width, cfg.min_period, cfg.max_period).float()
        cond = F.silu(model.time_mlp_out(F.silu(model.time_mlp_in(temb))))
        x = model.action_in_proj(x_t)
        real = prefix.pad_mask.sum(-1)  # the prefix's real tokens; the actions come after them
        pos = real[:, None] + torch.arange(H)[None]
        for layer, (past_k, past_v) in zip(model.expert.layers, prefix.kv):
            h, gate = adaptive_norm(layer.input_layernorm, x, cond)
            att = layer.self_attn
            q = rope(att.q_proj(h).view(B, H, cfg.heads, D), pos, cfg.rope_theta)
            k = rope(att.k_proj(h).view(B, H, cfg.kv_heads, D), pos, cfg.rope_theta)
            v = att.v_proj(h).view(B, H, cfg.kv_heads, D)
            keys = torch.cat([past_k, k.transpose(1, 2)], 2).repeat_interleave(cfg.heads // cfg.kv_heads, 1)
            values = torch.cat([past_v, v.transpose(1, 2)], 2).repeat_interleave(cfg.heads // cfg.kv_heads, 1)
            scores = q.transpose(1, 2) @ keys.transpose(2, 3) / D ** 0.5  # (B, heads, H, P + H)
            visible = torch.cat([prefix.pad_mask, torch.ones(B, H, dtype=torch.bool)], 1)[:, None, None]
            weights = scores.masked_fill(~visible, float("-inf")).softmax(-1)
            out = (weights @ values).transpose(1, 2).reshape(B, H, cfg.heads * D)
            x = x + att.o_proj(out) * gate
            h, gate = adaptive_norm(layer.post_attention_layernorm, x, cond)
            x = x + layer.mlp(h) * gate
        want = model.action_out_proj(adaptive_norm(model.expert.norm, x, cond)[0])
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


def test_images_are_resized_as_openpis_clients_do():
    """openpi's clients resize camera frames with PIL's BILINEAR (antialiased when shrinking): LIBERO renders at 256
    px, the models take 224."""
    from PIL import Image

    rng = np.random.default_rng(0)
    frame = np.clip(rng.normal(128, 60, (256, 256, 3)), 0, 255).astype(np.uint8)  # texture: aliasing would show
    model = Pi0Model(Pi0Config.tiny(image_size=224))
    ours = (model.prepare_images(torch.as_tensor(frame)[None])[0].permute(1, 2, 0).numpy() + 1.0) * 127.5
    pil = np.asarray(Image.fromarray(frame).resize((224, 224), Image.BILINEAR), np.float32)
    diff = np.abs(ours - pil)
    assert diff.mean() < 0.5 and diff.max() < 2.0, (diff.mean(), diff.max())


def test_prompt_prefix_cache_equals_encoding_each_batch():
    cfg = Pi0Config.tiny(num_cameras=0)
    model = randomised(cfg)
    cache = PromptPrefixCache(model)
    images, img_masks, tokens, tok_masks, state, x_t, t = inputs(cfg, B=3)
    calls = []
    model.encode_prefix = lambda *a, f=model.encode_prefix: calls.append(a[2].shape[0]) or f(*a)
    for rows in ([0, 0, 0, 0], [1, 0, 2], [2, 2], [0, 1, 2, 1]):  # one prompt broadcast, mixed prompts
        idx = torch.tensor(rows)
        got = cache(images[idx], img_masks[idx], tokens[idx], tok_masks[idx])
        with torch.no_grad():
            want = model.encode_prefix(images[idx], img_masks[idx], tokens[idx], tok_masks[idx])
        assert torch.equal(got.pad_mask, want.pad_mask) and torch.allclose(got.hidden, want.hidden, atol=1e-6)
        assert all(torch.allclose(a, b, atol=1e-6) for (ka, va), (kb, vb) in zip(got.kv, want.kv)
                   for a, b in ((ka, kb), (va, vb)))
        v1 = model.velocity(got, state[:1].expand(len(rows), -1), x_t[:1].expand(len(rows), -1, -1), 0.5)[0]
        v2 = model.velocity(want, state[:1].expand(len(rows), -1), x_t[:1].expand(len(rows), -1, -1), 0.5)[0]
        assert torch.allclose(v1, v2, atol=1e-5)
    # batch sizes encoded, cache and reference alternating: the cache encoded prompt 0, then prompts 1 and 2, then
    # nothing new (the reference encodes every batch whole)
    assert calls == [1, 4, 2, 3, 2, 4] and len(cache.rows) == 3
    state_prompts = PromptPrefixCache(randomised(Pi0Config.tiny(num_cameras=0, variant="pi05",
                                                                discrete_state_input=True)))
    state_prompts(images, img_masks, tokens, tok_masks)
    assert not state_prompts.rows  # prompts with the state in them are (nearly) all new: none are kept


def test_noise_dims_keep_the_padding_exactly_zero(tmp_path):
    cfg = Pi0Config.tiny(noise_dims=3)  # 3 env action dims inside the model's 8
    model = randomised(cfg)
    images, img_masks, tokens, tok_masks, state, _, _ = inputs(cfg)
    x1 = model.initial_noise(3, generator=torch.Generator().manual_seed(0))
    assert (x1[..., 3:] == 0).all() and (x1[..., :3] != 0).all()

    def noisy(i, x_t, v, h, t, d):  # an SDE that asks for noise on every dim
        mean, _ = euler_step(i, x_t, v, h, t, d)
        return mean, torch.full_like(mean, 0.3)

    with torch.no_grad():
        prefix = model.encode_prefix(images, img_masks, tokens, tok_masks)
        a, b = (model.sample(prefix, state, model.initial_noise(3, generator=torch.Generator().manual_seed(s)), 4,
                             noisy, torch.Generator().manual_seed(s)) for s in (1, 2))
        half, actions = torch.full((3,), 0.5), torch.zeros(3, cfg.horizon, 8)
        torch.manual_seed(5)
        loss = model.flow_loss(images, img_masks, tokens, tok_masks, state, actions, t=half)  # draws its own noise
        torch.manual_seed(5)
        noise = model.initial_noise(3)  # the same draw
        v = model.forward_joint(images, img_masks, tokens, tok_masks, state, 0.5 * noise, half)
    assert (a.stds[..., 3:] == 0).all() and (a.stds[..., :3] == 0.3).all()
    for out in (a, b):  # the padding is 0 along the whole chain (the velocity there is not applied) ...
        assert (out.chain[..., 3:] == 0).all() and (out.means[..., 3:] == 0).all()
        assert not torch.allclose(out.chain[:, 1:, ..., :3], out.means[..., :3])  # ... but on the action dims
    assert torch.allclose(loss, (v - noise) ** 2, atol=1e-5)  # the loss drew zero noise on the padding (target 0)
    save_pi0(tmp_path / "m", model, None)
    assert load_pi0(tmp_path / "m")[0].cfg.noise_dims == 3


def test_invalid_configs_are_refused():
    for bad in (dict(heads=3, kv_heads=2), dict(image_size=60, patch=8), dict(depth=0), dict(variant="pi1"),
                dict(discrete_state_input=True), dict(head_dim=7), dict(max_tokens=1), dict(expert="lstm"),
                dict(expert="mlp", variant="pi05"), dict(noise_dims=9), dict(noise_dims=-1)):
        with pytest.raises(ValueError):
            Pi0Config.tiny(**bad)


def test_real_presets_build_on_meta_device():
    with torch.device("meta"):
        counts = Pi0Model(Pi0Config.pi0()).num_parameters()
        counts5 = Pi0Model(Pi0Config.pi05()).num_parameters()
    assert 3.2e9 < counts["total"] < 3.45e9, counts  # ≈3.3B: SigLIP 0.4B, Gemma-2B 2.5B, expert 0.3B
    assert 0.40e9 < counts["vision"] < 0.42e9 and 2.50e9 < counts["vlm"] < 2.52e9 and 0.30e9 < counts["expert"] < 0.32e9
    assert counts5["expert"] > counts["expert"]  # adaptive-norm denses (1024 -> 3072) per norm
    assert Pi0Config.pi0().prefix_len == 816 and Pi0Config.pi05().prefix_len == 968
    assert Pi0Config.pi05().horizon == 10


def test_byte_tokenizer_and_openpi_prompts():
    tok = ByteTokenizer()
    ids, mask = tokenize_prompt(tok, " pick_up the\ncube ", 32)
    text_ids = tok.encode("pick up the cube", add_bos=True) + tok.encode("\n")
    assert ids[: len(text_ids)].tolist() == text_ids and mask.sum() == len(text_ids) and (ids[~mask] == 0).all()
    assert tok.decode(ids[mask]) == "pick up the cube\n"
    with pytest.warns(UserWarning, match="truncated"):
        ids, mask = tokenize_prompt(tok, "x" * 100, 16)
    assert mask.all() and len(ids) == 16  # truncated
    assert discretize_state(np.array([-1.0, 0.0, 0.999, 1.0])).tolist() == [0, 128, 255, 255]
    ids, mask = tokenize_prompt(tok, "push", 64, state=np.array([-1.0, 0.0]))
    assert tok.decode(ids[mask]) == "Task: push, State: 0 128;\nAction: "


def test_sentencepiece_tokenizer_and_vocabulary_check(tmp_path):
    spm = pytest.importorskip("sentencepiece")
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n".join(["pick up the alphabet soup and place it in the basket", "push the cube to the goal",
                                 "put the bowl on the plate", "open the top drawer"] * 50))
    spm.SentencePieceTrainer.train(input=str(corpus), model_prefix=str(tmp_path / "sp"), vocab_size=300,
                                   byte_fallback=True, model_type="bpe", minloglevel=2)
    tok = SentencePieceTokenizer(tmp_path / "sp.model")
    ids, mask = tokenize_prompt(tok, "push the cube", 16)
    assert ids[0] == tok.bos_id and tok.decode(ids[mask][1:]).strip() == "push the cube"
    check_tokenizer(Pi0Config.tiny(vocab=300), tok)
    with pytest.raises(ValueError, match="ids"):
        check_tokenizer(Pi0Config.tiny(), tok)  # 300 ids do not fit a 260-row embedding
    with pytest.raises(ValueError, match="PaliGemma"):
        check_tokenizer(Pi0Config.tiny(vocab=257_152), ByteTokenizer())  # real weights, wrong vocabulary
    with pytest.raises(FileNotFoundError):
        SentencePieceTokenizer(tmp_path / "missing.model")


def test_norm_stats_round_trip():
    rng = np.random.default_rng(0)
    data = {"state": rng.normal(3, 2, (500, 5)), "actions": rng.uniform(-4, 9, (500, 7))}
    stats = NormStats.from_json(NormStats.from_data(data).to_json())
    x = torch.as_tensor(data["actions"][:10], dtype=torch.float32)
    padded = torch.nn.functional.pad(x, (0, 3), value=0.5)  # stats shorter than the vector: first dims only
    for quantile in (False, True):
        y = stats.normalize("actions", padded, quantile)
        assert torch.equal(y[:, 7:], padded[:, 7:])
        assert torch.allclose(stats.unnormalize("actions", y, quantile), padded, atol=1e-4)
    z = stats.normalize("state", torch.as_tensor(data["state"], dtype=torch.float32), False)
    assert torch.allclose(z.mean(0), torch.zeros(5), atol=1e-4) and torch.allclose(z.std(0), torch.ones(5), atol=1e-2)
    q = stats.normalize("actions", torch.as_tensor(data["actions"], dtype=torch.float32), True)
    assert abs(torch.quantile(q[:, 0], 0.01).item() + 1) < 1e-3 and abs(torch.quantile(q[:, 0], 0.99).item() - 1) < 1e-3
    raw = json.loads(stats.to_json())
    assert set(raw["norm_stats"]["state"]) == {"mean", "std", "q01", "q99"}


@pytest.mark.parametrize("cfg", VARIANTS, ids=["pi0", "pi05"])
def test_openpi_checkpoint_round_trip_is_strict(tmp_path, cfg):
    model = randomised(cfg)
    stats = NormStats.from_data({"state": np.random.randn(50, 5), "actions": np.random.randn(50, 7)})
    save_openpi(tmp_path / "ckpt", model, stats)
    from safetensors.torch import load_file, save_file

    names = load_file(str(tmp_path / "ckpt" / "model.safetensors"))
    assert "paligemma_with_expert.paligemma.lm_head.weight" in names  # the tied embedding, stored as lm_head
    assert "paligemma_with_expert.paligemma.model.language_model.embed_tokens.weight" not in names
    assert any(k.startswith("paligemma_with_expert.paligemma.model.vision_tower.vision_model.encoder.layers.0.")
               for k in names)
    assert any(k.startswith("paligemma_with_expert.gemma_expert.model.layers.1.") for k in names)
    # the unused expert lm_head that openpi files carry is dropped, and reported
    names["paligemma_with_expert.gemma_expert.lm_head.weight"] = torch.zeros(cfg.vocab, cfg.expert_width)
    save_file(names, str(tmp_path / "ckpt" / "model.safetensors"))
    loaded, loaded_stats, report = load_openpi(tmp_path / "ckpt")
    assert report.dropped == ["paligemma_with_expert.gemma_expert.lm_head.weight"] and not report.missing
    sd, sd2 = model.state_dict(), loaded.state_dict()
    assert sd.keys() == sd2.keys() and all(torch.equal(sd[k], sd2[k]) for k in sd)
    assert np.allclose(loaded_stats.stats["state"]["mean"], stats.stats["state"]["mean"])
    # a missing key is an error with a report (strict), not a silently random weight
    del names["action_out_proj.bias"]
    save_file(names, str(tmp_path / "ckpt" / "model.safetensors"))
    with pytest.raises(ValueError, match="missing.*action_out_proj.bias"):
        load_openpi(tmp_path / "ckpt")
    _, _, report = load_openpi(tmp_path / "ckpt", strict=False)
    assert report.missing == ["action_out_proj.bias"]
    # a half-copied openpi checkpoint: errors that name the file, through load_pi0 as through load_openpi
    (stats_file,) = (tmp_path / "ckpt" / "assets").glob("**/norm_stats.json")
    stats_file.write_text('{"norm_stats": {"state": ')
    with pytest.raises(ValueError, match="norm_stats.json is not readable norm stats"):
        load_openpi(tmp_path / "ckpt", strict=False)
    weights = tmp_path / "ckpt" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    with pytest.raises(ValueError, match="model.safetensors is unreadable"):
        load_pi0(tmp_path / "ckpt")
    (tmp_path / "ckpt" / "config.json").write_text('{"paligemma_variant": ')
    with pytest.raises(ValueError, match="config.json is not valid JSON"):
        load_pi0(tmp_path / "ckpt")


def test_rename_table_covers_lerobot_and_hf5_layouts():
    keys = {
        "model.paligemma_with_expert.paligemma.model.vision_tower.encoder.layers.0.mlp.fc1.weight":
            "vision.encoder.layers.0.mlp.fc1.weight",  # lerobot prefix, transformers-5 vision tower (no vision_model.)
        "paligemma_with_expert.paligemma.model.language_model.embed_tokens.weight": "vlm.embed_tokens.weight",
        "model.action_in_proj.weight": "action_in_proj.weight",
        "paligemma_with_expert.gemma_expert.model.norm.weight": "expert.norm.weight",
    }
    out, dropped = rename_openpi({k: torch.zeros(1) for k in keys})
    assert sorted(out) == sorted(keys.values()) and not dropped
    both = {"paligemma_with_expert.paligemma.model.language_model.embed_tokens.weight": torch.ones(2),
            "paligemma_with_expert.paligemma.lm_head.weight": torch.zeros(2)}
    out, dropped = rename_openpi(both)
    assert torch.equal(out["vlm.embed_tokens.weight"], torch.ones(2)) and len(dropped) == 1
    assert to_openpi_names({"vlm.embed_tokens.weight": 1}, tie_lm_head=False) == {
        "paligemma_with_expert.paligemma.model.language_model.embed_tokens.weight": 1}


def test_our_checkpoint_round_trip_and_crash_safety(tmp_path):
    model = randomised(Pi0Config.tiny(variant="pi05", discrete_state_input=True))
    save_pi0(tmp_path / "sft", model, None, extra={"step": 3})
    (tmp_path / "sft.tmpk1ll3d").mkdir()  # a save killed before its rename left a whole model's files
    (tmp_path / "sft.tmpk1ll3d" / "model.safetensors").write_bytes(b"x" * 1000)
    save_pi0(tmp_path / "sft", model, None, extra={"step": 4})  # replaces the old one, and clears that
    assert sorted(p.name for p in tmp_path.iterdir()) == ["sft"]
    loaded, stats, meta = load_pi0(tmp_path / "sft")
    assert meta["extra"] == {"step": 4} and loaded.cfg == model.cfg and stats is None
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), loaded.state_dict().values()))
    # a crash between the two renames of a replace leaves only the aside copy: it is still loadable
    (tmp_path / "sft").rename(tmp_path / "sft.old")
    assert load_pi0(tmp_path / "sft")[2]["extra"] == {"step": 4}
    with pytest.raises(FileNotFoundError):
        load_pi0(tmp_path / "nothing")
    # a half-copied checkpoint: an error that names the file (the scripts print it), not safetensors' bare one
    from common.pi0_io import existing_checkpoint
    assert existing_checkpoint(tmp_path / "sft") == tmp_path / "sft.old" and existing_checkpoint(tmp_path / "x") is None
    weights = tmp_path / "sft.old" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:len(weights.read_bytes()) // 2])
    with pytest.raises(ValueError, match="model.safetensors is unreadable"):
        load_pi0(tmp_path / "sft")
    (tmp_path / "sft.old" / "pi0_config.json").write_text('{"format": ')
    with pytest.raises(ValueError, match="pi0_config.json is not valid JSON"):
        load_pi0(tmp_path / "sft")


def test_a_run_s_torch_file_loads_and_a_damaged_one_is_named(tmp_path):
    from common.pi0_io import read_torch_state

    path = tmp_path / "trainer.pt"
    torch.save({"step": 3, "rng": torch.get_rng_state()}, path)
    assert read_torch_state(path)["step"] == 3
    whole = path.read_bytes()
    for damaged in (whole[:len(whole) // 2], b"garbage"):
        path.write_bytes(damaged)
        with pytest.raises(ValueError, match="trainer.pt is not a torch file"):
            read_torch_state(path)
    with pytest.raises(ValueError, match="vla.pt missing"):
        read_torch_state(tmp_path / "vla.pt")


@pytest.mark.parametrize("variant", ["pi0", "pi05"])
def test_the_state_is_normalised_by_quantiles_for_pi05_and_by_z_scores_for_pi0(variant):
    """openpi: π0 z-scores its inputs, π0.5 maps the 1st..99th percentiles to [-1, 1] (its checkpoints' norm
    stats are read so)."""
    cfg = Pi0Config.tiny(variant=variant, num_cameras=0)
    rng = np.random.default_rng(0)
    stats = NormStats.from_data({"state": rng.normal(1, 2, size=(200, 5)), "actions": rng.normal(size=(200, 7))})
    proc = Pi0Processor(cfg, ByteTokenizer(), stats, env_action_dim=7)
    state = rng.normal(1, 2, size=(2, 5))
    got = proc.batch(state, {}, ["push", "push"])["state"][:, :5].double().numpy()
    s = stats.stats["state"]
    want = (state - s["q01"]) / (s["q99"] - s["q01"] + 1e-6) * 2 - 1 if variant == "pi05" else \
        (state - s["mean"]) / (s["std"] + 1e-6)
    np.testing.assert_allclose(got, want, atol=1e-5)


def test_processor_pads_masks_and_round_trips_actions():
    cfg = Pi0Config.tiny(num_cameras=3)
    rng = np.random.default_rng(0)
    stats = NormStats.from_data({"state": rng.normal(size=(100, 5)), "actions": rng.normal(2, 3, size=(100, 7))})
    proc = Pi0Processor(cfg, ByteTokenizer(), stats, env_action_dim=7)
    images = {"main": rng.integers(0, 255, (2, 32, 32, 3), dtype=np.uint8)}  # wrist and a third slot missing
    b = proc.batch(rng.normal(size=(2, 5)), images, ["push the cube", "push the cube"])
    assert b["images"].shape == (2, 3, 32, 32, 3) and b["img_masks"].tolist() == [[True, False, False]] * 2
    assert b["state"].shape == (2, cfg.action_dim) and (b["state"][:, 5:] == 0).all()
    actions = torch.as_tensor(rng.normal(2, 3, size=(2, cfg.horizon, 7)), dtype=torch.float32)
    model_actions = proc.actions_to_model(actions)
    assert model_actions.shape == (2, cfg.horizon, cfg.action_dim)
    assert torch.allclose(proc.actions_to_env(model_actions), actions, atol=1e-4)
    with pytest.raises(ValueError, match="action_dim"):
        Pi0Processor(cfg, ByteTokenizer(), stats, env_action_dim=9)


@pytest.mark.parametrize("cfg", VARIANTS, ids=["pi0", "pi05"])
def test_mixed_precision_keeps_openpi_fp32_params(cfg):
    model = Pi0Model(cfg).to_mixed_bf16()
    dtypes = {n: p.dtype for n, p in model.named_parameters()}
    assert dtypes["vision.embeddings.patch_embedding.weight"] == torch.float32
    assert dtypes["vlm.layers.0.input_layernorm.weight"] == torch.float32
    assert dtypes["expert.layers.0.mlp.up_proj.weight"] == torch.bfloat16
    assert dtypes["action_in_proj.weight"] == dtypes["action_out_proj.weight"] == torch.float32  # heads stay fp32
    if cfg.is_pi05:
        assert dtypes["expert.layers.0.input_layernorm.dense.weight"] == torch.float32
    images, img_masks, tokens, tok_masks, state, x_t, t = inputs(model.cfg)
    with torch.no_grad():
        v = model.forward_joint(images, img_masks, tokens, tok_masks, state, x_t, t)
        prefix = model.encode_prefix(images, img_masks, tokens, tok_masks)
        v2, _ = model.velocity(prefix, state, x_t, t)
    assert v.dtype == torch.float32 and torch.isfinite(v).all() and torch.allclose(v, v2, atol=0.05)


def test_delta_action_models_get_the_state_added_back():
    """openpi's pi0_libero trains the end-effector pose as deltas from the state (extra_delta_transform): targets
    subtract it, env actions add it back, for every action of the chunk."""
    from common.pi0_io import NormStats, Pi0Processor, make_tokenizer

    cfg = Pi0Config.tiny(delta_action_dims=2, action_dim=8, num_cameras=0)
    stats = NormStats({"state": {k: np.ones(3) for k in ("mean", "std", "q01", "q99")},
                       "actions": {"mean": np.zeros(3), "std": np.full(3, 2.0), "q01": -np.ones(3), "q99": np.ones(3)}})
    proc = Pi0Processor(cfg, make_tokenizer("bytes"), stats, env_action_dim=3, camera_keys=())
    state = torch.tensor([[10.0, 20.0, 30.0]])
    chunk = torch.tensor([[[11.0, 22.0, 0.5], [12.0, 18.0, -0.5]]])
    target = proc.actions_to_model(chunk, state)
    assert torch.allclose(target[0, :, :3], torch.tensor([[0.5, 1.0, 0.25], [1.0, -1.0, -0.25]]))  # (a - s) / 2
    assert torch.allclose(proc.actions_to_env(target, state), chunk)
    with pytest.raises(ValueError, match="pass the raw state"):
        proc.actions_to_env(target)
    with pytest.raises(ValueError, match="delta_action_dims"):
        Pi0Config.tiny(delta_action_dims=99)


@pytest.mark.parametrize("cfg", VARIANTS, ids=["pi0", "pi05"])
def test_openpi_libero_delta_actions_follow_the_weights_not_our_config_key(tmp_path, cfg):
    """openpi's config.json has no `pi05` key (only our save_openpi writes one): whether a LIBERO checkpoint's
    actions are deltas (π0) or absolute (π0.5) is read from its weights."""
    from common.pi0_io import load_pi0_policy

    with pytest.raises(ValueError, match="norm_stats.json"):  # openpi's own code refuses to run without them too
        save_openpi(tmp_path / "bare", randomised(cfg))
        load_pi0_policy(f"openpi:{tmp_path / 'bare'}", env="libero")
    stats = NormStats.from_data({"state": np.random.randn(50, 8), "actions": np.random.randn(50, 7)})
    save_openpi(tmp_path / "ckpt", randomised(cfg), stats)
    conf = json.loads((tmp_path / "ckpt" / "config.json").read_text())
    del conf["pi05"]  # as openpi writes it; the sizes stay in pi0_config (the tiny model is no Gemma variant)
    (tmp_path / "ckpt" / "config.json").write_text(json.dumps(conf))
    model, _, env_dim, _ = load_pi0_policy(f"openpi:{tmp_path / 'ckpt'}", env="libero")
    assert model.cfg.is_pi05 == cfg.is_pi05 and env_dim == 7
    assert model.cfg.delta_action_dims == (0 if cfg.is_pi05 else 6)
    assert load_pi0_policy(f"openpi:{tmp_path / 'ckpt'}", env="maniskill")[0].cfg.delta_action_dims == 0


def test_policy_prompts_hold_every_task_of_a_subset_apart(tmp_path):
    """RL from scratch on several tasks sizes the prompt to the longest instruction; a loaded model whose prompt cuts
    two tasks to the same tokens is refused, one that keeps them apart (or one task alone) is kept."""
    from common.pi0_io import check_prompts, instruction_tokens, load_pi0_policy, save_pi0

    tok = ByteTokenizer()
    spatial = ["pick the akita black bowl next to the ramekin and place it on the plate",  # libero_spatial 1 and 6 as
               "pick the akita black bowl next to the cookies box and place it on the plate"]  # their envs prompt
    need = instruction_tokens(tok, spatial)
    assert need == len(spatial[1]) + 2  # BOS, the bytes, "\n"
    tiny = Pi0Config.tiny().max_tokens
    model = load_pi0_policy("scratch", env="libero", instructions=spatial, tokenizer=tok)[0]
    assert model.cfg.max_tokens == need > tiny
    one = load_pi0_policy("scratch", env="libero", instructions=spatial[:1], tokenizer=tok)[0]
    assert one.cfg.max_tokens == tiny  # one task: a cut prompt is still one prompt
    # libero_90 repeats instructions across scenes: two tasks with one instruction are one prompt, not a collision
    assert load_pi0_policy("scratch", env="libero", instructions=spatial[:1] * 2, tokenizer=tok)[0].cfg.max_tokens == tiny
    assert load_pi0_policy("scratch", env="libero")[0].cfg.max_tokens == tiny

    save_pi0(tmp_path / "short", Pi0Model(Pi0Config.tiny()), None, tok.name)
    with pytest.raises(ValueError, match=f"cuts the instructions of different tasks to the same tokens \\(they need {need}\\)"):
        load_pi0_policy(f"sft:{tmp_path / 'short'}", env="libero", instructions=spatial, tokenizer=tok)
    object_0_5 = ["pick up the alphabet soup and place it in the basket", "pick up the tomato sauce and place it in the basket"]
    kept = load_pi0_policy(f"sft:{tmp_path / 'short'}", env="libero", instructions=object_0_5, tokenizer=tok)[0]
    assert kept.cfg.max_tokens == tiny  # cut, but still apart: kept (openpi's truncation warns)
    shared = len("pick the akita black bowl next to the ")
    check_prompts(Pi0Config.tiny(max_tokens=1 + shared + 1), tok, spatial)  # BOS, the shared bytes, one that differs
    with pytest.raises(ValueError, match="cuts the instructions"):
        check_prompts(Pi0Config.tiny(max_tokens=1 + shared), tok, spatial)
    with pytest.raises(ValueError, match="tokenizer"):
        load_pi0_policy("scratch", env="libero", instructions=spatial)
