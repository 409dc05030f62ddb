"""Expert predictor: which experts the next MoE layers will choose, from the hidden state now.

Shape legend: T tokens, H hidden, E experts (of the target layer), K top-k (of the target layer),
F the MLP head's width.

ExpertFlow (He, Zhang, Tang, Shi, Wang, Zeng, Tang, Chu, Yin, Tsang and Ong 2024, "ExpertFlow:
Efficient Mixture-of-Experts Inference via Predictive Expert Caching and Token Scheduling", arXiv
2410.17954) trains a routing-path predictor: a small model that estimates, for every token, the
experts each MoE layer will use, so that the experts can be loaded before the layer runs and a
predictive cache keeps the experts that are about to be needed. The paper's predictor is a small
transformer reading the token sequence and predicting all layers in one pass; here each head is
per (source layer l, target layer l + h), reading the hidden state ``x_TH`` entering MoE block l
(the router's input), for ``h = 1 .. horizon`` MoE blocks ahead: a cheaper predictor that sees
everything the model has computed so far. With ``next_token``, further heads (l, d, +1) predict the
experts layers ``d <= l`` will use for the *next* token (the steps a one-token decode takes after
this token's last layer), trained on consecutive tokens of a sequence; ``tokens_ahead = a``
extends them to every step of the next ``a`` tokens up to layer l (heads (l, d, +j), j <= a), the
routing path further ahead. Each head is a multi-label classifier

    z_TE = W2 act(W1 (x_TH - mu) / sigma + b1) + b2      (or W (x - mu) / sigma + b, linear)
    loss = BCE(sigmoid(z_TE), onehot(ids_{l+h})_TE)          (mean over tokens and experts)
    predicted_{l+h}(x_t) = top-K(z_t)                        (K = the target block's top-k)

trained with Adam on the hidden states and the chosen experts of a routing pass
(:func:`collect_routes`, over :func:`moelab.compress.calib.calibration_batches`). Precision and
recall (:func:`precision_recall`) are per token, pooled: ``sum_t |P_t & U_t| / sum_t |P_t|`` and
``sum_t |P_t & U_t| / sum_t |U_t|`` for predicted sets P_t and used sets U_t. Baselines
(:func:`score_predictor`): the target layer's K most frequent experts on the training routes, the
same expert ids as the source layer chose, and the target block's own router applied to the source
hidden state (speculative routing, the rule of :mod:`moelab.offload.prefetch`).

A cache hint (:func:`cache_hint`) is either the set of predicted keys (:func:`predicted_keys`,
``hint="keys"``) or, with ``hint="scores"``, every key's discounted probability of use over the
next occurrences of its layer (:func:`predicted_scores`): with ``j = 0, 1, ..`` the occurrences of
layer d after the current step in time order (this token's if d is later, then the next tokens')
and ``p_j = sigmoid(z_{l -> (d, j)})``,

    score(d, e) = sum_j discount ** j * p_j[e]

which, for exact 0/1 predictions and ``discount <= 1/2``, ranks keys as Belady's MIN does within
the heads' window (an earlier next use outweighs all later ones).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from moelab.errors import MoelabError

HINTS = ("keys", "scores")  # what a cache hint carries (PredictorConfig.hint)


@dataclass(frozen=True)
class PredictorConfig:
    """How the heads are built and trained.

    horizon: MoE blocks ahead each source block predicts (1 = the next one); next_token: also
    predict the next token's experts in this and the earlier MoE layers; tokens_ahead: with
    next_token, the tokens ahead covered (a: every layer of tokens +1 .. +(a-1), and the layers up
    to this one of token +a); hint: what :func:`cache_hint` gives a cache, ``"keys"`` (the predicted
    set, :func:`predicted_keys`) or ``"scores"`` (:func:`predicted_scores`); hint_extra: experts
    beyond each target's top-k that a ``"keys"`` hint names (more recall, less precision);
    score_discount: the weight ratio of successive occurrences in a ``"scores"`` hint; hidden: width F of
    the head's one hidden layer (0 = a linear head); steps: Adam steps per head over mini-batches of
    ``batch_tokens`` tokens; lr, weight_decay: Adam's; seed: the heads' initialisation and batches.
    """

    horizon: int = 1
    next_token: bool = False
    tokens_ahead: int = 1
    hint: str = "keys"
    hint_extra: int = 0
    score_discount: float = 0.5
    hidden: int = 0
    steps: int = 300
    batch_tokens: int = 2048
    lr: float = 1e-2
    weight_decay: float = 0.0
    seed: int = 0

    def __post_init__(self) -> None:
        if self.hint_extra < 0:
            raise MoelabError(f"PredictorConfig.hint_extra: expected >= 0, got {self.hint_extra}")
        if self.hint not in HINTS:
            raise MoelabError(f"PredictorConfig.hint: expected one of {HINTS}, got {self.hint!r}")
        if not 0 < self.score_discount <= 1:
            raise MoelabError(f"PredictorConfig.score_discount: expected in (0, 1], got {self.score_discount}")
        for name in ("horizon", "tokens_ahead", "steps", "batch_tokens"):
            if getattr(self, name) < 1:
                raise MoelabError(f"PredictorConfig.{name}: expected >= 1, got {getattr(self, name)}")
        if self.hidden < 0:
            raise MoelabError(f"PredictorConfig.hidden: expected >= 0 (0 = linear), got {self.hidden}")
        if not self.lr > 0 or self.weight_decay < 0:
            raise MoelabError(f"PredictorConfig: lr must be > 0 and weight_decay >= 0, got "
                              f"{self.lr}, {self.weight_decay}")


@dataclass(frozen=True)
class Routes:
    """A routing pass, per MoE layer in block order: the block's input ``hidden[l]`` ``[T, H]``
    (float32) and its chosen experts ``ids[l]`` ``[T, K]`` (int64, -1 for a masked slot), the same
    T tokens in every layer, sequences of ``seq_len`` tokens one after another; ``top_k[l]``,
    ``num_experts[l]``."""

    layers: tuple[int, ...]
    hidden: dict[int, Tensor]
    ids: dict[int, Tensor]
    top_k: dict[int, int]
    num_experts: dict[int, int]
    seq_len: int

    @property
    def num_tokens(self) -> int:
        return self.ids[self.layers[0]].shape[0]

    def select(self, rows: Tensor | slice) -> Routes:
        """The same routes restricted to token ``rows``."""
        return Routes(self.layers, {k: v[rows] for k, v in self.hidden.items()},
                      {k: v[rows] for k, v in self.ids.items()}, self.top_k, self.num_experts,
                      self.seq_len)

    def next_pairs(self, dt: int = 1) -> tuple[Tensor, Tensor]:
        """Rows ``(t, t + dt)`` of tokens ``dt`` apart within a sequence."""
        t = torch.arange(max(self.num_tokens - dt, 0))
        t = t[(t % self.seq_len) < self.seq_len - dt]
        return t, t + dt


def collect_routes(view, calib) -> Routes:
    """Hidden states entering each MoE block and its chosen experts over ``calib`` (a
    :class:`~moelab.compress.calib.Calibration`), via :func:`~moelab.compress.calib.routing_pass`."""
    from moelab.compress.calib import routing_pass

    hidden: dict[int, list[Tensor]] = {b.layer: [] for b in view.blocks}
    ids: dict[int, list[Tensor]] = {b.layer: [] for b in view.blocks}

    def on_event(ev) -> None:
        hidden[ev.block.layer].append(ev.hidden_TH.float().cpu())
        chosen = ev.ids_TK if ev.mask_TK is None else ev.ids_TK.masked_fill(~ev.mask_TK, -1)
        ids[ev.block.layer].append(chosen.cpu())

    routing_pass(view, calib, on_event)
    layers = tuple(b.layer for b in view.blocks)
    return Routes(layers, {k: torch.cat(v) for k, v in hidden.items()},
                  {k: torch.cat(v) for k, v in ids.items()},
                  {b.layer: b.top_k for b in view.blocks}, {b.layer: b.num_experts for b in view.blocks},
                  int(calib.batches[0].shape[1]))


def multi_hot(ids_TK: Tensor, num_experts: int) -> Tensor:
    """``[T, E]`` float: 1 where the token chose the expert (ids -1 ignored)."""
    out = torch.zeros(ids_TK.shape[0], num_experts + 1)
    out.scatter_(1, ids_TK.clamp(min=-1) % (num_experts + 1), 1.0)  # -1 lands in the spare column
    return out[:, :num_experts]


def precision_recall(pred_TK: Tensor, used_TK: Tensor) -> tuple[float, float]:
    """Pooled per-token precision and recall of predicted expert sets against used ones (ids < 0
    are empty slots; a repeated id counts once)."""
    if pred_TK.shape[0] != used_TK.shape[0]:
        raise MoelabError(f"precision_recall: {pred_TK.shape[0]} predicted tokens vs {used_TK.shape[0]} used")
    E = int(max(pred_TK.max(), used_TK.max(), 0)) + 1
    p_TE, u_TE = multi_hot(pred_TK, E), multi_hot(used_TK, E)
    both = float((p_TE * u_TE).sum())
    n_p, n_u = float(p_TE.sum()), float(u_TE.sum())
    return (both / n_p if n_p else float("nan"), both / n_u if n_u else float("nan"))


class Head(nn.Module):
    """One (source, target) head: standardise ``x_TH`` with the training mean and std, then a
    linear map or a one-hidden-layer MLP (GELU) to ``z_TE``."""

    def __init__(self, mean_H: Tensor, std_H: Tensor, num_experts: int, hidden: int) -> None:
        super().__init__()
        self.register_buffer("mean_H", mean_H)
        self.register_buffer("std_H", std_H)
        H = mean_H.shape[0]
        self.net = (nn.Linear(H, num_experts) if hidden == 0 else
                    nn.Sequential(nn.Linear(H, hidden), nn.GELU(), nn.Linear(hidden, num_experts)))

    def forward(self, x_TH: Tensor) -> Tensor:
        x = (x_TH.to(self.mean_H.dtype) - self.mean_H) / self.std_H
        return self.net(x)


Target = tuple[int, int]  # (target MoE layer, token offset: 0 = this token, 1 = the next)


class ExpertPredictor(nn.Module):
    """Trained heads: ``predict(src, x_TH, (dst, dt)) -> ids [T, K]`` of MoE layer ``dst`` for
    token offset ``dt`` from the hidden state entering MoE layer ``src``; ``targets(src)``: the
    ``(dst, dt)`` it predicts."""

    def __init__(self, heads: dict[tuple[int, int, int], Head], top_k: dict[int, int],
                 config: PredictorConfig) -> None:
        super().__init__()
        self.heads = nn.ModuleDict({f"{s}->{d}+{dt}": h for (s, d, dt), h in heads.items()})
        self.pairs = tuple(heads)  # (src, dst, dt)
        self.top_k = dict(top_k)
        self.config = config
        self.fingerprint: dict | None = None  # of the model trained on, when known (predictor files)

    def targets(self, src: int) -> list[Target]:
        return [(d, dt) for s, d, dt in self.pairs if s == src]

    @torch.no_grad()
    def logits(self, src: int, x_TH: Tensor, target: Target) -> Tensor:
        key = f"{src}->{target[0]}+{target[1]}"
        if key not in self.heads:
            raise MoelabError(f"predictor: no head from MoE layer {src} to {target} (has {list(self.heads)})")
        head = self.heads[key]
        return head(x_TH.reshape(-1, x_TH.shape[-1]).to(head.mean_H.device))

    def predict(self, src: int, x_TH: Tensor, target: Target, extra: int = 0) -> Tensor:
        """``[T, K + extra]`` the experts of ``target`` with the highest scores, per token."""
        z_TE = self.logits(src, x_TH, target)
        return z_TE.topk(min(self.top_k[target[0]] + extra, z_TE.shape[-1]), dim=-1).indices


def _targets(routes: Routes, i: int, cfg: PredictorConfig) -> list[Target]:
    later = [(d, 0) for d in routes.layers[i + 1:i + 1 + cfg.horizon]]
    if not cfg.next_token:
        return later
    a = cfg.tokens_ahead
    return later + [(d, dt) for dt in range(1, a + 1)
                    for j, d in enumerate(routes.layers) if dt < a or j <= i]


def head_count(routes: Routes, config: PredictorConfig) -> int:
    """The heads :func:`train_predictor` trains on ``routes`` with ``config``."""
    return sum(len(_targets(routes, i, config)) for i in range(len(routes.layers)))


def train_predictor(routes: Routes, config: PredictorConfig | None = None,
                    progress: Callable[[int], None] | None = None) -> ExpertPredictor:
    """A head for every MoE layer l and target l + h (h = 1 .. horizon, within the model; with
    ``next_token`` also the next token's layers <= l), trained on ``routes``; ``progress(1)`` is
    called after each head."""
    cfg = config or PredictorConfig()
    far = cfg.tokens_ahead if cfg.next_token else 0
    if routes.num_tokens < 2 or (far and len(routes.next_pairs(far)[0]) < 2):
        raise MoelabError(f"train_predictor: the routes hold {routes.num_tokens} tokens in sequences "
                          f"of {routes.seq_len}; need >= 2 (and two {far} tokens apart for next_token)")
    heads = {}
    gen = torch.Generator().manual_seed(cfg.seed)
    pairs = {dt: routes.next_pairs(dt) for dt in range(1, far + 1)}
    for i, src in enumerate(routes.layers):
        for dst, dt in _targets(routes, i, cfg):
            now, later = pairs[dt] if dt else (slice(None), slice(None))
            x_TH, used_TK = routes.hidden[src][now], routes.ids[dst][later]
            torch.manual_seed(int(torch.randint(0, 2**31 - 1, (1,), generator=gen)))
            head = Head(x_TH.mean(0), x_TH.std(0).clamp(min=1e-6), routes.num_experts[dst], cfg.hidden)
            _fit(head, x_TH, multi_hot(used_TK, routes.num_experts[dst]), cfg, gen)
            heads[(src, dst, dt)] = head.eval()
            if progress is not None:
                progress(1)
    if not heads:
        raise MoelabError("train_predictor: the model has one MoE layer; there is no next layer to "
                          "predict (use next_token=True)")
    return ExpertPredictor(heads, routes.top_k, cfg)


def _fit(head: Head, x_TH: Tensor, y_TE: Tensor, cfg: PredictorConfig, gen: torch.Generator) -> None:
    opt = torch.optim.Adam(head.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    T = x_TH.shape[0]
    with torch.enable_grad():
        for _ in range(cfg.steps):
            rows = torch.randint(0, T, (min(cfg.batch_tokens, T),), generator=gen) if T > cfg.batch_tokens else slice(None)
            loss = nn.functional.binary_cross_entropy_with_logits(head(x_TH[rows]), y_TE[rows])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()


def route_steps(routes: Routes) -> list[list[tuple[int, int]]]:
    """One cache step per (token, MoE layer), in token order then block order: the token's distinct
    experts ``(layer, expert)`` in that layer (what a one-token decode asks the cache for)."""
    per_layer = [[sorted({int(e) for e in row if e >= 0}) for row in routes.ids[layer].tolist()]
                 for layer in routes.layers]
    return [[(layer, e) for e in per_layer[i][t]]
            for t in range(routes.num_tokens) for i, layer in enumerate(routes.layers)]


def predicted_keys(predictor: ExpertPredictor, src: int, x_TH: Tensor) -> list[tuple[int, int]]:
    """The distinct ``(layer, expert)`` the predictor expects the steps after MoE layer ``src`` to
    use for tokens ``x_TH`` (this token's later layers; with ``next_token`` the next token's layers
    up to ``src``), each target's top-k plus ``config.hint_extra``: a predictive cache's hint."""
    keys: set[tuple[int, int]] = set()
    extra = predictor.config.hint_extra
    for target in predictor.targets(src):
        keys.update((target[0], int(e)) for e in predictor.predict(src, x_TH, target, extra).unique().tolist())
    return sorted(keys)


def predicted_scores(predictor: ExpertPredictor, src: int, x_TH: Tensor) -> dict[tuple[int, int], float]:
    """Every ``(layer, expert)`` of the layers the heads from ``src`` target, scored by its
    discounted probability of use at the next occurrences of its layer (the module docstring's
    ``score``; ``discount = config.score_discount``): a ``"scores"`` cache hint. For T > 1 tokens
    (a prompt's forward) ``p_j`` is the probability that any of them uses the key, taken as
    independent: ``1 - prod_t (1 - p_tj)``."""
    by_layer: dict[int, list[int]] = {}
    for d, dt in predictor.targets(src):
        by_layer.setdefault(d, []).append(dt)
    out: dict[tuple[int, int], float] = {}
    for d, dts in by_layer.items():
        score_E = 0.0
        for j, dt in enumerate(sorted(dts)):  # the occurrences of layer d in time order
            p_TE = torch.sigmoid(predictor.logits(src, x_TH, (d, dt)).float())
            p_E = p_TE[0] if p_TE.shape[0] == 1 else 1 - (1 - p_TE).prod(0)
            score_E = score_E + predictor.config.score_discount ** j * p_E
        out.update(((d, e), float(v)) for e, v in enumerate(score_E.tolist()))
    return out


def cache_hint(predictor: ExpertPredictor, src: int, x_TH: Tensor):
    """The hint a cache gets at MoE layer ``src`` (:meth:`moelab.analysis.cache_policy.CachePolicy.hint`):
    :func:`predicted_keys` or, with ``config.hint == "scores"``, :func:`predicted_scores`."""
    fn = predicted_scores if predictor.config.hint == "scores" else predicted_keys
    return fn(predictor, src, x_TH)


def route_hints(predictor: ExpertPredictor, routes: Routes) -> list:
    """The hint before each step of :func:`route_steps`: :func:`cache_hint` from the hidden
    state entering that step's layer, one token at a time, as the runtime's hints
    (:func:`moelab.offload.prefetch.install_hints`) give them in a one-token decode."""
    per_layer = {src: [cache_hint(predictor, src, routes.hidden[src][t:t + 1])
                       for t in range(routes.num_tokens)] for src in routes.layers}
    return [per_layer[src][t] for t in range(routes.num_tokens) for src in routes.layers]


@dataclass(frozen=True)
class PredictionScore:
    """Precision and recall of one way of predicting ``target`` = (layer, token offset) from the
    hidden state entering MoE layer ``src``."""

    src: int
    target: Target
    method: str  # "predictor" | "router" | "frequent" | "same"
    precision: float
    recall: float


def score_predictor(predictor: ExpertPredictor, test: Routes, train: Routes, view=None) -> list[PredictionScore]:
    """Precision and recall on ``test`` of the predictor and the baselines: ``"frequent"`` (the K
    most frequent experts of the target layer in ``train``), ``"same"`` (the ids the target layer
    chose for this token, for a target tokens ahead; the ids layer ``src`` chose, where both layers
    have as many experts, for a later layer) and, with ``view``, ``"router"`` (the target layer's
    router on the hidden state entering ``src``; later layers only)."""
    from moelab.models.reference import reference_route

    out = []
    for src, dst, dt in predictor.pairs:
        now, nxt = test.next_pairs(dt) if dt else (slice(None), slice(None))
        x_TH, K, E = test.hidden[src][now], test.top_k[dst], test.num_experts[dst]
        used_TK = test.ids[dst][nxt]
        preds: dict[str, Tensor] = {"predictor": predictor.predict(src, x_TH, (dst, dt))}
        if view is not None and dt == 0:
            preds["router"] = reference_route(view.block(dst), x_TH)[1].to(torch.int64)
        top = multi_hot(train.ids[dst], E).sum(0).topk(K).indices
        preds["frequent"] = top.expand(x_TH.shape[0], K)
        if dt >= 1:
            preds["same"] = test.ids[dst][now]
        elif test.num_experts[src] == E:
            preds["same"] = test.ids[src]
        for method, pred_TK in preds.items():
            out.append(PredictionScore(src, (dst, dt), method, *precision_recall(pred_TK, used_TK)))
    return out


__all__ = ["HINTS", "ExpertPredictor", "PredictionScore", "PredictorConfig", "Routes", "Target",
           "cache_hint", "collect_routes", "multi_hot", "precision_recall", "predicted_keys",
           "predicted_scores", "route_hints", "route_steps", "score_predictor", "train_predictor"]
