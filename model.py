"""
Our own decoder-only transformer for the Hugging Face checkpoints Patcher is run on
(Llama 2/3/3.1/3.2, SmolLM, Mistral, Qwen2/2.5, Qwen3), whose bf16 logits equal transformers' bf16 ones
(its rotary inv_freq stays fp32 whatever the model's dtype, as theirs does when loaded in bf16), plus:

- load_model(): config.json + safetensors -> Transformer, also straight into FSDP2 shards
- save_model(): Transformer (plain or FSDP2-sharded: each tensor gathered onto the first rank alone) ->
                Hugging Face checkpoint directory, swapped in whole; never with a non-finite weight (all_finite)
- generate():   batched generation for left-padded prompts with a static KV cache (greedy or sampled:
                repetition penalty, temperature, top-k, top-p, in transformers' order), its decode step
                compilable into a CUDA graph over one cache per model that every call reuses, finished rows
                leaving the batch (eagerly); generation_defaults() reads the checkpoint's sampling settings
- add_lora(), merge_lora_(): LoRA factors on named Linear layers (eval.py's low-rank attack), their gradients
  averaged over ranks in one all-reduce per backward;
  inference_copy(): a plain, unsharded copy of a (sharded, LoRA-augmented) model for generation

Module names equal Hugging Face parameter names (model.layers.{i}.self_attn.q_proj.weight, ...),
so a checkpoint loads and exports with no renaming table at all.
"""
import ctypes
import functools
import json
import math
import os
import shutil
import uuid
import weakref
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import save_file

SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3")


class CheckpointError(ValueError):
    """A checkpoint directory or file we cannot use; the message names it (and the field or tensor)."""

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}

# -----------------------------------------------------------------------------
# Configuration: read only from the checkpoint's config.json, fields named as Hugging Face names them


@dataclass
class ModelConfig:
    model_type: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    rms_norm_eps: float
    rope_theta: float
    rope_scaling: dict | None  # None, or the llama3 parameters (factor, low/high_freq_factor, ...)
    max_position_embeddings: int
    tie_word_embeddings: bool
    attention_bias: bool  # q/k/v biases (always on for qwen2)
    mlp_bias: bool
    qk_norm: bool  # qwen3: RMSNorm over each head's q and k before RoPE
    torch_dtype: str = "bfloat16"  # the checkpoint's storage dtype; the default export dtype
    hf: dict = field(default_factory=dict, repr=False)  # the raw config.json, written back on export

    @classmethod
    def from_hf(cls, hf: dict, source: str = "config.json") -> "ModelConfig":
        def need(key):
            if key not in hf:
                raise CheckpointError(f"{source}: missing field '{key}'")
            return hf[key]

        model_type = need("model_type")
        if model_type not in SUPPORTED_MODEL_TYPES:
            raise CheckpointError(f"{source}: unsupported model_type '{model_type}' (supported: {', '.join(SUPPORTED_MODEL_TYPES)})")
        if hf.get("hidden_act", "silu") != "silu":
            raise CheckpointError(f"{source}: unsupported hidden_act '{hf['hidden_act']}' (only 'silu')")
        # transformers 4.x writes rope_theta + rope_scaling; 5.x writes rope_parameters = {rope_type, rope_theta, ...}
        rope = dict(hf.get("rope_parameters") or hf.get("rope_scaling") or {})
        rope_theta = rope.pop("rope_theta", hf.get("rope_theta", 10000.0))
        rope_type = rope.get("rope_type", rope.get("type", "default"))
        if rope_type not in ("default", "llama3"):
            field_name = "rope_parameters" if "rope_parameters" in hf else "rope_scaling"
            raise CheckpointError(f"{source}: unsupported {field_name}.rope_type '{rope_type}' (supported: default, llama3)")
        # A sliding window only changes the computation once sequences exceed it; we implement full attention.
        window = hf.get("sliding_window")
        active = hf.get("use_sliding_window", model_type == "mistral") and window is not None
        if active and window < hf.get("max_position_embeddings", 0):
            raise CheckpointError(f"{source}: unsupported sliding_window {window} (active sliding-window attention)")
        n_heads = need("num_attention_heads")
        hidden = need("hidden_size")
        dtype = hf.get("torch_dtype") or hf.get("dtype") or "bfloat16"
        return cls(
            model_type=model_type,
            vocab_size=need("vocab_size"),
            hidden_size=hidden,
            intermediate_size=need("intermediate_size"),
            num_hidden_layers=need("num_hidden_layers"),
            num_attention_heads=n_heads,
            num_key_value_heads=hf.get("num_key_value_heads") or n_heads,
            head_dim=hf.get("head_dim") or hidden // n_heads,
            rms_norm_eps=hf.get("rms_norm_eps", 1e-6),
            rope_theta=float(rope_theta),
            rope_scaling=rope if rope_type == "llama3" else None,
            max_position_embeddings=hf.get("max_position_embeddings", 4096),
            tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
            attention_bias=model_type == "qwen2" or bool(hf.get("attention_bias", False)),
            mlp_bias=bool(hf.get("mlp_bias", False)),
            qk_norm=model_type == "qwen3",
            torch_dtype=dtype if dtype in DTYPES else "bfloat16",
            hf=dict(hf),
        )


