"""moelab.run: running a model for measurement, below every stage that measures.

- :func:`run_batches` / :func:`evaluating`: forward token batches in eval mode without gradients;
  hooks removed and the model's train/eval state restored on exit, also on error.
- :func:`next_token_nll`: the one next-token cross-entropy (position s predicts token s + 1).
- :mod:`moelab.run.evaluate`: per-domain validation perplexity and expert load
  (``moelab perplexity``, the model card, compression evaluation).
"""

from __future__ import annotations

from moelab.run.loss import next_token_nll
from moelab.run.runner import evaluating, run_batches

__all__ = ["evaluating", "next_token_nll", "run_batches"]
