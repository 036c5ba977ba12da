"""Everything around the π0 module (`common.pi0`): tokenizers, prompts, norm stats, checkpoints, env-obs batches.

- Tokenizers: `ByteTokenizer` (offline, the default for tiny models and CI: ids 0-3 specials, 4-259 bytes) and
  `SentencePieceTokenizer` for the real PaliGemma `paligemma_tokenizer.model` (vocabulary 257,152) that the user
  supplies (flag or $PALIGEMMA_TOKENIZER); no tokenizer is ever downloaded. `tokenize_prompt` reproduces openpi's
  prompt formats: π0 `encode(clean, bos) + encode("\\n")`, π0.5 with discrete state
  `"Task: {clean}, State: {bins};\\nAction: "`; padded with id 0 to max_tokens, plus a mask.
- `NormStats`: openpi's norm_stats.json (`{"norm_stats": {"state"|"actions": {mean, std, q01, q99}}}`); z-score for
  π0, quantiles to [-1, 1] for π0.5; stats shorter than the padded vector apply to the first dims only.
- Checkpoints: ours (`save_pi0` / `load_pi0`: model.safetensors under our names, pi0_config.json, norm_stats.json,
  written to a temp dir and renamed into place) and openpi's PyTorch format (`load_openpi`: model.safetensors +
  config.json + assets/<asset_id>/norm_stats.json) through `OPENPI_RENAMES`, strict, with a report of missing and
  unexpected keys, the tied `lm_head` -> `embed_tokens` copy and the unused expert `lm_head` dropped. `save_openpi`
  writes our model under openpi names (the inverse table) so the loader is tested without real weights.
- `Pi0Processor`: env observations (our wrappers' `state`, `images`, `task_description`) -> model inputs, and model
  actions -> env actions (slice to the env's action dim, unnormalise). Shared by SFT and the RL scripts.
"""

from __future__ import annotations

import glob
import io
import json
import os
import re
import shutil
import tempfile
import warnings
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from common.fsutil import atomic_write, fsync_path
from common.pi0 import Pi0Config, Pi0Model

PALIGEMMA_VOCAB = 257_152
FORMAT = "pi0-hackable/1"


# ----------------------------------------------------------------------------------------------------- tokenizers
class ByteTokenizer:
    """UTF-8 bytes as tokens: 0 pad, 1 eos, 2 bos, 3 unused, byte b -> 4 + b. Vocabulary 260; needs no files."""

    name, vocab_size, pad_id, eos_id, bos_id, offset = "bytes", 260, 0, 1, 2, 4

    def encode(self, text: str, add_bos: bool = False) -> list[int]:
        return ([self.bos_id] if add_bos else []) + [self.offset + b for b in text.encode("utf-8")]

    def decode(self, ids) -> str:
        return bytes(i - self.offset for i in ids if i >= self.offset).decode("utf-8", errors="replace")


class SentencePieceTokenizer:
    """A SentencePiece model file, e.g. PaliGemma's `paligemma_tokenizer.model` (pad id 0 as openpi pads)."""

    pad_id = 0

    def __init__(self, path: str | os.PathLike):
        try:
            import sentencepiece
        except ImportError as e:
            raise ImportError("SentencePieceTokenizer needs the `sentencepiece` package: pip install sentencepiece") from e
        if not Path(path).is_file():
            raise FileNotFoundError(f"tokenizer model {path} not found (for real π0 weights: PaliGemma's "
                                    "paligemma_tokenizer.model from gs://big_vision, passed by flag or $PALIGEMMA_TOKENIZER)")
        self.name = str(path)
        self.sp = sentencepiece.SentencePieceProcessor(model_file=str(path))
        self.vocab_size, self.bos_id, self.eos_id = self.sp.get_piece_size(), self.sp.bos_id(), self.sp.eos_id()

    def encode(self, text: str, add_bos: bool = False) -> list[int]:
        return self.sp.encode(text, add_bos=add_bos)

    def decode(self, ids) -> str:
        return self.sp.decode([int(i) for i in ids])


def make_tokenizer(spec: str | None = None):
    """"bytes" (default) or the path of a SentencePiece model; None reads $PALIGEMMA_TOKENIZER, else bytes."""
    spec = spec or os.environ.get("PALIGEMMA_TOKENIZER") or "bytes"
    return ByteTokenizer() if spec == "bytes" else SentencePieceTokenizer(spec)