def read_config(path) -> ModelConfig:
    path = Path(path)
    config_file = path / "config.json"
    if not config_file.is_file():
        raise CheckpointError(f"{config_file}: no config.json in the checkpoint directory {path}")
    try:
        hf = json.loads(config_file.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{config_file}: not valid JSON ({e})") from None
    return ModelConfig.from_hf(hf, source=str(config_file))


# -----------------------------------------------------------------------------
# Rotary position embedding (rotate-half, the Hugging Face convention: no Q/K permutation on load)


def rope_inv_freq(cfg: ModelConfig) -> torch.Tensor:
    """Inverse frequencies (head_dim/2,) in fp32, computed on the CPU exactly as transformers does."""
    dim = cfg.head_dim
    inv_freq = 1.0 / (cfg.rope_theta ** (torch.arange(0, dim, 2, dtype=torch.float) / dim))
    if cfg.rope_scaling is None:
        return inv_freq
    # Llama 3.1: keep high frequencies, divide low ones by `factor`, interpolate smoothly in between.
    s = cfg.rope_scaling
    factor, low, high = s["factor"], s["low_freq_factor"], s["high_freq_factor"]
    old_len = s.get("original_max_position_embeddings", cfg.max_position_embeddings)
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > old_len / low, inv_freq / factor, inv_freq)
    smooth = (old_len / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = ~(wavelen < old_len / high) & ~(wavelen > old_len / low)
    return torch.where(medium, smoothed, scaled)


def apply_rope(x, cos, sin):
    # x: (B, nh, T, hd); cos, sin: (B, 1, T, hd)
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat((-x2, x1), dim=-1) * sin


# -----------------------------------------------------------------------------
# The transformer


class RMSNorm(nn.Module):
    def __init__(self, dim, eps):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        # normalise in fp32 and scale in the input dtype, as transformers does (this matters in bf16)
        return self.weight * F.rms_norm(x.float(), (x.shape[-1],), eps=self.eps).to(x.dtype)


def expands_kv_heads(device_type: str, dtype: torch.dtype, masked: bool) -> bool:
    """Whether attention repeats each K/V head for its query group instead of asking SDPA for enable_gqa.

    On CUDA (torch 2.11) SDPA runs enable_gqa in the flash kernel, which takes neither fp32 nor a mask, or else in
    the math kernel, never in the memory-efficient one. The math kernel materialises every head's (T, T) weights:
    fp32 on an 8B model runs out of memory at 4k tokens and is 10-15x slower, and a mask (generation under left
    padding) sends bf16 there too. Repeated K/V cost (group - 1) more K/V memory and let the memory-efficient kernel
    run. The CPU's flash kernel takes GQA with masks and fp32 (torch 2.13): there nothing is repeated."""
    return device_type == "cuda" and (dtype == torch.float32 or masked)


def attend(q, k, v, mask=None, expand_kv=None):
    """SDPA of q (B, nh, T, hd) over k, v (B, nkv, S, hd), each K/V head shared by nh / nkv query heads: causal
    without a mask, else where the bool mask (B, 1, T, S) is True. expand_kv: repeat the K/V heads (None: as
    expands_kv_heads() decides for these inputs)."""
    group = q.shape[1] // k.shape[1]
    if expand_kv is None:
        expand_kv = expands_kv_heads(q.device.type, q.dtype, mask is not None)
    if group > 1 and expand_kv:  # query head h reads K/V head h // group, as enable_gqa does
        k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None,
                                          enable_gqa=k.shape[1] != q.shape[1])


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.n_head, self.n_kv_head, self.head_dim = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        bias = cfg.attention_bias
        self.q_proj = nn.Linear(cfg.hidden_size, self.n_head * self.head_dim, bias=bias)
        self.k_proj = nn.Linear(cfg.hidden_size, self.n_kv_head * self.head_dim, bias=bias)
        self.v_proj = nn.Linear(cfg.hidden_size, self.n_kv_head * self.head_dim, bias=bias)
        # qwen2 has biases on q/k/v only; llama/qwen3 with attention_bias have one on o_proj too
        self.o_proj = nn.Linear(self.n_head * self.head_dim, cfg.hidden_size, bias=bias and cfg.model_type != "qwen2")
        if cfg.qk_norm:
            self.q_norm = RMSNorm(self.head_dim, cfg.rms_norm_eps)
            self.k_norm = RMSNorm(self.head_dim, cfg.rms_norm_eps)

    def forward(self, x, cos, sin, mask=None, kv=None):
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, self.n_head, self.head_dim)
        k = self.k_proj(x).view(B, T, self.n_kv_head, self.head_dim)
        v = self.v_proj(x).view(B, T, self.n_kv_head, self.head_dim)
        if hasattr(self, "q_norm"):  # qwen3 normalises each head before RoPE
            q, k = self.q_norm(q), self.k_norm(k)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # (B, nh, T, hd)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if kv is not None:  # generation: the cache stores these keys/values and returns all it holds so far
            cache, layer = kv
            k, v = cache.update(layer, k, v)
        y = attend(q, k, v, mask)  # training passes no mask: plain causal attention
        return self.o_proj(y.transpose(1, 2).reshape(B, T, -1))


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.gate_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=cfg.mlp_bias)
        self.up_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=cfg.mlp_bias)
        self.down_proj = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=cfg.mlp_bias)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = Attention(cfg)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = MLP(cfg)

    def forward(self, x, cos, sin, mask=None, kv=None):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, mask, kv)
        return x + self.mlp(self.post_attention_layernorm(x))


