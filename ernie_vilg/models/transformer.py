"""The shared bidirectional transformer of ERNIE-ViLG (paper sec. 3.1.2), top to bottom.

One stack of pre-LN blocks serves both directions:

    text-to-image  [t_1..t_L, z_1..z_n]  -> logits of z_1..z_n       (image head)
    image-to-text  [z_1..z_n, t_1..t_L]  -> logits of t_2..t_L       (text head)

Text convention: `[CLS] w_1 .. w_k [SEP] [PAD] ..` padded to a length L <= `max_text_len` (a batch
may pad to its longest text; pos_emb_txt has max_text_len rows). [CLS] is the
begin-of-text token and [SEP] the end; as a target, position j predicts token j + 1, so the
loss covers w_1 .. [SEP] and skips the padding (`losses.py`). In text-to-image the image tokens
are predicted from the last text position onwards (z_1 from position L - 1, which sees all text).

Embeddings: tok_emb_txt / tok_emb_img, pos_emb_txt (1-D over text positions), pos_emb_row /
pos_emb_col (image row and column), dir_emb (0 = text-to-image, 1 = image-to-text) added to every
token. The heads head_txt / head_img hold the input embedding Parameters themselves (tied).

Generative VQA (paper sec. 4.4) is image-to-text with a text prefix: text_ids = `[CLS] question
[SEP] answer [SEP] [PAD]..` and `text_prefix` [B] = the question's length with [CLS] and its
[SEP]; those positions are source (bidirectional, see `sparse_masks.py`), the answer is the
target. `text_prefix=None` is captioning, and all zeros gives the same result.

Models return logits only; the criterion is `losses.VilgCriterion`. `num_params` and
`flops_per_token` compute sizes from the config alone (no weights are allocated).
"""
from __future__ import annotations

import math
from typing import TYPE_CHECKING

import numpy as np
import paddle
import paddle.nn as nn
import paddle.nn.functional as F

from ernie_vilg.config import ModelConfig
from ernie_vilg.models.attention import SelfAttention
from ernie_vilg.models.chunked_ce import linear_cross_entropy
from ernie_vilg.models.fast_ops import Linear, add_bias
from ernie_vilg.models.guidance import NULL_IMAGE_ID
from ernie_vilg.models.sparse_masks import (
    Direction,
    LayerKind,
    PairedLayout,
    StreamLayout,
    layer_kinds,
    mean_visible_keys,
)
from ernie_vilg.models.recompute import POLICIES as RECOMPUTE_MODES, recompute_block

if TYPE_CHECKING:
    from ernie_vilg.models.kv_cache import KVCache

Tensor = paddle.Tensor
BOTH = "both"  # `ErnieViLG.forward` direction: both directions' logits from one pass


def check_model_config(cfg: ModelConfig) -> None:
    """Derived sizes must be filled in (0 = 'from the data') before a model is built."""
    for key in ("text_vocab_size", "image_vocab_size", "image_grid", "max_text_len"):
        if getattr(cfg, key) <= 0:
            raise ValueError(f"Model.{key} is {getattr(cfg, key)}: resolve it from the vocab / tokenizer "
                             f"first (or set it, e.g. -o Model.{key}=N)")
    if cfg.hidden_size % cfg.num_heads:
        raise ValueError(f"Model.hidden_size {cfg.hidden_size} is not divisible by Model.num_heads {cfg.num_heads}")
    layer_kinds(cfg.num_layers, cfg.attention_impl)  # validates attention_impl
    if cfg.ffn_act not in ("gelu", "geglu"):
        raise ValueError(f"Model.ffn_act {cfg.ffn_act!r} is not one of: gelu, geglu")


def stream_layout(cfg: ModelConfig, direction: Direction, text_len: int | None = None) -> StreamLayout:
    """The stream of one direction with `text_len` text positions (default: max_text_len)."""
    text_len = cfg.max_text_len if text_len is None else text_len
    if not 2 <= text_len <= cfg.max_text_len:
        raise ValueError(f"text length {text_len} is outside [2, Model.max_text_len={cfg.max_text_len}]")
    return StreamLayout(Direction(direction), text_len, cfg.image_grid, cfg.image_grid, cfg.conv_kernel,
                        cfg.image_sees_prefix)


