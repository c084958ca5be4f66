"""Stage-2 held-out evaluation (`evaluate_fusion_heads`): MLM and VTM accuracies recomputed pair by pair through the
public fusion API."""

from __future__ import annotations

import pytest
import torch

from dataloaders.lm_targets import IGNORE_INDEX, sample_targets
from engine.tasks.fusion_pretraining import evaluate_fusion_heads
from modules.fusion_objectives import sample_hard_negatives
from modules.model import T2VLP, T2VLPConfig
from tests.model_helpers import TINY_FUSION_CLIP, random_text, random_video

COUNT, FRAMES, SEED = 10, 3, 7


@pytest.fixture(scope="module")
def model_and_split() -> tuple[T2VLP, dict]:
    torch.manual_seed(0)
    model = T2VLP(TINY_FUSION_CLIP, T2VLPConfig(with_fusion=True, fusion_layers=2, match_norm="pair")).eval()
    video_mask = torch.ones(COUNT, FRAMES, dtype=torch.long)
    video_mask[3, 2:] = 0
    ids, mask = random_text(COUNT, 12, [5, 12, 7, 9, 4, 6, 8, 10, 11, 3])
    with torch.no_grad():
        frames, tubes = model.encode_video(random_video(COUNT, FRAMES, TINY_FUSION_CLIP.image_resolution), video_mask)
        eot, tokens = model.encode_text(ids, mask)
    caption_video = torch.randperm(COUNT, generator=torch.Generator().manual_seed(1))  # caption i shows this video
    split = {"frames": frames, "video_mask": video_mask, "tubes": tubes, "text": eot, "text_tokens": tokens,
             "attention_mask": mask, "input_ids": ids, "indices": list(range(100, 100 + COUNT)),
             "caption_video": caption_video}
    return model, split


def margin(model: T2VLP, split: dict, text: int, video: int) -> float:
    """match - unmatch logit of one (caption, video) pair, scored alone (per-pair normalisation)."""
    parts = [split[key][video : video + 1] for key in ("frames", "video_mask", "tubes")]
    with torch.no_grad():
        logits = model.match_logits(*parts, split["text_tokens"][text : text + 1],
                                    split["attention_mask"][text : text + 1])
    return float(logits[0, 1] - logits[0, 0])


def expected_matching(model: T2VLP, split: dict, similarity: torch.Tensor) -> dict[str, float]:
    negative_video, negative_text = sample_hard_negatives(similarity, torch.Generator().manual_seed(SEED))
    videos = split["caption_video"]
    match = unmatch = pairwise = 0
    for i in range(COUNT):
        assert negative_video[i] != i and negative_text[i] != i
        positive = margin(model, split, i, int(videos[i]))
        negatives = [margin(model, split, i, int(videos[negative_video[i]])),
                     margin(model, split, int(negative_text[i]), int(videos[i]))]
        match += positive > 0
        unmatch += sum(n <= 0 for n in negatives)
        pairwise += sum(positive > n for n in negatives)
    return {"match": 100 * match / COUNT, "unmatch": 100 * unmatch / (2 * COUNT),
            "pairwise": 100 * pairwise / (2 * COUNT)}


@pytest.mark.parametrize("batch_size", [COUNT, 3])
def test_fusion_head_accuracies_equal_a_pair_by_pair_computation(model_and_split, batch_size):
    model, split = model_and_split
    result = evaluate_fusion_heads(model, split, mask_ratio=0.4, seed=SEED, batch_size=batch_size, precision="fp32")

    videos = split["caption_video"]
    with torch.no_grad():
        similarity = model.similarity(split["text"], split["frames"][videos], split["video_mask"][videos])
    hard = expected_matching(model, split, similarity)
    assert result["vtm_acc_match"] == pytest.approx(hard["match"])
    assert result["vtm_acc_unmatch"] == pytest.approx(hard["unmatch"])
    assert result["vtm_acc"] == pytest.approx((hard["match"] + hard["unmatch"]) / 2)
    assert result["vtm_pairwise_acc"] == pytest.approx(hard["pairwise"])
    uniform = expected_matching(model, split, torch.zeros(COUNT, COUNT))
    assert result["vtm_random_acc"] == pytest.approx((uniform["match"] + uniform["unmatch"]) / 2)
    assert result["vtm_random_pairwise_acc"] == pytest.approx(uniform["pairwise"])

    correct = total = 0
    for i in range(COUNT):
        target = sample_targets({"input_ids": split["input_ids"][i], "attention_mask": split["attention_mask"][i],
                                 "index": split["indices"][i]}, 0.4, SEED, epoch=0)
        masked = target["mlm_labels"] != IGNORE_INDEX
        v = int(videos[i])
        with torch.no_grad():
            _, tokens = model.encode_text(target["mlm_input_ids"][None], split["attention_mask"][i : i + 1])
            states = model.fuse(split["frames"][v : v + 1], split["video_mask"][v : v + 1], split["tubes"][v : v + 1],
                                tokens.masked_fill(masked[None, :, None], 0.0), split["attention_mask"][i : i + 1])
            logits = model.token_logits(states[0, 1 + FRAMES + split["tubes"].shape[1]:])
        correct += int((logits[masked].argmax(-1) == target["mlm_labels"][masked]).sum())
        total += int(masked.sum())
    assert result["n_masked_tokens"] == total and result["mlm_acc"] == pytest.approx(100 * correct / total)
    assert result["n"] == COUNT
