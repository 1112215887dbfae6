"""Decoding loops for both directions, written once against a `Stepper`.

A stepper encodes the source and then feeds one target token at a time:

    CachedStepper  the model's prefill / step over a preallocated KVCache (sparse patterns kept:
                   a step reads only the keys its layer pattern allows)
    FullStepper    re-runs the whole stream for every token (the reference the cache is tested
                   against; thanks to the masks, future placeholders cannot leak)

Text-to-image: `generate_image_tokens` (greedy, or temperature / top-k / top-p sampling, seeded,
`num_candidates` per text). Image-to-text: `generate_text_tokens` (greedy, sampling, beam search
with a length penalty). Text follows the [CLS] .. [SEP] convention of `models/transformer.py`.

Generative VQA (`generate_answer_tokens`, `beam_search_answer_tokens`) is image-to-text with a
prompt: the source is the image + `[CLS] question [SEP]` (one prefill; the question is
bidirectional), then answer tokens are decoded one by one up to [SEP]. Every question of one call
has the same length P (callers group questions by length; padding inside the question would be a
token the model never saw there in training).

Classifier-free guidance (`cfg_scale` s != 1, docs/guidance.md): `GuidedStepper` runs every
conditional row together with an unconditional one (the null text `[CLS] [SEP] [PAD]..` for
text-to-image, the null image for image-to-text; models/guidance.py) as ONE batch of 2B rows over
one stepper (one KV cache of batch 2B), and returns uncond + s * (cond - uncond), before any
temperature / top-k / top-p. s == 1 takes the plain path (no doubled batch).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional, Protocol, Sequence

import numpy as np
import paddle

from ernie_vilg.generation.filters import apply_temperature, log_softmax, sample, top_k_filter, top_p_filter
from ernie_vilg.models.guidance import null_image_ids, null_text_ids
from ernie_vilg.models.sparse_masks import Direction
from ernie_vilg.models.transformer import ErnieViLG


class Stepper(Protocol):
    def start(self, source_ids: np.ndarray, prompt_ids: Optional[np.ndarray] = None) -> np.ndarray:
        """Encode the source [B, S] (+ an image-to-text prompt [B, P]); logits of the first target
        token [B, V] (with a prompt: of the token after it)."""

    def step(self, token_ids: np.ndarray) -> np.ndarray:
        """Append one target token per row [B]; logits of the next one [B, V]."""

    def reorder(self, index: np.ndarray) -> None:
        """Keep rows `index` (beam search)."""


class CachedStepper:
    """`text_len`: text positions of the image-to-text stream (default max_text_len); for
    text-to-image the prompt's width decides."""

    def __init__(self, model: ErnieViLG, direction: Direction, text_len: Optional[int] = None) -> None:
        self.model, self.direction, self.text_len = model, Direction(direction), text_len
        self.cache = None

    @paddle.no_grad()
    def start(self, source_ids: np.ndarray, prompt_ids: Optional[np.ndarray] = None) -> np.ndarray:
        src = paddle.to_tensor(np.asarray(source_ids, dtype=np.int64))
        text_len = src.shape[1] if self.direction is Direction.TXT2IMG else self.text_len
        self.cache = self.model.new_cache(self.direction, src.shape[0], text_len)
        prompt = None if prompt_ids is None else paddle.to_tensor(np.asarray(prompt_ids, dtype=np.int64))
        return self.model.prefill(src, self.cache, prompt).astype("float32").numpy()

    @paddle.no_grad()
    def step(self, token_ids: np.ndarray) -> np.ndarray:
        tokens = paddle.to_tensor(np.asarray(token_ids, dtype=np.int64))
        return self.model.step(tokens, self.cache).astype("float32").numpy()

    def reorder(self, index: np.ndarray) -> None:
        self.cache.reorder(paddle.to_tensor(np.asarray(index, dtype=np.int64)))


