"""A speech LLM in the manner of DiVA (Held et al., 2024): a text LLM that hears.

::

    audio → Whisper encoder (frozen) → connector: N learned queries + positions, cross-attending
    to the encoder's frames → linear projection → N "virtual audio tokens" → the LLM (frozen),
    inside its chat template as the user's turn

Only the connector and the projection learn. The *teacher* is the same frozen LLM reading the
transcript in the same template (:class:`TextTeacher`); the student (:class:`SpeechLLM`) is trained
to leave the LLM in the same state after the user's turn: the final hidden state at the position
that predicts the first response token. :class:`Cascade` is the classic alternative (Whisper
transcribes, the LLM reads the transcript), kept here as the baseline.

The connector's layers have the parameter names of Whisper's decoder layers, so it can start from
the pretrained decoder (DiVA's initialisation); unlike the decoder it attends over all queries
(no causal mask). A :class:`SpeechLLM` saves as a folder: ``config.json`` (the sizes, and the names
or paths of the frozen encoder and LLM), ``model.safetensors`` (connector and projection only),
the LLM's tokenizer and the Whisper feature extractor; encoder and LLM that have no name are saved
in ``encoder/`` and ``llm/``.
"""

from __future__ import annotations

import copy
import inspect
import json
import logging
import math
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Literal, NamedTuple

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from torch import Tensor, nn
from torch.nn import functional as F

from .io import atomic_path, write_json
from .models import ARCHITECTURE_KEY, CONFIG, WEIGHTS
from .pretrained import load_causal_lm, load_tokenizer, resolve
from .signals import output_head

log = logging.getLogger(__name__)

ARCHITECTURE = "speech-llm"
#: where the audio goes in the chat template (replaced by the virtual tokens, or by the transcript)
AUDIO = "<|potstill-audio|>"
#: the submodules a SpeechLLM trains, and the only ones its state_dict and checkpoints hold
TRAINED = ("connector", "projection")
#: the signals both models expose (module paths the objective names)
FINAL_STATE = "final_state"
VIRTUAL_TOKENS = "virtual_tokens"

EncoderFrames = Literal["audio", "all"]

__all__ = [
    "ARCHITECTURE", "AUDIO", "FINAL_STATE", "VIRTUAL_TOKENS", "Cascade", "ConnectorLayer", "QueryConnector",
    "SpeechLLM", "TextTeacher", "WhisperParts", "encoder_frames", "load_whisper_parts", "template_ids",
]


# ----- the chat template around the audio -----------------------------------------------------------------------


def template_ids(tokenizer: Any, prompt: str | None = None) -> tuple[list[int], list[int]]:
    """The token ids before and after the user's spoken (or transcribed) turn.

    The user's message is the audio, then ``prompt`` on a new line if given; it goes through the
    tokenizer's chat template with the generation prompt (or, for a tokenizer without one, is
    followed by a newline). The teacher reads ``before + transcript + after`` and the student
    ``before + virtual tokens + after``: the same tokens around different content.
    """
    content = AUDIO if not prompt else f"{AUDIO}\n{prompt}"
    if getattr(tokenizer, "chat_template", None):
        text = tokenizer.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True,
                                             tokenize=False)
    else:
        text = content + "\n"
    if text.count(AUDIO) != 1:
        raise ValueError(f"the chat template does not keep the user's message as written (it should appear once in "
                         f"{text!r})")
    before, after = text.split(AUDIO)

    def encode(part: str) -> list[int]:
        return list(tokenizer(part, add_special_tokens=False)["input_ids"]) if part else []

    return encode(before), encode(after)


def encoder_frames(num_samples: int, hop_length: int, max_frames: int) -> int:
    """Encoder frames that cover ``num_samples`` of audio (Whisper: 100 mel frames a second, halved by
    the encoder's strided convolution), plus one, at most ``max_frames``."""
    return min(max_frames, math.ceil(num_samples / hop_length / 2) + 1)


# ----- the connector --------------------------------------------------------------------------------------------