def check_tokenizer(cfg: Pi0Config, tokenizer) -> None:
    """Refuse a tokenizer whose ids the embedding cannot hold, and real PaliGemma weights with another vocabulary."""
    if tokenizer.vocab_size > cfg.vocab:
        raise ValueError(f"tokenizer {tokenizer.name} has {tokenizer.vocab_size} ids, the model embeds {cfg.vocab}")
    if cfg.vocab == PALIGEMMA_VOCAB and tokenizer.vocab_size != PALIGEMMA_VOCAB:
        raise ValueError(f"these weights use PaliGemma's {PALIGEMMA_VOCAB}-token vocabulary; tokenizer "
                         f"{tokenizer.name} has {tokenizer.vocab_size}. Pass the real paligemma_tokenizer.model")


def discretize_state(state: np.ndarray) -> np.ndarray:
    """π0.5's 256 state bins over [-1, 1] (openpi: digitize(state, linspace(-1, 1, 257)[:-1]) - 1)."""
    return np.digitize(state, bins=np.linspace(-1, 1, 256 + 1)[:-1]) - 1


def tokenize_prompt(tokenizer, text: str, max_len: int, state: np.ndarray | None = None):
    """openpi's prompt: -> (ids int64 [max_len], mask bool [max_len]). `state` (normalised) selects π0.5's format."""
    clean = text.strip().replace("_", " ").replace("\n", " ")
    if state is not None:
        bins = " ".join(map(str, discretize_state(np.asarray(state))))
        ids = tokenizer.encode(f"Task: {clean}, State: {bins};\nAction: ", add_bos=True)
    else:
        ids = tokenizer.encode(clean, add_bos=True) + tokenizer.encode("\n")
    if len(ids) > max_len:  # openpi truncates with a warning; so do we
        warnings.warn(f"prompt of {len(ids)} tokens truncated to max_tokens={max_len}: {text[:60]!r}", stacklevel=2)
    ids = ids[:max_len]
    out = np.full(max_len, tokenizer.pad_id, np.int64)
    out[: len(ids)] = ids
    return out, np.arange(max_len) < len(ids)


def instruction_tokens(tokenizer, instructions) -> int:
    """The prompt length (tokens) that holds the longest of `instructions` whole (0 for none)."""
    return max((int(tokenize_prompt(tokenizer, t, 10**4)[1].sum()) for t in instructions), default=0)


