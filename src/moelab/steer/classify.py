"""A naive Bayes classifier over token ids: which domain a piece of text reads like.

The judge of steered generations (issue 14: "forcing drama experts on turns greedy continuations of
code prompts drama-like"): trained on the windows of a corpus' train split, one class per domain.
Multinomial naive Bayes with add-alpha (Laplace) smoothing (e.g. Manning, Raghavan & Schuetze 2008,
"Introduction to Information Retrieval", section 13.2)::

    log P(c | x) = log P(c) + sum_v n_v(x) log theta_cv + const
    theta_cv     = (count_cv + alpha) / (sum_v' count_cv' + alpha V)

``n_v(x)`` is how often token v occurs in x, ``count_cv`` in the training text of class c; classes
get a uniform prior by default (the corpus' domains are drawn to equal token counts).

Shape legend: C classes, V vocabulary, N tokens of one text, W windows.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from moelab.errors import MoelabError


@dataclass(frozen=True)
class NaiveBayes:
    """A fitted classifier: ``classes``, ``log_prior_C`` and ``log_theta_CV``."""

    classes: tuple[str, ...]
    log_prior_C: np.ndarray
    log_theta_CV: np.ndarray

    @property
    def vocab_size(self) -> int:
        return int(self.log_theta_CV.shape[1])

    def _counts(self, tokens: Sequence[int] | np.ndarray) -> np.ndarray:
        ids = np.asarray(tokens, dtype=np.int64).reshape(-1)
        if ids.size and (ids.min() < 0 or ids.max() >= self.vocab_size):
            raise MoelabError(f"naive Bayes: token ids must lie in [0, {self.vocab_size}), got "
                              f"[{ids.min()}, {ids.max()}]")
        return np.bincount(ids, minlength=self.vocab_size).astype(np.float64)

    def log_posterior(self, tokens: Sequence[int] | np.ndarray) -> np.ndarray:
        """``[C]`` unnormalised log P(c | tokens)."""
        return self.log_prior_C + self.log_theta_CV @ self._counts(tokens)

    def predict(self, tokens: Sequence[int] | np.ndarray) -> str:
        return self.classes[int(np.argmax(self.log_posterior(tokens)))]

    def predict_many(self, texts: Sequence[Sequence[int] | np.ndarray]) -> list[str]:
        if not len(texts):
            return []
        counts_WV = np.stack([self._counts(t) for t in texts])
        scores_WC = counts_WV @ self.log_theta_CV.T + self.log_prior_C
        return [self.classes[i] for i in scores_WC.argmax(1)]

    def accuracy(self, texts: Sequence[Sequence[int] | np.ndarray], labels: Sequence[str]) -> float:
        if len(texts) != len(labels) or not len(texts):
            raise MoelabError(f"accuracy: {len(texts)} texts and {len(labels)} labels (need the same, > 0)")
        return float(np.mean([p == y for p, y in zip(self.predict_many(texts), labels, strict=True)]))

    def indicative_tokens(self, cls: str, against: str, n: int = 20) -> list[int]:
        """The ``n`` token ids with the largest ``log theta_cls,v - log theta_against,v``."""
        c, a = self.classes.index(cls), self.classes.index(against)
        ratio = self.log_theta_CV[c] - self.log_theta_CV[a]
        return np.argsort(-ratio, kind="stable")[:n].tolist()


def fit_naive_bayes(texts: Sequence[Sequence[int] | np.ndarray], labels: Sequence[str], vocab_size: int,
                    alpha: float = 1.0, uniform_prior: bool = True) -> NaiveBayes:
    """Fit on token-id texts with one label each (see the module docstring)."""
    if len(texts) != len(labels) or not len(texts):
        raise MoelabError(f"naive Bayes: {len(texts)} texts and {len(labels)} labels (need the same, > 0)")
    if alpha <= 0:
        raise MoelabError(f"naive Bayes: alpha must be > 0, got {alpha}")
    classes = tuple(sorted(set(labels)))
    counts_CV = np.zeros((len(classes), vocab_size))
    docs_C = np.zeros(len(classes))
    for t, y in zip(texts, labels, strict=True):
        ids = np.asarray(t, dtype=np.int64).reshape(-1)
        if ids.size and (ids.min() < 0 or ids.max() >= vocab_size):
            raise MoelabError(f"naive Bayes: token ids must lie in [0, {vocab_size})")
        c = classes.index(y)
        counts_CV[c] += np.bincount(ids, minlength=vocab_size)
        docs_C[c] += 1
    theta = (counts_CV + alpha) / (counts_CV.sum(1, keepdims=True) + alpha * vocab_size)
    prior = np.full(len(classes), 1 / len(classes)) if uniform_prior else docs_C / docs_C.sum()
    return NaiveBayes(classes, np.log(prior), np.log(theta))


def log_posterior_reference(nb: NaiveBayes, tokens: Sequence[int]) -> list[float]:
    """Slow, obvious log posterior: a sum over the tokens one at a time."""
    return [float(nb.log_prior_C[c]) + sum(float(nb.log_theta_CV[c, int(v)]) for v in tokens)
            for c in range(len(nb.classes))]


def domain_windows(corpus_dir: Path, split: str, window: int, tokens: int) -> tuple[list[torch.Tensor], list[str]]:
    """Windows of ``window`` tokens from the first ``tokens`` of each domain's ``split`` stream."""
    from moelab.data.streams import encode_split
    from moelab.run.evaluate import eval_windows

    texts, labels = [], []
    for domain, stream in encode_split(Path(corpus_dir), split, max_tokens=tokens).items():
        w = eval_windows(stream, window)
        texts += list(w)
        labels += [domain] * len(w)
    return texts, labels


def train_domain_classifier(corpus_dir: Path, *, tokens: int = 65536, window: int = 64,
                            alpha: float = 1.0) -> NaiveBayes:
    """A naive Bayes over the domains of a ``moelab data build`` corpus, fit on windows of its train split."""
    from moelab.data.tokenizer import load_tokenizer

    vocab = load_tokenizer(Path(corpus_dir), "expected a corpus folder written by `moelab data build`").get_vocab_size()
    texts, labels = domain_windows(corpus_dir, "train", window, tokens)
    return fit_naive_bayes([t.numpy() for t in texts], labels, vocab, alpha)


__all__ = ["NaiveBayes", "domain_windows", "fit_naive_bayes", "log_posterior_reference", "train_domain_classifier"]
