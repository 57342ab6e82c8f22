"""Quality metrics against exact answers on hand-made models."""

import math

import pytest
import torch
from torch import nn

from mpsearch.errors import MpsearchError
from mpsearch.metrics import (Accuracy, EmbeddingCosine, FunctionMetric, KLDivergence, Perplexity,
                              Top1Agreement, default_metric_name, make_metric)


class Fixed(nn.Module):
    """Returns ``x @ w`` (a linear map without bias), so outputs are known exactly."""

    def __init__(self, w):
        super().__init__()
        self.lin = nn.Linear(w.shape[0], w.shape[1], bias=False)
        with torch.no_grad():
            self.lin.weight.copy_(w.T)

    def forward(self, x):
        return self.lin(x)


class TinyLM(nn.Module):
    def __init__(self, vocab=7, uniform=False):
        super().__init__()
        torch.manual_seed(0)
        self.emb = nn.Embedding(vocab, 5)
        self.head = nn.Linear(5, vocab)
        if uniform:
            nn.init.zeros_(self.head.weight)
            nn.init.zeros_(self.head.bias)

    def forward(self, input_ids):
        return self.head(self.emb(input_ids))  # each position sees only its own token


def test_perplexity_uniform_model_is_vocab_size():
    ids = torch.randint(0, 7, (50,), generator=torch.Generator().manual_seed(0))
    assert Perplexity(ids, window=16, stride=8)(TinyLM(uniform=True)) == pytest.approx(7.0, rel=1e-6)


def test_perplexity_matches_manual_cross_entropy():
    ids = torch.randint(0, 7, (40,), generator=torch.Generator().manual_seed(1))
    lm = TinyLM()
    with torch.no_grad():
        ce = nn.functional.cross_entropy(lm(ids[None])[0, :-1], ids[1:])
    # the model is context-free, so any window/stride gives the exact whole-sequence perplexity
    for window, stride in [(40, 40), (16, 8), (10, 3), (5, 5)]:
        assert Perplexity(ids, window=window, stride=stride)(lm) == pytest.approx(math.exp(ce.item()), rel=1e-5)


@pytest.mark.parametrize("n,window,stride", [(40, 16, 8), (41, 10, 3), (7, 16, 4), (33, 8, 8)])
def test_perplexity_windows_score_every_token_once(n, window, stride):
    p = Perplexity(torch.zeros(n, dtype=torch.long), window=window, stride=stride)
    scored = []
    for start, end, first in p.windows():
        assert end - start <= window
        scored.extend(range(first, end))
    assert scored == list(range(1, n))


def test_classifier_metrics_exact():
    w = torch.eye(3)
    x = torch.tensor([[3.0, 1, 0], [0, 2, 1], [0, 0, 5], [1, 0, 0]])
    y = torch.tensor([0, 1, 1, 0])
    model = Fixed(w)
    assert Accuracy([(x, y)])(model) == pytest.approx(75.0)
    agree = Top1Agreement([(x, y)]).fit(model)
    assert agree(model) == 100.0
    assert agree(Fixed(-w)) == 0.0  # argmin never equals argmax on these rows
    kl = KLDivergence([x]).fit(model)
    assert kl(model) == pytest.approx(0.0, abs=1e-7)
    w2 = 2 * w
    p = torch.softmax(x, -1)
    q = torch.log_softmax(2 * x, -1)
    expected = (p * (p.log() - q)).sum(-1).mean().item()
    assert kl(Fixed(w2)) == pytest.approx(expected, rel=1e-5)
    assert kl.loss(0.3, 0.1) == pytest.approx(0.2) and agree.loss(90, 100) == 10


def test_embedding_cosine_exact():
    x = torch.randn(6, 4, generator=torch.Generator().manual_seed(0))
    w = torch.randn(4, 4, generator=torch.Generator().manual_seed(1))
    m = EmbeddingCosine([x]).fit(Fixed(w))
    assert m(Fixed(w)) == pytest.approx(1.0, abs=1e-6)
    assert m(Fixed(3 * w)) == pytest.approx(1.0, abs=1e-6)
    assert m(Fixed(-w)) == pytest.approx(-1.0, abs=1e-6)


def test_embedding_cosine_masked_mean_pool():
    class Seq(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(1, 2)

        def forward(self, input_ids, attention_mask=None):
            return self.lin(input_ids[..., None].float())

    ids = torch.tensor([[1, 2, 9], [3, 4, 5]])
    batch = {"input_ids": ids, "attention_mask": torch.tensor([[1, 1, 0], [1, 1, 1]])}
    ref = Seq()
    m = EmbeddingCosine([batch]).fit(ref)
    assert m(ref) == pytest.approx(1.0, abs=1e-6)

    class Shifted(Seq):  # the reference, except for the embedding of one token id
        def __init__(self, token):
            super().__init__()
            self.token = token
            self.load_state_dict(ref.state_dict())

        def forward(self, input_ids, attention_mask=None):
            out = super().forward(input_ids, attention_mask)
            return out + 100.0 * (input_ids == self.token)[..., None] * torch.tensor([1.0, -1.0])

    assert m(Shifted(9)) == pytest.approx(1.0, abs=1e-6)  # 9 sits only under the mask: ignored
    assert m(Shifted(5)) < 0.9  # 5 is a real token: the pooled embedding moves


def test_metric_errors():
    x = torch.randn(3, 2)
    with pytest.raises(MpsearchError, match="call metric.fit"):
        Top1Agreement([x])(Fixed(torch.eye(2)))
    with pytest.raises(MpsearchError, match="accuracy needs targets"):
        Accuracy([x])
    with pytest.raises(MpsearchError, match="needs evaluation data"):
        Accuracy([])
    with pytest.raises(MpsearchError, match="unknown metric 'acuracy'.*did you mean 'accuracy'"):
        make_metric("acuracy", [x])
    with pytest.raises(MpsearchError, match="need 0 < stride <= window"):
        Perplexity(torch.arange(10), window=4, stride=8)
    with pytest.raises(MpsearchError, match="at least 2 tokens"):
        Perplexity(torch.arange(1))
    with pytest.raises(MpsearchError, match="returned str, not a number"):
        FunctionMetric(lambda m: "x", name="bad")(Fixed(torch.eye(2)))
    with pytest.raises(MpsearchError, match="must be callable"):
        FunctionMetric(3)


def test_default_metric_name():
    x = torch.randn(2, 2)
    assert default_metric_name(Fixed(torch.eye(2)), (x, torch.tensor([0, 1]))) == "accuracy"
    assert default_metric_name(Fixed(torch.eye(2)), x) == "agreement"
    Lm = type("GPT2LMHeadModel", (nn.Module,), {})
    assert default_metric_name(Lm()) == "kld"  # KL to full precision, top-1 and perplexity in one pass
