"""The miniature model's text side: a word-level tokenizer and a small learned transformer text encoder in one module.

The vocabulary is part of the model config, so ``MiniTextEncoder.from_pretrained`` restores the tokenizer with the
weights. Token 0 is padding, 1 is a start token that every sequence begins with (its output is the pooled embedding, and
the empty caption, the CFG negative, is the start token alone), 2 stands for words outside the vocabulary.
"""

from __future__ import annotations

import logging

import torch
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.modeling_utils import ModelMixin
from torch import nn

logger = logging.getLogger(__name__)

PAD, START, UNKNOWN = 0, 1, 2
SPECIAL = ("<pad>", "<start>", "<unk>")


class MiniTextEncoder(ModelMixin, ConfigMixin):
    """Word-level tokenizer + transformer encoder: captions -> (token embeddings [B, L, dim], pooled [B, pooled_dim]).

    Args:
        vocab: the words it knows (token ids follow the special tokens in this order).
        max_length: tokens per caption, start token included (longer captions are cut, with a warning).
        width, num_layers, num_heads: the encoder's size.
        pooled_dim: size of the pooled embedding (the transformer's ``pooled_projection_dim``).

    Example:
        >>> enc = MiniTextEncoder(vocab=["a", "red", "circle"])
        >>> ids = enc.tokenize(["a red circle", ""])
        >>> tokens, pooled = enc(ids)
        >>> tuple(tokens.shape), tuple(pooled.shape)
        ((2, 32, 128), (2, 128))
    """

    @register_to_config
    def __init__(self, vocab: list[str], max_length: int = 32, width: int = 128, num_layers: int = 2,
                 num_heads: int = 4, pooled_dim: int = 128):
        super().__init__()
        if len(set(vocab)) != len(vocab) or set(vocab) & set(SPECIAL):
            raise ValueError("vocab must hold distinct words and none of the special tokens " + ", ".join(SPECIAL))
        self.word_ids = {w: i + len(SPECIAL) for i, w in enumerate(vocab)}
        # words and positions start at the same scale: with nn.Embedding's N(0, 1) the positions would be 50x
        # smaller, the encoder close to a bag of words, and "red ... top left and blue ... bottom" would not say which
        # colour goes where (the first trained model drew the right colours at the right places, but swapped)
        self.embed = nn.Embedding(len(SPECIAL) + len(vocab), width)
        nn.init.normal_(self.embed.weight, std=0.02)
        self.position = nn.Parameter(torch.randn(max_length, width) * 0.02)
        layer = nn.TransformerEncoderLayer(width, num_heads, dim_feedforward=4 * width, dropout=0.0,
                                           activation="gelu", batch_first=True, norm_first=True)
        self.encoder = nn.TransformerEncoder(layer, num_layers, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(width)
        self.pooled = nn.Linear(width, pooled_dim)

    def tokenize(self, captions: list[str]) -> torch.Tensor:
        """Token ids [len(captions), max_length] (lowercased, split on spaces); unknown words warn once per call."""
        if isinstance(captions, str):
            captions = [captions]
        length = self.config.max_length
        ids = torch.full((len(captions), length), PAD, dtype=torch.long)
        unknown, cut = set(), 0
        for row, caption in enumerate(captions):
            words = caption.lower().replace(",", " ").replace(".", " ").split()
            if len(words) > length - 1:
                cut += 1
                words = words[: length - 1]
            unknown.update(w for w in words if w not in self.word_ids)
            ids[row, 0] = START
            ids[row, 1: len(words) + 1] = torch.tensor([self.word_ids.get(w, UNKNOWN) for w in words],
                                                       dtype=torch.long)
        if unknown:
            logger.warning("mini text encoder: words outside its vocabulary are read as <unk>: %s "
                           "(it knows only the shapes grammar; see ditfa_optimum.mini.grammar)", sorted(unknown))
        if cut:
            logger.warning("mini text encoder: %d caption(s) longer than %d words were cut", cut, length - 1)
        return ids.to(self.embed.weight.device)

    def forward(self, input_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = self.embed(input_ids) + self.position[: input_ids.shape[1]]
        x = self.norm(self.encoder(x, src_key_padding_mask=input_ids == PAD))
        return x, self.pooled(x[:, 0])

    def encode(self, captions: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """``forward(tokenize(captions))``."""
        return self(self.tokenize(captions))