class MLP(nn.Layer):
    def __init__(self, cfg: ModelConfig, proj_std: float) -> None:
        super().__init__()
        d, normal = cfg.hidden_size, nn.initializer.Normal(std=cfg.init_std)
        self.gated = cfg.ffn_act == "geglu"
        width = cfg.ffn_mult * d
        # GEGLU (Shazeer 2020): fc1 yields the value and the gate side by side, [.., 2 f]
        self.fc1 = Linear(d, 2 * width if self.gated else width, weight_attr=paddle.ParamAttr(initializer=normal))
        self.fc2 = Linear(width, d, weight_attr=paddle.ParamAttr(initializer=nn.initializer.Normal(std=proj_std)))
        self.approximate = cfg.gelu_approximate
        self.dropout = nn.Dropout(cfg.dropout)

    def forward(self, x: Tensor) -> Tensor:
        h = self.fc1(x)
        if self.gated:
            value, gate = paddle.chunk(h, 2, axis=-1)
            h = value * F.gelu(gate, approximate=self.approximate)
        else:
            h = F.gelu(h, approximate=self.approximate)
        return self.dropout(self.fc2(h))


class Block(nn.Layer):
    """Pre-LN transformer block: x + attn(ln(x)), then x + mlp(ln(x))."""

    def __init__(self, cfg: ModelConfig, kind: LayerKind) -> None:
        super().__init__()
        # GPT-2: residual projections scaled by 1/sqrt(2 * layers) so the residual stream stays O(1)
        proj_std = cfg.init_std / math.sqrt(2 * cfg.num_layers)
        self.ln1 = nn.LayerNorm(cfg.hidden_size, epsilon=cfg.layer_norm_eps)
        self.attn = SelfAttention(cfg.hidden_size, cfg.num_heads, kind, cfg.attention_impl, cfg.conv_kernel,
                                  cfg.mask_fill_value, cfg.dropout, cfg.init_std, proj_std)
        self.ln2 = nn.LayerNorm(cfg.hidden_size, epsilon=cfg.layer_norm_eps)
        self.mlp = MLP(cfg, proj_std)
        self.scale_attn = self.scale_mlp = None
        if cfg.layer_scale_init > 0:  # LayerScale (CaiT; DALLE-pytorch's default, 0.1 up to 18 layers)
            init = nn.initializer.Constant(cfg.layer_scale_init)
            self.scale_attn = self.create_parameter([cfg.hidden_size], default_initializer=init)
            self.scale_mlp = self.create_parameter([cfg.hidden_size], default_initializer=init)

    @staticmethod
    def _scaled(branch: Tensor, scale: Tensor | None) -> Tensor:
        return branch if scale is None else branch * scale

    def attention_residual(self, x: Tensor, layout: StreamLayout, cache=None,
                           text_prefix: np.ndarray | None = None) -> Tensor:
        return x + self._scaled(self.attn(self.ln1(x), layout, cache, text_prefix), self.scale_attn)

    def mlp_residual(self, x: Tensor) -> Tensor:
        return x + self._scaled(self.mlp(self.ln2(x)), self.scale_mlp)

    def forward(self, x: Tensor, layout: StreamLayout, cache=None, text_prefix: np.ndarray | None = None) -> Tensor:
        # the prefix is passed only when there is one: subclasses written for captioning
        # (attention_residual(x, layout, cache)) keep working
        extra = () if text_prefix is None else (text_prefix,)
        return self.mlp_residual(self.attention_residual(x, layout, cache, *extra))

    def step(self, x: Tensor, layout: StreamLayout, position: int, cache) -> Tensor:
        x = x + self._scaled(self.attn.step(self.ln1(x), layout, position, cache), self.scale_attn)
        return self.mlp_residual(x)


