"""DrasCLR MoCo module: losses against logits computed by hand, per-location queues, momentum, gradients."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

from drasclr_ext.networks import DrasCLR

TAU = 0.2


def small_model(**kwargs) -> DrasCLR:
    torch.manual_seed(0)
    defaults = {"num_locations": 6, "rep_dim": 16, "moco_dim": 8, "num_experts": 2, "queue_size": 5}
    defaults.update(kwargs)
    return DrasCLR(**defaults)


def batch(b: int = 4, k: int = 2, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {
        "image_q": torch.rand(b, 1, 32, 32, 32, generator=g) * 2 - 1,
        "image_k": torch.rand(b, 1, 32, 32, 32, generator=g) * 2 - 1,
        "location": torch.rand(b, 3, generator=g) * 2 - 1,
        "location_index": torch.tensor([0, 3, 3, 5][:b]),
        "neighbour_images": torch.rand(b, k, 1, 32, 32, 32, generator=g) * 2 - 1,
        "neighbour_locations": torch.rand(b, k, 3, generator=g) * 2 - 1,
    }


def hand_cross_entropy(pos: torch.Tensor, neg: torch.Tensor) -> torch.Tensor:
    logits = torch.cat([pos[:, None], neg], dim=1)
    return (torch.logsumexp(logits, dim=1) - logits[:, 0]).mean()


def test_losses_equal_logits_computed_by_hand():
    model = small_model().train()
    data = batch()
    expected = copy.deepcopy(model)
    queue_before = model.queue.clone()
    out = model(**data)

    # the same step, written out sample by sample
    with torch.no_grad():
        for pk, pq in zip(expected.encoder_k.parameters(), expected.encoder_q.parameters()):
            pk.copy_(0.999 * pk + 0.001 * pq)
        k = F.normalize(expected.encoder_k(data["image_k"], data["location"])[0], dim=1)
    q = F.normalize(expected.encoder_q(data["image_q"], data["location"])[0], dim=1)
    nb = data["neighbour_images"]
    r = F.normalize(expected.encoder_q(nb.flatten(0, 1), data["neighbour_locations"].flatten(0, 1))[0], dim=1)
    s = r.view(4, 2, -1).sum(1)
    pos_l, neg_l, pos_n, neg_n = [], [], [], []
    for b, j in enumerate(data["location_index"].tolist()):
        negatives = queue_before[:, :, j]  # (C, K): the keys stored for landmark j
        pos_l.append(q[b] @ k[b] / TAU)
        neg_l.append(q[b] @ negatives / TAU)
        pos_n.append(s[b] @ k[b] / TAU)
        neg_n.append(s[b] @ negatives / TAU)
    pos_l, neg_l, pos_n, neg_n = map(torch.stack, (pos_l, neg_l, pos_n, neg_n))

    torch.testing.assert_close(out["logits_local"], torch.cat([pos_l[:, None], neg_l], 1), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out["logits_neighbour"], torch.cat([pos_n[:, None], neg_n], 1), rtol=1e-5, atol=1e-5)
    local, neighbour = hand_cross_entropy(pos_l, neg_l), hand_cross_entropy(pos_n, neg_n)
    torch.testing.assert_close(out["loss_local"], local.detach(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out["loss_neighbour"], neighbour.detach(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out["loss"], (local + 1.0 * neighbour).detach(), rtol=1e-5, atol=1e-5)
    acc = (torch.cat([pos_l[:, None], neg_l], 1).argmax(1) == 0).float().mean()
    assert out["acc_local"].item() == pytest.approx(acc.item())


def test_beta_weights_the_neighbour_loss():
    data = batch()
    out1 = small_model(beta=1.0)(**data)
    out3 = small_model(beta=3.0)(**data)
    expected = out3["loss_local"] + 3.0 * out3["loss_neighbour"]
    torch.testing.assert_close(out3["loss"].detach(), expected, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(out1["loss_local"], out3["loss_local"])


def test_without_neighbours_the_loss_is_local_only():
    data = batch()
    data.pop("neighbour_images"), data.pop("neighbour_locations")
    out = small_model()(**data)
    assert "loss_neighbour" not in out
    torch.testing.assert_close(out["loss"].detach(), out["loss_local"])


def test_enqueue_per_location_with_wrap_around():
    model = small_model(num_locations=4, moco_dim=2, queue_size=3)
    model.queue.zero_()
    model.queue_ptr.copy_(torch.tensor([0, 2, 0, 1]))
    keys = torch.arange(1, 13, dtype=torch.float32).view(6, 2)  # key i = (2i+1, 2i+2)
    model.enqueue(keys, torch.tensor([1, 1, 2, 1, 1, 3]))
    # landmark 1 starts at slot 2: keys 0,1,3,4 go to slots 2,0,1,2 (the last overwrites the first)
    torch.testing.assert_close(model.queue[:, :, 1].T, torch.tensor([[3.0, 4], [7, 8], [9, 10]]))
    torch.testing.assert_close(model.queue[:, :, 2].T, torch.tensor([[5.0, 6], [0, 0], [0, 0]]))
    torch.testing.assert_close(model.queue[:, :, 3].T, torch.tensor([[0.0, 0], [11, 12], [0, 0]]))
    assert model.queue[:, :, 0].abs().sum() == 0
    assert model.queue_ptr.tolist() == [0, 0, 1, 2]


def test_enqueue_more_keys_than_the_queue_keeps_the_newest():
    model = small_model(num_locations=2, moco_dim=1, queue_size=3)
    model.queue.zero_()
    model.enqueue(torch.arange(1, 8, dtype=torch.float32)[:, None], torch.zeros(7, dtype=torch.long))
    # 7 keys into 3 slots from slot 0: slots receive keys ... 5, 6, 7 at positions 7%3=1 -> 5 at 1, 6 at 2, 7 at 0
    assert model.queue[0, :, 0].tolist() == [7.0, 5.0, 6.0]
    assert model.queue_ptr.tolist() == [1, 0]


def test_forward_enqueues_the_keys_at_their_landmarks():
    model = small_model()
    data = batch()
    model(**data)
    assert model.queue_ptr.tolist() == [1, 0, 0, 2, 0, 1]


def test_momentum_update():
    model = small_model(momentum=0.9)
    with torch.no_grad():
        for p in model.encoder_q.parameters():
            p.add_(1.0)
    q = [p.clone() for p in model.encoder_q.parameters()]
    k = [p.clone() for p in model.encoder_k.parameters()]
    model.momentum_update()
    for pk, k0, q0 in zip(model.encoder_k.parameters(), k, q):
        torch.testing.assert_close(pk, 0.9 * k0 + 0.1 * q0)


def test_gradients_reach_the_query_encoder_only():
    model = small_model()
    model(**batch())["loss"].backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.encoder_q.parameters())
    assert all(p.grad is None for p in model.encoder_k.parameters())
    assert not model.queue.requires_grad


def test_queue_keeps_official_layout():
    model = DrasCLR(num_locations=7, moco_dim=16, rep_dim=16, num_experts=2, queue_size=11)
    assert model.queue.shape == (16, 11, 7)
    assert model.queue_ptr.shape == (7,)
    torch.testing.assert_close(model.queue.norm(dim=0), torch.ones(11, 7))
