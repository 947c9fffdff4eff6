"""AttributeEmbedding and item_attribute_table: pooling, padding, trainable tables, item lookups."""
import torch

from dif_attention import AttributeEmbedding, item_attribute_table


def test_attribute_embedding_pooling_and_padding():
    torch.manual_seed(0)
    emb = AttributeEmbedding({"cat": 6}, 4, pooling="sum")
    tok = torch.tensor([[[1, 2, 0], [0, 0, 0], [3, 3, 5]]])  # (b=1, n=3, k=3)
    out = emb({"cat": tok})["cat"]
    w = emb.tables["cat"].weight
    torch.testing.assert_close(out[0, 0], w[1] + w[2])
    assert out[0, 1].abs().max() == 0
    torch.testing.assert_close(out[0, 2], 2 * w[3] + w[5])
    emb.pooling = "mean"
    torch.testing.assert_close(emb({"cat": tok})["cat"][0, 0], (w[1] + w[2]) / 2)
    emb.pooling = "max"
    mx = emb({"cat": tok})["cat"]
    torch.testing.assert_close(mx[0, 0], torch.maximum(w[1], w[2]))
    assert mx[0, 1].abs().max() == 0
    # tables are trainable (the reference's were frozen by accident); the padding row gets no gradient
    emb.pooling = "sum"
    emb({"cat": tok})["cat"].sum().backward()
    g = emb.tables["cat"].weight.grad
    assert g[1].abs().sum() > 0 and g[0].abs().sum() == 0
    assert any(p is emb.tables["cat"].weight for p in emb.parameters())


def test_attribute_embedding_item_tables():
    table = item_attribute_table({1: [2, 3], 2: [4], 3: []}, num_items=5)
    assert table.tolist() == [[0, 0], [2, 3], [4, 0], [0, 0], [0, 0]]
    emb = AttributeEmbedding({"cat": 6}, 4, item_tables={"cat": table})
    items = torch.tensor([[1, 2, 0]])
    torch.testing.assert_close(emb(items=items)["cat"], emb({"cat": table[items]})["cat"])
    frozen = AttributeEmbedding({"cat": 6}, 4, trainable=False, init_std=1.0)
    assert not any(p.requires_grad for p in frozen.parameters())
