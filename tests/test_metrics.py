"""Full-ranking metrics against hand-computed cases."""
import math

import torch

from train import append_item, bert_mask, rank_metrics


def test_rank_metrics_hand_cases():
    # 12 item columns (0 = padding, ignored even with the highest score)
    scores = torch.tensor([
        [99.0, 5, 4, 3, 2, 1, 0, 0, 0, 0, 0, 0, 0],   # target 1 -> rank 0
        [99.0, 5, 4, 3, 2, 1, 0, 0, 0, 0, 0, 0, 0],   # target 3 -> rank 2
        [0.0, 12, 11, 10, 9, 8, 7, 6, 5, 4, 3, 2, 1],  # target 12 -> rank 11
    ])
    m = rank_metrics(scores, torch.tensor([1, 3, 12]), ks=(10, 20))
    assert m["Recall@10"].tolist() == [1.0, 1.0, 0.0]
    assert m["Recall@20"].tolist() == [1.0, 1.0, 1.0]
    assert torch.allclose(m["NDCG@10"], torch.tensor([1.0, 1 / math.log2(4), 0.0]))
    assert torch.allclose(m["NDCG@20"], torch.tensor([1.0, 0.5, 1 / math.log2(13)]))


def test_ties_favour_the_target():
    scores = torch.tensor([[0.0, 1, 1, 1]])
    m = rank_metrics(scores, torch.tensor([3]), ks=(1,))
    assert m["Recall@1"].item() == 1.0


def test_append_item_shifts_full_histories():
    hist = torch.tensor([[1, 2, 0], [4, 5, 6]])
    out, pos = append_item(hist, 9)
    assert out.tolist() == [[1, 2, 9], [5, 6, 9]] and pos.tolist() == [2, 2]
    assert hist.tolist() == [[1, 2, 0], [4, 5, 6]]


def test_bert_mask_never_masks_padding_and_masks_at_least_one():
    seqs = torch.tensor([[1, 2, 3, 0, 0], [4, 0, 0, 0, 0]])
    g = torch.Generator().manual_seed(0)
    for ratio in (0.0, 0.5, 1.0):
        inp, tgt = bert_mask(seqs, mask_id=99, ratio=ratio, last_only=False, gen=g)
        assert ((inp == 99) == (tgt != 0)).all()
        assert (tgt[seqs == 0] == 0).all() and ((tgt != 0).sum(-1) >= 1).all()
        assert (tgt[tgt != 0] == seqs[tgt != 0]).all()
    inp, tgt = bert_mask(seqs, mask_id=99, ratio=1.0, last_only=True, gen=g)
    assert inp.tolist() == [[1, 2, 99, 0, 0], [99, 0, 0, 0, 0]]


def test_a_diverged_model_scores_zero_not_one():
    """NaN scores never count as hits: a NaN target is a miss, a NaN elsewhere ranks above the target."""
    nan = float("nan")
    m = rank_metrics(torch.full((2, 5), nan), torch.tensor([3, 2]), ks=(1, 10))
    assert all(v.tolist() == [0.0, 0.0] for v in m.values()), m
    m = rank_metrics(torch.tensor([[0.0, 1, 2, nan, 0.5], [0.0, 1, torch.inf, 3, 0]]), torch.tensor([2, 2]), ks=(1, 2))
    assert m["Recall@1"].tolist() == [0.0, 0.0] and m["Recall@2"].tolist() == [1.0, 0.0]
    assert torch.allclose(m["NDCG@2"], torch.tensor([1 / math.log2(3), 0.0]))
