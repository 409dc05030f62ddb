"""Text generation with a KV cache, streaming tokens as they come (``moelab generate``).

Shape legend: S tokens in the sequence so far, V vocabulary.

One simple loop over the model's own forward: the prompt is run once (prefill), then one token per
step with the returned ``cache`` (transformers' ``DynamicCache``, created by the model on the
first call; only the last position's logits are computed). ``use_cache=False`` recomputes the whole sequence every step: the slow obvious reference the
cached loop is tested against. The next token is the argmax at temperature 0 (greedy), otherwise a
sample from ``softmax(logits / T)`` restricted to the nucleus of mass ``top_p`` (the smallest
highest-probability set whose mass reaches ``top_p``: :func:`moelab.nn.routers.top_p.top_p_select`,
the one top-p selection).

Routing edits (``moelab.steer``) act through the model's routing seam, so a steered generation is
a generation with edits installed: pass their handles to have them removed when generation ends.
A decoding method that scores the next token otherwise (SCMoE's self-contrast, Rewiring's refits)
is a ``scorer``: ``scorer(new_ids_1S) -> scores_V``, fed the prompt first and then each new token,
keeping its own caches; the loop's sampling and stopping rules stay the same.
Text is decoded incrementally (:class:`TextStream`) so that a character split over several byte-level
tokens prints once, whole.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from moelab.errors import MoelabError
from moelab.run.runner import Removable

# config fields naming a model's context length, in the order they are looked up
_CONTEXT_FIELDS = ("max_position_embeddings", "max_seq_len", "n_positions")


@dataclass(frozen=True, kw_only=True)
class GenerationConfig:
    """How to generate.

    Attributes:
        max_new_tokens: at most this many new tokens (fewer at EOS or at the model's context).
        temperature: 0 is greedy (argmax); > 0 samples from ``softmax(logits / temperature)``.
        top_p: nucleus sampling mass in (0, 1]; 1 keeps the whole distribution (ignored when greedy).
        seed: seed of the sampling generator (None: torch's global generator).
        stop_at_eos: stop after the model's end-of-text token.
        use_cache: reuse the KV cache; False recomputes the whole sequence each step (the reference).
    """

    max_new_tokens: int = 64
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int | None = None
    stop_at_eos: bool = True
    use_cache: bool = True

    def __post_init__(self) -> None:
        if isinstance(self.max_new_tokens, bool) or not isinstance(self.max_new_tokens, int) \
                or self.max_new_tokens < 1:
            raise MoelabError(f"max_new_tokens: expected an integer >= 1, got {self.max_new_tokens!r}")
        if not isinstance(self.temperature, (int, float)) or not math.isfinite(self.temperature) \
                or self.temperature < 0:
            raise MoelabError(f"temperature: expected a finite number >= 0, got {self.temperature!r}")
        if not isinstance(self.top_p, (int, float)) or not 0 < self.top_p <= 1:
            raise MoelabError(f"top_p: expected a number in (0, 1], got {self.top_p!r}")
        if self.seed is not None and (isinstance(self.seed, bool) or not isinstance(self.seed, int)):
            raise MoelabError(f"seed: expected an integer or None, got {self.seed!r}")


@dataclass
class GenerationResult:
    """What :func:`generate` produced.

    Attributes:
        text: the generated text (without the prompt).
        token_ids: the generated token ids.
        prompt_ids: the prompt's token ids.
        stop_reason: ``"length"`` (max_new_tokens), ``"eos"`` or ``"context"`` (the model's context
            length was reached).
        seconds: wall time of the whole call; first_token_s: until the first new token (prefill).
        tokens_per_s: decode rate, ``(n - 1) / (seconds - first_token_s)`` for n > 1 new tokens
            (the prefill excluded), ``n / seconds`` for one.
    """

    text: str
    token_ids: list[int]
    prompt_ids: list[int]
    stop_reason: str
    seconds: float
    first_token_s: float
    tokens_per_s: float = field(init=False)

    def __post_init__(self) -> None:
        n, rest = len(self.token_ids), self.seconds - self.first_token_s
        self.tokens_per_s = (n - 1) / rest if n > 1 and rest > 0 else n / max(self.seconds, 1e-12)


def context_length(model: nn.Module) -> int | None:
    """The longest sequence the model's config allows, or None when it names none."""
    config = getattr(model, "config", None)
    for name in _CONTEXT_FIELDS:
        value = getattr(config, name, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def encode_prompt(model: nn.Module, tokenizer, prompt: str) -> list[int]:
    """The prompt's token ids, checked against the model's context (an empty prompt starts from BOS)."""
    if not isinstance(prompt, str):
        raise MoelabError(f"prompt (--prompt): expected text, got {type(prompt).__name__}")
    ids = list(tokenizer.encode(prompt, add_special_tokens=False).ids)
    if not ids:
        bos = getattr(model.config, "bos_token_id", None)
        if not isinstance(bos, int):
            raise MoelabError("prompt (--prompt) is empty and the model's config names no bos_token_id "
                              "to start from; give some text")
        ids = [bos]
    vocab = getattr(model.config, "vocab_size", None)
    if isinstance(vocab, int) and max(ids) >= vocab:
        raise MoelabError(f"prompt (--prompt): the tokenizer gave token id {max(ids)} but the model has a "
                          f"vocabulary of {vocab}; use the tokenizer the model was trained with")
    limit = context_length(model)
    if limit is not None and len(ids) >= limit:
        raise MoelabError(f"prompt (--prompt) is {len(ids)} tokens; the model's context is {limit} tokens, "
                          f"so the prompt must be at most {limit - 1} tokens to leave room for one new token")
    return ids


def next_token(logits_V: Tensor, config: GenerationConfig, generator: torch.Generator | None) -> int:
    """Greedy argmax at temperature 0, else a sample from the tempered nucleus (float32 softmax)."""
    if config.temperature == 0:
        return int(logits_V.argmax())
    from moelab.nn.routers.top_p import top_p_select

    probs_V = torch.softmax(logits_V.float() / config.temperature, dim=-1)
    if config.top_p < 1:
        probs_V = probs_V * top_p_select(probs_V[None], config.top_p)[0]
    return int(torch.multinomial(probs_V, 1, generator=generator))


Scorer = Callable[[Tensor], Tensor]  # new_ids_1S -> next-token scores_V (see the module docstring)


def iter_token_ids(model: nn.Module, prompt_ids: Sequence[int], config: GenerationConfig,
                   handles: Sequence[Removable] = (), scorer: Scorer | None = None) -> Iterator[int]:
    """Yield new token ids one at a time (see the module docstring).

    The model is in eval mode and gradients are off while it runs (its train/eval mode is restored
    at the end); ``handles`` (routing edits installed for this generation) are removed when the
    iterator ends or is closed, also on error.
    """
    # NOTE: not moelab.run.evaluating around the loop: its no_grad would stay on in the caller
    # between yields, and entering it per step walks every module twice (model.eval / train)
    # per token, ~15 % of a decode step on the embedded model.
    was_training = model.training
    try:
        model.eval()
        yield from _decode(model, prompt_ids, config, scorer)
    finally:
        model.train(was_training)
        for h in handles:
            h.remove()


def _decode(model: nn.Module, prompt_ids: Sequence[int], config: GenerationConfig,
            scorer: Scorer | None = None) -> Iterator[int]:
    device = next(model.parameters()).device
    ids_1S = torch.tensor([list(prompt_ids)], dtype=torch.int64, device=device)
    generator = None
    if config.seed is not None and config.temperature > 0:
        generator = torch.Generator(device=device).manual_seed(config.seed)
    limit = context_length(model)
    eos = _eos_ids(model) if config.stop_at_eos else set()
    step_1S, cache = ids_1S, None
    for _ in range(config.max_new_tokens):
        if limit is not None and ids_1S.shape[1] >= limit:
            return
        if scorer is not None:
            token = next_token(scorer(step_1S), config, generator)
        else:
            with torch.no_grad():
                if config.use_cache:
                    out = model(input_ids=step_1S, cache=cache, use_cache=True, logits_to_keep=1)
                    cache = out.cache
                else:
                    out = model(input_ids=ids_1S, use_cache=False, logits_to_keep=1)
                token = next_token(out.logits[0, -1], config, generator)
        step_1S = torch.tensor([[token]], dtype=torch.int64, device=device)
        ids_1S = torch.cat([ids_1S, step_1S], dim=1)
        yield token
        if token in eos:
            return


def _eos_ids(model: nn.Module) -> set[int]:
    eos = getattr(model.config, "eos_token_id", None)
    if eos is None:
        return set()
    return {eos} if isinstance(eos, int) else {int(e) for e in eos}


class TextStream:
    """Incremental detokenisation: :meth:`push` a token id, get the text it completes.

    Tokens are kept until they decode without a trailing replacement character (a UTF-8 character
    split across byte-level tokens) and then emitted and dropped, so ``"".join(pieces) + flush()``
    is the decoding of all the tokens. A run of ``max_pending`` tokens that never completes a
    character is emitted as it decodes.
    """

    def __init__(self, tokenizer, max_pending: int = 8) -> None:
        self.tokenizer, self.max_pending = tokenizer, max_pending
        self._pending: list[int] = []

    def push(self, token_id: int) -> str:
        self._pending.append(int(token_id))
        text = self.tokenizer.decode(self._pending)
        if text.endswith("\ufffd") and len(self._pending) < self.max_pending:
            return ""
        self._pending = []
        return text

    def flush(self) -> str:
        text = self.tokenizer.decode(self._pending) if self._pending else ""
        self._pending = []
        return text


@dataclass(frozen=True)
class Piece:
    """One step of :func:`iter_generate`: the token id and the text it completes (may be empty)."""

    token_id: int
    text: str


def iter_generate(model: nn.Module, tokenizer, prompt: str, config: GenerationConfig,
                  handles: Sequence[Removable] = (), scorer: Scorer | None = None) -> Iterator[Piece]:
    """Stream a generation: one :class:`Piece` per new token; text still pending at the end comes as
    a last piece with ``token_id`` -1. A bad prompt raises here, before any token; ``handles`` are
    removed when the stream ends (or on that error)."""
    return _pieces(model, tokenizer, _encode_or_release(model, tokenizer, prompt, handles), config, handles, scorer)


def _encode_or_release(model: nn.Module, tokenizer, prompt: str, handles: Sequence[Removable]) -> list[int]:
    try:
        return encode_prompt(model, tokenizer, prompt)
    except BaseException:
        for h in handles:
            h.remove()
        raise


def _pieces(model: nn.Module, tokenizer, ids: list[int], config: GenerationConfig,
            handles: Sequence[Removable], scorer: Scorer | None = None) -> Iterator[Piece]:
    stream = TextStream(tokenizer)
    for token in iter_token_ids(model, ids, config, handles, scorer):
        yield Piece(token, stream.push(token))
    rest = stream.flush()
    if rest:
        yield Piece(-1, rest)


def generate(model: nn.Module, tokenizer, prompt: str, config: GenerationConfig | None = None, *,
             handles: Sequence[Removable] = (), on_text: Callable[[str], None] | None = None,
             scorer: Scorer | None = None) -> GenerationResult:
    """Generate from ``prompt`` (text; ``tokenizer`` a ``tokenizers.Tokenizer``).

    Args:
        handles: edits installed for this generation (e.g. :func:`moelab.steer.experts_off`'s
            handle, or a steering file's); removed when it ends, also on error.
        on_text: called with each piece of text as it is decoded (streaming).
        scorer: next-token scores other than the model's own logits (see the module docstring).
    """
    config = config or GenerationConfig()
    start = time.perf_counter()
    ids = _encode_or_release(model, tokenizer, prompt, handles)
    tokens, pieces, first = [], [], None
    for piece in _pieces(model, tokenizer, ids, config, handles, scorer):
        if piece.token_id >= 0:
            tokens.append(piece.token_id)
            first = time.perf_counter() - start if first is None else first
        if piece.text:
            pieces.append(piece.text)
            if on_text is not None:
                on_text(piece.text)
    seconds = time.perf_counter() - start
    return GenerationResult(text="".join(pieces), token_ids=tokens, prompt_ids=ids,
                            stop_reason=_stop_reason(model, tokens, config),
                            seconds=seconds, first_token_s=first if first is not None else seconds)


def _stop_reason(model: nn.Module, tokens: list[int], config: GenerationConfig) -> str:
    if tokens and config.stop_at_eos and tokens[-1] in _eos_ids(model):
        return "eos"
    if len(tokens) >= config.max_new_tokens:
        return "length"
    return "context"


__all__ = ["GenerationConfig", "GenerationResult", "Piece", "TextStream", "context_length", "encode_prompt",
           "generate", "iter_generate", "iter_token_ids", "next_token"]