def check_prompts(cfg: Pi0Config, tokenizer, instructions) -> None:
    """Refuse a model whose prompt of `cfg.max_tokens` tokens cuts the instructions of different tasks to the same
    tokens: trained together, those tasks would be one prompt (with the tiny config's 32 byte tokens libero_spatial's
    tasks 1, 6, 8 all read "pick the akita black bowl next ", and 3, 5, 7, 9 "pick the akita black bowl on th"). A cut
    that keeps them apart only warns, as openpi does. Tasks with one instruction (libero_90 has repeats) are one."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        whole = {tuple(tokenize_prompt(tokenizer, t, 10**4)[0]) for t in instructions}
        cut = {tuple(tokenize_prompt(tokenizer, t, cfg.max_tokens)[0]) for t in instructions}
    if len(cut) < len(whole):
        raise ValueError(f"the model's prompt of {cfg.max_tokens} tokens cuts the instructions of different tasks to "
                         f"the same tokens (they need {instruction_tokens(tokenizer, instructions)})")


# ----------------------------------------------------------------------------------------------------- norm stats
@dataclass
class NormStats:
    """Per key ("state", "actions"): mean, std, q01, q99 as float arrays (openpi's norm_stats.json)."""

    stats: dict[str, dict[str, np.ndarray]] = field(default_factory=dict)

    @classmethod
    def from_data(cls, data: dict[str, np.ndarray], min_scale: float = 1e-2) -> "NormStats":
        """Stats of arrays (..., D). `min_scale` floors std and (q99 - q01)/2: a dim that is (nearly) constant in a
        few demos would otherwise turn eval-time jitter into inputs of size 1e6 (openpi's formula divides by
        std + 1e-6). 0 reproduces openpi's raw stats."""
        out = {}
        for key, x in data.items():
            x = np.asarray(x, np.float64).reshape(-1, np.asarray(x).shape[-1])
            q01, q99 = np.quantile(x, 0.01, axis=0), np.quantile(x, 0.99, axis=0)
            mid, half = (q01 + q99) / 2, np.maximum((q99 - q01) / 2, min_scale)
            out[key] = {"mean": x.mean(0), "std": np.maximum(x.std(0), min_scale), "q01": mid - half, "q99": mid + half}
        return cls(out)

    def to_json(self) -> str:
        return json.dumps({"norm_stats": {k: {n: np.asarray(v).tolist() for n, v in s.items()}
                                          for k, s in self.stats.items()}}, indent=1)

    @classmethod
    def from_json(cls, text: str) -> "NormStats":
        raw = json.loads(text)
        raw = raw.get("norm_stats", raw)
        return cls({k: {n: np.asarray(v, np.float64) for n, v in s.items() if n in ("mean", "std", "q01", "q99")}
                    for k, s in raw.items()})

    def _parts(self, key, x: torch.Tensor):
        if key not in self.stats:
            raise KeyError(f"no norm stats for {key!r} (have {sorted(self.stats)})")
        d = min(len(self.stats[key]["mean"]), x.shape[-1])  # stats may cover only the first dims
        return {n: torch.as_tensor(v[:d], dtype=torch.float32, device=x.device) for n, v in self.stats[key].items()}, d

    def normalize(self, key: str, x: torch.Tensor, quantile: bool) -> torch.Tensor:
        s, d = self._parts(key, x)
        head = ((x[..., :d] - s["q01"]) / (s["q99"] - s["q01"] + 1e-6) * 2 - 1) if quantile else \
            (x[..., :d] - s["mean"]) / (s["std"] + 1e-6)
        return torch.cat([head, x[..., d:]], dim=-1)

    def unnormalize(self, key: str, x: torch.Tensor, quantile: bool) -> torch.Tensor:
        s, d = self._parts(key, x)
        head = ((x[..., :d] + 1) / 2 * (s["q99"] - s["q01"] + 1e-6) + s["q01"]) if quantile else \
            x[..., :d] * (s["std"] + 1e-6) + s["mean"]
        return torch.cat([head, x[..., d:]], dim=-1)


# ----------------------------------------------------------------------------------------------------- checkpoints
# openpi / lerobot parameter names -> ours (applied in order; None drops the key).
OPENPI_RENAMES = [
    (r"^(model\.)?paligemma_with_expert\.paligemma\.model\.vision_tower\.(vision_model\.)?", "vision."),
    (r"^(model\.)?paligemma_with_expert\.paligemma\.model\.multi_modal_projector\.", "projector."),
    (r"^(model\.)?paligemma_with_expert\.paligemma\.model\.language_model\.", "vlm."),
    (r"^(model\.)?paligemma_with_expert\.paligemma\.lm_head\.weight$", "vlm.embed_tokens.weight"),  # tied
    (r"^(model\.)?paligemma_with_expert\.gemma_expert\.model\.", "expert."),
    (r"^(model\.)?paligemma_with_expert\.gemma_expert\.lm_head\..*", None),  # unused
    (r"^model\.", ""),
]
OURS_TO_OPENPI = [
    ("vision.", "paligemma_with_expert.paligemma.model.vision_tower.vision_model."),
    ("projector.", "paligemma_with_expert.paligemma.model.multi_modal_projector."),
    ("vlm.", "paligemma_with_expert.paligemma.model.language_model."),
    ("expert.", "paligemma_with_expert.gemma_expert.model."),
]
GEMMA_VARIANTS = {  # openpi gemma.py get_config: width, depth, mlp, heads, kv_heads, head_dim
    "gemma_2b": (2048, 18, 16_384, 8, 1, 256),
    "gemma_300m": (1024, 18, 4096, 8, 1, 256),
    "dummy": (64, 4, 128, 8, 1, 16),
}


def rename_openpi(state_dict: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], list[str]]:
    """Apply OPENPI_RENAMES. Returns (renamed, dropped keys). A real embed_tokens wins over the tied lm_head copy."""
    out, dropped = {}, []
    for key, value in state_dict.items():
        new = key
        for pattern, repl in OPENPI_RENAMES:
            if re.search(pattern, new):
                new = None if repl is None else re.sub(pattern, repl, new)
                if new is None or pattern.startswith(r"^(model\.)?paligemma_with_expert"):
                    break
        if new is None:
            dropped.append(key)
        elif new == "vlm.embed_tokens.weight" and new in out and "lm_head" in key:
            dropped.append(key)
        else:
            out[new] = value
    return out, dropped