class TiedHead(nn.Layer):
    """Output projection that reuses an input embedding matrix [V, d]: logits = h W^T + b.

    With `untied_std` > 0 it owns a fresh [V, d] weight of that init std instead (Model.tie_heads false).
    """

    def __init__(self, weight: paddle.base.framework.Parameter, untied_std: float = 0.0) -> None:
        super().__init__()
        if untied_std > 0:
            weight = self.create_parameter(list(weight.shape),
                                           default_initializer=nn.initializer.Normal(std=untied_std))
        self.weight = weight  # tied: the embedding's Parameter itself, one tensor with two names
        self.bias = self.create_parameter([weight.shape[0]], is_bias=True)

    def forward(self, h: Tensor, targets: Tensor | None = None, chunk_tokens: int = 0) -> Tensor:
        """Logits [.., V]; with `targets` [..] the per-token NLL [..] instead, from the chunked
        linear + cross-entropy (`chunked_ce.py`) that never holds all logits at once."""
        if targets is not None:
            return linear_cross_entropy(h, self.weight, self.bias, targets, chunk_tokens)
        return add_bias(paddle.matmul(h, self.weight, transpose_y=True), self.bias)


class ErnieViLG(nn.Layer):
    """The shared bidirectional generator. `forward` returns the target logits of one direction."""

    def __init__(self, cfg: ModelConfig, recompute: str = "none", recompute_every_k: int = 1) -> None:
        super().__init__()
        check_model_config(cfg)
        if recompute not in RECOMPUTE_MODES:
            raise ValueError(f"recompute {recompute!r} is not supported by the model "
                             f"(known: {', '.join(RECOMPUTE_MODES)})")
        self.cfg = cfg
        self.recompute, self.recompute_every_k = recompute, max(1, recompute_every_k)
        d = cfg.hidden_size
        emb_std = cfg.emb_init_std or cfg.init_std
        emb_attr = lambda: paddle.ParamAttr(initializer=nn.initializer.Normal(std=emb_std))  # noqa: E731
        self.tok_emb_txt = nn.Embedding(cfg.text_vocab_size, d, weight_attr=emb_attr())
        self.tok_emb_img = nn.Embedding(cfg.image_vocab_size, d, weight_attr=emb_attr())
        self.pos_emb_txt = nn.Embedding(cfg.max_text_len, d, weight_attr=emb_attr())
        self.pos_emb_row = nn.Embedding(cfg.image_grid, d, weight_attr=emb_attr())
        self.pos_emb_col = nn.Embedding(cfg.image_grid, d, weight_attr=emb_attr())
        self.dir_emb = nn.Embedding(2, d, weight_attr=emb_attr())
        self.drop = nn.Dropout(cfg.dropout)
        self.kinds = layer_kinds(cfg.num_layers, cfg.attention_impl)
        self.blocks = nn.LayerList([Block(cfg, kind) for kind in self.kinds])
        self.ln_f = nn.LayerNorm(d, epsilon=cfg.layer_norm_eps)
        untied_std = 0.0 if cfg.tie_heads else cfg.init_std
        self.head_txt = TiedHead(self.tok_emb_txt.weight, untied_std)
        self.head_img = TiedHead(self.tok_emb_img.weight, untied_std)
        # classifier-free guidance (models/guidance.py): the embedding of NULL_IMAGE_ID, a row
        # outside tok_emb_img so the tied head can never predict it. Created last and zero-init
        # (no RNG draw), so every other parameter initialises exactly as before it existed.
        self.null_img_emb = self.create_parameter([d], default_initializer=nn.initializer.Constant(0.0))
        # keys a checkpoint may lack (written before they existed): loaders keep their init, with a warning
        self.optional_state_keys = ("null_img_emb",)

    # ---------------------------------------------------------------- embeddings
    def layout(self, direction: Direction, text_len: int | None = None) -> StreamLayout:
        return stream_layout(self.cfg, direction, text_len)

    def _embed_text(self, text_ids: Tensor, start: int) -> Tensor:
        """text_ids [B, t] at text positions [start, start + t) -> [B, t, d]."""
        pos = paddle.arange(start, start + text_ids.shape[1])
        return self.tok_emb_txt(text_ids) + self.pos_emb_txt(pos)

    def _embed_image(self, image_ids: Tensor, start: int) -> Tensor:
        """image_ids [B, t] at raster positions [start, start + t) -> [B, t, d]."""
        raster = paddle.arange(start, start + image_ids.shape[1])
        rows, cols = raster // self.cfg.image_grid, raster % self.cfg.image_grid
        # NULL_IMAGE_ID (-1) takes null_img_emb; always through `where` (no data-dependent branch),
        # so null_img_emb is in every graph (DataParallel needs each parameter used) and static export works
        null = (image_ids == NULL_IMAGE_ID).unsqueeze(-1)  # [B, t, 1]
        tok = self.tok_emb_img(paddle.clip(image_ids, min=0))
        tok = paddle.where(null.expand_as(tok), self.null_img_emb.expand_as(tok), tok)
        return tok + self.pos_emb_row(rows) + self.pos_emb_col(cols)

    def _direction(self, x: Tensor, layout: StreamLayout) -> Tensor:
        return self.drop(add_bias(x, self.dir_emb.weight[layout.direction.index]))

    def _source_embeddings(self, source_ids: Tensor, layout: StreamLayout) -> Tensor:
        if layout.direction is Direction.TXT2IMG:
            return self._embed_text(source_ids, 0)
        return self._embed_image(source_ids, 0)

    # ---------------------------------------------------------------- the block stack
    def _run_blocks(self, x: Tensor, layout: StreamLayout, cache: KVCache | None,
                    text_prefix: np.ndarray | None = None) -> Tensor:
        """The only place that decides about recompute."""
        for i, block in enumerate(self.blocks):
            if cache is None and self.training and self.recompute != "none":
                x = recompute_block(block, self.recompute, i, x, layout, None, text_prefix,
                                    every_k=self.recompute_every_k)
            else:
                x = block(x, layout, cache.layers[i] if cache is not None else None, text_prefix)
        return self.ln_f(x)

    @staticmethod
    def _check_prefix(text_prefix: Tensor | np.ndarray | None, direction: Direction, batch: int,
                      text_len: int) -> np.ndarray | None:
        """The per-sample text prefix as host int64 [B] (None stays None)."""
        if text_prefix is None:
            return None
        if direction is not Direction.IMG2TXT:
            raise ValueError("a text prefix (VQA question) exists only in the image-to-text direction")
        prefix = np.asarray(text_prefix.numpy() if isinstance(text_prefix, paddle.Tensor) else text_prefix,
                            dtype=np.int64).reshape(-1)
        if prefix.shape[0] != batch or prefix.min() < 0 or prefix.max() > text_len:
            raise ValueError(f"text_prefix must hold {batch} lengths in [0, {text_len}], got {prefix.tolist()}")
        return prefix

    def hidden_states(self, text_ids: Tensor, image_ids: Tensor, direction: Direction,
                      text_prefix: Tensor | np.ndarray | None = None) -> Tensor:
        """Last-layer hidden states [B, L + n, d] of the whole stream, in stream order."""
        layout = self.layout(direction, text_ids.shape[1])
        prefix = self._check_prefix(text_prefix, layout.direction, text_ids.shape[0], text_ids.shape[1])
        n = layout.num_image
        image_ids = image_ids.reshape([image_ids.shape[0], -1])  # [B, h, w] -> [B, n]
        if image_ids.shape[1] != n or text_ids.shape[0] != image_ids.shape[0]:
            raise ValueError(f"expected text [B, L <= {self.cfg.max_text_len}] and image [B, {n}] ids, got "
                             f"{list(text_ids.shape)} and {list(image_ids.shape)}")
        txt, img = self._embed_text(text_ids, 0), self._embed_image(image_ids, 0)
        parts = [txt, img] if layout.direction is Direction.TXT2IMG else [img, txt]
        x = self._direction(paddle.concat(parts, axis=1), layout)  # [B, L + n, d]
        return self._run_blocks(x, layout, None, prefix)

    def forward(self, text_ids: Tensor, image_ids: Tensor, direction: Direction | str,
                text_prefix: Tensor | np.ndarray | None = None, t2i_text_ids: Tensor | None = None,
                i2t_image_ids: Tensor | None = None, head_targets: tuple[Tensor, Tensor] | None = None,
                chunk_tokens: int = 0) -> Tensor | tuple[Tensor, Tensor]:
        """Target logits of one direction, aligned with the targets.

        direction BOTH ("both") returns both directions' logits from one pass (`forward_both`,
        with its `t2i_text_ids` / `i2t_image_ids`); through `__call__`, so distributed wrappers
        (DataParallel, sharding) see the forward they hook into.

        text_ids [B, L] int64 ([CLS] .. [SEP] [PAD]..; L <= max_text_len), image_ids [B, h, w] or
        [B, n] int64.
        text-to-image -> [B, n, V_img] (row k predicts z_k); image-to-text -> [B, L - 1, V_txt]
        (row j predicts text_ids[:, j + 1]).
        text_prefix: int [B] or None, image-to-text only: the first text_prefix[b] text positions of
        sample b are source (VQA question); rows j >= text_prefix[b] - 1 predict its answer.
        head_targets (direction BOTH only): (image targets [B, n], text targets [B, L - 1]) -> the
        per-token NLLs of both directions instead of logits, `chunk_tokens` rows of logits at a time.
        """
        if direction == BOTH:
            if text_prefix is not None:
                raise ValueError("a text prefix (VQA question) needs the image-to-text direction alone")
            return self.forward_both(text_ids, image_ids, t2i_text_ids, i2t_image_ids, head_targets, chunk_tokens)
        if head_targets is not None:
            raise ValueError("head_targets (the chunked loss) is an input of direction 'both'")
        if t2i_text_ids is not None or i2t_image_ids is not None:
            raise ValueError("t2i_text_ids / i2t_image_ids are inputs of direction 'both'")
        direction = Direction(direction)
        h = self.hidden_states(text_ids, image_ids, direction, text_prefix)
        L, n = text_ids.shape[1], self.cfg.image_grid ** 2
        if direction is Direction.TXT2IMG:
            # positions L-1 .. L+n-2 predict z_1 .. z_n
            _, h_pred, _ = paddle.split(h, [L - 1, n, 1], axis=1)
            return self.head_img(h_pred)
        # text positions 0 .. L-2 predict text 1 .. L-1
        _, h_pred, _ = paddle.split(h, [n, L - 1, 1], axis=1)
        return self.head_txt(h_pred)

    def forward_both(self, text_ids: Tensor, image_ids: Tensor, t2i_text_ids: Tensor | None = None,
                     i2t_image_ids: Tensor | None = None, head_targets: tuple[Tensor, Tensor] | None = None,
                     chunk_tokens: int = 0) -> tuple[Tensor, Tensor]:
        """Target logits of both directions in one pass: (image logits [B, n, V_img], text logits
        [B, L - 1, V_txt]), equal to `forward` of each direction.

        The text-to-image stream reads `t2i_text_ids` (default `text_ids`) and the image-to-text
        stream `i2t_image_ids` (default `image_ids`), e.g. the null conditions of guidance
        training. The two streams have one length, so they run as one batch of 2B rows
        (`PairedLayout`): every projection, LayerNorm and MLP is one kernel over both directions
        instead of two, which on CPU is most of the step (docs/benchmarks.md, "Training step").
        """
        t2i_text = text_ids if t2i_text_ids is None else t2i_text_ids
        i2t_image = image_ids if i2t_image_ids is None else i2t_image_ids
        B, L = text_ids.shape
        n = self.cfg.image_grid ** 2
        image_ids, i2t_image = (ids.reshape([B, -1]) for ids in (image_ids, i2t_image))  # [B, n]
        if image_ids.shape[1] != n or i2t_image.shape[1] != n or list(t2i_text.shape) != [B, L]:
            raise ValueError(f"expected text [B, L <= {self.cfg.max_text_len}] and image [B, {n}] ids, got "
                             f"{list(text_ids.shape)}, {list(t2i_text.shape)}, {list(image_ids.shape)} and "
                             f"{list(i2t_image.shape)}")
        layout = PairedLayout(self.layout(Direction.TXT2IMG, L), self.layout(Direction.IMG2TXT, L))
        t2i = self._direction(paddle.concat([self._embed_text(t2i_text, 0), self._embed_image(image_ids, 0)], axis=1),
                              layout.txt2img)
        i2t = self._direction(paddle.concat([self._embed_image(i2t_image, 0), self._embed_text(text_ids, 0)], axis=1),
                              layout.img2txt)
        h = self._run_blocks(paddle.concat([t2i, i2t], axis=0), layout, None)  # [2B, L + n, d]
        h_t2i, h_i2t = paddle.split(h, 2, axis=0)
        _, img_pred, _ = paddle.split(h_t2i, [L - 1, n, 1], axis=1)  # positions L-1 .. L+n-2 predict z_1 .. z_n
        _, txt_pred, _ = paddle.split(h_i2t, [n, L - 1, 1], axis=1)  # text positions 0 .. L-2 predict 1 .. L-1
        if head_targets is not None:  # per-token NLLs [B, n], [B, L - 1] (Train.loss_chunk_tokens)
            image_targets, text_targets = head_targets
            return (self.head_img(img_pred, image_targets.reshape([B, n]), chunk_tokens),
                    self.head_txt(txt_pred, text_targets, chunk_tokens))
        return self.head_img(img_pred), self.head_txt(txt_pred)

    # ---------------------------------------------------------------- incremental decoding
    def prefill(self, source_ids: Tensor, cache: KVCache, prompt_ids: Tensor | None = None) -> Tensor:
        """Encode the source (text [B, L], or image [B, n] / [B, h, w]) into an empty cache.

        Returns the logits of the first target token [B, V_target] (the first image token; for
        image-to-text the [CLS] prediction, which callers ignore: they feed [CLS] via `step`).
        `prompt_ids` [B, P] (image-to-text only, VQA): the text prefix `[CLS] question [SEP]`,
        encoded with the image as source (bidirectional); the logits returned are then those of
        the first answer token.
        """
        layout = cache.layout
        if cache.length != 0:
            raise ValueError("prefill needs an empty cache")
        source_ids = source_ids.reshape([source_ids.shape[0], -1])
        if source_ids.shape[1] != layout.source_len:
            raise ValueError(f"expected {layout.source_len} source ids, got {source_ids.shape[1]}")
        x = self._direction(self._source_embeddings(source_ids, layout), layout)
        prefix = None
        if prompt_ids is not None:
            B, P = prompt_ids.shape
            if layout.direction is not Direction.IMG2TXT or P < 1 or P >= layout.text_len:
                raise ValueError(f"a prompt of {P} text ids needs an image-to-text cache with more "
                                 f"than {P} text positions (has {layout.text_len})")
            x = paddle.concat([x, self._direction(self._embed_text(prompt_ids, 0), layout)], axis=1)
            prefix = np.full(B, P, dtype=np.int64)  # [B, n + P]: image + question, all source
        h = self._run_blocks(x, layout, cache, prefix)
        cache.length = x.shape[1]
        return self._head(h[:, -1], layout)

    def step(self, token_ids: Tensor, cache: KVCache) -> Tensor:
        """Feed one target token [B] at the cache's next position; logits of the next one [B, V]."""
        layout, position = cache.layout, cache.length
        if position < layout.source_len or position >= layout.total:
            raise ValueError(f"cache position {position} is outside the target segment")
        offset = position - layout.source_len  # index within the target segment
        tokens = token_ids.reshape([-1, 1])  # [B] -> [B, 1]
        if layout.direction is Direction.TXT2IMG:
            x = self._embed_image(tokens, offset)
        else:
            x = self._embed_text(tokens, offset)
        x = self._direction(x, layout)
        for block, layer_cache in zip(self.blocks, cache.layers):
            x = block.step(x, layout, position, layer_cache)
        cache.length = position + 1
        return self._head(self.ln_f(x)[:, 0], layout)

    def _head(self, h: Tensor, layout: StreamLayout) -> Tensor:
        return self.head_img(h) if layout.direction is Direction.TXT2IMG else self.head_txt(h)

    def new_cache(self, direction: Direction | str, batch_size: int, text_len: int | None = None) -> KVCache:
        """An empty cache for a stream with `text_len` text positions (default: max_text_len)."""
        from ernie_vilg.models.kv_cache import KVCache

        return KVCache.allocate(self.layout(Direction(direction), text_len), len(self.blocks), batch_size,
                                self.cfg.num_heads, self.cfg.hidden_size // self.cfg.num_heads,
                                self.tok_emb_txt.weight.dtype)


