"""Caption decoding (docs/method.md §7b): the CLIP text tower feeding the fusion encoder under the prefix mask, the tied
token head predicting the next word.

Three decoders over the same model:
* `greedy_decode_reencode`: the original's procedure, which re-encodes the whole prefix at every step (the
  reference the others are tested against);
* `greedy_decode`: the same tokens with cached key/value states. Under the prefix mask the visual rows never see
  text and text rows are causal, so a text position's state depends only on the video and the tokens up to it:
  the visual rows are encoded once and every step adds one row to the text tower and one to the fusion encoder;
* `beam_search`: batched over videos, `beam_size` hypotheses each, ranked by summed log-probability divided by
  `length ** length_penalty` (0: the plain model score).

Every decoder returns token lists without SOT and cut before the first EOT, and the model score of each (the
summed log-probability of the generated tokens, EOT included when it was generated).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from modules.tokenization import EOT_ID, SOT_ID


@dataclass
class Decoded:
    tokens: list[list[int]]  # per video, without SOT and EOT
    scores: list[float]  # summed log-probability of the generated tokens (EOT included when generated)


def _cut(sequence: list[int], eot: int) -> list[int]:
    return sequence[: sequence.index(eot)] if eot in sequence else sequence


# ------------------------------------------------------------------------------------------ reference decoder


@torch.no_grad()
def greedy_decode_reencode(
    model: nn.Module, frames: torch.Tensor, video_mask: torch.Tensor, tubes: torch.Tensor, *, max_steps: int,
    sot: int = SOT_ID, eot: int = EOT_ID,
) -> Decoded:
    """The original's greedy decoding: `max_steps` steps, each re-encoding the prefix with the text tower and the
    fusion encoder (prefix mask) and appending the arg-max of the last position; cut at the first EOT."""
    batch = frames.shape[0]
    ids = torch.full((batch, 1), sot, dtype=torch.long, device=frames.device)
    scores = torch.zeros(batch, device=frames.device)
    done = torch.zeros(batch, dtype=torch.bool, device=frames.device)
    for _ in range(max_steps):
        mask = torch.ones_like(ids)
        _, text = model.encode_text(ids, mask)
        states = model.fuse(frames, video_mask, tubes, text, mask, causal_text=True)
        log_probs = F.log_softmax(model.token_logits(states[:, -1]), dim=-1)
        best = log_probs.argmax(dim=-1)
        scores += torch.where(done, 0.0, log_probs.gather(1, best[:, None]).squeeze(1))
        done |= best == eot
        ids = torch.cat([ids, best[:, None]], dim=1)
    return Decoded([_cut(row[1:], eot) for row in ids.tolist()], scores.tolist())


# ------------------------------------------------------------------------------------------ cached decoding


def _attend_with_cache(
    block: nn.Module, x: torch.Tensor, past: tuple[torch.Tensor, torch.Tensor] | None,
    key_valid: torch.Tensor | None,
) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
    """One pre-LN residual block on new rows `x` [N, n, W] attending to the cached keys/values plus their own.

    `key_valid` [N, n_keys] (bool) masks keys; None lets every key be seen. The new rows see each other fully, so a
    call with several rows is only used where that is the model's mask (the visual rows, which only see each
    other) or with one row (a text step, causal by construction). Returns the output rows and the extended cache.
    """
    attention = block.attn
    batch, length, width = x.shape
    heads = attention.heads
    qkv = F.linear(block.ln_1(x), attention.in_proj_weight, attention.in_proj_bias)
    q, k, v = qkv.view(batch, length, 3, heads, width // heads).permute(2, 0, 3, 1, 4)
    if past is not None:
        k, v = torch.cat([past[0], k], dim=2), torch.cat([past[1], v], dim=2)
    mask = None if key_valid is None else key_valid[:, None, None, :]
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    x = x + attention.out_proj(out.transpose(1, 2).reshape(batch, length, width))
    return x + block.mlp(block.ln_2(x)), (k, v)


class CachedCaptionState:
    """Key/value caches of the text tower and the fusion encoder for a batch of partial captions.

    Built from the encoded videos (their visual rows are run through the fusion blocks once); `step(ids)` feeds
    one token per row and returns the next-token log-probabilities; `reorder(rows)` follows beam selection.
    """

    def __init__(self, model: nn.Module, frames: torch.Tensor, video_mask: torch.Tensor, tubes: torch.Tensor) -> None:
        from modules.fusion import fusion_inputs  # the same layout and key validity as T2VLP.fuse

        self.model = model
        clip = model.clip
        self.fusion_blocks = list(clip.fusion_transformer.resblocks[: model.config.fusion_layers])
        self.text_blocks = list(clip.transformer.resblocks)
        empty_text = frames.new_zeros(frames.shape[0], 0, frames.shape[-1])
        empty_mask = video_mask.new_zeros(frames.shape[0], 0)
        visual, visual_valid = fusion_inputs(frames, video_mask, tubes, empty_text, empty_mask, answer_slot=False)
        self.visual_length = visual.shape[1]
        self.visual_valid = visual_valid
        x = visual + clip.fusion_positional_embedding[: self.visual_length].to(visual.dtype)
        self.fusion_cache = []
        for block in self.fusion_blocks:
            x, cache = _attend_with_cache(block, x, None, visual_valid)
            self.fusion_cache.append(cache)
        self.text_cache: list[tuple[torch.Tensor, torch.Tensor] | None] = [None] * len(self.text_blocks)
        self.length = 0  # text tokens fed so far

    def step(self, ids: torch.Tensor) -> torch.Tensor:
        """Feed token `ids` [N] at the next text position; returns log-probabilities [N, vocab] of the token after."""
        clip = self.model.clip
        position = self.length
        if self.visual_length + position >= clip.fusion_positional_embedding.shape[0]:
            raise ValueError("the caption is longer than the fusion encoder's positional table allows")
        x = clip.token_embedding(ids[:, None]) + clip.positional_embedding[position].to(clip.token_embedding.weight.dtype)
        for layer, block in enumerate(self.text_blocks):
            x, self.text_cache[layer] = _attend_with_cache(block, x, self.text_cache[layer], None)
        text_state = (clip.ln_final(x) @ clip.text_projection).float()
        h = text_state + clip.fusion_positional_embedding[self.visual_length + position].float()
        key_valid = torch.cat([self.visual_valid, self.visual_valid.new_ones(ids.shape[0], position + 1)], dim=1)
        for layer, block in enumerate(self.fusion_blocks):
            h, self.fusion_cache[layer] = _attend_with_cache(block, h, self.fusion_cache[layer], key_valid)
        self.length += 1
        return F.log_softmax(self.model.token_logits(h[:, 0].float()), dim=-1)

    def reorder(self, rows: torch.Tensor) -> None:
        """Keep/duplicate the rows `rows` (indices into the current batch) in every cache."""
        self.visual_valid = self.visual_valid.index_select(0, rows)
        self.fusion_cache = [(k.index_select(0, rows), v.index_select(0, rows)) for k, v in self.fusion_cache]
        self.text_cache = [None if c is None else (c[0].index_select(0, rows), c[1].index_select(0, rows))
                           for c in self.text_cache]


@torch.no_grad()
def greedy_decode(
    model: nn.Module, frames: torch.Tensor, video_mask: torch.Tensor, tubes: torch.Tensor, *, max_steps: int,
    sot: int = SOT_ID, eot: int = EOT_ID,
) -> Decoded:
    """Greedy decoding with cached states: the tokens of `greedy_decode_reencode`, stopping once every caption has
    produced EOT (later tokens cannot change earlier ones under the causal mask)."""
    batch = frames.shape[0]
    state = CachedCaptionState(model, frames, video_mask, tubes)
    current = torch.full((batch,), sot, dtype=torch.long, device=frames.device)
    scores = torch.zeros(batch, device=frames.device)
    done = torch.zeros(batch, dtype=torch.bool, device=frames.device)
    generated = []
    for _ in range(max_steps):
        log_probs = state.step(current)
        current = log_probs.argmax(dim=-1)
        scores += torch.where(done, 0.0, log_probs.gather(1, current[:, None]).squeeze(1))
        done |= current == eot
        generated.append(current)
        if bool(done.all()):
            break
    rows = torch.stack(generated, dim=1).tolist() if generated else [[] for _ in range(batch)]
    return Decoded([_cut(row, eot) for row in rows], scores.tolist())


class Hypothesis(NamedTuple):
    """A beam-search hypothesis: the beam it extends, its last token, its summed log-probability, its tokens."""

    beam: int
    token: int
    score: float
    tokens: list[int]


class Finished(NamedTuple):
    """A finished hypothesis: its ranking value (score over length ** length_penalty), score and tokens."""

    ranked: float
    score: float
    tokens: list[int]


@torch.no_grad()
def beam_search(
    model: nn.Module, frames: torch.Tensor, video_mask: torch.Tensor, tubes: torch.Tensor, *, beam_size: int,
    max_steps: int, length_penalty: float = 1.0, sot: int = SOT_ID, eot: int = EOT_ID,
) -> Decoded:
    """Beam search over a batch of videos with cached states.

    Each video keeps `beam_size` unfinished hypotheses; a hypothesis ending in EOT is finished. A video stops when it
    has `beam_size` finished hypotheses and no unfinished one can still beat the worst of them (exact: summed
    log-probabilities only decrease, so the best an unfinished hypothesis can reach is its score over the
    largest possible normaliser). Hypotheses still unfinished after `max_steps` compete as they are. The
    returned caption is the finished hypothesis with the highest `score / length ** length_penalty`, where the
    length counts the generated tokens (EOT included).
    """
    if beam_size < 1:
        raise ValueError(f"beam_size must be >= 1, got {beam_size}")
    batch, device = frames.shape[0], frames.device
    state = CachedCaptionState(model, frames, video_mask, tubes)
    state.reorder(torch.arange(batch, device=device).repeat_interleave(beam_size))
    beam_scores = torch.full((batch, beam_size), float("-inf"), device=device)
    beam_scores[:, 0] = 0.0  # all beams start identical: expand only the first
    sequences: list[list[list[int]]] = [[[] for _ in range(beam_size)] for _ in range(batch)]
    finished: list[list[Finished]] = [[] for _ in range(batch)]
    closed = [False] * batch
    current = torch.full((batch * beam_size,), sot, dtype=torch.long, device=device)

    def normalised(score: float, length: int) -> float:
        return score / (length ** length_penalty) if length_penalty else score

    for _ in range(max_steps):
        log_probs = state.step(current)  # [batch * beam, vocab]
        vocab = log_probs.shape[-1]
        candidates = (beam_scores.reshape(-1, 1) + log_probs.float()).reshape(batch, beam_size * vocab)
        top_scores, top_index = candidates.topk(min(2 * beam_size, candidates.shape[1]), dim=1)
        top_scores, top_index = top_scores.tolist(), top_index.tolist()
        next_rows, next_tokens, next_scores = [], [], []
        for video in range(batch):
            kept: list[Hypothesis] = []
            if not closed[video]:
                for score, flat in zip(top_scores[video], top_index[video]):
                    if score == float("-inf"):
                        break
                    beam, token = divmod(flat, vocab)
                    tokens = sequences[video][beam] + [token]
                    if token == eot:
                        finished[video].append(Finished(normalised(score, len(tokens)), score, tokens))
                    else:
                        kept.append(Hypothesis(beam, token, score, tokens))
                    if len(kept) == beam_size:
                        break
                finished[video].sort(key=lambda item: -item.ranked)
                del finished[video][beam_size:]
                closed[video] = _video_done(finished[video], kept, beam_size, max_steps, length_penalty, normalised)
            if closed[video] or not kept:
                closed[video] = True
                kept = [Hypothesis(0, eot, float("-inf"), [])] * beam_size  # placeholder rows, never expanded again
            kept += [kept[-1]._replace(score=float("-inf"))] * (beam_size - len(kept))
            sequences[video] = [item.tokens for item in kept]
            next_rows += [video * beam_size + item.beam for item in kept]
            next_tokens += [item.token for item in kept]
            next_scores += [item.score for item in kept]
        if all(closed):
            break
        state.reorder(torch.tensor(next_rows, device=device))
        current = torch.tensor(next_tokens, device=device)
        beam_scores = torch.tensor(next_scores, device=device).reshape(batch, beam_size)

    tokens, scores = [], []
    for video in range(batch):
        pool = list(finished[video])
        if not closed[video]:  # max_steps reached: unfinished hypotheses compete as they are
            for sequence, score in zip(sequences[video], beam_scores[video].tolist()):
                if score != float("-inf"):
                    pool.append(Finished(normalised(score, len(sequence)), score, sequence))
        best = max(pool, key=lambda item: item.ranked)
        tokens.append(_cut(best.tokens, eot))
        scores.append(best.score)
    return Decoded(tokens, scores)


def _video_done(finished: list[Finished], kept: list[Hypothesis], beam_size: int, max_steps: int,
                length_penalty: float, normalised) -> bool:
    if len(finished) < beam_size:
        return False
    if not kept:
        return True
    best_open = max(item.score for item in kept)
    reachable = normalised(best_open, max_steps) if length_penalty > 0 else best_open
    return reachable <= finished[-1].ranked


def decode_captions(
    model: nn.Module, frames: torch.Tensor, video_mask: torch.Tensor, tubes: torch.Tensor, *, beam_size: int = 1,
    max_steps: int = 31, length_penalty: float = 1.0,
) -> Decoded:
    """Greedy (`beam_size` 1, the original's decoding) or beam search."""
    if beam_size == 1:
        return greedy_decode(model, frames, video_mask, tubes, max_steps=max_steps)
    return beam_search(model, frames, video_mask, tubes, beam_size=beam_size, max_steps=max_steps,
                       length_penalty=length_penalty)