def to_openpi_names(state_dict: dict[str, torch.Tensor], tie_lm_head: bool = True) -> dict[str, torch.Tensor]:
    """Our names -> openpi's. `tie_lm_head` stores the VLM embedding as `paligemma.lm_head.weight`, as
    `safetensors.save_model` does when it drops the duplicate of a tied tensor."""
    out = {}
    for key, value in state_dict.items():
        if tie_lm_head and key == "vlm.embed_tokens.weight":
            out["paligemma_with_expert.paligemma.lm_head.weight"] = value
            continue
        for ours, theirs in OURS_TO_OPENPI:
            if key.startswith(ours):
                key = theirs + key[len(ours):]
                break
        out[key] = value
    return out


@dataclass
class LoadReport:
    missing: list[str]
    unexpected: list[str]
    dropped: list[str]
    mismatched: list[str]

    def __str__(self):
        return "; ".join(f"{k}: {len(v)} {v[:8]}" for k, v in asdict(self).items() if v) or "all keys matched"


def load_state_strict(model: Pi0Model, state: dict[str, torch.Tensor], dropped=(), strict: bool = True) -> LoadReport:
    own = model.state_dict()
    report = LoadReport(sorted(set(own) - set(state)), sorted(set(state) - set(own)), list(dropped),
                        [f"{k} {tuple(v.shape)} != {tuple(own[k].shape)}" for k, v in state.items()
                         if k in own and v.shape != own[k].shape])
    if strict and (report.missing or report.unexpected or report.mismatched):
        raise ValueError(f"checkpoint does not match the model: {report}")
    model.load_state_dict({k: v.to(own[k].dtype) for k, v in state.items() if k in own and not
                           any(m.startswith(k + " ") for m in report.mismatched)}, strict=False)
    return report


def _commit_dir(tmp: Path, target: Path) -> None:
    """Replace `target` by the fully written `tmp` (each file already fsynced): rename the old one aside first, so a
    crash leaves either the old or the new checkpoint (`_resolve_dir` falls back to the aside copy)."""
    old = target.with_name(target.name + ".old")
    if target.exists():
        shutil.rmtree(old, ignore_errors=True)
        os.replace(target, old)
    os.replace(tmp, target)
    fsync_path(target.parent)
    shutil.rmtree(old, ignore_errors=True)


def _resolve_dir(path: Path) -> Path:
    old = path.with_name(path.name + ".old")
    return old if not path.exists() and old.exists() else path


def existing_checkpoint(directory: str | Path) -> Path | None:
    """The checkpoint to resume from: `directory`, or its `.old` copy where a crash came between `save_pi0`'s two
    renames (the next save would delete that copy); None where neither exists."""
    path = _resolve_dir(Path(directory))
    return path if path.exists() else None


def save_pi0(directory: str | Path, model: Pi0Model, norm_stats: NormStats | None = None,
             tokenizer: str = "bytes", extra: dict | None = None, extra_files: dict[str, bytes] | None = None) -> Path:
    """Our checkpoint: model.safetensors (our names), pi0_config.json, norm_stats.json, plus `extra_files` (e.g. a
    trainer state to resume from); atomic as a whole."""
    from safetensors.torch import save

    target = Path(directory)
    target.parent.mkdir(parents=True, exist_ok=True)
    for stale in target.parent.glob(glob.escape(target.name) + ".tmp*"):  # a save killed before its rename: a
        shutil.rmtree(stale, ignore_errors=True)  # whole model's worth of files that nothing else would remove
    tmp = Path(tempfile.mkdtemp(prefix=target.name + ".tmp", dir=target.parent))
    state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    atomic_write(tmp / "model.safetensors", save(state))
    if norm_stats is not None:
        atomic_write(tmp / "norm_stats.json", norm_stats.to_json())
    for name, data in (extra_files or {}).items():
        atomic_write(tmp / name, data)
    meta = {"format": FORMAT, "config": asdict(model.cfg), "tokenizer": tokenizer, "extra": extra or {}}
    atomic_write(tmp / "pi0_config.json", json.dumps(meta, indent=1))
    _commit_dir(tmp, target)
    return target


def _read_json(path: Path):
    """A checkpoint's JSON file; a corrupt one is a ValueError that names it."""
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{path} is not valid JSON ({e}): a partial copy?") from None


def read_torch_state(path: Path) -> Any:
    """A run's own torch file (trainer.pt, vla.pt: optimizer states, counters, RNG states), loaded with
    `weights_only=True` (a file handed over from elsewhere runs no code). A missing, truncated or foreign one is a
    ValueError that names it."""
    path = Path(path)
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise ValueError(f"{path} missing: not a checkpoint directory of this script, or a partial copy") from None
    try:
        return torch.load(io.BytesIO(data), weights_only=True)
    except Exception as e:  # torch raises several kinds (UnpicklingError, RuntimeError, EOFError, ...)
        raise ValueError(f"{path} is not a torch file these scripts write ({type(e).__name__}): a partial or "
                         f"damaged copy?") from None