class Decoder(nn.Module):
    """The `model.` prefix of Hugging Face names: embeddings, blocks, final norm."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(Block(cfg) for _ in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)


class Transformer(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.config = cfg
        self.model = Decoder(cfg)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        if cfg.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight  # one Parameter, listed once by named_parameters()
        # Not a checkpoint tensor (persistent=False); meta-device flows must call reset_rope() after to_empty().
        self.register_buffer("inv_freq", rope_inv_freq(cfg), persistent=False)
        self.activation_checkpointing = False  # recompute each block in backward (saves activation memory)
        # weights that take part in a matmul (all but the embedding lookup; a tied lm_head counts once)
        self.n_matmul_params = sum(p.numel() for n, p in self.named_parameters() if n != "model.embed_tokens.weight") \
            + (cfg.vocab_size * cfg.hidden_size if cfg.tie_word_embeddings else 0)

    def flops_per_token(self, seq_len, backward=True):
        """Model flops for one token of a seq_len-token sequence, forward (+ backward: twice the forward):
        2 per matmul weight plus attention's 4 * layers * heads * head_dim * seq_len (the PaLM count, as nanoGPT)."""
        c = self.config
        forward = 2 * self.n_matmul_params + 4 * c.num_hidden_layers * c.num_attention_heads * c.head_dim * seq_len
        return forward * (3 if backward else 1)

    @torch.no_grad()
    def reset_rope(self):
        self.inv_freq.copy_(rope_inv_freq(self.config))

    def _apply(self, fn, recurse=True):
        # Every move and cast of the model (.to(dtype), .half(), to_empty(), ...) goes through _apply. inv_freq
        # stays fp32 whatever the parameters' dtype, as transformers keeps it when it loads in bf16: rounded to
        # bf16 it turns position 256 by up to 0.35 rad, and the logits drift from transformers' (NOTES.md).
        super()._apply(fn, recurse)
        if self.inv_freq.dtype != torch.float32:  # recomputed, not cast back: a cast has rounded it already
            self.inv_freq = rope_inv_freq(self.config).to(self.inv_freq.device)
        return self

    @torch.no_grad()
    def init_weights(self, std=0.02):
        """Random init for models trained from scratch (the built-in demo): as transformers initialises."""
        for name, p in self.named_parameters():
            if name.endswith("norm.weight"):
                nn.init.ones_(p)
            elif name.endswith(".bias"):
                nn.init.zeros_(p)
            else:
                nn.init.normal_(p, std=std)
        self.reset_rope()

    def forward(self, idx, cache=None, last_only=False, only=None):
        """idx: (B, T) token ids -> logits (B, T, vocab); (B, 1, vocab) with last_only; (N, vocab) for
        the N positions `only` picks: (N,) int64 indices into the B * T positions, flattened row by row, or a
        (B, T) bool mask. The mask's N depends on its data, so on a GPU the host waits for the device to count
        it; indices cost no wait.

        Training calls model(idx, only=scored) with indices made on the host from the CPU labels: positions
        0..T-1, plain causal attention, and the vocabulary projection (a fifth of a small model's flops) only
        where the loss looks.
        Generation passes a KVCache, which supplies positions and the left-padding mask, stores each
        layer's keys/values and returns those to attend over (see KVCache.feed)."""
        B, T = idx.shape
        if cache is None:
            pos = torch.arange(T, device=idx.device).unsqueeze(0)  # (1, T)
            mask = None
        else:
            pos, mask = cache.positions_and_mask(T)  # (B, T), (B, 1, T, S)
        freqs = pos.unsqueeze(-1).float() * self.inv_freq.float()  # fp32, as transformers does
        emb = torch.cat((freqs, freqs), dim=-1).unsqueeze(1)  # (B, 1, T, hd)
        x = self.model.embed_tokens(idx)
        cos, sin = emb.cos().to(x.dtype), emb.sin().to(x.dtype)
        for i, block in enumerate(self.model.layers):
            kv = None if cache is None else (cache, i)
            if self.activation_checkpointing and torch.is_grad_enabled():
                x = torch.utils.checkpoint.checkpoint(block, x, cos, sin, mask, kv, use_reentrant=False)
            else:
                x = block(x, cos, sin, mask, kv)
        x = self.model.norm(x)
        if last_only:
            x = x[:, -1:]
        if only is not None:  # (N, d)
            x = x[only] if only.dtype == torch.bool else x.flatten(0, 1).index_select(0, only)
        return self.lm_head(x)


def compile_blocks(model: Transformer):
    """torch.compile each block in place (after fully_shard, as torchtitan does); names stay unchanged."""
    for block in model.model.layers:
        block.compile()
    return model


# -----------------------------------------------------------------------------
# Loading from a Hugging Face checkpoint directory (safetensors only: nothing is ever unpickled)


def checkpoint_files(path: Path) -> dict[str, Path]:
    """Map every tensor name in the checkpoint to the safetensors file that holds it."""
    index = path / "model.safetensors.index.json"
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
        except (ValueError, KeyError, TypeError) as e:
            raise CheckpointError(f"{index}: not a safetensors index ({type(e).__name__}: {e})") from None
        files = {name: path / f for name, f in weight_map.items()}
        for f in sorted(set(files.values())):
            if not f.is_file():
                raise CheckpointError(f"{f}: shard listed in {index} is missing")
        return files
    single = path / "model.safetensors"
    if not single.is_file():
        raise CheckpointError(f"{path}: no model.safetensors or model.safetensors.index.json "
                              "(only safetensors checkpoints are read; .bin/.pt files are never unpickled)")
    with open_safetensors(single) as f:
        return {name: single for name in f.keys()}


def open_safetensors(file):
    """safe_open, with a truncated or corrupt file reported by its path (safetensors' own error does not name it)."""
    try:
        return safe_open(file, framework="pt")
    except Exception as e:  # SafetensorError, or OSError from the memory map
        raise CheckpointError(f"{file}: not a readable safetensors file ({e})") from None


