import torch

from elrea.routers import keep_top_k, similarity_weights


def test_weights_follow_similarity_and_sum_to_one():
    cent = torch.eye(4)
    feats = torch.tensor([[0.1, 0.9, 0.2, 0.0], [0.0, 0.0, 0.1, 1.0]])
    w = similarity_weights(feats, cent)
    assert torch.allclose(w.sum(1), torch.ones(2))
    assert w[0].argmax() == 1 and w[1].argmax() == 3


def test_standardised_softmax_matches_formula():
    cent = torch.randn(5, 16)
    f = torch.randn(3, 16)
    s = torch.nn.functional.normalize(f, dim=1) @ torch.nn.functional.normalize(cent, dim=1).T
    z = (s - s.mean(1, keepdim=True)) / s.std(1, unbiased=False, keepdim=True)
    for tau in (0.5, 1.0, 2.0):
        assert torch.allclose(similarity_weights(f, cent, tau), torch.softmax(z / tau, 1), atol=1e-6)


def test_equal_similarities_give_uniform_weights():
    cent = torch.ones(3, 4)
    w = similarity_weights(torch.randn(2, 4), cent)
    assert torch.allclose(w, torch.full((2, 3), 1 / 3))


def test_temperature_sharpens_and_top_k_keeps_k():
    cent, f = torch.randn(6, 8), torch.randn(4, 8)
    cold, hot = similarity_weights(f, cent, 0.25), similarity_weights(f, cent, 4.0)
    assert (cold.max(1).values > hot.max(1).values).all()
    w = similarity_weights(f, cent, 1.0, top_k=2)
    assert ((w > 0).sum(1) == 2).all() and torch.allclose(w.sum(1), torch.ones(4))
    assert torch.equal(keep_top_k(w, 0), w)