def _read_weights(path: Path) -> dict:
    """A checkpoint's safetensors file; a missing or corrupt one is an error that names it."""
    from safetensors.torch import load_file

    try:
        return load_file(str(path))
    except FileNotFoundError:
        raise FileNotFoundError(f"{path} missing") from None
    except Exception as e:  # safetensors' own error type derives from Exception only
        raise ValueError(f"{path} is unreadable ({e}): a partial copy?") from None


def _read_norm_stats(path: Path) -> "NormStats":
    try:
        return NormStats.from_json(path.read_text())
    except (ValueError, KeyError, TypeError, AttributeError, UnicodeDecodeError) as e:
        raise ValueError(f"{path} is not readable norm stats ({type(e).__name__}: {e}): a partial copy?") from None


def load_pi0(directory: str | Path, device: str | torch.device = "cpu"):
    """-> (model, norm_stats or None, meta). Reads our format, or openpi's (delegates to `load_openpi`)."""
    path = _resolve_dir(Path(directory))
    if not (path / "pi0_config.json").is_file():
        if (path / "config.json").is_file() and (path / "model.safetensors").is_file():
            model, stats, report = load_openpi(path, device=device)
            return model, stats, {"format": "openpi", "report": str(report)}
        raise FileNotFoundError(f"{directory}: no pi0_config.json (ours) or config.json + model.safetensors (openpi)")
    meta = _read_json(path / "pi0_config.json")
    if meta.get("format") != FORMAT:
        raise ValueError(f"{path}: checkpoint format {meta.get('format')!r}, this code reads {FORMAT!r}")
    model = Pi0Model(Pi0Config(**meta["config"]))
    load_state_strict(model, _read_weights(path / "model.safetensors"))
    stats_file = path / "norm_stats.json"
    stats = _read_norm_stats(stats_file) if stats_file.is_file() else None
    return model.to(device), stats, meta


def init_expert(init: str, sft_auto: str = "gemma") -> str:
    """The action expert ("gemma" or "mlp") that an --init spec loads, read from the checkpoint's config without
    loading weights: what a script's CPU preset picks its PPO settings by. `sft_auto`: the expert sft:auto makes.
    openpi checkpoints and scratch are "gemma"; a path that is not a checkpoint also says "gemma" (its load, later,
    says what is wrong)."""
    kind, _, path = init.partition(":")
    if kind == "sft" and path in ("", "auto"):
        return sft_auto
    if kind != "sft":
        return "gemma"
    try:
        return json.loads((_resolve_dir(Path(path)) / "pi0_config.json").read_text())["config"].get("expert", "gemma")
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return "gemma"


def init_variant(init: str, scratch_preset: str = "tiny") -> str:
    """The π0 variant ("pi0" or "pi05") that an --init spec loads, read without loading weights (what a script's
    paper preset picks RLinf's π0 or π0.5 values by): our checkpoint's config, openpi's config.json or, where that
    does not say, its weight names (π0.5's time MLP); `scratch_preset` for "scratch"; sft:auto makes a π0. A path
    that is not a checkpoint says "pi0" (its load, later, says what is wrong)."""
    kind, _, path = init.partition(":")
    if kind == "scratch":
        return "pi05" if scratch_preset == "pi05" else "pi0"
    try:
        if kind == "sft" and path not in ("", "auto"):
            return json.loads((_resolve_dir(Path(path)) / "pi0_config.json").read_text())["config"].get("variant", "pi0")
        if kind == "openpi":
            conf = json.loads((Path(path) / "config.json").read_text())
            if "pi05" in conf:
                return "pi05" if conf["pi05"] else "pi0"
            from safetensors import safe_open

            with safe_open(str(Path(path) / "model.safetensors"), "pt") as f:  # the header only
                return "pi05" if any(k.removeprefix("model.").startswith("time_mlp_in.") for k in f.keys()) else "pi0"
    except Exception:  # (safetensors' own error for a corrupt file among them) unreadable: the load will say why
        pass
    return "pi0"