def local_rows(p: torch.Tensor) -> slice:
    """The dim-0 rows of a parameter that this rank holds: all of them, or its FSDP2 shard.

    FSDP2 shards dim 0 like torch.chunk over each mesh dimension with a Shard(0) placement
    (Replicate dimensions, as in HSDP, keep the full extent)."""
    start, stop = 0, p.shape[0]
    if hasattr(p, "placements"):  # a DTensor
        for mesh_dim, placement in enumerate(p.placements):
            if placement.is_shard():
                assert placement.dim == 0, "only dim-0 sharding (FSDP2) is supported"
                n = p.device_mesh.size(mesh_dim)
                chunk = -(-(stop - start) // n)
                lo = start + chunk * p.device_mesh.get_local_rank(mesh_dim)
                start, stop = min(lo, stop), min(lo + chunk, stop)
    return slice(start, stop)


@torch.no_grad()
def load_weights(model: Transformer, path, files: dict[str, Path] | None = None):
    """Copy checkpoint tensors into the model's (possibly sharded) parameters, strictly.

    Each rank reads only its own rows through safetensors' memory map, so host memory per rank
    stays about one shard of one tensor, whatever the world size."""
    path = Path(path)
    files = files or checkpoint_files(path)
    params = dict(model.named_parameters())
    expected = set(params)
    tied = model.config.tie_word_embeddings
    for name in expected - set(files):
        raise CheckpointError(f"{path}: checkpoint has no tensor '{name}'")
    for name in set(files) - expected:
        if not (name == "lm_head.weight" and tied) and not name.endswith("rotary_emb.inv_freq"):
            raise CheckpointError(f"{path}: unexpected tensor '{name}' in {files[name].name} (not in a {model.config.model_type} model)")
    by_file = {}
    for name in expected:
        by_file.setdefault(files[name], []).append(name)
    for file, names in by_file.items():
        with open_safetensors(file) as f:
            for name in names:
                p = params[name]
                sl = f.get_slice(name)
                shape = tuple(sl.get_shape())
                if shape != tuple(p.shape):
                    raise CheckpointError(f"{file}: tensor '{name}' has shape {list(shape)}, the config implies {list(p.shape)}")
                rows = local_rows(p)
                local = p.to_local() if hasattr(p, "to_local") else p
                if rows.stop > rows.start:  # a rank past the last row of a tiny tensor holds nothing
                    try:
                        local.copy_(sl[rows.start:rows.stop])
                    except Exception as e:  # a file cut short after its header
                        raise CheckpointError(f"{file}: cannot read tensor '{name}' ({e})") from None


def load_model(path, device="cpu", dtype=torch.float32, shard=None) -> Transformer:
    """Load a Hugging Face checkpoint directory into our Transformer.

    dtype is the dtype of the parameters (keep fp32 master weights for training). `shard`, if given,
    is called on the meta-device model to apply FSDP2 (fully_shard per block, then the root)."""
    path = Path(path)
    cfg = read_config(path)
    files = checkpoint_files(path)  # fail on a missing shard before allocating anything
    if "lm_head.weight" not in files and not cfg.tie_word_embeddings:
        cfg.tie_word_embeddings = True  # no separate head in the checkpoint: it is the embedding
    model = empty_model(cfg, device, dtype, shard)  # steps 1-3
    # 4. Fill each local shard from the checkpoint, reading just those rows from disk.
    load_weights(model, path, files)
    # 5. Rebuild the non-checkpoint rotary buffer, which to_empty() left uninitialised.
    model.reset_rope()
    return model


def empty_model(cfg: ModelConfig, device, dtype, shard=None) -> Transformer:
    """A Transformer with uninitialised (possibly sharded) parameters on `device`, to be filled in."""
    # 1. Build on the meta device: shapes only, no memory.
    with torch.device("meta"):
        model = Transformer(cfg).to(dtype)
    # 2. Shard (FSDP2): each parameter becomes a DTensor whose local part is this rank's rows.
    if shard is not None:
        shard(model)
    # 3. Allocate only the local shards on the target device (uninitialised memory).
    model.to_empty(device=device)
    if cfg.tie_word_embeddings:  # to_empty() re-creates unsharded parameters one module at a time,
        model.lm_head.weight = model.model.embed_tokens.weight  # which unties them (FSDP2 keeps the tie)
    return model


# -----------------------------------------------------------------------------
# Export to a Hugging Face checkpoint directory (loads in transformers and vLLM)

WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf")
NOT_COPIED = ("config.json", "model.safetensors.index.json")


def _plan_shards(sizes: dict[str, int], max_shard_bytes: int) -> list[list[str]]:
    shards, current, used = [], [], 0
    for name, nbytes in sizes.items():
        if current and used + nbytes > max_shard_bytes:
            shards.append(current)
            current, used = [], 0
        current.append(name)
        used += nbytes
    return shards + [current]


def _shard_group(model):
    """The process group a sharded model is sharded over (None for a plain model): exports and checks
    are collectives within it, so a half of the world (parallel.py) never waits for the other half."""
    if hasattr(model, "reshard"):  # FSDP2 leaves the root unsharded after a forward with no backward
        model.reshard()
    p = next(model.parameters())
    return p.device_mesh.get_group() if hasattr(p, "device_mesh") else None


@torch.no_grad()
def all_finite(model: Transformer) -> bool:
    """Whether every weight is finite (on all ranks of a sharded model: a collective). Nothing with a
    NaN or inf in it is ever written as a checkpoint or an export."""
    group = _shard_group(model)
    device = model.lm_head.weight.device
    bad = torch.zeros((), device=device)
    for p in model.parameters():
        bad += (~torch.isfinite(p.to_local() if hasattr(p, "to_local") else p)).any()
    if group is not None:
        dist.all_reduce(bad, group=group)
    return bad.item() == 0


def _rename_exchange(a: Path, b: Path) -> bool:
    """Swap two directories in one atomic step (Linux renameat2 RENAME_EXCHANGE); False where the
    system or filesystem cannot."""
    try:
        renameat2 = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):
        return False
    AT_FDCWD, RENAME_EXCHANGE = -100, 2
    return renameat2(AT_FDCWD, os.fsencode(a), AT_FDCWD, os.fsencode(b), RENAME_EXCHANGE) == 0


def _swap_in(tmp: Path, out_dir: Path):
    """Put the finished directory `tmp` at out_dir, so that at every moment out_dir holds a complete export,
    old or new. Where the two cannot be swapped atomically, the old one is moved aside first; a crash
    between the two renames then leaves it beside as .NAME.old-*, and the next export puts it back."""
    if not out_dir.exists():
        os.rename(tmp, out_dir)
    elif _rename_exchange(tmp, out_dir):
        shutil.rmtree(tmp)  # now the old export
    else:
        old = out_dir.parent / f".{out_dir.name}.old-{uuid.uuid4().hex[:8]}"
        os.rename(out_dir, old)
        os.rename(tmp, out_dir)
        shutil.rmtree(old)


def _clean_leftovers(out_dir: Path):
    """Remove what a crashed export left beside out_dir (a partial .NAME.tmp-*; an old export moved aside
    as .NAME.old-*, first put back if out_dir is missing)."""
    olds = sorted(out_dir.parent.glob(f".{out_dir.name}.old-*"), key=lambda p: p.stat().st_mtime)
    if olds and not out_dir.exists():
        os.rename(olds.pop(), out_dir)
    for p in olds + list(out_dir.parent.glob(f".{out_dir.name}.tmp-*")):
        shutil.rmtree(p, ignore_errors=True)


