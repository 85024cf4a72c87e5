"""Model families and `build_model`.

A model is an `EncoderDecoder`: one encoder and one decoder, each from a family in `FAMILIES`
(a plain dict, no registration by import side effect). Families can be mixed where the contract
holds: the decoder only sees the encoder's `EncoderOut` (memory of width `encoder.out_dim`).

Every class takes its sizes and options as explicit keyword arguments (no defaults: those live
in `nmt.config.ModelConfig`, with their help) and has one `from_config(model_cfg, ...)` that reads
them from a `ModelConfig`.
Encoder classes: `Cls.from_config(model_cfg, vocab_size, pad_id)`, `.out_dim`, `.embed`
(nn.Embedding), `forward(src_ids (B, S), src_lens (B,)) -> EncoderOut`.
Decoder classes: `Cls.from_config(model_cfg, vocab_size, pad_id, memory_dim)`, `.embed`,
`prepare(enc) -> EncoderOut` (cache keys once per sentence), `forward(tgt_in_ids (B, T), enc)
-> logits (B, T, V)`, `init_state(enc)`, `step(tgt_ids_t (B,), state, enc) -> (logits (B, V),
state, attn (B, S))`, `reorder_state(state, index)`, `tie_output()` (share the output projection
with `.embed`, called only when `model_cfg.tie_embeddings`).
"""

from __future__ import annotations

import torch

from nmt.config import ModelConfig
from nmt.errors import ConfigError
from nmt.models import gnmt, tcn
from nmt.models.base import EncoderOut, Seq2Seq
from nmt.models.shortlisted import Shortlisted

FAMILIES = {
    "gnmt": (gnmt.GNMTEncoder, gnmt.GNMTDecoder),
    "tcn": (tcn.TCNEncoder, tcn.TCNDecoder),
}


class EncoderDecoder(Seq2Seq):
    """An encoder and a decoder joined through `EncoderOut` (see nmt.models.base)."""

    def __init__(self, encoder, decoder):
        super().__init__()
        self.encoder = encoder
        self.decoder = decoder
        self.src_vocab_size = encoder.embed.num_embeddings
        self.tgt_vocab_size = decoder.embed.num_embeddings

    def encode(self, src_ids, src_lens) -> EncoderOut:
        return self.decoder.prepare(self.encoder(src_ids, src_lens))

    def forward(self, src_ids, src_lens, tgt_in_ids) -> torch.Tensor:
        return self.decoder(tgt_in_ids, self.encode(src_ids, src_lens))  # (B, T, V)

    def init_state(self, enc):
        return self.decoder.init_state(enc)

    def step(self, tgt_ids_t, state, enc):
        logits, state, attn = self.decoder.step(tgt_ids_t, state, enc)
        # float32 out of a bf16/fp16 input in one pass, with no float32 copy of the logits
        return torch.log_softmax(logits, dim=-1, dtype=torch.float32), state, attn  # (B, V)

    def reorder_state(self, state, index):
        return self.decoder.reorder_state(state, index)

    def compact_state(self, state):
        compact = getattr(self.decoder, "compact_state", None)
        return state if compact is None else compact(state)

    def inspect_attention(self, src_ids, src_lens, tgt_in_ids) -> torch.Tensor:
        return self.decoder.inspect_attention(tgt_in_ids, self.encode(src_ids, src_lens))

    def shortlisted(self, tgt_ids: torch.Tensor, allowed: torch.Tensor | None = None):
        """This model scoring only the target ids `tgt_ids` (sorted, unique), each sentence only
        those of its own row of `allowed` (B, n): nmt.models.shortlisted.Shortlisted."""
        return Shortlisted(self, tgt_ids, allowed)


def build_model(
    model_cfg: ModelConfig,
    src_vocab_size: int,
    tgt_vocab_size: int,
    pad_id: int,
    joint_vocab: bool,
) -> EncoderDecoder:
    """The encoder and decoder `model_cfg` names, embeddings shared and output tied as it says."""
    enc_family = model_cfg.encoder or model_cfg.arch
    dec_family = model_cfg.decoder or model_cfg.arch
    for side in ("encoder", "decoder"):
        key = side if getattr(model_cfg, side) else "arch"
        family = getattr(model_cfg, key)
        if family not in FAMILIES:
            families = ", ".join(FAMILIES)
            raise ConfigError([f"model.{key}: expected one of {families}, found {family!r}"])
    encoder = FAMILIES[enc_family][0].from_config(model_cfg, src_vocab_size, pad_id)
    decoder = FAMILIES[dec_family][1].from_config(
        model_cfg, tgt_vocab_size, pad_id, encoder.out_dim
    )
    same_shape = encoder.embed.weight.shape == decoder.embed.weight.shape
    if model_cfg.share_embeddings and joint_vocab and same_shape:
        decoder.embed = encoder.embed
    if model_cfg.tie_embeddings:
        decoder.tie_output()
    return EncoderDecoder(encoder, decoder)


def build_model_for(model_cfg: ModelConfig, tokenizer) -> EncoderDecoder:
    """`build_model` for a `ModelConfig` and the tokenizer whose vocabularies it uses."""
    return build_model(
        model_cfg,
        tokenizer.src_vocab_size,
        tokenizer.tgt_vocab_size,
        tokenizer.pad_id,
        tokenizer.joint,
    )