def save_openpi(directory: str | Path, model: Pi0Model, norm_stats: NormStats | None = None,
                asset_id: str = "physical-intelligence/libero", tie_lm_head: bool = True) -> Path:
    """Write our model in openpi's PyTorch layout (names, config.json, assets/<asset_id>/norm_stats.json). Sizes that
    are not openpi variants are recorded in config.json under `pi0_config` so the loader can rebuild them."""
    from safetensors.torch import save

    cfg, target = model.cfg, Path(directory)
    if cfg.expert != "gemma":
        raise ValueError(f"openpi has no {cfg.expert!r} action expert; save this model with save_pi0")
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=target.name + ".tmp", dir=target.parent))
    state = to_openpi_names({k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}, tie_lm_head)
    atomic_write(tmp / "model.safetensors", save(state))
    variant = lambda w, m: next((n for n, v in GEMMA_VARIANTS.items()  # noqa: E731
                                 if v == (w, cfg.depth, m, cfg.heads, cfg.kv_heads, cfg.head_dim)), "custom")
    conf = {"action_dim": cfg.action_dim, "action_horizon": cfg.horizon,
            "paligemma_variant": variant(cfg.vlm_width, cfg.vlm_mlp),
            "action_expert_variant": variant(cfg.expert_width, cfg.expert_mlp), "precision": "float32",
            "pi05": cfg.is_pi05, "pi0_config": asdict(cfg)}
    atomic_write(tmp / "config.json", json.dumps(conf, indent=1))
    if norm_stats is not None:
        (tmp / "assets" / asset_id).mkdir(parents=True)
        atomic_write(tmp / "assets" / asset_id / "norm_stats.json", norm_stats.to_json())
    _commit_dir(tmp, target)
    return target


def load_openpi(directory: str | Path, config: Pi0Config | None = None, asset_id: str | None = None,
                strict: bool = True, device: str | torch.device = "cpu", delta_action_dims: int | None = None):
    """Load an openpi PyTorch checkpoint into our module (fp32). -> (model, norm_stats or None, LoadReport).
    `delta_action_dims`: the action dims trained as deltas from the state (openpi's pi0_libero: 6); the checkpoint
    does not say, so the caller does (None keeps the config's)."""
    path = Path(directory)
    conf = _read_json(path / "config.json")
    state, dropped = rename_openpi(_read_weights(path / "model.safetensors"))
    if config is None:
        pi05 = conf.get("pi05", any(k.startswith("time_mlp_in.") for k in state))
        if "pi0_config" in conf:
            config = Pi0Config(**conf["pi0_config"])
        else:
            try:
                w, depth, mlp, heads, kv, hd = GEMMA_VARIANTS[conf["paligemma_variant"]]
                we, _, mlp_e, _, _, _ = GEMMA_VARIANTS[conf["action_expert_variant"]]
            except KeyError as e:
                raise ValueError(f"{path}: unknown Gemma variant {e}; pass config=Pi0Config(...)") from None
            base = Pi0Config.pi05() if pi05 else Pi0Config.pi0()
            config = Pi0Config(**{**asdict(base), "vlm_width": w, "depth": depth, "vlm_mlp": mlp, "heads": heads,
                                  "kv_heads": kv, "head_dim": hd, "expert_width": we, "expert_mlp": mlp_e,
                                  "action_dim": conf.get("action_dim", 32),
                                  "horizon": conf.get("action_horizon", base.horizon)})
    if delta_action_dims is not None:
        config = replace(config, delta_action_dims=delta_action_dims)
    model = Pi0Model(config)
    report = load_state_strict(model, {k: v.float() for k, v in state.items()}, dropped, strict)
    stats = None
    stats_files = sorted((path / "assets").glob("**/norm_stats.json")) if (path / "assets").is_dir() else []
    if asset_id is not None:
        stats_files = [f for f in stats_files if f.parent.relative_to(path / "assets").as_posix() == asset_id]
    if len(stats_files) > 1:
        raise ValueError(f"{path}: several norm stats {[str(f) for f in stats_files]}; pass asset_id")
    if stats_files:
        stats = _read_norm_stats(stats_files[0])
    return model.to(device), stats, report