class Attention(nn.Module):
    """Multi-head attention with Whisper's parameter layout (``k_proj`` has no bias)."""

    def __init__(self, width: int, heads: int):
        super().__init__()
        if width % heads:
            raise ValueError(f"connector width {width} is not a multiple of its {heads} heads")
        self.heads = heads
        self.q_proj = nn.Linear(width, width)
        self.k_proj = nn.Linear(width, width, bias=False)
        self.v_proj = nn.Linear(width, width)
        self.out_proj = nn.Linear(width, width)

    def forward(self, x: Tensor, context: Tensor, mask: Tensor | None = None) -> Tensor:
        """``x`` [B, Q, D] attends to ``context`` [B, K, D]; ``mask`` [B, K] is true on the keys that count."""
        b, q, d = x.shape

        def heads(t: Tensor) -> Tensor:
            return t.view(b, -1, self.heads, d // self.heads).transpose(1, 2)

        keep = None if mask is None else mask[:, None, None, :].bool()
        out = F.scaled_dot_product_attention(heads(self.q_proj(x)), heads(self.k_proj(context)),
                                             heads(self.v_proj(context)), attn_mask=keep)
        return self.out_proj(out.transpose(1, 2).reshape(b, q, d))


class ConnectorLayer(nn.Module):
    """Self-attention over the queries, cross-attention to the encoder's frames, a feed-forward block;
    pre-norm residuals. The parameter names are those of Whisper's decoder layer."""

    def __init__(self, width: int, heads: int, ffn_dim: int, activation: str = "gelu"):
        super().__init__()
        from transformers.activations import ACT2FN

        self.self_attn = Attention(width, heads)
        self.self_attn_layer_norm = nn.LayerNorm(width)
        self.encoder_attn = Attention(width, heads)
        self.encoder_attn_layer_norm = nn.LayerNorm(width)
        self.fc1 = nn.Linear(width, ffn_dim)
        self.fc2 = nn.Linear(ffn_dim, width)
        self.final_layer_norm = nn.LayerNorm(width)
        self.activation = ACT2FN[activation]

    def forward(self, x: Tensor, frames: Tensor, frame_mask: Tensor | None = None) -> Tensor:
        h = self.self_attn_layer_norm(x)
        x = x + self.self_attn(h, h)
        x = x + self.encoder_attn(self.encoder_attn_layer_norm(x), frames, frame_mask)
        return x + self.fc2(self.activation(self.fc1(self.final_layer_norm(x))))


class QueryConnector(nn.Module):
    """N learned query tokens plus position embeddings that cross-attend to the encoder's frames
    (Q-Former-like); the output is ``[B, N, width]``, layer-normed."""

    def __init__(self, width: int, num_queries: int, num_layers: int, num_heads: int, ffn_dim: int,
                 activation: str = "gelu"):
        super().__init__()
        self.config = {"width": width, "num_queries": num_queries, "num_layers": num_layers,
                       "num_heads": num_heads, "ffn_dim": ffn_dim, "activation": activation}
        self.queries = nn.Parameter(torch.randn(num_queries, width) * 0.02)
        self.positions = nn.Parameter(torch.randn(num_queries, width) * 0.02)
        self.layers = nn.ModuleList(ConnectorLayer(width, num_heads, ffn_dim, activation) for _ in range(num_layers))
        self.layer_norm = nn.LayerNorm(width)

    @property
    def width(self) -> int:
        return self.config["width"]

    @property
    def num_queries(self) -> int:
        return self.config["num_queries"]

    def forward(self, frames: Tensor, frame_mask: Tensor | None = None) -> Tensor:
        x = (self.queries + self.positions).to(frames.dtype).expand(frames.shape[0], -1, -1)
        for layer in self.layers:
            x = layer(x, frames, frame_mask)
        return self.layer_norm(x)

    @classmethod
    def from_whisper_decoder(cls, decoder: nn.Module, num_queries: int,
                             num_layers: int | None = None) -> QueryConnector:
        """A connector whose layers, final norm and position embeddings start as the first
        ``num_layers`` of a Whisper decoder's (all of them by default); the queries stay random."""
        config = decoder.config
        available = len(decoder.layers)
        num_layers = available if num_layers is None else num_layers
        if not 1 <= num_layers <= available:
            raise ValueError(f"connector_layers={num_layers}: the Whisper decoder has {available} layers to start from")
        if num_queries > config.max_target_positions:
            raise ValueError(f"num_queries={num_queries}: the Whisper decoder has {config.max_target_positions} "
                             "position embeddings to start from")
        connector = cls(config.d_model, num_queries, num_layers, config.decoder_attention_heads,
                        config.decoder_ffn_dim, config.activation_function)
        with torch.no_grad():
            for mine, theirs in zip(connector.layers, decoder.layers, strict=False):
                missing, unexpected = mine.load_state_dict(theirs.state_dict(), strict=False)
                if missing or unexpected:
                    raise ValueError(f"the Whisper decoder layer does not match the connector's: missing {missing}, "
                                     f"unexpected {unexpected}")
            connector.layer_norm.load_state_dict(decoder.layer_norm.state_dict())
            connector.positions.copy_(decoder.embed_positions.weight[:num_queries])
        return connector


# ----- loading the frozen parts ---------------------------------------------------------------------------------


class WhisperParts(NamedTuple):
    """A Whisper loaded for a speech LLM: the encoder, the decoder (a connector can start from it), the
    feature extractor, and the whole model (for transcribing; None for a bare encoder folder)."""

    encoder: nn.Module
    decoder: nn.Module | None
    feature_extractor: Any
    model: nn.Module | None


def load_whisper_parts(name: str | Path) -> WhisperParts:
    """The parts of the Whisper ``name`` (anything :func:`potstill.pretrained.resolve` takes:
    ``whisper-base``, a hub name, a folder, or a bare ``WhisperEncoder`` folder)."""
    import transformers

    source = resolve(str(name))
    config = transformers.AutoConfig.from_pretrained(source.path)
    if getattr(config, "model_type", None) != "whisper":
        raise ValueError(f"encoder {str(name)!r} is a {getattr(config, 'model_type', '?')} model, not a Whisper")
    extractor = _feature_extractor(source.path, config.num_mel_bins)
    if "WhisperEncoder" in (config.architectures or []):
        from transformers.models.whisper.modeling_whisper import WhisperEncoder

        encoder = WhisperEncoder.from_pretrained(source.path, use_safetensors=True)
        return WhisperParts(encoder.eval(), None, extractor, None)
    full = transformers.WhisperForConditionalGeneration.from_pretrained(source.path, use_safetensors=True).eval()
    return WhisperParts(full.model.encoder, full.model.decoder, extractor, full)


def _feature_extractor(path: str, num_mel_bins: int) -> Any:
    from transformers import WhisperFeatureExtractor

    try:
        return WhisperFeatureExtractor.from_pretrained(path)
    except OSError:  # a folder without preprocessor_config.json: Whisper's standard 30-s extractor
        return WhisperFeatureExtractor(feature_size=num_mel_bins)


def _name(source: str | Path) -> str:
    """How a config records a model's source: names as given, existing folders as absolute paths."""
    path = Path(source).expanduser()
    return str(path.resolve()) if path.exists() else str(source)


# ----- the two models -------------------------------------------------------------------------------------------


class _LLMReader(nn.Module):
    """What the student and the teacher share: the frozen LLM, read at chosen positions.

    Every sequence starts with the same template tokens (the system prompt, the user's turn marker):
    the LLM reads them once, and later batches continue from their key/value cache (the same
    outputs, the gradients of the rest unchanged: the prefix depends on nothing that learns).
    """

    llm: nn.Module

    def _check_llm(self, llm: nn.Module) -> nn.Linear:
        head = output_head(llm)
        if head is None:
            raise ValueError(f"{type(llm).__name__} is not a causal LM whose logits are a linear map of its last "
                             "hidden state (the hidden-state loss relies on that)")
        return head

    def _read(self, embeds: Tensor, attention_mask: Tensor, positions: Tensor,
              prefix: Sequence[int] = ()) -> tuple[Tensor, Tensor]:
        """The LLM's last hidden state and logits at ``positions`` ([B, R]) of ``embeds`` ([B, L, D]),
        which follow the tokens ``prefix`` (the same in every row; positions count from after it)."""
        base = self.llm.base_model
        kwargs: dict[str, Any] = {}
        if prefix:
            start, (batch, length) = len(prefix), embeds.shape[:2]
            kwargs = {_cache_argument(base): self._prefix_cache(tuple(prefix), embeds, batch), "use_cache": True,
                      "position_ids": torch.arange(start, start + length, device=embeds.device).expand(batch, -1)}
            attention_mask = torch.cat([attention_mask.new_ones(batch, start), attention_mask], dim=1)
        hidden = base(inputs_embeds=embeds, attention_mask=attention_mask, **kwargs).last_hidden_state
        picked = hidden.gather(1, positions[..., None].expand(-1, -1, hidden.shape[-1]))
        return picked, output_head(self.llm)(picked)

    def _prefix_cache(self, prefix: tuple[int, ...], like: Tensor, batch: int) -> Any:
        """A fresh copy, for ``batch`` rows, of the LLM's key/value cache after reading ``prefix``."""
        caches = self.__dict__.setdefault("_prefix_caches", {})
        key = (prefix, like.device, like.dtype, torch.is_autocast_enabled())
        if key not in caches:
            with torch.no_grad():
                ids = torch.tensor([prefix], device=like.device)
                out = self.llm.base_model(inputs_embeds=self.llm.get_input_embeddings()(ids), use_cache=True)
            # transformers 5 names the output field "cache", earlier versions "past_key_values"
            caches[key] = out.cache if "cache" in getattr(out, "__dataclass_fields__", ()) else out.past_key_values
        cache = copy.deepcopy(caches[key])
        if batch > 1:
            cache.batch_repeat_interleave(batch)
        return cache


def _cache_argument(model: nn.Module) -> str:
    """The keyword a Hugging Face model's forward takes its cache by (``cache`` from transformers 5.x)."""
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


def _common_prefix(ids: Tensor) -> list[int]:
    """The tokens of ``ids`` [B, P] if every row holds the same ones, else none."""
    return ids[0].tolist() if ids.shape[1] and bool((ids == ids[:1]).all()) else []


class SpeechLLM(_LLMReader):
    """A frozen Whisper encoder → a trained connector and projection → a frozen causal LM.

    ``forward`` reads the LLM inputs ``prefix_ids`` + virtual tokens + ``suffix_ids`` (the chat
    template around the user's turn, :func:`template_ids`) and returns ``{"logits": [B, V]}``, the
    next-token logits at the last position (the first response token); the final hidden state
    there passes through ``self.final_state`` and the projected connector outputs through
    ``self.virtual_tokens`` (identities, so that the objective captures them by name). Audio comes
    as ``input_features`` (log-mel, padded to the encoder's window) or as encoder outputs
    computed once (``encoder_hidden_states`` + ``encoder_attention_mask``).

    The encoder and the LLM never learn: ``requires_grad`` is off, they stay in eval mode, and
    :meth:`state_dict` holds only the connector and the projection (checkpoints stay small).
    """

    def __init__(self, encoder: nn.Module, connector: QueryConnector, projection: nn.Linear, llm: nn.Module,
                 tokenizer: Any, feature_extractor: Any, *, encoder_name: str | None = None,
                 llm_name: str | None = None, llm_gguf_file: str | None = None,
                 encoder_frames: EncoderFrames = "audio"):
        super().__init__()
        self.encoder_name, self.llm_name, self.llm_gguf_file = encoder_name, llm_name, llm_gguf_file
        self.encoder_frames = encoder_frames
        if encoder_frames not in ("audio", "all"):
            raise ValueError(f"encoder_frames must be 'audio' or 'all', got {encoder_frames!r}")
        _check_widths(encoder, connector, projection, llm, encoder_name, llm_name)
        _check_tokenizer(tokenizer, llm, llm_name)
        _check_features(feature_extractor, encoder, encoder_name)
        self._check_llm(llm)
        self.encoder = encoder.requires_grad_(False).eval()
        self.llm = llm.requires_grad_(False).eval()
        self.connector, self.projection = connector, projection
        self.tokenizer, self.feature_extractor = tokenizer, feature_extractor
        self.final_state, self.virtual_tokens = nn.Identity(), nn.Identity()

    # ----- building -----------------------------------------------------------------------------------------

    @classmethod
    def build(cls, encoder: str | Path = "whisper-base", llm: str | Path = "smollm2-135m-instruct", *,
              num_queries: int = 32, connector_layers: int | None = None, init_from_decoder: bool = True,
              num_heads: int | None = None, ffn_dim: int | None = None, encoder_frames: EncoderFrames = "audio",
              llm_gguf_file: str | None = None, seed: int = 0, whisper: WhisperParts | None
              = None, llm_model: nn.Module | None = None, tokenizer: Any = None) -> SpeechLLM:
        """A speech LLM with a new connector between ``encoder`` (a Whisper name or folder) and ``llm``
        (a causal LM name, folder or ``.gguf``).

        The connector starts from the Whisper decoder's first ``connector_layers`` layers (all by
        default) when ``init_from_decoder``, else it is new with ``connector_layers`` (default 2)
        layers of the encoder's width; its random parts draw from ``seed`` only (two builds are
        equal). The projection starts so that the virtual tokens have the size of the LLM's own
        token embeddings. ``whisper`` / ``llm_model`` / ``tokenizer``: the parts already loaded
        (from :func:`load_whisper_parts` and ``load_causal_lm``), to share them between models.
        """
        enc, decoder, extractor, _ = whisper if whisper is not None else load_whisper_parts(encoder)
        source = resolve(str(llm), llm_gguf_file)
        model = llm_model if llm_model is not None else load_causal_lm(source)
        tokenizer = tokenizer if tokenizer is not None else load_tokenizer(source)
        config = enc.config
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            if init_from_decoder:
                if decoder is None:
                    raise ValueError(f"init_from_decoder: {str(encoder)!r} is a bare encoder, with no decoder to "
                                     "start the connector from")
                connector = QueryConnector.from_whisper_decoder(decoder, num_queries, connector_layers)
            else:
                heads = num_heads or config.encoder_attention_heads
                connector = QueryConnector(config.d_model, num_queries, connector_layers or 2, heads,
                                           ffn_dim or config.encoder_ffn_dim, config.activation_function)
            projection = nn.Linear(config.d_model, model.get_input_embeddings().embedding_dim)
            _scale_like_embeddings(projection, model.get_input_embeddings().weight)
        return cls(enc, connector, projection, model, tokenizer, extractor, encoder_name=_name(encoder),
                   llm_name=_name(llm), llm_gguf_file=llm_gguf_file,
                   encoder_frames=encoder_frames)

    # ----- the frozen parts stay frozen -----------------------------------------------------------------------

    def train(self, mode: bool = True) -> SpeechLLM:
        super().train(mode)
        self.encoder.eval()
        self.llm.eval()
        return self

    def _trained(self) -> nn.ModuleDict:
        return nn.ModuleDict({name: getattr(self, name) for name in TRAINED})

    def state_dict(self, *args: Any, destination: Any = None, prefix: str = "", keep_vars: bool = False) -> Any:
        """The connector's and the projection's tensors only (the frozen parts are named in the config)."""
        if args:
            raise TypeError("SpeechLLM.state_dict takes keyword arguments only")
        out = OrderedDict() if destination is None else destination
        self._trained().state_dict(destination=out, prefix=prefix, keep_vars=keep_vars)
        return out

    def load_state_dict(self, state_dict: Mapping[str, Any], strict: bool = True, assign: bool = False) -> Any:
        return self._trained().load_state_dict(state_dict, strict=strict, assign=assign)

    def trainable_parameters(self) -> int:
        return sum(p.numel() for p in self._trained().parameters())

    # ----- the forward pass -----------------------------------------------------------------------------------

    @property
    def max_frames(self) -> int:
        return self.encoder.config.max_source_positions

    @torch.no_grad()
    def encode(self, input_features: Tensor, num_frames: Sequence[int] | Tensor | None = None) -> tuple[Tensor, Tensor]:
        """The frozen encoder's outputs ``[B, T, D]`` and their mask ``[B, T]``: with ``encoder_frames:
        audio`` only the first ``num_frames[i]`` frames of each (those that cover the audio)."""
        states = self.encoder(input_features.to(self._dtype)).last_hidden_state
        frames = [states.shape[1]] * len(states) if num_frames is None or self.encoder_frames == "all" \
            else [min(int(n), states.shape[1]) for n in num_frames]
        longest = max(frames)
        counts = torch.tensor(frames, device=states.device)
        mask = torch.arange(longest, device=states.device)[None, :] < counts[:, None]
        return states[:, :longest], mask

    @property
    def _dtype(self) -> torch.dtype:
        return self.projection.weight.dtype

    @property
    def _device(self) -> torch.device:
        return self.projection.weight.device

    def connect(self, encoder_hidden_states: Tensor, encoder_attention_mask: Tensor | None = None) -> Tensor:
        """The virtual tokens ``[B, N, D_llm]`` for encoder outputs ``[B, T, D]``."""
        if encoder_hidden_states.shape[-1] != self.connector.width:
            raise ValueError(f"encoder outputs are {encoder_hidden_states.shape[-1]} wide, the connector takes "
                             f"{self.connector.width}")
        return self.projection(self.connector(encoder_hidden_states.to(self._dtype), encoder_attention_mask))

    def forward(self, prefix_ids: Tensor, suffix_ids: Tensor, encoder_hidden_states: Tensor | None = None,
                encoder_attention_mask: Tensor | None = None, input_features: Tensor | None = None,
                num_frames: Tensor | None = None, response_ids: Tensor | None = None,
                response_mask: Tensor | None = None) -> dict[str, Tensor]:
        """Next-token logits after the user's spoken turn: ``{"logits": [B, V]}``.

        ``prefix_ids`` [B, P] and ``suffix_ids`` [B, S] are the template around the audio (the same
        length in every row). With ``response_ids`` [B, R] (right-padded, ``response_mask`` 1 on real
        tokens) the LLM also reads the response, teacher-forced, and ``"response_logits"`` [B, R, V]
        holds the logits that predict each of its tokens (index 0 is ``"logits"``).
        """
        if encoder_hidden_states is None:
            if input_features is None:
                raise ValueError("give input_features or encoder_hidden_states")
            encoder_hidden_states, encoder_attention_mask = self.encode(input_features, num_frames)
        virtual = self.virtual_tokens(self.connect(encoder_hidden_states, encoder_attention_mask))
        embed = self.llm.get_input_embeddings()
        # the template before the audio is the same in every row: read once, from the LLM's cache
        prefix = _common_prefix(prefix_ids)
        parts = [virtual, embed(suffix_ids)] if prefix else [embed(prefix_ids), virtual, embed(suffix_ids)]
        batch = virtual.shape[0]
        mask = torch.ones(batch, sum(p.shape[1] for p in parts), dtype=torch.long, device=virtual.device)
        last = mask.shape[1] - 1
        steps = 1
        if response_ids is not None and response_ids.shape[1] > 1:
            parts.append(embed(response_ids[:, :-1]))
            keep = response_mask[:, :-1] if response_mask is not None else torch.ones_like(response_ids[:, :-1])
            mask = torch.cat([mask, keep.to(mask)], dim=1)
            steps = response_ids.shape[1]
        positions = (last + torch.arange(steps, device=virtual.device)).expand(batch, -1)
        hidden, logits = self._read(torch.cat(parts, dim=1), mask, positions, prefix)
        self.final_state(hidden[:, 0])
        out = {"logits": logits[:, 0]}
        if response_ids is not None:
            out["response_logits"] = logits
        return out

    # ----- generation -----------------------------------------------------------------------------------------

    def features(self, audio: Any, sampling_rate: int | None = None) -> tuple[Tensor, list[int]]:
        """Log-mel features ``[B, n_mels, frames]`` and encoder frame counts for audio given as file paths,
        1-D sample arrays (at ``sampling_rate``, default the extractor's) or a list of either."""
        from .audio import from_samples, load_audio

        rate = self.feature_extractor.sampling_rate
        items = audio if isinstance(audio, list) else [audio]
        waves = []
        for item in items:
            if isinstance(item, (str, Path)):
                waves.append(load_audio(item, rate))
            else:
                waves.append(from_samples(np.asarray(item), sampling_rate or rate, rate))
        window = getattr(self.feature_extractor, "n_samples", None)
        for i, wave in enumerate(waves):
            if window is not None and len(wave) > window:
                raise ValueError(f"audio {i} lasts {len(wave) / rate:.1f} s, longer than the encoder's "
                                 f"{window / rate:g}-s window")
        features = self.feature_extractor(waves, sampling_rate=rate, return_tensors="pt")["input_features"]
        frames = [encoder_frames(len(w), self.feature_extractor.hop_length, self.max_frames) for w in waves]
        return features, frames

    @torch.no_grad()
    def generate(self, audio: Any, prompt: str | None = None, *, max_new_tokens: int = 64,
                 sampling_rate: int | None = None) -> str | list[str]:
        """Answer spoken input greedily: ``audio`` as :meth:`features` takes it; ``prompt`` is an optional
        text instruction after the audio in the user's turn. One string per clip (a string for one clip)."""
        features, frames = self.features(audio, sampling_rate)
        states, mask = self.encode(features.to(self._device), frames)
        counts = mask.sum(1).tolist()
        answers = [self.generate_from_states(states[i:i + 1, :n], None, prompt, max_new_tokens=max_new_tokens)
                   for i, n in enumerate(counts)]
        return answers if isinstance(audio, list) else answers[0]

    @torch.no_grad()
    def generate_from_states(self, encoder_hidden_states: Tensor, encoder_attention_mask: Tensor | None = None,
                             prompt: str | None = None, *, max_new_tokens: int = 64) -> str:
        """The greedy answer to one clip given as encoder outputs ``[1, T, D]``."""
        before, after = template_ids(self.tokenizer, prompt)
        embed = self.llm.get_input_embeddings()
        device = self._device
        virtual = self.connect(encoder_hidden_states.to(device), None if encoder_attention_mask is None
                               else encoder_attention_mask.to(device))
        embeds = torch.cat([embed(torch.tensor([before], device=device)), virtual,
                            embed(torch.tensor([after], device=device))], dim=1)
        ids = greedy(self.llm, embeds, max_new_tokens, stop_ids(self.tokenizer, self.llm))
        return self.tokenizer.decode(ids, skip_special_tokens=True).strip()

    # ----- saving and loading ---------------------------------------------------------------------------------

    def config(self) -> dict[str, Any]:
        return {ARCHITECTURE_KEY: ARCHITECTURE, "encoder": self.encoder_name or "encoder",
                "llm": self.llm_name or "llm", "llm_gguf_file": self.llm_gguf_file,
                "encoder_frames": self.encoder_frames, "connector": dict(self.connector.config),
                "encoder_width": self.connector.width, "llm_width": self.projection.out_features}

    def save_pretrained(self, folder: str | Path, **_: Any) -> None:
        """Write the folder :meth:`from_pretrained` reads (atomically); encoder and LLM built in memory
        (no name) are saved beside it in ``encoder/`` and ``llm/``."""
        with atomic_path(Path(folder)) as tmp:
            tmp.mkdir(parents=True)
            config = self.config()
            if self.encoder_name is None:
                self.encoder.save_pretrained(tmp / "encoder", safe_serialization=True)
                self.feature_extractor.save_pretrained(tmp / "encoder")
            if self.llm_name is None:
                self.llm.save_pretrained(tmp / "llm", safe_serialization=True)
            state = {k: v.detach().cpu().contiguous() for k, v in self.state_dict().items()}
            save_file(state, tmp / WEIGHTS)
            self.tokenizer.save_pretrained(tmp)
            self.feature_extractor.save_pretrained(tmp)
            write_json(tmp / CONFIG, config)

    @classmethod
    def from_pretrained(cls, folder: str | Path, *, whisper: WhisperParts | None = None,
                        llm_model: nn.Module | None = None) -> SpeechLLM:
        """Load a folder written by :meth:`save_pretrained`. ``whisper`` / ``llm_model``: the frozen
        parts already loaded (they must be the ones the config names: the widths are checked)."""
        from transformers import AutoTokenizer, WhisperFeatureExtractor

        folder = Path(folder)
        config = read_config(folder)
        encoder_name = config["encoder"]
        encoder_path = folder / "encoder" if encoder_name == "encoder" else encoder_name
        if whisper is None:
            whisper = load_whisper_parts(encoder_path)
        llm_name = config["llm"]
        if llm_model is None:
            llm_path = folder / "llm" if llm_name == "llm" else llm_name
            llm_model = load_causal_lm(resolve(str(llm_path), config.get("llm_gguf_file")))
        c = config["connector"]
        connector = QueryConnector(c["width"], c["num_queries"], c["num_layers"], c["num_heads"], c["ffn_dim"],
                                   c.get("activation", "gelu"))
        projection = nn.Linear(config["encoder_width"], config["llm_width"])
        model = cls(whisper[0], connector, projection, llm_model, AutoTokenizer.from_pretrained(folder),
                    WhisperFeatureExtractor.from_pretrained(folder),
                    encoder_name=None if encoder_name == "encoder" else encoder_name,
                    llm_name=None if llm_name == "llm" else llm_name, llm_gguf_file=config.get("llm_gguf_file"),
                    encoder_frames=config.get("encoder_frames", "audio"))
        model.load_state_dict(load_file(folder / WEIGHTS))
        return model


def read_config(folder: str | Path) -> dict[str, Any]:
    """A saved SpeechLLM's ``config.json``; a folder that holds none (or another model) is a clear error."""
    path = Path(folder) / CONFIG
    if not path.is_file():
        raise FileNotFoundError(f"{folder} is not a saved SpeechLLM: it has no {CONFIG}")
    config = json.loads(path.read_text())
    if config.get(ARCHITECTURE_KEY) != ARCHITECTURE:
        raise ValueError(f"{path} describes {config.get(ARCHITECTURE_KEY) or config.get('architectures')}, "
                         f"not a SpeechLLM")
    return config


class TextTeacher(_LLMReader):
    """The teacher: the frozen LLM reading the transcript as the user's turn.

    ``forward(input_ids, attention_mask, positions, transcript_start, transcript_length)``: right-padded
    sequences ``before + transcript + after (+ response)``; ``positions`` [B, R] are the positions whose
    next-token logits are wanted (column 0: the first response token). Returns ``{"logits": [B, V]}``
    (and ``"response_logits"`` [B, R, V] when R > 1); the final hidden state passes through
    ``self.final_state`` and the transcript's token embeddings ``[B, L, D]`` (zero beyond each
    transcript) through ``self.virtual_tokens``, the student's signals of the same names.
    """

    def __init__(self, llm: nn.Module):
        super().__init__()
        self._check_llm(llm)
        self.llm = llm.requires_grad_(False).eval()
        self.final_state, self.virtual_tokens = nn.Identity(), nn.Identity()

    def forward(self, input_ids: Tensor, attention_mask: Tensor, positions: Tensor,
                transcript_start: Tensor | None = None, transcript_length: Tensor | None = None) -> dict[str, Tensor]:
        embeds = self.llm.get_input_embeddings()(input_ids)
        if transcript_start is not None and transcript_length is not None:
            longest = max(int(transcript_length.max()), 1)
            index = transcript_start[:, None] + torch.arange(longest, device=input_ids.device)[None, :]
            inside = torch.arange(longest, device=input_ids.device)[None, :] < transcript_length[:, None]
            index = index.clamp(max=embeds.shape[1] - 1)
            picked = embeds.gather(1, index[..., None].expand(-1, -1, embeds.shape[-1]))
            self.virtual_tokens(picked * inside[..., None])
        # the template before the transcript is the same in every row: read once, from the LLM's cache
        start = int(transcript_start[0]) if transcript_start is not None and bool(
            (transcript_start == transcript_start[0]).all()) else 0
        prefix = _common_prefix(input_ids[:, :start])
        cut = len(prefix)
        hidden, logits = self._read(embeds[:, cut:], attention_mask[:, cut:], positions - cut, prefix)
        self.final_state(hidden[:, 0])
        out = {"logits": logits[:, 0]}
        if positions.shape[1] > 1:
            out["response_logits"] = logits
        return out


# ----- the cascade baseline -------------------------------------------------------------------------------------


class Cascade(nn.Module):
    """Whisper transcribes, the LLM reads the transcript: the pipeline a speech LLM replaces."""

    def __init__(self, whisper: nn.Module, whisper_tokenizer: Any, llm: nn.Module, tokenizer: Any):
        super().__init__()
        self.whisper, self.whisper_tokenizer = whisper.eval(), whisper_tokenizer
        self.llm, self.tokenizer = llm.eval(), tokenizer

    @torch.no_grad()
    def transcribe(self, input_features: Tensor, max_new_tokens: int = 128) -> list[str]:
        """Greedy English transcripts of log-mel ``input_features`` [B, n_mels, frames]."""
        room = self.whisper.config.max_target_positions - 8  # the decoder prompt's tokens
        config = copy.deepcopy(self.whisper.generation_config)
        config.max_length = None  # max_new_tokens decides (a config's max_length would only warn)
        kwargs: dict[str, Any] = {"max_new_tokens": min(max_new_tokens, room), "do_sample": False, "num_beams": 1}
        if getattr(config, "is_multilingual", False):
            kwargs.update(language="en", task="transcribe")
        device = next(self.whisper.parameters()).device
        features = input_features.to(device)
        mask = torch.ones(features.shape[0], features.shape[-1], dtype=torch.long, device=device)
        ids = self.whisper.generate(features, attention_mask=mask, generation_config=config, **kwargs)
        return [t.strip() for t in self.whisper_tokenizer.batch_decode(ids, skip_special_tokens=True)]

    @torch.no_grad()
    def generate_from_text(self, transcript: str, prompt: str | None = None, *, max_new_tokens: int = 64) -> str:
        """The LLM's greedy answer to a transcript."""
        return answer_text(self.llm, self.tokenizer, transcript, prompt, max_new_tokens=max_new_tokens)


# ----- greedy decoding ------------------------------------------------------------------------------------------


def stop_ids(tokenizer: Any, llm: nn.Module) -> set[int]:
    """Token ids that end an answer: the tokenizer's end of sequence and the model's own."""
    ids = {tokenizer.eos_token_id}
    configured = getattr(getattr(llm, "generation_config", None), "eos_token_id", None)
    ids |= set(configured) if isinstance(configured, list) else {configured}
    return {i for i in ids if i is not None}


@torch.no_grad()
def greedy(llm: nn.Module, embeds: Tensor, max_new_tokens: int, stop: set[int]) -> list[int]:
    """Greedy continuation of one sequence of input embeddings ``[1, L, D]``, ending at a stop id
    (kept) or after ``max_new_tokens``."""
    mask = torch.ones(embeds.shape[:2], dtype=torch.long, device=embeds.device)
    ids = llm.generate(inputs_embeds=embeds, attention_mask=mask, max_new_tokens=max_new_tokens, do_sample=False,
                       num_beams=1, eos_token_id=sorted(stop), pad_token_id=min(stop) if stop else 0,
                       temperature=None, top_p=None, top_k=None)
    out = ids[0, -max_new_tokens:].tolist() if ids.shape[1] > max_new_tokens else ids[0].tolist()
    for i, token in enumerate(out):
        if token in stop:  # generate pads a finished sequence with the pad id: cut after the first stop
            return out[: i + 1]
    return out


@torch.no_grad()
def answer_text(llm: nn.Module, tokenizer: Any, transcript: str, prompt: str | None = None, *,
                max_new_tokens: int = 64) -> str:
    """The LLM's greedy answer to ``transcript`` as the user's turn (the teacher's, or the cascade's)."""
    ids = teacher_ids(tokenizer, transcript, prompt)
    device = next(llm.parameters()).device
    embeds = llm.get_input_embeddings()(torch.tensor([ids], device=device))
    return tokenizer.decode(greedy(llm, embeds, max_new_tokens, stop_ids(tokenizer, llm)),
                            skip_special_tokens=True).strip()


def teacher_ids(tokenizer: Any, transcript: str | Sequence[int], prompt: str | None = None) -> list[int]:
    """``before + transcript + after``: what the teacher reads (``transcript`` as text or token ids)."""
    before, after = template_ids(tokenizer, prompt)
    ids = transcript if not isinstance(transcript, str) else tokenizer(transcript.strip(),
                                                                      add_special_tokens=False)["input_ids"]
    return before + list(ids) + after


# ----- set-up checks --------------------------------------------------------------------------------------------


def _check_widths(encoder: nn.Module, connector: QueryConnector, projection: nn.Linear, llm: nn.Module,
                  encoder_name: str | None, llm_name: str | None) -> None:
    width = encoder.config.d_model
    if width != connector.width or projection.in_features != connector.width:
        raise ValueError(f"the encoder {encoder_name or type(encoder).__name__} outputs {width}-wide frames, but the "
                         f"connector takes {connector.width}-wide ones and the projection "
                         f"{projection.in_features}-wide: they were built for another encoder")
    llm_width = llm.get_input_embeddings().embedding_dim
    if projection.out_features != llm_width:
        raise ValueError(f"the LLM {llm_name or type(llm).__name__} reads {llm_width}-wide token embeddings, but the "
                         f"projection writes {projection.out_features}-wide virtual tokens: it was built for "
                         "another LLM")


def _check_tokenizer(tokenizer: Any, llm: nn.Module, llm_name: str | None) -> None:
    rows = llm.get_input_embeddings().num_embeddings
    if len(tokenizer) > rows:
        raise ValueError(f"the tokenizer has {len(tokenizer):,} tokens but the LLM {llm_name or type(llm).__name__} "
                         f"embeds {rows:,}: they do not belong together")


def _check_features(feature_extractor: Any, encoder: nn.Module, encoder_name: str | None) -> None:
    config = encoder.config
    name = encoder_name or type(encoder).__name__
    if feature_extractor.feature_size != config.num_mel_bins:
        raise ValueError(f"the feature extractor makes {feature_extractor.feature_size} mel bins, the encoder {name} "
                         f"reads {config.num_mel_bins}")
    window = 2 * config.max_source_positions
    if getattr(feature_extractor, "nb_max_frames", window) != window:
        raise ValueError(f"the feature extractor pads to {feature_extractor.nb_max_frames} frames, the encoder "
                         f"{name} reads {window}")


def _scale_like_embeddings(projection: nn.Linear, embeddings: Tensor) -> None:
    """Start the projection so that its outputs (of layer-normed inputs) have the spread of the LLM's
    own token embeddings, which the LLM expects to read."""
    std = embeddings.detach().float().std().item()
    with torch.no_grad():
        projection.weight.normal_(0.0, std / math.sqrt(projection.in_features))
        projection.bias.zero_()
