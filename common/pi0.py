"""π0 / π0.5 flow-matching VLA in plain PyTorch, faithful to openpi's PyTorch model and named like its checkpoints.

Black et al., "π0: A Vision-Language-Action Flow Model for General Robot Control" (2024), and Physical Intelligence,
"π0.5" (2025). One module covers a tiny CPU config and the real 3.3B sizes with the same code:

- `vision`: SigLIP-style ViT (no pooling head) + `projector` into the VLM width; images uint8 -> [-1, 1].
- `vlm`: Gemma (RMSNorm x*(1+w) in fp32, GeGLU, RoPE, multi-query attention); language embeddings scaled by sqrt(width)
  once, here; image tokens are not scaled.
- `expert`: the Gemma action expert. In every layer both experts project their own tokens to Q/K/V, the sequences are
  concatenated and ONE attention runs over [prefix; suffix] with the prefix-LM block mask; each expert then applies its
  own o_proj / MLP. Hence both share depth, heads, kv_heads and head_dim; widths may differ.
- π0: suffix = [state token] + H action tokens, time by `action_time_mlp_*`. π0.5: suffix = H action tokens; time
  conditions every expert RMSNorm adaptively (scale, shift, gate; gated residuals); no state token (the state may go
  into the prompt as discrete bins, see `common.pi0_io.tokenize_prompt`).
- Flow matching as openpi: t ~ Beta(1.5, 1)*0.999 + 0.001, x_t = t*noise + (1-t)*a, target u = noise - a, MSE per
  element. Sampling runs from t=1 (noise) to t=0 with K Euler steps; `step_fn` is where RL injects noise (SDE or a
  learned std) and the sampler records the chain, means and stds for log-probs.
- Prefix cache: `encode_prefix` runs the VLM once; every denoising step runs only the expert against the cached prefix
  K/V, which is never grown (the prefix never attends to the suffix, so this equals the joint forward).

Public API: `Pi0Config` (`tiny()`, `pi0()`, `pi05()`), `Pi0Model.encode_prefix`, `.velocity`, `.flow_loss`, `.sample`,
`.transition`, `gaussian_log_prob`, `euler_step`. Tokenizers, norm stats and checkpoints live in `common.pi0_io`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from typing import Callable, NamedTuple

import torch
import torch.nn as nn
import torch.nn.functional as F

MASK_VALUE = -2.3819763e38  # openpi's additive mask value (the most negative bf16 number)


@dataclass
class Pi0Config:
    """Sizes and variant. The defaults are the real π0 (PaliGemma 3B + Gemma-300M expert); see the presets."""

    variant: str = "pi0"  # "pi0" (state token, action-time MLP) or "pi05" (adaptive-norm time conditioning)
    expert: str = "gemma"  # "gemma" (π0's action expert) or "mlp" (an MLP velocity net over [pooled prefix, state,
    # x_t, time]: the small flow policy of πRL's CPU calibration, to tell the algorithm from the tiny transformer)
    discrete_state_input: bool = False  # π0.5 only: state as 256 bins in the prompt instead of no state at all
    noise_dims: int = 0  # flow noise on the first `noise_dims` action dims only, the zero padding beyond stays exactly 0
    # along the whole path (0 = every dim, as openpi trains; our few-shot SFT sets the env's action width, see README)
    delta_action_dims: int = 0  # the first dims are trained as deltas from the state (openpi's pi0_libero: 6, the
    # end-effector pose: extra_delta_transform); the processor adds the state back for the env
    image_size: int = 224
    patch: int = 14
    vit_width: int = 1152
    vit_depth: int = 27
    vit_heads: int = 16
    vit_mlp: int = 4304
    vocab: int = 257_152
    depth: int = 18
    heads: int = 8
    kv_heads: int = 1
    head_dim: int = 256
    vlm_width: int = 2048
    vlm_mlp: int = 16_384
    expert_width: int = 1024
    expert_mlp: int = 4096
    action_dim: int = 32
    horizon: int = 50
    max_tokens: int = 48
    num_cameras: int = 3
    rope_theta: float = 10_000.0
    min_period: float = 4e-3
    max_period: float = 4.0

    def __post_init__(self):
        positive = ("image_size", "patch", "vit_width", "vit_depth", "vit_heads", "vit_mlp", "vocab", "depth", "heads",
                    "kv_heads", "head_dim", "vlm_width", "vlm_mlp", "expert_width", "expert_mlp", "action_dim",
                    "horizon", "max_tokens")
        bad = [f"{k}={getattr(self, k)}" for k in positive if getattr(self, k) < 1]
        if bad:
            raise ValueError(f"Pi0Config: these must be >= 1: {', '.join(bad)}")
        if self.num_cameras < 0:
            raise ValueError(f"Pi0Config: num_cameras must be >= 0, got {self.num_cameras}")
        if not 0 <= self.delta_action_dims <= self.action_dim:
            raise ValueError(f"Pi0Config: delta_action_dims must be in [0, action_dim], got {self.delta_action_dims}")
        if not 0 <= self.noise_dims <= self.action_dim:
            raise ValueError(f"Pi0Config: noise_dims must be in [0, action_dim={self.action_dim}], got {self.noise_dims}")
        if self.image_size % self.patch:
            raise ValueError(f"Pi0Config: image_size {self.image_size} is not a multiple of patch {self.patch}")
        if self.vit_width % self.vit_heads:
            raise ValueError(f"Pi0Config: vit_width {self.vit_width} is not divisible by vit_heads {self.vit_heads}")
        if self.heads % self.kv_heads:
            raise ValueError(f"Pi0Config: heads {self.heads} is not a multiple of kv_heads {self.kv_heads}")
        if self.expert_width % 2:
            raise ValueError(f"Pi0Config: expert_width {self.expert_width} must be even (sine-cosine time embedding)")
        if self.head_dim % 2:
            raise ValueError(f"Pi0Config: head_dim {self.head_dim} must be even (RoPE rotates pairs)")
        if self.variant not in ("pi0", "pi05"):
            raise ValueError(f"Pi0Config: variant must be 'pi0' or 'pi05', got {self.variant!r}")
        if self.expert not in ("gemma", "mlp"):
            raise ValueError(f"Pi0Config: expert must be 'gemma' or 'mlp', got {self.expert!r}")
        if self.expert == "mlp" and self.variant != "pi0":
            raise ValueError("Pi0Config: the MLP expert takes the state as an input (variant pi0 only)")
        if self.discrete_state_input and not self.is_pi05:
            raise ValueError("Pi0Config: discrete_state_input is a π0.5 option (π0 has a state token)")
        if self.max_tokens < 2:
            raise ValueError("Pi0Config: max_tokens must leave room for BOS and the prompt")

    @property
    def is_pi05(self) -> bool:
        return self.variant == "pi05"

    @property
    def image_tokens(self) -> int:
        return (self.image_size // self.patch) ** 2

    @property
    def prefix_len(self) -> int:
        return self.num_cameras * self.image_tokens + self.max_tokens

    @classmethod
    def pi0(cls, **overrides) -> "Pi0Config":
        """Real π0: 3.3B parameters, horizon 50, 48 prompt tokens."""
        return replace(cls(), **overrides)

    @classmethod
    def pi05(cls, **overrides) -> "Pi0Config":
        """Real π0.5 as in `pi05_libero`: horizon 10, 200 prompt tokens, no state input by default."""
        return replace(cls(variant="pi05", horizon=10, max_tokens=200), **overrides)

    @classmethod
    def tiny(cls, **overrides) -> "Pi0Config":
        """CPU scale, same code path: ~0.5M parameters, byte-level vocabulary (260), 64 px images in patches of 8."""
        base = cls(image_size=64, patch=8, vit_width=64, vit_depth=2, vit_heads=2, vit_mlp=128, vocab=260, depth=2,
                   heads=2, kv_heads=1, head_dim=32, vlm_width=128, vlm_mlp=256, expert_width=64, expert_mlp=128,
                   action_dim=8, horizon=8, max_tokens=32, num_cameras=2)
        return replace(base, **overrides)


# ------------------------------------------------------------------------------------------------------- blocks
class RMSNorm(nn.Module):
    """Gemma RMSNorm in fp32: x*rsqrt(mean(x^2)+eps)*(1+w), w zero-initialised. With `cond_dim` it is π0.5's
    adaptive norm: Dense(cond -> 3*dim), zero-initialised, gives (scale, shift, gate); returns (y, gate)."""

    def __init__(self, dim: int, cond_dim: int | None = None, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        if cond_dim is None:
            self.weight = nn.Parameter(torch.zeros(dim))
            self.dense = None
        else:
            self.dense = nn.Linear(cond_dim, 3 * dim)
            nn.init.zeros_(self.dense.weight)
            nn.init.zeros_(self.dense.bias)

    def forward(self, x: torch.Tensor, cond: torch.Tensor | None = None):
        xf = x.float()
        normed = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        if self.dense is None:
            return (normed * (1.0 + self.weight.float())).to(x.dtype), None
        if cond is None:
            raise ValueError("an adaptive RMSNorm needs the time conditioning")
        scale, shift, gate = self.dense(cond.to(self.dense.weight.dtype))[:, None, :].float().chunk(3, dim=-1)
        return (normed * (1.0 + scale) + shift).to(x.dtype), gate.to(x.dtype)


def gated_residual(x: torch.Tensor, y: torch.Tensor, gate: torch.Tensor | None) -> torch.Tensor:
    return x + y if gate is None else x + y * gate


class GemmaAttentionProj(nn.Module):
    def __init__(self, width: int, cfg: Pi0Config):
        super().__init__()
        self.q_proj = nn.Linear(width, cfg.heads * cfg.head_dim, bias=False)
        self.k_proj = nn.Linear(width, cfg.kv_heads * cfg.head_dim, bias=False)
        self.v_proj = nn.Linear(width, cfg.kv_heads * cfg.head_dim, bias=False)
        self.o_proj = nn.Linear(cfg.heads * cfg.head_dim, width, bias=False)


class GemmaMLP(nn.Module):
    def __init__(self, width: int, hidden: int):
        super().__init__()
        self.gate_proj = nn.Linear(width, hidden, bias=False)
        self.up_proj = nn.Linear(width, hidden, bias=False)
        self.down_proj = nn.Linear(hidden, width, bias=False)

    def forward(self, x):
        return self.down_proj(F.gelu(self.gate_proj(x), approximate="tanh") * self.up_proj(x))


class GemmaLayer(nn.Module):
    def __init__(self, width: int, mlp: int, cfg: Pi0Config, cond_dim: int | None):
        super().__init__()
        self.input_layernorm = RMSNorm(width, cond_dim)
        self.self_attn = GemmaAttentionProj(width, cfg)
        self.post_attention_layernorm = RMSNorm(width, cond_dim)
        self.mlp = GemmaMLP(width, mlp)


class GemmaStack(nn.Module):
    """Layers + final norm (+ token embedding for the VLM). No forward: `joint_layer` runs both stacks together."""

    def __init__(self, width: int, mlp: int, cfg: Pi0Config, vocab: int | None = None, cond_dim: int | None = None):
        super().__init__()
        if vocab is not None:
            self.embed_tokens = nn.Embedding(vocab, width)
        self.layers = nn.ModuleList(GemmaLayer(width, mlp, cfg, cond_dim) for _ in range(cfg.depth))
        self.norm = RMSNorm(width, cond_dim)


class SiglipAttention(nn.Module):
    def __init__(self, width: int, heads: int):
        super().__init__()
        self.heads = heads
        self.q_proj, self.k_proj = nn.Linear(width, width), nn.Linear(width, width)
        self.v_proj, self.out_proj = nn.Linear(width, width), nn.Linear(width, width)

    def forward(self, x):
        B, L, W = x.shape
        q, k, v = (p(x).view(B, L, self.heads, -1).transpose(1, 2) for p in (self.q_proj, self.k_proj, self.v_proj))
        return self.out_proj(F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(B, L, W))


class SiglipMLP(nn.Module):
    def __init__(self, width: int, hidden: int):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(width, hidden), nn.Linear(hidden, width)

    def forward(self, x):
        return self.fc2(F.gelu(self.fc1(x), approximate="tanh"))


class SiglipLayer(nn.Module):
    def __init__(self, width: int, heads: int, mlp: int):
        super().__init__()
        self.layer_norm1 = nn.LayerNorm(width, eps=1e-6)
        self.self_attn = SiglipAttention(width, heads)
        self.layer_norm2 = nn.LayerNorm(width, eps=1e-6)
        self.mlp = SiglipMLP(width, mlp)

    def forward(self, x):
        x = x + self.self_attn(self.layer_norm1(x))
        return x + self.mlp(self.layer_norm2(x))


class SiglipEmbeddings(nn.Module):
    def __init__(self, cfg: Pi0Config):
        super().__init__()
        self.patch_embedding = nn.Conv2d(3, cfg.vit_width, cfg.patch, stride=cfg.patch)
        self.position_embedding = nn.Embedding(cfg.image_tokens, cfg.vit_width)


class SiglipEncoder(nn.Module):
    def __init__(self, cfg: Pi0Config):
        super().__init__()
        self.layers = nn.ModuleList(SiglipLayer(cfg.vit_width, cfg.vit_heads, cfg.vit_mlp) for _ in range(cfg.vit_depth))


class SiglipViT(nn.Module):
    """SigLIP So400m/14 layout (pool_type none): patch conv + learned positions, pre-LN blocks, post LayerNorm."""

    def __init__(self, cfg: Pi0Config):
        super().__init__()
        self.embeddings = SiglipEmbeddings(cfg)
        self.encoder = SiglipEncoder(cfg)
        self.post_layernorm = nn.LayerNorm(cfg.vit_width, eps=1e-6)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:  # pixels (B, 3, S, S) in [-1, 1]
        emb = self.embeddings.patch_embedding(pixels.to(self.embeddings.patch_embedding.weight.dtype))
        x = emb.flatten(2).transpose(1, 2) + self.embeddings.position_embedding.weight[None]
        x = x.to(self.post_layernorm.weight.dtype)  # fp32 embeddings feed bf16 blocks under mixed precision
        for layer in self.encoder.layers:
            x = layer(x)
        return self.post_layernorm(x)


class Projector(nn.Module):
    def __init__(self, cfg: Pi0Config):
        super().__init__()
        self.linear = nn.Linear(cfg.vit_width, cfg.vlm_width)


# ---------------------------------------------------------------------------------------------- attention core
def make_att_2d_masks(pad: torch.Tensor, ar: torch.Tensor) -> torch.Tensor:
    """openpi's block mask: query q sees key k iff cumsum(ar)[k] <= cumsum(ar)[q], and both are real tokens."""
    cum = torch.cumsum(ar.long(), dim=1)
    return (cum[:, None, :] <= cum[:, :, None]) & pad[:, None, :] & pad[:, :, None]