# ------------------------------------------------------------------------------------------------- obs -> batch
class Pi0Processor:
    """Our env observations -> model inputs, and model actions -> env actions.

    state: normalised (z-score for π0, quantiles for π0.5) then zero-padded to `action_dim`; images: the cameras in
    `camera_keys` fill the slots in order, missing ones are zeros with mask False; prompt: `tokenize_prompt` (π0.5 with
    discrete_state_input puts the state bins into the prompt). Actions: normalised + padded for training; sliced to
    `env_action_dim` and unnormalised for the env.
    """

    def __init__(self, cfg: Pi0Config, tokenizer, norm_stats: NormStats | None, env_action_dim: int,
                 camera_keys: tuple[str, ...] = ("main", "wrist")):
        check_tokenizer(cfg, tokenizer)
        if env_action_dim > cfg.action_dim:
            raise ValueError(f"env actions have {env_action_dim} dims, more than the model's action_dim={cfg.action_dim}")
        self.cfg, self.tokenizer, self.norm_stats = cfg, tokenizer, norm_stats
        self.env_action_dim, self.camera_keys = env_action_dim, tuple(camera_keys)
        self.quantile = cfg.is_pi05
        self._prompt_cache: dict[str, tuple[np.ndarray, np.ndarray]] = {}

    def _norm(self, key, x, inverse=False):
        if self.norm_stats is None:
            return x
        fn = self.norm_stats.unnormalize if inverse else self.norm_stats.normalize
        return fn(key, x, self.quantile)

    def _pad(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-1] > self.cfg.action_dim:
            raise ValueError(f"vector of {x.shape[-1]} dims does not fit the model's action_dim {self.cfg.action_dim}")
        return torch.nn.functional.pad(x, (0, self.cfg.action_dim - x.shape[-1]))

    def prompts(self, texts: list[str], states: torch.Tensor | None = None):
        rows = []
        for i, text in enumerate(texts):
            if states is not None:
                rows.append(tokenize_prompt(self.tokenizer, text, self.cfg.max_tokens, states[i].cpu().numpy()))
            else:
                if text not in self._prompt_cache:
                    self._prompt_cache[text] = tokenize_prompt(self.tokenizer, text, self.cfg.max_tokens)
                rows.append(self._prompt_cache[text])
        return torch.from_numpy(np.stack([r[0] for r in rows])), torch.from_numpy(np.stack([r[1] for r in rows]))

    def batch(self, state, images: dict[str, Any] | None, texts: list[str], device="cpu") -> dict[str, torch.Tensor]:
        """state (B, D); images {key: (B, H, W, 3) uint8}; texts B strings -> kwargs for encode_prefix + state."""
        cfg = self.cfg
        state = self._norm("state", torch.as_tensor(state, dtype=torch.float32, device=device))
        B = state.shape[0]
        images = {k: torch.as_tensor(v, device=device) for k, v in (images or {}).items() if k in self.camera_keys}
        sizes = {tuple(v.shape[1:3]) for v in images.values()}
        if len(sizes) > 1:
            raise ValueError(f"cameras must share one image size, got {sizes}")
        size = sizes.pop() if sizes else (cfg.image_size, cfg.image_size)
        slots, masks = [], []
        for c in range(cfg.num_cameras):  # missing cameras: zeros, masked out (openpi's convention)
            key = self.camera_keys[c] if c < len(self.camera_keys) else None
            present = key in images
            slots.append(images[key] if present else torch.zeros(B, *size, 3, dtype=torch.uint8, device=device))
            masks.append(torch.full((B,), present, dtype=torch.bool, device=device))
        imgs = torch.stack(slots, 1) if slots else torch.zeros(B, 0, *size, 3, dtype=torch.uint8, device=device)
        img_masks = torch.stack(masks, 1) if masks else torch.zeros(B, 0, dtype=torch.bool, device=device)
        tokens, tok_masks = self.prompts(texts, state if cfg.discrete_state_input else None)
        return {"images": imgs, "img_masks": img_masks,
                "tokens": tokens.to(device), "tok_masks": tok_masks.to(device), "state": self._pad(state)}

    def _delta(self, actions: torch.Tensor, state, sign: float) -> torch.Tensor:
        """openpi's DeltaActions (sign -1) / AbsoluteActions (+1) on the first `delta_action_dims` dims: the same
        current state for every action of the chunk."""
        d = self.cfg.delta_action_dims
        if not d:
            return actions
        if state is None:
            raise ValueError(f"this model's first {d} action dims are deltas from the state: pass the raw state")
        state = torch.as_tensor(state, dtype=torch.float32, device=actions.device)[..., None, :d]
        return torch.cat([actions[..., :d] + sign * state, actions[..., d:]], -1)

    def actions_to_model(self, actions, state=None) -> torch.Tensor:
        """Env action chunks (B, H, A) -> the model's targets; `state` (B, S, raw) for delta-action models."""
        return self._pad(self._norm("actions", self._delta(torch.as_tensor(actions, dtype=torch.float32), state, -1)))

    def actions_to_env(self, actions: torch.Tensor, state=None) -> torch.Tensor:
        """The model's action chunks -> env actions; `state` (B, S, raw) for delta-action models."""
        return self._delta(self._norm("actions", actions[..., : self.env_action_dim].float(), inverse=True), state, 1)


