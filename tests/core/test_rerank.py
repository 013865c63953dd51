"""Retrieval re-ranking by FILIP late interaction: recalls equal a brute-force re-ranking of the
top k, the loader path keeps every image's tokens, and the recipe section is checked."""
from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from domainclip.core.config import ConfigError, from_dict
from domainclip.core.eval.metrics import retrieval_metrics
from domainclip.core.eval.retrieval import RerankConfig, evaluate_retrieval, filip_rescorer
from domainclip.core.losses import late_interaction_scores, paired_late_interaction
from domainclip.core.run_config import EvalTaskConfig

N_IMAGES, N_TEXTS, I, T, D = 7, 11, 3, 5, 6


def _data(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    image_tokens = F.normalize(torch.randn(N_IMAGES, I, D, generator=g), dim=-1)
    text_tokens = F.normalize(torch.randn(N_TEXTS, T, D, generator=g), dim=-1)
    text_mask = torch.arange(T)[None, :] < torch.randint(1, T + 1, (N_TEXTS,), generator=g)[:, None]
    image_mask = torch.ones(N_IMAGES, I, dtype=torch.bool)
    image_features = F.normalize(torch.randn(N_IMAGES, D, generator=g), dim=-1)
    text_features = F.normalize(torch.randn(N_TEXTS, D, generator=g), dim=-1)
    text_to_image = torch.randint(0, N_IMAGES, (N_TEXTS,), generator=g)
    return image_tokens, image_mask, text_tokens, text_mask, image_features, text_features, text_to_image


def brute_force_recalls(global_scores: torch.Tensor, fine_scores: torch.Tensor, text_to_image: torch.Tensor,
                        k: int, ks=(1, 5, 10)) -> dict[str, float]:
    """Re-rank each row's top k of ``global_scores`` (texts x images) by ``fine_scores``, explicitly."""
    def reranked(rows_global: torch.Tensor, rows_fine: torch.Tensor) -> list[list[int]]:
        orders = []
        for g, f in zip(rows_global, rows_fine):
            order = sorted(range(len(g)), key=lambda c: -float(g[c]))
            head = sorted(order[:k], key=lambda c: -float(f[c]))
            orders.append(head + order[k:])
        return orders

    image_to_text_global, image_to_text_fine = global_scores.T, fine_scores["image_to_text"]
    caption_orders = reranked(global_scores, fine_scores["text_to_image"].T)
    image_orders = reranked(image_to_text_global, image_to_text_fine)
    out = {}
    for kk in ks:
        out[f"image_retrieval_recall@{kk}"] = sum(int(text_to_image[j]) in o[:kk] for j, o in enumerate(caption_orders)) / N_TEXTS
        queried = [i for i in range(N_IMAGES) if (text_to_image == i).any()]
        out[f"text_retrieval_recall@{kk}"] = sum(
            any(int(text_to_image[c]) == i for c in image_orders[i][:kk]) for i in queried) / len(queried)
    return out


@pytest.mark.parametrize("k", [1, 3, 50])
def test_filip_reranked_recalls_equal_brute_force(k: int) -> None:
    image_tokens, image_mask, text_tokens, text_mask, image_features, text_features, text_to_image = _data()
    rescore = filip_rescorer(image_tokens, image_mask, text_tokens, text_mask, k, pairs_per_step=4)
    got = retrieval_metrics(image_features, text_features, text_to_image, block_size=3, rescore=rescore)
    image_to_text, text_to_image_scores = late_interaction_scores(image_tokens, image_mask, text_tokens, text_mask)
    expected = brute_force_recalls(text_features @ image_features.T,
                                   {"image_to_text": image_to_text, "text_to_image": text_to_image_scores},
                                   text_to_image, k)
    for key, value in expected.items():
        assert got[key] == pytest.approx(value, abs=1e-12), key
    plain = retrieval_metrics(image_features, text_features, text_to_image)
    if k == 1:  # re-ranking one candidate changes nothing
        assert got == plain


def test_paired_scores_are_the_diagonal_of_the_all_pairs_scores() -> None:
    image_tokens, image_mask, text_tokens, text_mask, *_ = _data(seed=2)
    n = min(N_IMAGES, N_TEXTS)
    both = late_interaction_scores(image_tokens[:n], image_mask[:n], text_tokens[:n], text_mask[:n])
    for direction, scores in zip(("image_to_text", "text_to_image"), both):
        paired = paired_late_interaction(image_tokens[:n], image_mask[:n], text_tokens[:n], text_mask[:n], direction)
        torch.testing.assert_close(paired, scores.diagonal(), rtol=0, atol=1e-6)


class TokenStub(nn.Module):
    """A model whose tokens are fixed tables (images by their first pixel, captions by name)."""

    def __init__(self, data) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(1))
        (self.image_tokens, self.image_mask, self.text_tokens, self.text_mask, self.image_features,
         self.text_features, _) = data

    def tokenize(self, texts):
        return {"ids": torch.tensor([int(t.split()[-1]) for t in texts])}

    def encode_image_tokens(self, images):
        rows = images[:, 0, 0, 0].long()
        return SimpleNamespace(tokens=self.image_tokens[rows] * 3.0, mask=self.image_mask[rows],
                               pooled=self.image_features[rows] * 2.0)

    def encode_image(self, images, normalize=True):
        return self.image_features[images[:, 0, 0, 0].long()]

    def encode_text_tokens(self, tokens):
        rows = tokens["ids"]
        return SimpleNamespace(tokens=self.text_tokens[rows] * 0.5, mask=self.text_mask[rows],
                               pooled=self.text_features[rows] * 5.0)

    def encode_text(self, tokens, normalize=True):
        return self.text_features[tokens["ids"]]