def rope(x: torch.Tensor, pos: torch.Tensor, theta: float) -> torch.Tensor:
    """Rotary embedding over the last dim (halves layout, as HF Gemma). x (B, L, H, D), pos (B, L)."""
    half = x.shape[-1] // 2
    freq = theta ** (-torch.arange(half, device=x.device, dtype=torch.float32) * 2 / x.shape[-1])
    ang = pos.float()[..., None] * freq  # (B, L, half)
    cos, sin = ang.cos()[:, :, None], ang.sin()[:, :, None]
    x1, x2 = x.float()[..., :half], x.float()[..., half:]
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1).to(x.dtype)


def attention_bias(mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Boolean (B, Q, K) mask -> openpi's additive bias (B, 1, Q, K); built once per forward, shared by all layers."""
    return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill(~mask, MASK_VALUE)[:, None]


def joint_layer(cfg: Pi0Config, layers: list[GemmaLayer], xs: list[torch.Tensor | None], conds: list, bias, pos,
                past_kv: tuple[torch.Tensor, torch.Tensor] | None = None):
    """One layer of shared attention over the experts' concatenated tokens. `xs[i] is None` skips expert i; with
    `past_kv` (cached prefix keys/values, after RoPE) the keys are [past; new]. Returns the new hidden states and this
    call's (k, v) (for the prefix cache)."""
    qs, ks, vs, gates, lens = [], [], [], [], []
    for layer, x, cond in zip(layers, xs, conds):
        if x is None:
            continue
        h, gate = layer.input_layernorm(x, cond)
        B, L, _ = h.shape
        att = layer.self_attn
        qs.append(att.q_proj(h).view(B, L, cfg.heads, cfg.head_dim))
        ks.append(att.k_proj(h).view(B, L, cfg.kv_heads, cfg.head_dim))
        vs.append(att.v_proj(h).view(B, L, cfg.kv_heads, cfg.head_dim))
        gates.append(gate)
        lens.append(L)
    q = rope(torch.cat(qs, dim=1), pos, cfg.rope_theta).transpose(1, 2)  # (B, H, L, D)
    k = rope(torch.cat(ks, dim=1), pos, cfg.rope_theta).transpose(1, 2)  # (B, KV, L, D)
    v = torch.cat(vs, dim=1).transpose(1, 2)
    new_kv = (k, v)
    if past_kv is not None:
        k, v = torch.cat([past_kv[0], k], dim=2), torch.cat([past_kv[1], v], dim=2)
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias, scale=cfg.head_dim ** -0.5,
                                         enable_gqa=cfg.kv_heads != cfg.heads)
    out = out.transpose(1, 2).reshape(out.shape[0], -1, cfg.heads * cfg.head_dim)
    outs, start, j = [], 0, 0
    for layer, x, cond in zip(layers, xs, conds):
        if x is None:
            outs.append(None)
            continue
        o = layer.self_attn.o_proj(out[:, start:start + lens[j]])
        x = gated_residual(x, o, gates[j])
        h, gate = layer.post_attention_layernorm(x, cond)
        outs.append(gated_residual(x, layer.mlp(h), gate))
        start += lens[j]
        j += 1
    return outs, new_kv