def openpi_delta_action_dims(cfg: Pi0Config, env: str) -> int:
    """How many leading action dims an openpi checkpoint for `env` predicts as deltas from the state: openpi's π0
    LIBERO config trains the end-effector pose (6 dims) as deltas, π0.5's does not. Which one it is shows in the
    weights (openpi's config.json does not say)."""
    return 6 if env == "libero" and not cfg.is_pi05 else 0


def load_pi0_policy(init: str, *, env: str, obs_mode: str = "state", preset: str = "tiny", device="cpu",
                    instructions=(), tokenizer=None):
    """A policy to start RL from: "sft:PATH" (our checkpoint), "openpi:PATH" or "scratch" (a `preset` model sized for
    the env). -> (model, norm stats or None, env action dim, camera keys in slot order). With the `instructions` of
    several tasks (and their `tokenizer`), a scratch model's prompt holds the longest whole, and a model whose prompt
    would give two tasks the same tokens is refused (ValueError)."""
    if instructions and tokenizer is None:
        raise ValueError("checking the prompts of several tasks needs their tokenizer")
    out = _load_pi0_policy(init, env=env, obs_mode=obs_mode, preset=preset, device=device,
                           prompt_tokens=instruction_tokens(tokenizer, instructions) if len(set(instructions)) > 1 else 0)
    if instructions:
        check_tokenizer(out[0].cfg, tokenizer)  # a vocabulary mismatch is the first thing to say
        check_prompts(out[0].cfg, tokenizer, instructions)
    return out


def _load_pi0_policy(init: str, *, env: str, obs_mode: str, preset: str, device, prompt_tokens: int):
    kind, _, path = init.partition(":")
    if kind == "sft":
        if not (Path(path) / "pi0_config.json").exists() and not Path(path).with_name(Path(path).name + ".old").exists():
            raise FileNotFoundError(f"no SFT checkpoint at {path}")
        model, stats, meta = load_pi0(path, device)
        env_dim = len(stats.stats["actions"]["mean"]) if stats else model.cfg.action_dim
        cams = tuple(meta["extra"].get("camera_keys", ("main", "wrist")))
        return model, stats, env_dim, cams[: model.cfg.num_cameras]
    if kind == "openpi":
        model, stats, report = load_openpi(path, device=device)
        if stats is None:  # (openpi itself refuses to run without them)
            raise ValueError(f"{path}: no assets/<asset_id>/norm_stats.json: an openpi checkpoint ships the statistics "
                             f"its inputs and outputs are normalised with; without them the policy sees raw states "
                             f"and its actions are never unnormalised. Copy the checkpoint's assets folder along")
        delta = openpi_delta_action_dims(model.cfg, env)
        model.cfg = replace(model.cfg, delta_action_dims=delta)
        print(f"loaded openpi checkpoint {path}: {report}" + ("; actions 0..5 are deltas from the state (openpi's "
                                                             "pi0_libero)" if delta else ""))
        return model, stats, 8 if env == "maniskill" else 7, ("main", "wrist")  # as a scratch model's (openpi's
        # norm stats may be padded to the model's 32 dims, so they cannot say)
    if kind == "scratch":
        presets = {"tiny": Pi0Config.tiny, "pi0": Pi0Config.pi0, "pi05": Pi0Config.pi05}
        if preset not in presets:
            raise ValueError(f"unknown model preset {preset!r}; choose one of {sorted(presets)}")
        state_only = env == "maniskill" and obs_mode == "state"
        # tiny's 8 action dims fit LIBERO, π0's 32 LIBERO and ManiSkill rgb (25-D state, no object pose); ManiSkill's
        # state mode has a 35-D state
        tiny = dict(action_dim=35, num_cameras=0) if state_only else dict(action_dim=32) if env == "maniskill" else {}
        cfg = presets[preset](**(tiny if preset == "tiny" else dict(action_dim=35) if state_only else {}))
        cfg = replace(cfg, max_tokens=max(cfg.max_tokens, prompt_tokens))
        return Pi0Model(cfg).to(device), None, 8 if env == "maniskill" else 7, ("main", "wrist")
    raise ValueError(f"--init must be sft:PATH, sft:auto, openpi:PATH or scratch; got {init!r}")