def test_evaluate_retrieval_reports_plain_and_reranked_recalls() -> None:
    data = _data(seed=3)
    model = TokenStub(data)
    images = torch.arange(N_IMAGES, dtype=torch.float32)[:, None, None, None].expand(N_IMAGES, 3, 2, 2)
    loader = [{"images": images[s:s + 3], "indices": torch.arange(N_IMAGES)[s:s + 3]} for s in range(0, N_IMAGES, 3)]
    captions = [f"caption {j}" for j in range(N_TEXTS)]
    text_to_image = data[-1]
    got = evaluate_retrieval(model, loader, captions, text_to_image, batch_size=4, precision="fp32",
                             rerank=RerankConfig("filip", 3))
    plain = retrieval_metrics(data[4], data[5], text_to_image)
    expected = retrieval_metrics(data[4], data[5], text_to_image, rescore=filip_rescorer(*data[:4], k=3))
    assert got["mean_recall"] == pytest.approx(plain["mean_recall"])
    assert got["reranked_mean_recall"] == pytest.approx(expected["mean_recall"])
    assert got["reranked_image_retrieval_recall@1"] == pytest.approx(expected["image_retrieval_recall@1"])
    assert got["rerank"] == "filip@3"
    assert "reranked_mean_recall" not in evaluate_retrieval(model, loader, captions, text_to_image, batch_size=4,
                                                          precision="fp32")


def test_rerank_section_is_checked() -> None:
    task = from_dict(EvalTaskConfig, {"task": "retrieval", "rerank": {"name": "filip", "k": 20}})
    assert (task.rerank.name, task.rerank.k) == ("filip", 20)
    with pytest.raises(ConfigError, match="did you mean 'filip'"):
        from_dict(EvalTaskConfig, {"task": "retrieval", "rerank": {"name": "flip"}})
    with pytest.raises(ConfigError, match="rerank needs task 'retrieval'"):
        from_dict(EvalTaskConfig, {"task": "zeroshot", "rerank": {"name": "filip"}})
    with pytest.raises(ConfigError, match="rerank.k must be >= 1"):
        from_dict(EvalTaskConfig, {"task": "retrieval", "rerank": {"name": "filip", "k": 0}})
