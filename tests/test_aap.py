"""The auxiliary attribute predictors: the loss against a hand computation, the prior init."""
import math

import pytest
import torch
import torch.nn.functional as F

from dif_attention import DIFError, AttributePredictor, aap_loss, multi_hot, total_loss


def test_aap_loss_matches_hand_computation():
    torch.manual_seed(0)
    pred = AttributePredictor(8, {"cat": 5})
    h = torch.randn(3, 8)
    logits = pred(h)
    targets = {"cat": torch.tensor([[1, 3, 0], [2, 0, 0], [4, 4, 1]])}
    loss = pred.loss(logits, targets)["cat"]
    y = torch.tensor([[0, 1, 0, 1, 0], [0, 0, 1, 0, 0], [0, 1, 0, 0, 1]], dtype=torch.float)
    lg = logits["cat"]
    want = -(y * F.logsigmoid(lg) + (1 - y) * F.logsigmoid(-lg))[:, 1:].mean()
    torch.testing.assert_close(loss, want)
    torch.testing.assert_close(multi_hot(targets["cat"], 5), y)
    valid = torch.tensor([True, False, True])
    torch.testing.assert_close(aap_loss(logits, targets, valid=valid)["cat"],
                               -(y * F.logsigmoid(lg) + (1 - y) * F.logsigmoid(-lg))[valid][:, 1:].mean())
    item = torch.tensor(2.0)
    torch.testing.assert_close(total_loss(item, {"cat": loss}, lamb=10.0), item + 10 * loss)
    torch.testing.assert_close(total_loss(item, {"cat": loss}, lamb={"cat": 0.5}), item + 0.5 * loss)


def test_aap_prior_init_starts_at_the_label_rates():
    pred = AttributePredictor(8, {"cat": 4})
    rates = torch.tensor([0.0, 0.5, 0.1, 1.0])  # pad column 0 and a class that is always on get clamped
    assert pred.init_prior_({"cat": rates}, eps=1e-3) is pred
    probs = torch.sigmoid(pred(torch.zeros(2, 8))["cat"])  # h = 0: the logits are the biases
    torch.testing.assert_close(probs[0], torch.tensor([1e-3, 0.5, 0.1, 1 - 1e-3]))
    # the BCE at the prior is the rates' entropy, below the zero-init's log 2 per label
    y = torch.tensor([[0.0, 1, 0, 1], [0.0, 0, 0, 1]])
    init = aap_loss(pred(torch.zeros(2, 8)), {"cat": y})["cat"]
    assert init < math.log(2) - 0.2
    with pytest.raises(DIFError, match=r"^rates\['cat'\]: expected shape \(4,\), got"):
        pred.init_prior_({"cat": torch.full((3,), 0.5)})
    with pytest.raises(DIFError, match=r"^rates\['cat'\]: expected rates in \[0, 1\]"):
        pred.init_prior_({"cat": torch.tensor([0.0, 1.5, 0.1, 0.2])})
    with pytest.raises(DIFError, match=r"^rates: expected the attributes \['cat'\]"):
        pred.init_prior_({"brand": rates})


@pytest.mark.parametrize("pad_id", [-1, 5, True, 1.0])
def test_aap_loss_checks_pad_id_for_every_target_form(pad_id):
    logits = {"cat": torch.randn(2, 5)}
    for targets in (torch.tensor([[1, 0], [2, 3]]), torch.tensor([1, 2]), torch.zeros(2, 5)):
        with pytest.raises(DIFError, match=rf"^pad_id: expected an int in \[0, 5\) .*got {pad_id!r}$"):
            aap_loss(logits, {"cat": targets}, pad_id=pad_id)