def gather_to_first(p: torch.Tensor, group) -> torch.Tensor | None:
    """The whole of parameter p on the group's first rank, None on the others (p itself if it is not sharded).

    Each rank sends its rows (local_rows), padded to FSDP2's shard size, to that rank alone, which cuts the
    padding off; full_tensor() would all-gather the whole tensor onto every rank."""
    if not hasattr(p, "to_local"):
        return p
    local, world, first = p.to_local(), dist.get_world_size(group), dist.get_rank(group) == 0
    chunk = -(-p.shape[0] // world)  # rows per rank; the last ones may hold fewer, or none
    padded = local.new_zeros(chunk, *p.shape[1:])
    padded[:local.shape[0]] = local
    full = local.new_empty(world * chunk, *p.shape[1:]) if first else None  # rank r's rows land in chunk r
    dist.gather(padded, list(full.chunk(world)) if first else None, dst=dist.get_global_rank(group, 0), group=group)
    return full[:p.shape[0]] if first else None


@torch.no_grad()
def save_model(model: Transformer, out_dir, like=None, dtype=None, max_shard_bytes=5 * 10**9):
    """Write `model` as a Hugging Face checkpoint directory, atomically.

    - config.json (the source's fields, dtype and tying updated), safetensors split at about
      `max_shard_bytes` with model.safetensors.index.json when there is more than one file,
    - every tokenizer/generation file of the checkpoint directory `like`, copied unchanged.
    It is written into a temporary directory and swapped in whole (see _swap_in); a model with a
    non-finite weight is refused. Works on plain and FSDP2-sharded models (then all ranks of its group
    call it): each tensor in turn is gathered onto the group's first rank alone (gather_to_first), moved
    to its CPU and written out a shard file at a time, so neither GPU nor host memory ever holds more
    than one tensor plus one shard file, and the other ranks never hold a whole tensor. Only that rank
    writes."""
    cfg = model.config
    dtype = dtype or DTYPES[cfg.torch_dtype]
    group = _shard_group(model)
    rank = dist.get_rank(group) if group is not None else 0
    params = dict(model.named_parameters())  # tied lm_head is listed once, as the embedding
    out_dir = Path(out_dir)
    if not all_finite(model):
        raise FloatingPointError(f"{out_dir}: not exported: the model has non-finite weights")
    tmp = out_dir.parent / f".{out_dir.name}.tmp-{uuid.uuid4().hex[:8]}"
    itemsize = torch.empty((), dtype=dtype).element_size()
    sizes = {name: p.numel() * itemsize for name, p in params.items()}
    shards = _plan_shards(sizes, max_shard_bytes)
    names = [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    if len(shards) == 1:
        names = ["model.safetensors"]
    if rank == 0:
        out_dir.parent.mkdir(parents=True, exist_ok=True)
        _clean_leftovers(out_dir)
        tmp.mkdir()
        file_mode = tmp.stat().st_mode & 0o666  # the user's umask, as for any new file
    weight_map = {}
    for file, shard_names in zip(names, shards):
        tensors = {}
        for name in shard_names:
            full = gather_to_first(params[name], group)  # collective on sharded models
            if rank == 0:
                tensors[name] = full.detach().to("cpu", dtype).contiguous()
                weight_map[name] = file
            del full
        if rank == 0:
            save_file(tensors, tmp / file, metadata={"format": "pt"})
            os.chmod(tmp / file, file_mode)  # safetensors creates it private (0600)
        del tensors
    if rank == 0:
        hf = dict(cfg.hf)
        dtype_key = "dtype" if "dtype" in hf and "torch_dtype" not in hf else "torch_dtype"
        hf[dtype_key] = str(dtype).removeprefix("torch.")
        hf["tie_word_embeddings"] = cfg.tie_word_embeddings
        (tmp / "config.json").write_text(json.dumps(hf, indent=2) + "\n")
        if len(shards) > 1:
            index = {"metadata": {"total_size": sum(sizes.values())}, "weight_map": weight_map}
            (tmp / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
        if like is not None:
            for f in sorted(Path(like).iterdir()):
                if f.is_file() and f.name not in NOT_COPIED and not f.name.endswith(WEIGHT_SUFFIXES):
                    shutil.copy2(f, tmp / f.name)
        _swap_in(tmp, out_dir)
    if group is not None:
        dist.barrier(group=group)
    return out_dir


# -----------------------------------------------------------------------------
# LoRA factors (Hu et al., 2021), for eval.py's low-rank test-time attack; a plain copy for generation
#
# Each targeted nn.Linear gets lora_A (r, in) and lora_B (out, r) as extra parameters, registered on the Linear
# itself (Hugging Face names stay untouched), and a forward hook adds (alpha / r) * B A x to its output. B starts
# at zero, so the model starts unchanged; every other weight is frozen. Under FSDP2 the factors are added after
# sharding: plain tensors replicated on every rank, whose gradients hooks average (FSDP2 averages only its own),
# in one all-reduce per backward (LoraGradMean), so that the training loop needs no LoRA case.


def _lora_hook(module, inputs, out):
    x = inputs[0].to(module.lora_A.dtype)  # FSDP2 mixed precision may hand us bf16 activations
    return out + (F.linear(F.linear(x, module.lora_A), module.lora_B) * module.lora_scale).to(out.dtype)


class LoraGradMean:
    """Averages the LoRA factors' gradients over all ranks in ONE all-reduce per backward, not one per factor
    (128 collectives a backward on 32 layers, each paying the network's latency).

    Each factor's gradient hook (run before the gradient accumulates) keeps this backward's gradient and lets
    zeros accumulate in its place; the hook of the backward's last factor all-reduces them all as one flat
    tensor, adds each mean to its factor's .grad and returns its own. Only this backward's part is averaged,
    never what earlier micro-batches of the step accumulated. Every factor takes part in every forward."""

    def __init__(self, params):
        self.params, self.held = params, {}
        for i, p in enumerate(params):
            p.register_hook(functools.partial(self.hold, i))

    def hold(self, i, grad):
        if i in self.held:
            raise RuntimeError("LoRA: a backward reached only some of the LoRA factors; each must take part in every backward")
        self.held[i] = grad
        if len(self.held) < len(self.params):
            return torch.zeros_like(grad)
        grads = [self.held.pop(j) for j in range(len(self.params))]
        flat = torch.cat([g.flatten() for g in grads])
        dist.all_reduce(flat)  # gloo has no AVG: SUM, then divide
        flat /= dist.get_world_size()
        means = [m.view_as(g) for m, g in zip(flat.split([g.numel() for g in grads]), grads)]
        for j, (p, mean) in enumerate(zip(self.params, means)):
            if j != i:  # their zeros have accumulated already
                p.grad.add_(mean)
        return means[i]


def add_lora(model, rank, alpha, targets, seed=0):
    """Freeze the model and attach LoRA factors to every Linear named in `targets` (e.g. q_proj, v_proj);
    returns them. A is initialised as PEFT does (Kaiming-uniform), from `seed`, identically on every rank."""
    for p in model.parameters():
        p.requires_grad_(False)
    g = torch.Generator().manual_seed(seed)
    device = model.lm_head.weight.device
    params = []
    for name, mod in model.named_modules():
        if isinstance(mod, nn.Linear) and name.rsplit(".", 1)[-1] in targets:
            a = torch.empty(rank, mod.in_features)
            bound = 1 / math.sqrt(mod.in_features)  # kaiming_uniform_(a=sqrt(5)) as in nn.Linear / PEFT
            a.uniform_(-bound, bound, generator=g)
            mod.lora_A = nn.Parameter(a.to(device))
            mod.lora_B = nn.Parameter(torch.zeros(mod.out_features, rank, device=device))
            mod.lora_scale = alpha / rank
            mod.lora_handle = mod.register_forward_hook(_lora_hook)
            params += [mod.lora_A, mod.lora_B]
    if not params:
        raise CheckpointError(f"--lora-targets {','.join(targets)}: no Linear layer of the model has one of these names")
    if dist.is_initialized() and dist.get_world_size() > 1:
        LoraGradMean(params)  # kept alive by its hooks
    return params


def lora_delta(mod):
    return (mod.lora_B @ mod.lora_A) * mod.lora_scale  # (out, in), the update of mod.weight


@torch.no_grad()
def merge_lora_(model):
    """Fold every LoRA update into its weight (each rank into its own rows) and remove the factors."""
    for mod in model.modules():
        if hasattr(mod, "lora_A"):
            w = mod.weight
            local = w.to_local() if hasattr(w, "to_local") else w
            local.add_(lora_delta(mod)[local_rows(w)].to(local.dtype))
            mod.lora_handle.remove()
            del mod.lora_A, mod.lora_B, mod.lora_scale, mod.lora_handle


@torch.no_grad()
def inference_copy(model, dtype, device):
    """A plain, unsharded copy of the (possibly FSDP2-sharded, possibly LoRA-augmented) model for generation,
    in `dtype`, with any LoRA update merged in. Every rank gets the whole model: a sharded model would need an
    all-gather per generated token, in lockstep across ranks."""
    copy = empty_model(model.config, device, dtype)
    dst, modules = dict(copy.named_parameters()), dict(model.named_modules())
    for name, p in model.named_parameters():
        if name not in dst:  # lora_A / lora_B
            continue
        full = p.full_tensor() if hasattr(p, "full_tensor") else p  # a collective on sharded models
        owner = modules[name.rsplit(".", 1)[0]]
        if name.endswith(".weight") and hasattr(owner, "lora_A"):
            full = full + lora_delta(owner)
        dst[name].copy_(full)
    copy.reset_rope()
    return copy.eval()


# -----------------------------------------------------------------------------
# Generation with a KV cache (outside the trainable forward)


class KVCache:
    """Keys and values of every layer for a batch of left-padded rows, preallocated at the final length.

    Slot s of row b holds column s of the padded text (prompt, then new tokens); the first pad[b] slots
    of row b are padding. Before each forward, generate() says with feed() which rows the forward runs,
    which slots its T tokens go to and how many leading slots attention reads (`window`). Nothing grows
    and nothing is scanned: positions are slot - pad, the mask compares slot numbers. With all rows and
    window = max_len every decode step has the same shapes, so it can be compiled and captured as a
    CUDA graph; start() begins a new batch in the same tensors (see static_cache)."""

    def __init__(self, cfg: ModelConfig, batch: int, max_len: int, dtype, device):
        # One tensor per layer, not one (L, ...) tensor: torch.compile turns an in-place write into a
        # view of a graph input into a copy of the whole input (here: the cache of every layer).
        shape = (batch, cfg.num_key_value_heads, max_len, cfg.head_dim)  # (B, nkv, S, hd)
        self.k = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(cfg.num_hidden_layers)]
        self.v = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(cfg.num_hidden_layers)]
        self.slot_ids = torch.arange(max_len, device=device)  # (S,)
        self.pad = torch.full((batch,), max_len, device=device)  # (B,) padding slots at the start of each row
        self.real = torch.zeros(batch, max_len, dtype=torch.bool, device=device)  # (B, S) real tokens, now or later
        self.slot = torch.zeros(1, dtype=torch.long, device=device)  # (1,) the slot of the token decoded next
        self.rows, self.slots, self.window, self.max_len = None, None, max_len, max_len

    def start(self, pad: list[int]):
        """Begin a batch whose row b starts with pad[b] padding slots, in place. Rows past len(pad) are dummies:
        padding throughout, each of its tokens attending only to itself (static_cache pads a batch with them)."""
        self.pad.fill_(self.max_len)
        self.pad[:len(pad)] = torch.tensor(pad)
        torch.ge(self.slot_ids, self.pad[:, None], out=self.real)

    def keep(self, rows: torch.Tensor):
        """Keep only `rows` (indices into the current rows): generate() drops finished rows. A copy of the cache."""
        self.k, self.v = [k[rows] for k in self.k], [v[rows] for v in self.v]
        self.pad, self.real = self.pad[rows], self.real[rows]

    def feed(self, slots: torch.Tensor, window: int, rows: torch.Tensor | None = None):
        """The next forward runs `rows` (all if None), writes its T tokens to `slots` (T,) and
        attends over slots [0, window)."""
        self.slots, self.window, self.rows = slots, window, rows

    def positions_and_mask(self, T):
        """Positions (B, T) of the tokens fed, counted from each row's first real token as transformers
        counts them under left padding, and the attention mask (B, 1, T, window)."""
        assert self.slots.shape == (T,), "feed() the slots of the tokens before each forward"
        pad, real = self.pad, self.real
        if self.rows is not None:
            pad, real = pad[self.rows], real[self.rows]
        positions = (self.slots[None, :] - pad[:, None]).clamp(min=0)
        q = self.slots[:, None]  # (T, 1)
        k = self.slot_ids[:self.window]  # (window,)
        # A pad query may see only itself: an all-masked row would give NaN, which would then leak
        # through its cached K/V (0 * NaN) into real tokens.
        mask = (real[:, None, :self.window] & (k <= q)) | (k == q)  # (B, T, window)
        return positions, mask.unsqueeze(1)

    def update(self, layer, k, v):
        """Store one layer's keys/values (B, nkv, T, hd) of the tokens fed; return (B, nkv, window, hd)."""
        k_cache, v_cache = self.k[layer], self.v[layer]  # (B, nkv, S, hd)
        if self.rows is None:  # every row (decoding): write in place, attend over views
            k_cache.index_copy_(2, self.slots, k)
            v_cache.index_copy_(2, self.slots, v)
            return k_cache[:, :, :self.window], v_cache[:, :, :self.window]
        # some rows (prefill by length group): scatter in, gather out (copies, one layer at a time)
        idx = (self.rows[:, None], slice(None), self.slots[None, :])  # selects (G, T, nkv, hd)
        k_cache[idx], v_cache[idx] = k.transpose(1, 2), v.transpose(1, 2)
        return k_cache[self.rows, :, :self.window], v_cache[self.rows, :, :self.window]


def length_groups(lengths: list[int], max_padding=0.25) -> list[list[int]]:
    """Row indices grouped by prompt length: in length order, a group takes the next row while padding
    stays within `max_padding` of its real tokens. Padding is compute spent on nothing: prompts of 8 to
    48 tokens are 40% padding as one rectangle, 12% in groups (bench_model.py's batch)."""
    groups, group = [], []
    for i in sorted(range(len(lengths)), key=lengths.__getitem__):
        padded = (len(group) + 1) * lengths[i]  # rows x longest, the longest being row i
        if group and padded > (1 + max_padding) * (sum(lengths[j] for j in group) + lengths[i]):
            groups.append(group)
            group = []
        group.append(i)
    return groups + [group]


def prefill(model: Transformer, tokens, lengths: list[int], cache: KVCache):
    """Run the left-padded prompts tokens (B, T0) through the model, filling the cache's first B rows;
    return each row's next-token logits (B, V). Each length group runs alone, padded to its own longest
    prompt."""
    B, T0 = tokens.shape
    groups = length_groups(lengths)
    if len(groups) == 1 and B == len(cache.pad):  # one rectangle over every row: no gathering
        cache.feed(torch.arange(T0, device=tokens.device), T0)
        return model(tokens, cache=cache, last_only=True)[:, -1]
    logits = torch.empty(B, model.config.vocab_size, device=tokens.device, dtype=model.lm_head.weight.dtype)
    for group in groups:
        rows = torch.tensor(group, device=tokens.device)
        T = max(lengths[i] for i in group)
        cache.feed(torch.arange(T0 - T, T0, device=tokens.device), T0, rows)
        logits[rows] = model(tokens[rows, T0 - T:], cache=cache, last_only=True)[:, -1]
    return logits


def process_logits(logits, seen=None, temperature=0.0, top_k=0, top_p=1.0, repetition_penalty=1.0):
    """transformers' logits processors on logits (B, V), in fp32; filtered tokens get -inf.

    seen (B, V) marks the tokens already in each row's text (prompt and new tokens, not padding); the
    repetition penalty applies to those. The order is transformers' (checked against transformers 5.24,
    GenerationMixin._get_logits_processor): the repetition penalty is a processor and applies to greedy
    decoding too; the warpers run only when sampling (temperature > 0), in the order temperature,
    top-k, top-p. The order matters even though dividing by the temperature keeps the ranking:
    rounding can turn two close logits into a tie at the top-k boundary."""
    logits = logits.float()
    if repetition_penalty != 1.0:
        penalized = torch.where(logits < 0, logits * repetition_penalty, logits / repetition_penalty)
        logits = torch.where(seen, penalized, logits)
    if temperature <= 0:
        return logits
    logits = logits / temperature
    if top_k > 0:
        # keep every logit >= the k-th largest, so ties at the boundary all stay (as TopKLogitsWarper does)
        kth = logits.topk(min(top_k, logits.shape[-1]), dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = logits.sort(-1)  # ascending
        cum = sorted_logits.softmax(-1).cumsum(-1)
        drop = cum <= 1 - top_p
        drop[:, -1] = False  # always keep the most likely token
        logits = logits.masked_fill(drop.scatter(1, order, drop), float("-inf"))
    return logits


def sample_next(logits, seen=None, temperature=0.0, top_k=0, top_p=1.0, repetition_penalty=1.0, generator=None):
    """The next token per row (B,) from logits (B, V): greedy at temperature 0, else sampled."""
    logits = process_logits(logits, seen, temperature, top_k, top_p, repetition_penalty)
    if temperature <= 0:
        return logits.argmax(-1)
    return torch.multinomial(logits.softmax(-1), 1, generator=generator).squeeze(1)


def decode_step(model: Transformer, tok, cache: KVCache):
    """One token per row through the model: tok (B, 1) -> logits (B, V). The unit that compile=True compiles."""
    return model(tok, cache=cache)[:, -1]


def static_cache(model: Transformer, batch: int, length: int) -> KVCache:
    """The cache that compiled decoding reuses for `model` across generate() calls: the same tensors at the same
    addresses, only their contents new, so the compiled step is neither compiled nor (on CUDA) recorded as a graph
    again. It grows (is reallocated) only for a call with more rows or a longer text than it holds; a smaller
    batch runs with dummy rows (KVCache.start), and attention reads every slot each step: the same shapes."""
    dtype, device = model.lm_head.weight.dtype, model.lm_head.weight.device
    cache = _static_caches.pop(model, None)
    if cache is not None and (cache.k[0].dtype, cache.k[0].device) == (dtype, device):
        batch, length = max(batch, len(cache.pad)), max(length, cache.max_len)
        if (batch, length) == (len(cache.pad), cache.max_len):
            _static_caches[model] = cache
            return cache
    del cache  # freed before its successor is allocated
    cache = KVCache(model.config, batch, -(-length // 64) * 64, dtype, device)  # lengths in steps of 64: fewer graphs
    # Without this a CUDA graph would copy every cache tensor into its own input buffers each step.
    for t in cache.k + cache.v + [cache.pad, cache.real, cache.slot_ids, cache.slot]:
        torch._dynamo.mark_static_address(t)
    _static_caches[model] = cache
    return cache


_static_caches = weakref.WeakKeyDictionary()  # model -> its static_cache(), dropped with the model


@functools.cache
def compiled_decode_step(device_type: str):
    # On CUDA, mode="reduce-overhead" replays the whole step as one CUDA graph: a decode step is hundreds
    # of small kernels whose launch cost exceeds their run time. CPUs have no graphs: plain Inductor.
    # Memoised so that every generate() call shares one compiled function and its compiled graphs.
    mode = "reduce-overhead" if device_type == "cuda" else None
    return torch.compile(decode_step, mode=mode)


# transformers' own values for what a checkpoint's generation_config.json leaves unset
# (transformers 5.x, GenerationConfig._get_default_generation_params())
HF_SAMPLING_DEFAULTS = {"do_sample": False, "temperature": 1.0, "top_k": 50, "top_p": 1.0, "repetition_penalty": 1.0}


def generation_defaults(checkpoint_dir) -> dict:
    """The sampling settings Hugging Face generate() uses for this checkpoint when its caller sets none:
    do_sample, temperature, top_k, top_p, repetition_penalty from the checkpoint's generation_config.json
    (if there is one), and transformers' global defaults for those it leaves unset (absent or null).

    The caller merges: values its user sets explicitly override these. Like transformers, it should
    decode greedily (temperature 0 here) when do_sample is False, whatever temperature says. Note the
    top_k 50 fallback: a checkpoint that sets only temperature and top_p (Llama 3 Instruct) samples
    from its 50 most likely tokens in transformers."""
    path = Path(checkpoint_dir) / "generation_config.json"
    hf = {}
    if path.is_file():
        try:
            hf = json.loads(path.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise CheckpointError(f"{path}: not valid JSON ({e}); is the file complete?") from None
    return {key: hf[key] if hf.get(key) is not None else default for key, default in HF_SAMPLING_DEFAULTS.items()}


@torch.inference_mode()
def generate(model: Transformer, prompts: list[list[int]], max_new_tokens: int, stop_ids, pad_id: int,
             temperature=0.0, top_k=0, top_p=1.0, repetition_penalty=1.0, seed=None, compile=False) -> list[list[int]]:
    """Generate for a batch of token-id prompts of different lengths (left-padded internally).

    temperature 0 is greedy; top_k 0 and top_p 1 are off. Each row stops at the first token in
    `stop_ids`; the returned lists hold the new tokens up to and including that stop token (or
    max_new_tokens tokens). compile=True runs each decode step through torch.compile, as a CUDA graph
    on CUDA, where a step's hundreds of small kernels take longer to launch than to run, over one static
    cache per model that every call reuses (static_cache): a model compiles (a minute or more on a CPU)
    and records its graph once, and again only when a call needs a larger batch or a longer text."""
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be at least 1, not {max_new_tokens}")
    device = model.lm_head.weight.device
    B, T0 = len(prompts), max(len(p) for p in prompts)
    S = T0 + max_new_tokens
    if compile:  # the model's static cache, with dummy rows past B and slots past S
        cache = static_cache(model, B, S)
    else:  # a cache of this batch's size, whose finished rows leave it
        cache = KVCache(model.config, B, S, model.lm_head.weight.dtype, device)
    cache.start([T0 - len(p) for p in prompts])
    # The text of every row of the cache, preallocated: left-padded prompt, then the new tokens.
    tokens = torch.full(cache.real.shape, pad_id, dtype=torch.long)
    for i, p in enumerate(prompts):
        tokens[i, T0 - len(p):T0] = torch.tensor(p, dtype=torch.long)
    tokens = tokens.to(device)
    every_row = torch.arange(B, device=device)
    seen = None  # (B, V) which tokens each row's text holds so far, for the repetition penalty
    if repetition_penalty != 1.0:
        seen = torch.zeros(B, model.config.vocab_size, dtype=torch.bool, device=device)
        rows, cols = cache.real[:B, :T0].nonzero(as_tuple=True)
        seen[rows, tokens[rows, cols]] = True
    stop = torch.tensor(sorted(set(stop_ids)), dtype=torch.long, device=device)
    generator = None
    if seed is not None:
        generator = torch.Generator(device=device).manual_seed(seed)

    logits = prefill(model, tokens[:B, :T0], [len(p) for p in prompts], cache)  # (B, V)
    cache.slot.fill_(T0)  # advanced in place after each decode step
    step = compiled_decode_step(device.type) if compile else decode_step
    # Asking whether rows are done copies flags to the host, which drains CUDA's queue: on CUDA ask
    # every 8 steps (a finished row then runs at most 7 steps too many; its tokens are cut off).
    check_every = 8 if device.type == "cuda" else 1
    finished = torch.zeros(B, dtype=torch.bool, device=device)
    alive = every_row  # the rows the model still runs: eagerly, finished rows leave the batch (and the cache)
    n = 0  # new tokens so far
    while True:
        # Sampling always sees all B rows (a finished one: its last logits, its token then replaced by
        # padding), so that each row draws the same random numbers whichever rows have left.
        nxt = sample_next(logits, seen, temperature, top_k, top_p, repetition_penalty, generator)
        nxt = torch.where(finished, pad_id, nxt)
        tokens[:B, T0 + n] = nxt
        n += 1
        finished |= torch.isin(nxt, stop)
        if seen is not None:  # a finished row's text is over: its padding is not part of it
            seen[every_row, nxt] |= ~finished
        if n == max_new_tokens:
            break
        if n % check_every == 0:
            done = finished[alive]
            if done.all():
                break
            if not compile and done.any():  # refusals end early: their rows stop costing compute
                cache.keep((~done).nonzero().squeeze(1))
                alive = alive[~done]
        # Eagerly, attention reads only the slots filled so far (measured faster on a CPU); compiled, it
        # reads all of the static cache's, masked, so that every step has the same shapes.
        cache.feed(cache.slot, cache.max_len if compile else T0 + n)
        if compile:  # every row of the static cache, the dummies' logits dropped
            torch.compiler.cudagraph_mark_step_begin()  # the previous step's logits are used up
            logits = step(model, tokens[:, T0 + n - 1:T0 + n], cache)[:B]
        elif len(alive) == B:
            logits = step(model, tokens[:, T0 + n - 1:T0 + n], cache)
        else:
            logits = logits.index_copy(0, alive, step(model, tokens[alive, T0 + n - 1:T0 + n], cache))
        cache.slot += 1
    return [until_stop(row, stop_ids) for row in tokens[:B, T0:T0 + n].tolist()]


def until_stop(row: list[int], stop_ids) -> list[int]:
    """The new tokens of one row up to and including its first stop token (all of them if there is none)."""
    return row[:next((j + 1 for j, t in enumerate(row) if t in stop_ids), len(row))]