# --------------------------------------------------------------------------------------------
# Introspection from the config alone (no weights): identical numbers for trainer and benchmarks
# --------------------------------------------------------------------------------------------
def num_params(cfg: ModelConfig, include_embeddings: bool = True) -> int:
    """Exact parameter count of `ErnieViLG(cfg)` (tied heads counted once)."""
    d, f = cfg.hidden_size, cfg.ffn_mult * cfg.hidden_size
    f_in = 2 * f if cfg.ffn_act == "geglu" else f  # fc1's output width
    per_layer = (2 * d) + (3 * d * d + 3 * d) + (d * d + d) + (2 * d) + (d * f_in + f_in) + (f * d + d)
    if cfg.layer_scale_init > 0:
        per_layer += 2 * d
    total = cfg.num_layers * per_layer + 2 * d  # + ln_f
    if include_embeddings:
        heads = 1 if cfg.tie_heads else 2  # tied: the token embeddings are the head weights
        total += heads * (cfg.text_vocab_size + cfg.image_vocab_size) * d
        total += (cfg.max_text_len + 2 * cfg.image_grid + 2) * d  # text / row / column / direction
        total += d  # null_img_emb (classifier-free guidance)
        total += cfg.text_vocab_size + cfg.image_vocab_size  # head biases
    return total


