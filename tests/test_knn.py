"""igpt.knn: the vote against a brute-force loop, and known answers."""

import numpy as np
import pytest
import torch

from igpt import knn, probe

pytestmark = pytest.mark.usefixtures("one_thread")


def clusters(n, n_classes=4, dim=16, seed=0):
    """Each class a tight cluster around its own direction: cosine k-NN separates them."""
    rng = np.random.default_rng(seed)
    centres = np.random.default_rng(7).normal(size=(n_classes, dim))
    y = rng.integers(0, n_classes, n)
    return (centres[y] + 0.3 * rng.normal(size=(n, dim))).astype(np.float32), y


def test_vote_is_the_weighted_vote_of_the_k_nearest():
    g = torch.Generator().manual_seed(0)
    bank = torch.nn.functional.normalize(torch.randn(30, 8, generator=g), dim=1)
    labels = torch.randint(0, 3, (30,), generator=g)
    queries = torch.nn.functional.normalize(torch.randn(5, 8, generator=g), dim=1)
    got = knn.knn_predict(bank, labels, queries, [1, 4, 30], 3)
    for k in (1, 4, 30):
        for i, q in enumerate(queries):
            sim = bank @ q
            top = sim.argsort(descending=True)[:k]
            votes = torch.zeros(3, dtype=sim.dtype)
            votes.index_add_(0, labels[top], (sim[top] / knn.TEMPERATURE).exp())
            assert got[k][i] == votes.argmax()


def test_clustered_features_give_100_percent_and_shuffled_labels_chance():
    x, y = clusters(300)
    xt, yt = clusters(200, seed=1)
    res = probe.knn_probe(x, y, xt, yt, ks=(1, 5, 20))
    assert res["test_acc"] == 1.0 and res["val_acc"] == 1.0
    assert [r["k"] for r in res["val_curve"]] == [1, 5, 20] and res["k"] == 20  # largest tie
    shuffled = np.random.default_rng(0).permutation(y)
    res = probe.knn_probe(x, shuffled, xt, yt)
    assert abs(res["test_acc"] - 0.25) < 0.1


def test_knn_layers_ranks_layers_by_the_hold_out():
    x, y = clusters(200)
    xt, yt = clusters(100, seed=1)
    noise = np.random.default_rng(3)
    train = np.stack([noise.normal(size=x.shape), x], axis=1)
    test = np.stack([noise.normal(size=xt.shape), xt], axis=1)
    res = probe.knn_layers(train, y, test, yt, layer_ids=[3, 7], progress=False)
    assert res["best_layer"] == 7 and res["best"]["test_acc"] == 1.0
    assert res["rows"][0]["test_acc"] < 0.5


def test_knn_refuses_bad_arguments():
    x, y = clusters(40)
    with pytest.raises(ValueError, match="ks must be positive ints"):
        probe.knn_probe(x, y, ks=(0, 3))
    with pytest.raises(ValueError, match="temperature"):
        probe.knn_probe(x, y, temperature=0)
    with pytest.raises(ValueError, match="at least two classes"):
        probe.knn_probe(x, np.zeros(40, dtype=int))