def sincos_time(t: torch.Tensor, dim: int, min_period: float, max_period: float) -> torch.Tensor:
    """openpi's sine-cosine time embedding: periods geometric in [min, max], [sin, cos] concatenated (float64 math)."""
    if t.dim() == 1 and len(t) > 1 and t.stride(0) == 0:  # one time for the whole batch (sampling): embed it once
        return sincos_time(t[:1], dim, min_period, max_period).expand(len(t), -1)
    frac = torch.linspace(0.0, 1.0, dim // 2, dtype=torch.float64, device=t.device)
    period = min_period * (max_period / min_period) ** frac
    arg = t.double()[:, None] * (2 * math.pi / period)[None]
    return torch.cat([arg.sin(), arg.cos()], dim=-1).float()


# ---------------------------------------------------------------------------------------------------- the model
class Prefix(NamedTuple):
    kv: list  # per layer (k, v), k after RoPE, shapes (B, kv_heads, P, head_dim)
    pad_mask: torch.Tensor  # (B, P) bool
    hidden: torch.Tensor  # (B, P, vlm_width) VLM output after the final norm (πRL's critic-after-VLM input)


class Sample(NamedTuple):
    actions: torch.Tensor  # (B, H, A) x_0, in the model's normalised action space
    chain: torch.Tensor  # (B, K+1, H, A) x_T .. x_0 (x_T = the initial noise)
    means: torch.Tensor  # (B, K, H, A) transition means
    stds: torch.Tensor  # (B, K, H, A) transition stds (0 for deterministic steps)
    hidden: torch.Tensor  # (B, K, H, expert_width) expert hidden states of the action tokens at each step


StepFn = Callable[[int, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor],
                  tuple[torch.Tensor, torch.Tensor]]


def euler_step(i, x_t, v, h, t, d):
    """Deterministic flow ODE step from t to t - d: mean = x_t - d*v, std = 0 (openpi's sampler)."""
    return x_t - d * v, torch.zeros_like(x_t)


def gaussian_log_prob(x: torch.Tensor, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """Element-wise log N(x | mean, std); elements with std == 0 (deterministic steps) get 0, as in RLinf."""
    safe = torch.where(std > 0, std, torch.ones_like(std))
    logp = -torch.log(safe) - 0.5 * math.log(2 * math.pi) - 0.5 * ((x - mean) / safe) ** 2
    return torch.where(std > 0, logp, torch.zeros_like(logp))


class PromptPrefixCache:
    """Without cameras (state-only tasks) a prefix is a function of the prompt alone: encode each distinct prompt
    once and hand out views of it (not with the state in the prompt). Valid only while the VLM is frozen (πRL's train_expert_only) and gradients through
    the prefix are not needed; `clear()` after loading other weights. With cameras it just calls `encode_prefix`."""

    def __init__(self, model: "Pi0Model"):
        self.model, self.rows = model, {}

    @property
    def per_observation(self) -> bool:
        """The prefix depends on more than the prompt (cameras, or π0.5's state in the prompt): encoded at every call.
        With the state in the prompt nearly every prompt is new, so caching would only grow."""
        return bool(self.model.cfg.num_cameras or self.model.cfg.discrete_state_input)

    def clear(self) -> None:
        self.rows.clear()

    def __call__(self, images, img_masks, tokens, tok_masks) -> Prefix:
        if self.per_observation:
            with torch.no_grad():
                return self.model.encode_prefix(images, img_masks, tokens, tok_masks)
        keys = [bytes(t) + bytes(m) for t, m in zip(tokens.cpu().numpy(), tok_masks.cpu().numpy())]
        first_row: dict[bytes, int] = {}  # one row per prompt not seen before
        for i, key in enumerate(keys):
            if key not in self.rows:
                first_row.setdefault(key, i)
        new = list(first_row.values())
        if new:
            idx = torch.tensor(new, device=tokens.device)
            with torch.no_grad():
                p = self.model.encode_prefix(images[idx], img_masks[idx], tokens[idx], tok_masks[idx])
            for j, i in enumerate(new):
                self.rows[keys[i]] = Prefix([(k[j:j + 1], v[j:j + 1]) for k, v in p.kv], p.pad_mask[j:j + 1],
                                            p.hidden[j:j + 1])
        B = len(keys)
        if len(set(keys)) == 1:  # the usual case: one task, one prompt -> broadcast views, no copies
            p = self.rows[keys[0]]
            return Prefix([(k.expand(B, -1, -1, -1), v.expand(B, -1, -1, -1)) for k, v in p.kv],
                          p.pad_mask.expand(B, -1), p.hidden.expand(B, -1, -1))
        ps = [self.rows[key] for key in keys]
        return Prefix([(torch.cat([q.kv[i][0] for q in ps]), torch.cat([q.kv[i][1] for q in ps]))
                       for i in range(len(ps[0].kv))], torch.cat([q.pad_mask for q in ps]),
                      torch.cat([q.hidden for q in ps]))


def pooled_prefix(prefix: Prefix) -> torch.Tensor:
    """Mean of the valid (unpadded) prefix hidden states, fp32 (B, vlm_width): πRL's critic-after-VLM feature."""
    m = prefix.pad_mask.float()[..., None]
    return (prefix.hidden.float() * m).sum(1) / m.sum(1).clamp(min=1)


def prefix_tensors(prefix: Prefix) -> dict[str, torch.Tensor]:
    """A prefix as named batch-first tensors, so that it rides in a batch dict through the same concatenation and
    indexing as the observations (a frozen VLM's prefix, kept from the rollout for the PPO update)."""
    named = {"prefix.pad_mask": prefix.pad_mask, "prefix.hidden": prefix.hidden}
    for i, (k, v) in enumerate(prefix.kv):
        named[f"prefix.k{i}"], named[f"prefix.v{i}"] = k, v
    return named


def prefix_from(batch: dict) -> Prefix | None:
    """The prefix that `prefix_tensors` put into a batch dict, or None."""
    if "prefix.hidden" not in batch:
        return None
    layers = sum(key.startswith("prefix.k") for key in batch)
    return Prefix([(batch[f"prefix.k{i}"], batch[f"prefix.v{i}"]) for i in range(layers)], batch["prefix.pad_mask"],
                  batch["prefix.hidden"])


class RolloutPrefixKeeper:
    """Puts a frozen VLM's rollout prefixes into their batches (`prefix_tensors`), so that the PPO update reads them
    (`prefix_from`) instead of encoding the same images again, while one rollout's prefixes fit in `budget_gib`:
    decided, and said, at the first call. A budget of 0 keeps nothing."""

    def __init__(self, budget_gib: float, samples_per_rollout: int):
        self.budget_gib, self.samples = budget_gib, samples_per_rollout
        self.on: bool | None = None if budget_gib > 0 else False  # None: not decided yet

    def __call__(self, batch: dict, prefix: Prefix) -> None:
        if self.on is False:
            return
        kept = prefix_tensors(prefix)
        if self.on is None:
            gib = sum(t.nbytes for t in kept.values()) / len(batch["state"]) * self.samples / 2**30
            self.on = gib <= self.budget_gib
            from tqdm import tqdm

            tqdm.write(f"the rollout's VLM prefixes take {gib * 1024:.1f} MiB per iteration: " + (
                "kept for the update" if self.on else f"over the {self.budget_gib} GiB allowed, encoded again"))
        if self.on:
            batch.update(kept)


class MLPExpert(nn.Module):
    """`expert="mlp"`: three SiLU layers over [masked mean of the prefix states, state, flattened x_t, sincos(t)]; the
    whole chunk in one vector, as the MLP flow policy of πRL's CPU calibration. Its last hidden layer feeds the
    model's `action_out_proj`, as the Gemma expert's final states do."""

    def __init__(self, cfg: Pi0Config):
        super().__init__()
        we = cfg.expert_width
        d_in = cfg.vlm_width + cfg.action_dim * (1 + cfg.horizon) + we
        self.net = nn.Sequential(nn.Linear(d_in, we), nn.SiLU(), nn.Linear(we, we), nn.SiLU(), nn.Linear(we, we),
                                 nn.SiLU())

    def forward(self, prefix: Prefix, state, x_t, temb):
        return self.net(torch.cat([pooled_prefix(prefix), state.float(), x_t.flatten(1).float(), temb], -1))


class Pi0Model(nn.Module):
    def __init__(self, cfg: Pi0Config):
        super().__init__()
        self.cfg = cfg
        we = cfg.expert_width
        self.vision = SiglipViT(cfg)
        self.projector = Projector(cfg)
        self.vlm = GemmaStack(cfg.vlm_width, cfg.vlm_mlp, cfg, vocab=cfg.vocab)
        if cfg.expert == "mlp":
            self.expert = MLPExpert(cfg)
            self.action_out_proj = nn.Linear(we, cfg.horizon * cfg.action_dim)
            return
        self.expert = GemmaStack(we, cfg.expert_mlp, cfg, cond_dim=we if cfg.is_pi05 else None)
        self.action_in_proj = nn.Linear(cfg.action_dim, we)
        self.action_out_proj = nn.Linear(we, cfg.action_dim)
        if cfg.is_pi05:
            self.time_mlp_in, self.time_mlp_out = nn.Linear(we, we), nn.Linear(we, we)
        else:
            self.state_proj = nn.Linear(cfg.action_dim, we)
            self.action_time_mlp_in, self.action_time_mlp_out = nn.Linear(2 * we, we), nn.Linear(we, we)

    # ------------------------------------------------------------------------------------------------ helpers
    def mask_padding(self, x: torch.Tensor) -> torch.Tensor:
        """Zero the action dims past `cfg.noise_dims` (no-op when it is 0: noise everywhere, as openpi)."""
        if not self.cfg.noise_dims:
            return x
        return torch.cat([x[..., :self.cfg.noise_dims], torch.zeros_like(x[..., self.cfg.noise_dims:])], -1)

    def initial_noise(self, batch: int, device=None, generator: torch.Generator | None = None) -> torch.Tensor:
        """x_1 ~ N(0, I) of shape (B, horizon, action_dim), zero on the padding past `cfg.noise_dims`."""
        shape = (batch, self.cfg.horizon, self.cfg.action_dim)
        return self.mask_padding(torch.randn(shape, device=device, generator=generator))

    @property
    def dtype(self) -> torch.dtype:
        """dtype of the action/state/time heads (openpi keeps them fp32 under mixed precision)."""
        return self.action_out_proj.weight.dtype

    @property
    def compute_dtype(self) -> torch.dtype:
        """dtype of the transformer blocks (bf16 under `to_mixed_bf16`)."""
        return self.vlm.layers[0].self_attn.q_proj.weight.dtype

    def freeze_vlm(self) -> None:
        """πRL's train_expert_only: SigLIP, projector and the Gemma VLM get no gradients."""
        for module in (self.vision, self.projector, self.vlm):
            module.requires_grad_(False)

    def to_mixed_bf16(self) -> "Pi0Model":
        """openpi's precision: SigLIP, projector, VLM and expert in bf16, except the patch/position embeddings and
        every RMSNorm (adaptive ones included) in fp32; the action/state/time heads stay fp32."""
        for module in (self.vision, self.projector, self.vlm) + ((self.expert,) if self.cfg.expert == "gemma" else ()):
            module.to(torch.bfloat16)
        for module in [self.vision.embeddings] + [m for m in self.modules() if isinstance(m, RMSNorm)]:
            module.float()
        return self

    def prepare_images(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 (B, H, W, 3) -> float (B, 3, S, S) in [-1, 1], resized with padding (aspect kept) to image_size."""
        x = images.permute(0, 3, 1, 2).float() / 127.5 - 1.0
        S, (H, W) = self.cfg.image_size, x.shape[-2:]
        if (H, W) != (S, S):
            ratio = max(H / S, W / S)
            h, w = int(H / ratio), int(W / ratio)
            # antialiased as PIL's BILINEAR, which openpi's clients resize with (LIBERO renders at 256 px)
            x = F.interpolate(x, size=(h, w), mode="bilinear", align_corners=False, antialias=True).clamp(-1, 1)
            ph, pw = S - h, S - w  # pad with -1 (black), split as openpi (more at the end)
            x = F.pad(x, (pw // 2, pw - pw // 2, ph // 2, ph - ph // 2), value=-1.0)
        return x

    def embed_prefix(self, images, img_masks, tokens, tok_masks):
        """images (B, C, H, W, 3) uint8 (C = num_cameras), img_masks (B, C), tokens/tok_masks (B, T)."""
        B = tokens.shape[0]
        embs, pads = [], []
        for c in range(self.cfg.num_cameras):
            img = self.projector.linear(self.vision(self.prepare_images(images[:, c])))
            embs.append(img)
            pads.append(img_masks[:, c, None].expand(B, img.shape[1]))
        lang = self.vlm.embed_tokens(tokens)
        embs.append(lang * math.sqrt(lang.shape[-1]))  # the one place text embeddings are scaled
        pads.append(tok_masks.bool())
        return torch.cat([e.to(self.compute_dtype) for e in embs], dim=1), torch.cat(pads, dim=1)

    def embed_suffix(self, state, x_t, t):
        """-> tokens (B, S, we), pad (B, S), ar (B, S), adarms_cond (B, we) or None."""
        cfg, B = self.cfg, x_t.shape[0]
        temb = sincos_time(t, cfg.expert_width, cfg.min_period, cfg.max_period).to(self.dtype)
        act = self.action_in_proj(x_t.to(self.dtype))
        H = act.shape[1]
        if cfg.is_pi05:
            cond = F.silu(self.time_mlp_out(F.silu(self.time_mlp_in(temb))))
            tokens, ar = act, [1] + [0] * (H - 1)
        else:
            cond = None
            at = torch.cat([act, temb[:, None].expand(B, H, -1)], dim=-1)
            at = self.action_time_mlp_out(F.silu(self.action_time_mlp_in(at)))
            tokens = torch.cat([self.state_proj(state.to(self.dtype))[:, None], at], dim=1)
            ar = [1, 1] + [0] * (H - 1)  # state token its own block; the action chunk one bidirectional block
        pad = torch.ones(tokens.shape[:2], dtype=torch.bool, device=tokens.device)
        return tokens.to(self.compute_dtype), pad, torch.tensor(ar, device=tokens.device).expand(B, -1), cond

    def _check_inputs(self, images, img_masks, tokens):
        cfg = self.cfg
        if tokens.shape[1] != cfg.max_tokens:
            raise ValueError(f"tokens have length {tokens.shape[1]}, the config wants max_tokens={cfg.max_tokens}")
        if images.shape[1] != cfg.num_cameras or img_masks.shape[1] != cfg.num_cameras:
            raise ValueError(f"expected {cfg.num_cameras} camera slots, got images {tuple(images.shape)} and masks "
                             f"{tuple(img_masks.shape)} (missing cameras: zeros with mask False)")

    # --------------------------------------------------------------------------------------------- public API
    def encode_prefix(self, images, img_masks, tokens, tok_masks) -> Prefix:
        """Run the VLM once over images + prompt; the K/V it returns serve every denoising step."""
        self._check_inputs(images, img_masks, tokens)
        x, pad = self.embed_prefix(images, img_masks, tokens, tok_masks)
        bias = attention_bias(make_att_2d_masks(pad, torch.zeros_like(pad)), self.compute_dtype)
        pos = torch.cumsum(pad.long(), dim=1) - 1
        kv = []
        for i in range(self.cfg.depth):  # the expert's slot is empty here (None): only the VLM runs
            (x, *_), layer_kv = joint_layer(self.cfg, [self.vlm.layers[i]], [x], [None], bias, pos)
            kv.append(layer_kv)
        return Prefix(kv, pad, self.vlm.norm(x)[0])

    def _check_actions(self, x_t):
        if tuple(x_t.shape[1:]) != (self.cfg.horizon, self.cfg.action_dim):
            raise ValueError(f"noisy actions have shape {tuple(x_t.shape)}, the model wants (B, horizon="
                             f"{self.cfg.horizon}, action_dim={self.cfg.action_dim})")

    def velocity(self, prefix: Prefix, state, x_t, t):
        """v (B, H, A) fp32 and the expert's final hidden states of the action tokens (B, H, we) fp32."""
        cfg = self.cfg
        self._check_actions(x_t)
        t = torch.as_tensor(t, dtype=torch.float32, device=x_t.device).expand(x_t.shape[0])
        if cfg.expert == "mlp":
            temb = sincos_time(t, cfg.expert_width, cfg.min_period, cfg.max_period)
            h = self.expert(prefix, state, x_t, temb)
            v = self.action_out_proj(h).view(x_t.shape).float()
            return v, h[:, None].expand(-1, cfg.horizon, -1).float()
        x, pad, ar, cond = self.embed_suffix(state, x_t, t)
        B, S, P = x.shape[0], x.shape[1], prefix.pad_mask.shape[1]
        bias = attention_bias(torch.cat([prefix.pad_mask[:, None, :].expand(B, S, P), make_att_2d_masks(pad, ar)],
                                        dim=2), self.compute_dtype)
        pos = prefix.pad_mask.long().sum(-1, keepdim=True) + torch.cumsum(pad.long(), dim=1) - 1
        for i in range(cfg.depth):
            (_, x), _ = joint_layer(cfg, [self.vlm.layers[i], self.expert.layers[i]], [None, x], [None, cond], bias,
                                    pos, past_kv=prefix.kv[i])
        h = self.expert.norm(x, cond)[0][:, -cfg.horizon:]
        return self.action_out_proj(h.to(self.dtype)).float(), h.float()

    def forward_joint(self, images, img_masks, tokens, tok_masks, state, x_t, t):
        """The training forward: one pass over [prefix; suffix] with both experts. Returns v (B, H, A) fp32."""
        cfg = self.cfg
        self._check_inputs(images, img_masks, tokens)
        self._check_actions(x_t)
        if cfg.expert == "mlp":
            return self.velocity(self.encode_prefix(images, img_masks, tokens, tok_masks), state, x_t, t)[0]
        px, ppad = self.embed_prefix(images, img_masks, tokens, tok_masks)
        sx, spad, sar, cond = self.embed_suffix(state, x_t, t)
        pad = torch.cat([ppad, spad], dim=1)
        ar = torch.cat([torch.zeros_like(ppad, dtype=torch.long), sar], dim=1)
        bias = attention_bias(make_att_2d_masks(pad, ar), self.compute_dtype)
        pos = torch.cumsum(pad.long(), dim=1) - 1
        for i in range(cfg.depth):
            (px, sx), _ = joint_layer(cfg, [self.vlm.layers[i], self.expert.layers[i]], [px, sx], [None, cond],
                                      bias, pos)
        h = self.expert.norm(sx, cond)[0][:, -cfg.horizon:]
        return self.action_out_proj(h.to(self.dtype)).float()

    def flow_loss(self, images, img_masks, tokens, tok_masks, state, actions, noise=None, t=None):
        """Per-element flow-matching loss (B, H, A), openpi conventions (the trainer averages)."""
        B = actions.shape[0]
        if noise is None:
            noise = self.mask_padding(torch.randn_like(actions))
        if t is None:
            t = torch.distributions.Beta(1.5, 1.0).sample((B,)).to(actions.device) * 0.999 + 0.001
        tb = t[:, None, None]
        x_t = tb * noise + (1 - tb) * actions
        v = self.forward_joint(images, img_masks, tokens, tok_masks, state, x_t, t)
        return F.mse_loss(v, (noise - actions).float(), reduction="none")

    @staticmethod
    def timesteps(num_steps: int, device=None) -> torch.Tensor:
        """[1, 1-1/K, ..., 1/K, 0] (RLinf's linspace(1, 1/K, K) followed by 0)."""
        return torch.linspace(1.0, 0.0, num_steps + 1, device=device)

    def transition(self, prefix: Prefix, state, x_t, i: int, num_steps: int, step_fn: StepFn = euler_step):
        """Mean and std of denoising step i (of K) from x_t, plus the expert hidden states; differentiable."""
        ts = self.timesteps(num_steps, x_t.device)
        t, d = ts[i], ts[i] - ts[i + 1]
        v, h = self.velocity(prefix, state, x_t, t)
        mean, std = step_fn(i, x_t.float(), v, h, t, d)
        # the padding stays 0 along the whole chain, as in training: neither SDE noise nor the velocity (which the
        # model never had to learn there) moves it, so the next step's input is what training showed
        return self.mask_padding(mean), self.mask_padding(std), h

    def sample(self, prefix: Prefix, state, noise, num_steps: int = 10, step_fn: StepFn = euler_step,
               generator: torch.Generator | None = None) -> Sample:
        """Denoise from x_1 = noise to x_0 in K steps; each x_{next} = mean + std * eps (eps from `generator`)."""
        x = noise.float()
        chain, means, stds, hidden = [x], [], [], []
        for i in range(num_steps):
            mean, std, h = self.transition(prefix, state, x, i, num_steps, step_fn)
            eps = torch.randn(x.shape, generator=generator, device=x.device) if bool((std > 0).any()) else 0.0
            x = mean + std * eps
            chain.append(x), means.append(mean), stds.append(std), hidden.append(h)
        return Sample(x, torch.stack(chain, 1), torch.stack(means, 1), torch.stack(stds, 1), torch.stack(hidden, 1))

    def num_parameters(self) -> dict[str, int]:
        parts = {"vision": self.vision, "projector": self.projector, "vlm": self.vlm, "expert": self.expert}
        counts = {k: sum(p.numel() for p in m.parameters()) for k, m in parts.items()}
        counts["heads"] = sum(p.numel() for p in self.parameters()) - sum(counts.values())
        counts["total"] = sum(p.numel() for p in self.parameters())
        return counts