def flops_per_token(cfg: ModelConfig) -> float:
    """Training FLOPs (forward + backward) per stream token, averaged over both directions.

    PaLM appendix B: 6 N for the matmuls (N = weights used as matmul operands: the blocks, and the
    output head for the tokens that are predicted), plus 12 * d * (keys attended) per layer for the
    attention scores and weighted sums, the keys of each token taken from its layer's pattern
    (sparse layers attend to far fewer keys than dense ones).
    """
    d, f = cfg.hidden_size, cfg.ffn_mult * cfg.hidden_size
    layouts = [stream_layout(cfg, direction) for direction in Direction]
    tokens = sum(layout.total for layout in layouts)  # stream tokens of one text-image pair
    ffn = 3 * d * f if cfg.ffn_act == "geglu" else 2 * d * f
    blocks = cfg.num_layers * (4 * d * d + ffn) * tokens
    # text-to-image predicts n image tokens, image-to-text L - 1 text tokens
    heads = (cfg.image_vocab_size * layouts[0].num_image + cfg.text_vocab_size * (cfg.max_text_len - 1)) * d
    attn = sum(d * mean_visible_keys(layout, kind) * layout.total
               for layout in layouts for kind in layer_kinds(cfg.num_layers, cfg.attention_impl))
    return (6 * (blocks + heads) + 12 * attn) / tokens


def count_model_params(model: nn.Layer) -> int:
    """Parameters of an allocated model (shared Parameters once)."""
    return int(sum(int(np.prod(p.shape)) for p in model.parameters()))


def size_report(cfg: ModelConfig) -> dict[str, float]:
    """Parameter count (total, embeddings, transformer blocks) and training FLOPs per token."""
    check_model_config(cfg)
    total, body = num_params(cfg), num_params(cfg, include_embeddings=False)
    return {"params": total, "params_blocks": body, "params_embeddings": total - body,
            "flops_per_token": flops_per_token(cfg), "layers": cfg.num_layers, "hidden": cfg.hidden_size,
            "heads": cfg.num_heads, "image_tokens": cfg.image_grid ** 2, "max_text_len": cfg.max_text_len}