class FullStepper:
    def __init__(self, model: ErnieViLG, direction: Direction, pad_id: int = 0, text_len: Optional[int] = None
                 ) -> None:
        self.model, self.direction, self.pad_id = model, Direction(direction), pad_id
        cfg = model.cfg
        self.text_len, self.num_image = text_len or cfg.max_text_len, cfg.image_grid ** 2

    def _run(self) -> np.ndarray:
        if self.direction is Direction.TXT2IMG:
            text, image = self.source, self.target
        else:
            text, image = self.target, self.source
        with paddle.no_grad():
            logits = self.model(paddle.to_tensor(text), paddle.to_tensor(image), self.direction, self.prefix)
        return logits.astype("float32").numpy()

    def start(self, source_ids: np.ndarray, prompt_ids: Optional[np.ndarray] = None) -> np.ndarray:
        self.source = np.asarray(source_ids, dtype=np.int64).reshape(len(source_ids), -1)
        B = self.source.shape[0]
        self.prefix = None
        if self.direction is Direction.TXT2IMG:  # placeholders for image tokens not generated yet
            self.target = np.zeros((B, self.num_image), dtype=np.int64)
        else:
            self.target = np.full((B, self.text_len), self.pad_id, dtype=np.int64)
        self.length = 0
        if prompt_ids is not None:  # VQA: the question is source text, the answer follows it
            prompt = np.asarray(prompt_ids, dtype=np.int64)
            if self.direction is Direction.TXT2IMG or prompt.shape[1] >= self.text_len:
                raise ValueError("a prompt needs the image-to-text direction and room for an answer")
            self.target[:, :prompt.shape[1]] = prompt
            self.length = prompt.shape[1]
            self.prefix = np.full(B, self.length, dtype=np.int64)
            return self._run()[:, self.length - 1]  # row j predicts text position j + 1
        if self.direction is Direction.TXT2IMG:
            return self._run()[:, 0]
        return np.zeros((B, self.model.cfg.text_vocab_size), dtype=np.float32)  # [CLS] is given

    def step(self, token_ids: np.ndarray) -> np.ndarray:
        self.target[:, self.length] = token_ids
        self.length += 1
        # txt2img logits row k predicts z_{k+1} (0-based: z_k); img2txt row j predicts text j + 1
        row = self.length if self.direction is Direction.TXT2IMG else self.length - 1
        return self._run()[:, row]

    def reorder(self, index: np.ndarray) -> None:
        self.source, self.target = self.source[index], self.target[index]
        if self.prefix is not None:
            self.prefix = self.prefix[index]


def make_stepper(model: ErnieViLG, direction: Direction, use_cache: bool, pad_id: int = 0,
                 text_len: Optional[int] = None) -> Stepper:
    if use_cache:
        return CachedStepper(model, direction, text_len)
    return FullStepper(model, direction, pad_id, text_len)


def guide_logits(cond: np.ndarray, uncond: np.ndarray, scale: float) -> np.ndarray:
    """Classifier-free guidance on logits: uncond + scale * (cond - uncond) (scale 1 = cond)."""
    return uncond + scale * (cond - uncond)


class GuidedStepper:
    """A stepper whose rows [0, B) are the conditional ones and [B, 2B) the unconditional twins
    (source `make_null(source)`), all in one `inner` stepper, so each forward pass and the KV
    cache serve both; the logits returned are the guided mix [B, V]. `last_cond` / `last_uncond`
    keep the two halves of the latest logits (for inspection and tests)."""

    def __init__(self, inner: Stepper, scale: float, make_null: Callable[[np.ndarray], np.ndarray]) -> None:
        self.inner, self.scale, self.make_null = inner, float(scale), make_null
        self.rows = 0
        self.last_cond: Optional[np.ndarray] = None
        self.last_uncond: Optional[np.ndarray] = None

    def _mix(self, logits: np.ndarray) -> np.ndarray:
        self.last_cond, self.last_uncond = logits[:self.rows], logits[self.rows:]
        return guide_logits(self.last_cond, self.last_uncond, self.scale)

    def start(self, source_ids: np.ndarray, prompt_ids: Optional[np.ndarray] = None) -> np.ndarray:
        source = np.asarray(source_ids, dtype=np.int64).reshape(len(source_ids), -1)
        self.rows = len(source)
        both = np.concatenate([source, self.make_null(source)])
        # a prompt (VQA question) stays in the unconditional row: only the image is nulled
        prompt = None if prompt_ids is None else np.concatenate([prompt_ids, prompt_ids])
        return self._mix(self.inner.start(both, prompt))

    def step(self, token_ids: np.ndarray) -> np.ndarray:
        tokens = np.asarray(token_ids, dtype=np.int64)
        return self._mix(self.inner.step(np.concatenate([tokens, tokens])))

    def reorder(self, index: np.ndarray) -> None:
        index = np.asarray(index, dtype=np.int64)
        self.inner.reorder(np.concatenate([index, index + self.rows]))  # the twins follow their rows


def guided(stepper: Stepper, cfg_scale: float, make_null: Callable[[np.ndarray], np.ndarray]) -> Stepper:
    """`stepper` itself when cfg_scale == 1 (plain decoding), else its GuidedStepper."""
    return stepper if cfg_scale == 1.0 else GuidedStepper(stepper, cfg_scale, make_null)


@dataclass(frozen=True)
class SamplingParams:
    """How a token is chosen from logits: greedy if `greedy`, else filtered sampling."""

    greedy: bool = True
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0

    def choose(self, logits: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        if self.greedy:
            return np.argmax(logits, axis=-1).astype(np.int64)
        filtered = top_p_filter(top_k_filter(apply_temperature(logits, self.temperature), self.top_k), self.top_p)
        return sample(filtered, rng)


def row_rngs(seeds: Sequence[int], num_candidates: int) -> list[np.random.Generator]:
    """One generator per row for per-text seeds: candidate k of text i draws from
    default_rng([seeds[i], k]), so a text's samples do not depend on the rest of its batch."""
    return [np.random.default_rng([int(s), k]) for s in seeds for k in range(num_candidates)]


def _choose(params: SamplingParams, logits: np.ndarray, rng: np.random.Generator | list[np.random.Generator]
            ) -> np.ndarray:
    if isinstance(rng, list):  # per-row generators: row b consumes only its own random numbers
        return np.concatenate([params.choose(logits[b:b + 1], r) for b, r in enumerate(rng)])
    return params.choose(logits, rng)


def generate_image_tokens(model: ErnieViLG, text_ids: np.ndarray, params: SamplingParams,
                          num_candidates: int = 1, seed: int | Sequence[int] = 0, use_cache: bool = True,
                          cfg_scale: float = 1.0, specials: Optional["TextSpecials"] = None,
                          prefix_ids: Optional[np.ndarray] = None) -> np.ndarray:
    """Image token grids for texts [B, L]: int64 [B * num_candidates, h, w], the candidates of
    text i in rows i * num_candidates ... (i + 1) * num_candidates - 1.

    `seed`: one int for the whole batch (one generator), or one seed per text (`row_rngs`: a
    text's images are then the same in any batch, e.g. split over ranks).
    `cfg_scale` != 1: classifier-free guidance against the null text (built from `specials`,
    required then), padded to the prompts' width.
    `prefix_ids` [B, m] (or [m] for all texts): image completion, the first m tokens in raster
    order are given (fed to the model as if sampled, never changed) and the rest is generated."""
    B = len(text_ids)
    text_ids = np.repeat(np.asarray(text_ids, dtype=np.int64), num_candidates, axis=0)  # [B*N, L]
    if isinstance(seed, (int, np.integer)):
        rng: np.random.Generator | list[np.random.Generator] = np.random.default_rng(int(seed))
    else:
        if len(seed) != B:
            raise ValueError(f"{len(seed)} seeds for {B} texts")
        rng = row_rngs(seed, num_candidates)
    grid, n = model.cfg.image_grid, model.cfg.image_grid ** 2
    prefix = np.zeros((len(text_ids), 0), dtype=np.int64)
    if prefix_ids is not None:
        prefix = np.asarray(prefix_ids, dtype=np.int64)
        prefix = np.broadcast_to(prefix, (B, prefix.shape[-1])) if prefix.ndim == 1 else prefix
        if len(prefix) != B or prefix.shape[1] > n:
            raise ValueError(f"prefix_ids {list(prefix.shape)}: need [{B}, m <= {n}] image tokens")
        prefix = np.repeat(prefix, num_candidates, axis=0)  # [B*N, m]
    stepper = make_stepper(model, Direction.TXT2IMG, use_cache)
    if cfg_scale != 1.0:
        if specials is None:
            raise ValueError("text-to-image guidance (cfg_scale != 1) needs the text specials for the null text")
        stepper = guided(stepper, cfg_scale, lambda src: null_text_ids(len(src), src.shape[1], specials.bos_id,
                                                                        specials.eos_id, specials.pad_id))
    logits = stepper.start(text_ids)
    out = np.zeros((len(text_ids), n), dtype=np.int64)
    for k in range(n):
        # a kept prefix token is fed exactly as a sampled one would be (same cache / stream
        # position), so completion needs no model change
        out[:, k] = prefix[:, k] if k < prefix.shape[1] else _choose(params, logits, rng)
        if k + 1 < n:  # the last token needs no forward pass
            logits = stepper.step(out[:, k])
    return out.reshape(len(text_ids), grid, grid)  # [B*N, n] -> [B*N, h, w]


@dataclass(frozen=True)
class TextSpecials:
    bos_id: int  # [CLS]
    eos_id: int  # [SEP]
    pad_id: int  # [PAD]


def _start_text(model: ErnieViLG, image_ids: np.ndarray, specials: TextSpecials, use_cache: bool,
                max_new_tokens: Optional[int], prompt_ids: Optional[np.ndarray], cfg_scale: float = 1.0
                ) -> tuple[Stepper, np.ndarray, int]:
    """Encode the image (+ prompt) -> (stepper, logits of the first generated token, max new tokens).

    Without a prompt the first generated token follows [CLS], which is fed as the first step.
    `cfg_scale` != 1: guided against the null image (a GuidedStepper).
    """
    B = len(image_ids)
    images = np.asarray(image_ids, dtype=np.int64).reshape(B, -1)
    make_null = lambda src: null_image_ids(len(src), src.shape[1])  # noqa: E731
    if prompt_ids is None:
        max_new = _max_new_tokens(model, max_new_tokens)
        # text positions: [CLS] + the tokens fed back + the last one (predicted, never fed)
        stepper = guided(make_stepper(model, Direction.IMG2TXT, use_cache, specials.pad_id, max_new + 1),
                         cfg_scale, make_null)
        stepper.start(images)
        return stepper, stepper.step(np.full(B, specials.bos_id, dtype=np.int64)), max_new
    prompt = np.asarray(prompt_ids, dtype=np.int64).reshape(B, -1)
    P = prompt.shape[1]
    max_new = _max_new_tokens(model, max_new_tokens, used=P)
    # text positions: the prompt + the answer tokens fed back + the last one (never fed)
    stepper = guided(make_stepper(model, Direction.IMG2TXT, use_cache, specials.pad_id, P + max_new),
                     cfg_scale, make_null)
    return stepper, stepper.start(images, prompt), max_new


def generate_text_tokens(model: ErnieViLG, image_ids: np.ndarray, specials: TextSpecials,
                         params: SamplingParams, max_new_tokens: Optional[int] = None, seed: int = 0,
                         use_cache: bool = True, prompt_ids: Optional[np.ndarray] = None, cfg_scale: float = 1.0
                         ) -> list[list[int]]:
    """Greedy or sampled captions for image grids [B, h, w]: token ids without [CLS] / [SEP].

    With `prompt_ids` [B, P] (`[CLS] question [SEP]`, one length P for the batch) the text
    continues the prompt: the generated answer, without the prompt and without [SEP].
    `cfg_scale` != 1: classifier-free guidance against the null image.
    """
    B = len(image_ids)
    rng = np.random.default_rng(seed)
    stepper, logits, max_new = _start_text(model, image_ids, specials, use_cache, max_new_tokens, prompt_ids,
                                           cfg_scale)
    seqs: list[list[int]] = [[] for _ in range(B)]
    done = np.zeros(B, dtype=bool)
    for t in range(max_new):
        tokens = params.choose(logits, rng)
        tokens = np.where(done, specials.pad_id, tokens)  # finished rows keep running on padding
        for b in np.flatnonzero(~done):
            if tokens[b] == specials.eos_id:
                done[b] = True
            else:
                seqs[b].append(int(tokens[b]))
        if done.all() or t + 1 == max_new:
            break
        logits = stepper.step(tokens)
    return seqs


def beam_search_text_tokens(model: ErnieViLG, image_ids: np.ndarray, specials: TextSpecials, beam_size: int,
                            length_penalty: float = 1.0, max_new_tokens: Optional[int] = None,
                            use_cache: bool = True, prompt_ids: Optional[np.ndarray] = None, cfg_scale: float = 1.0
                            ) -> list[list[int]]:
    """Beam search captions for image grids [B, h, w] (ids without [CLS] / [SEP]).

    A hypothesis' score is its summed log-probability / (length ** length_penalty), the length
    counting [SEP]. An image is finished once it holds `beam_size` ended hypotheses and no live
    beam scores better at the current length; unfinished beams are scored as they stand at the end.
    `prompt_ids` [B, P]: as in `generate_text_tokens` (VQA answers). `cfg_scale` != 1: the beams
    are scored by the log-softmax of the guided logits (null-image guidance).
    """
    K = beam_size
    B = len(image_ids)
    # rows b * K + k: beam k of image b
    images = np.repeat(np.asarray(image_ids, dtype=np.int64).reshape(B, -1), K, axis=0)
    prompt = None if prompt_ids is None else np.repeat(np.asarray(prompt_ids, dtype=np.int64).reshape(B, -1), K,
                                                       axis=0)
    stepper, logits, max_new = _start_text(model, images, specials, use_cache, max_new_tokens, prompt, cfg_scale)
    scores = np.full((B, K), -np.inf)
    scores[:, 0] = 0.0  # all beams start identical: expand only the first
    seqs: list[list[list[int]]] = [[[] for _ in range(K)] for _ in range(B)]
    finished: list[list[tuple[float, list[int]]]] = [[] for _ in range(B)]
    done = np.zeros(B, dtype=bool)
    norm = lambda total, length: total / (length ** length_penalty)  # noqa: E731
    for t in range(max_new):
        logp = log_softmax(logits).reshape(B, K, -1)  # [B, K, V]
        V = logp.shape[-1]
        cand = (scores[:, :, None] + logp).reshape(B, K * V)  # [B, K*V]
        top = np.argsort(-cand, axis=-1)[:, : 2 * K]
        src = np.arange(B * K).reshape(B, K).copy()
        new_tokens = np.full((B, K), specials.pad_id, dtype=np.int64)
        new_scores = np.full((B, K), -np.inf)
        new_seqs: list[list[list[int]]] = []
        for b in range(B):
            keep: list[list[int]] = []
            for rank, flat in enumerate(top[b]):
                if done[b] or len(keep) == K or not np.isfinite(cand[b, flat]):
                    break
                beam, token = divmod(int(flat), V)
                if token == specials.eos_id:
                    if rank < K:  # only ends that rank among the best K count
                        finished[b].append((norm(cand[b, flat], t + 1), seqs[b][beam]))
                    continue
                slot = len(keep)
                src[b, slot], new_tokens[b, slot], new_scores[b, slot] = b * K + beam, token, cand[b, flat]
                keep.append(seqs[b][beam] + [token])
            keep += [[] for _ in range(K - len(keep))]
            new_seqs.append(keep)
            if len(finished[b]) >= K:
                worst_kept = sorted(s for s, _ in finished[b])[-K]
                if not np.isfinite(new_scores[b]).any() or norm(new_scores[b].max(), t + 1) <= worst_kept:
                    done[b] = True
        if done.all():
            break
        stepper.reorder(src.reshape(-1))
        tokens, scores, seqs = new_tokens.reshape(-1), new_scores, new_seqs
        if t + 1 < max_new:  # the last step's logits would never be read
            logits = stepper.step(tokens)
    results = []
    for b in range(B):
        pool = list(finished[b])
        if not done[b]:  # out of length: live beams compete as they are
            pool += [(norm(scores[b, k], max(len(seqs[b][k]), 1)), seqs[b][k])
                     for k in range(K) if np.isfinite(scores[b, k])]
        results.append(max(pool, key=lambda x: x[0])[1] if pool else [])
    return results


def _max_new_tokens(model: ErnieViLG, requested: Optional[int], used: int = 1) -> int:
    """Text positions after the `used` given ones ([CLS], or a VQA prompt): at most
    max_text_len - used tokens (including [SEP])."""
    limit = model.cfg.max_text_len - used
    if limit < 1:
        raise ValueError(f"a prompt of {used} text ids leaves no room for an answer "
                         f"(Model.max_text_len={model.cfg.max_text_len})")
    return limit if requested is None or requested <= 0 else min(requested, limit)


def generate_answer_tokens(model: ErnieViLG, image_ids: np.ndarray, question_ids: np.ndarray,
                           specials: TextSpecials, params: SamplingParams = SamplingParams(),
                           max_new_tokens: Optional[int] = None, seed: int = 0, use_cache: bool = True
                           ) -> list[list[int]]:
    """Generative VQA: answers (ids without [SEP]) for images [B, h, w] and questions [B, P]
    (`[CLS] question [SEP]`, one length P)."""
    return generate_text_tokens(model, image_ids, specials, params, max_new_tokens, seed, use_cache,
                                prompt_ids=question_ids)


def beam_search_answer_tokens(model: ErnieViLG, image_ids: np.ndarray, question_ids: np.ndarray,
                              specials: TextSpecials, beam_size: int, length_penalty: float = 1.0,
                              max_new_tokens: Optional[int] = None, use_cache: bool = True) -> list[list[int]]:
    """Beam-search answers for images [B, h, w] and questions [B, P] (see `generate_answer_tokens`)."""
    return beam_search_text_tokens(model, image_ids, specials, beam_size, length_penalty, max_new_tokens,
                                   use_cache, prompt_ids=question_ids)
