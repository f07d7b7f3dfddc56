"""Semantic decoding: word sequences from brain responses by beam search (after Tang et al. 2023).

Identification decoding (:mod:`pipelines.decoding`) asks which known segment a response
came from. Semantic decoding asks for the words themselves: a causal language model
proposes continuations, and an encoding model (LM features -> responses) scores each
proposal by how well the responses it predicts match the recorded ones. The best
hypotheses (the beam) are kept word by word (Tang, LeBel, Jain & Huth 2023, *Nat.
Neurosci.* 26:858).

What is assumed, and how it differs from Tang's decoder:

* **Word times are given** (the words' onsets in the held-out segment), standing for the
  output of Tang's word-rate model; only the word *identities* are decoded.
* Proposals are the language model's ``candidates`` most likely next words (Tang samples a
  nucleus); with a sub-word tokenizer a proposal is the first token of a word, so words the
  model spells with several tokens are proposed truncated. The encoding model alone ranks
  hypotheses (no LM prior), as in Tang's decoder.
* A hypothesis' features are the LM hidden states of its words, each read with the
  ``context_words`` words before it (:func:`hypothesis_features`, the same windows as
  :func:`pipelines.features.language_model.extract_word_features_per_word`), resampled to
  the TR grid with the Lanczos kernel (:func:`pipelines.features.align.lanczos_resample`),
  optionally standardised with the training statistics, stacked at the FIR delays and
  multiplied by the encoding weights.
* Score: Gaussian log-likelihood of the recorded responses of the TRs up to the last one
  the newest word reaches, with a noise covariance from the training residuals (Ledoit-Wolf
  shrinkage, :func:`noise_precision`); words not yet decoded contribute nothing, alike for
  every hypothesis.

Evaluation (:func:`decode_segments`): the decoded words of each segment are compared with
the actual ones by the cosine similarity of sentence embeddings (mean-pooled last hidden
state of a masked LM, e.g. the packaged all-MiniLM-L6-v2), averaged over windows of
``window_words`` words; the null distribution is the same decoder run on the segment's
responses circularly shifted in time (same statistics, wrong timing), giving a z-score and
a percentile. On small data expect little (``bench/results/semantic-decoding.md``): on
planted data whose every target has a held-out r of about 0.2, 5-18% of the words come
back; at r 0.05-0.07 nothing distinguishable from the null does, and the decoded text is
the language model's own guesses.
"""
from __future__ import annotations

import weakref
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from .errors import ConfigError, ModelError
from .features.align import lanczos_kernel, make_delays
from .features.lm_windows import LoadedModel, forward_batch, tokenize_window

__all__ = [
    "DecodingReport",
    "SegmentDecoding",
    "SemanticEncoder",
    "beam_decode",
    "decode_segments",
    "embedding_similarity",
    "fit_semantic_encoder",
    "hypothesis_features",
    "noise_precision",
    "shifted_responses",
]


@dataclass
class SemanticEncoder:
    """A fitted encoding model of one LM feature space, as the decoder needs it.

    Attributes
    ----------
    weights : array of shape (n_delays * n_features, n_targets)
        Ridge weights on the delayed features, delay blocks in the order of ``delays``
        (as :func:`pipelines.features.align.make_delays` stacks them).
    intercept : array of shape (n_targets,)
    delays : list of int
        FIR delays in TRs.
    layer : int
        Hidden-state index of the features (0 = embeddings).
    context_words : int
        Preceding words each word was read with.
    precision : array of shape (n_targets, n_targets)
        Inverse noise covariance of the responses (:func:`noise_precision`).
    feature_mean, feature_scale : arrays of shape (n_features,), optional
        Standardisation of the resampled features the weights were fitted on.
    lanczos_window : int
        Lanczos lobes used when resampling (3 as :func:`lanczos_resample`).
    """

    weights: np.ndarray
    intercept: np.ndarray
    delays: list[int]
    layer: int
    context_words: int
    precision: np.ndarray
    feature_mean: np.ndarray | None = None
    feature_scale: np.ndarray | None = None
    lanczos_window: int = 3

    def __post_init__(self) -> None:
        self.weights = np.asarray(self.weights, dtype=np.float64)
        self.intercept = np.asarray(self.intercept, dtype=np.float64).ravel()
        self.precision = np.asarray(self.precision, dtype=np.float64)
        self.delays = [int(d) for d in self.delays]
        n_targets = self.intercept.size
        if not self.delays:
            raise ConfigError("SemanticEncoder 'delays' is empty: give the FIR delays in TRs the model was fit with")
        if self.weights.ndim != 2 or self.weights.shape[1] != n_targets or self.weights.shape[0] % len(self.delays):
            raise ConfigError(f"SemanticEncoder 'weights' has shape {self.weights.shape}: it must be "
                              f"(n_delays * n_features, n_targets) = ({len(self.delays)} * F, {n_targets})")
        if self.precision.shape != (n_targets, n_targets):
            raise ConfigError(f"SemanticEncoder 'precision' has shape {self.precision.shape}: it must be "
                              f"({n_targets}, {n_targets}), see noise_precision()")
        for name in ("feature_mean", "feature_scale"):
            value = getattr(self, name)
            if value is not None:
                value = np.asarray(value, dtype=np.float64).ravel()
                if value.size != self.n_features:
                    raise ConfigError(f"SemanticEncoder {name!r} has {value.size} values: it needs one per "
                                      f"feature ({self.n_features})")
                setattr(self, name, value)

    @property
    def n_features(self) -> int:
        """Features per delay (the LM's hidden size)."""
        return self.weights.shape[0] // len(self.delays)

    @property
    def n_targets(self) -> int:
        """Responses predicted (voxels, channels)."""
        return self.intercept.size

    def predict(self, resampled: np.ndarray) -> np.ndarray:
        """Responses predicted from TR-grid features.

        Parameters
        ----------
        resampled : array of shape (..., n_trs, n_features)
            Features on the TR grid (one segment, any leading batch axes).

        Returns
        -------
        array of shape (..., n_trs, n_targets)
        """
        X = np.asarray(resampled, dtype=np.float64)
        if self.feature_mean is not None:
            X = X - self.feature_mean
        if self.feature_scale is not None:
            X = X / np.where(self.feature_scale > 0, self.feature_scale, 1.0)
        n_trs, f = X.shape[-2], self.n_features
        out = np.broadcast_to(self.intercept, X.shape[:-1] + (self.n_targets,)).copy()
        for k, d in enumerate(self.delays):
            W = self.weights[k * f:(k + 1) * f]
            if d >= n_trs or -d >= n_trs:
                continue
            if d >= 0:
                out[..., d:, :] += X[..., : n_trs - d, :] @ W
            else:
                out[..., : n_trs + d, :] += X[..., -d:, :] @ W
        return out


def noise_precision(residuals: np.ndarray) -> np.ndarray:
    """Inverse noise covariance from training residuals, Ledoit-Wolf shrunk.

    Parameters
    ----------
    residuals : array of shape (n_samples, n_targets)
        Training responses minus the encoding model's predictions of them.

    Returns
    -------
    precision : array of shape (n_targets, n_targets)
    """
    from sklearn.covariance import LedoitWolf

    R = np.asarray(residuals, dtype=np.float64)
    if R.ndim != 2 or R.shape[0] < 2 or not np.isfinite(R).all():
        raise ConfigError(f"'residuals' must be a finite 2-D array (n_samples >= 2, n_targets); got shape {R.shape}")
    return LedoitWolf().fit(R).precision_


def fit_semantic_encoder(features: Sequence[np.ndarray], responses: Sequence[np.ndarray], *, delays: Sequence[int],
                         layer: int, context_words: int, alpha: float, backend: str = "auto") -> SemanticEncoder:
    """Fit the encoding model the decoder needs on training runs (ridge, one alpha).

    Parameters
    ----------
    features : sequence of arrays of shape (n_trs_run, n_features)
        Per training run, the LM features on the TR grid (e.g. :func:`hypothesis_features`
        of the run's words, :func:`pipelines.features.align.lanczos_resample`-d).
    responses : sequence of arrays of shape (n_trs_run, n_targets)
        Per run, the recorded responses (in the units the decoded segments will be given in).
    delays : sequence of int
        FIR delays in TRs.
    layer, context_words : int
        How ``features`` were made (kept for the decoder's hypotheses).
    alpha : float
        Ridge penalty (e.g. the median of the alphas the cross-validated fit chose).
    backend : str
        himalaya backend, as :func:`pipelines.fit.fit_ridge_fixed_alpha`.

    Returns
    -------
    SemanticEncoder
        Features standardised with the training mean and standard deviation; the noise
        precision from the training residuals (:func:`noise_precision`).
    """
    from .fit import fit_ridge_fixed_alpha

    if not features or len(features) != len(responses):
        raise ConfigError(f"'features' and 'responses' must hold the same, non-zero number of runs; got "
                          f"{len(features)} and {len(responses)}")
    Fs = [np.asarray(F, dtype=np.float64) for F in features]
    Ys = [np.asarray(Y, dtype=np.float64) for Y in responses]
    for k, (F, Y) in enumerate(zip(Fs, Ys)):
        if F.ndim != 2 or Y.ndim != 2 or F.shape[0] != Y.shape[0]:
            raise ConfigError(f"run {k}: 'features' {F.shape} and 'responses' {Y.shape} must be 2-D with one row "
                              "per TR each")
    F = np.concatenate(Fs)
    Y = np.concatenate(Ys)
    mean, sd = F.mean(0), F.std(0)
    sd = np.where(sd > 0, sd, 1.0)
    X = make_delays(((F - mean) / sd).astype(np.float32), [f.shape[0] for f in Fs], list(delays))
    intercept = Y.mean(0)
    weights = fit_ridge_fixed_alpha(X, (Y - intercept).astype(np.float32), alpha, backend=backend).astype(np.float64)
    return SemanticEncoder(weights=weights, intercept=intercept, delays=list(delays), layer=layer,
                           context_words=context_words, precision=noise_precision(Y - X @ weights - intercept),
                           feature_mean=mean, feature_scale=sd)


def _hidden_index(lm: LoadedModel, layer: int) -> int:
    idx = int(layer) if layer >= 0 else lm.n_layers + 1 + int(layer)
    if not 0 <= idx <= lm.n_layers:
        raise ModelError(f"layer {layer} is out of range for model {lm.name!r} (hidden states 0..{lm.n_layers})")
    return idx


def _forward_last(lm: LoadedModel, windows: list[list[str]], layer: int, batch_size: int = 64
                  ) -> tuple[np.ndarray, np.ndarray | None]:
    """Hidden state (at ``layer``) and next-token log-probabilities of the last word of each window."""
    import torch  # heavy and optional: imported only when a model runs

    idx = _hidden_index(lm, layer)
    states = np.zeros((len(windows), lm.hidden_size), dtype=np.float32)
    logp: np.ndarray | None = None
    for lo in range(0, len(windows), batch_size):
        seqs, last = [], []
        for words in windows[lo:lo + batch_size]:
            ids, wids, _ = tokenize_window(lm, list(words))
            target = max(w for w in wids if w is not None)
            seqs.append(ids)
            last.append(max(k for k, w in enumerate(wids) if w == target))
        out = forward_batch(lm, seqs)
        rows = torch.arange(len(seqs), device=out.hidden_states[idx].device)
        pos = torch.tensor(last, device=rows.device)
        states[lo:lo + len(seqs)] = out.hidden_states[idx][rows, pos].float().cpu().numpy()
        if getattr(out, "logits", None) is not None:
            with torch.inference_mode():
                lp = torch.log_softmax(out.logits[rows, pos].float(), dim=-1).cpu().numpy()
            logp = lp if logp is None else np.concatenate([logp, lp])
    return states, logp


def hypothesis_features(lm: LoadedModel, words: Sequence[str], layer: int, context_words: int) -> np.ndarray:
    """LM features of each word read with its ``context_words`` preceding words.

    The same windows and pooling (last sub-token) as
    :func:`pipelines.features.language_model.extract_word_features_per_word`, so an encoding
    model fitted on those features scores the decoder's hypotheses on the same footing.

    Parameters
    ----------
    lm : LoadedModel
    words : sequence of str
    layer : int
        Hidden-state index (0 = embeddings; negative from the end).
    context_words : int

    Returns
    -------
    array of shape (n_words, hidden_size), float32
    """
    words = list(words)
    windows = [words[max(0, i - int(context_words)):i + 1] for i in range(len(words))]
    return _forward_last(lm, windows, layer)[0]


class _Vocabulary:
    """Which token ids of a causal LM may start a proposed word, and the word each gives."""

    def __init__(self, lm: LoadedModel) -> None:
        tok = lm.tokenizer
        pieces = tok.convert_ids_to_tokens(list(range(len(tok))))
        marked = any(p.startswith(("Ġ", "▁")) for p in pieces if p)
        special = set(tok.all_special_ids)
        self.ids: list[int] = []
        self.words: dict[int, str] = {}
        ids = [i for i, piece in enumerate(pieces)
               if i not in special and piece and (not marked or piece.startswith(("Ġ", "▁")))]
        for i, text in zip(ids, tok.batch_decode([[i] for i in ids])):
            word = text.strip()
            if word and any(c.isalnum() for c in word) and " " not in word:
                self.ids.append(i)
                self.words[i] = word
        if not self.ids:
            raise ModelError(f"model {lm.name!r} has no token that starts a word: semantic decoding needs a causal "
                             "LM whose vocabulary holds words")
        self.array = np.asarray(self.ids)

    def top(self, logp: np.ndarray, k: int) -> list[str]:
        scores = logp[self.array]
        best = np.argsort(-scores, kind="stable")[:k]
        return [self.words[int(self.array[j])] for j in best]


#: The proposable words of each tokenizer, built once (a 50k vocabulary takes seconds).
_VOCABULARIES: "weakref.WeakKeyDictionary[Any, _Vocabulary]" = weakref.WeakKeyDictionary()


def _start_logp(lm: LoadedModel, prefix: list[str], layer: int) -> np.ndarray:
    """Next-token log-probabilities after ``prefix`` (or after BOS when empty)."""
    if prefix:
        logp = _forward_last(lm, [prefix], layer)[1]
    else:
        import torch

        tok = lm.tokenizer
        start = tok.bos_token_id if tok.bos_token_id is not None else tok.eos_token_id
        if start is None:
            raise ModelError(f"model {lm.name!r} has neither a BOS nor an EOS token: give a 'prefix' of words to "
                             "start decoding from")
        out = forward_batch(lm, [[int(start)]])
        with torch.inference_mode():
            logp = torch.log_softmax(out.logits[:, -1].float(), dim=-1).cpu().numpy()
    if logp is None:
        raise ModelError(f"model {lm.name!r} was loaded without its language-modelling head: load it with "
                         "load_language_model(..., head='causal_lm')")
    return logp[0]


@dataclass
class _Beam:
    words: list[str]
    feats: list[np.ndarray]
    logp: np.ndarray
    score: float = 0.0


def _check_segment(responses: np.ndarray, tr_times: np.ndarray, word_times: np.ndarray, n_targets: int
                   ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    Y = np.asarray(responses, dtype=np.float64)
    tt = np.asarray(tr_times, dtype=np.float64).ravel()
    wt = np.asarray(word_times, dtype=np.float64).ravel()
    if Y.ndim != 2 or Y.shape[1] != n_targets or not np.isfinite(Y).all():
        raise ConfigError(f"'responses' must be a finite (n_trs, {n_targets}) array (one column per target of the "
                          f"encoding model); got shape {Y.shape}")
    if tt.size != Y.shape[0] or tt.size < 2 or np.any(np.diff(tt) <= 0):
        raise ConfigError(f"'tr_times' must be {Y.shape[0]} increasing times (one per response row); got {tt.size}")
    if wt.size < 1 or np.any(np.diff(wt) < 0) or not np.isfinite(wt).all():
        raise ConfigError("'word_times' must be a non-empty, non-decreasing list of word onsets in seconds "
                          "(the word rate model's output)")
    return Y, tt, wt


def beam_decode(encoder: SemanticEncoder, lm: LoadedModel, responses: np.ndarray, tr_times: np.ndarray,
                word_times: np.ndarray, *, beam: int = 5, candidates: int = 10,
                prefix: Sequence[str] = ()) -> list[str]:
    """Decode the words of one segment by beam search.

    Parameters
    ----------
    encoder : SemanticEncoder
        Encoding model of the LM's features (same model, layer and context as ``lm``).
    lm : LoadedModel
        The causal language model, loaded with ``head="causal_lm"``.
    responses : array of shape (n_trs, n_targets)
        Recorded responses of the segment, in the units the encoder was fitted on.
    tr_times : array of shape (n_trs,)
        Time of each response row, seconds (same clock as ``word_times``).
    word_times : array of shape (n_words,)
        Onsets of the segment's words (assumed known: Tang's word rate model).
    beam : int
        Hypotheses kept after each word.
    candidates : int
        Next words the LM proposes for each hypothesis.
    prefix : sequence of str
        Words before the segment (context for the LM; not scored).

    Returns
    -------
    list of str, length n_words
        The best hypothesis.
    """
    for name, value in (("beam", beam), ("candidates", candidates)):
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
            raise ConfigError(f"'{name}' must be an integer >= 1; got {value!r}")
    if lm.head != "causal_lm":
        raise ModelError(f"model {lm.name!r} was loaded without its language-modelling head: load it with "
                         "load_language_model(..., head='causal_lm')")
    if lm.hidden_size != encoder.n_features:
        raise ConfigError(f"the encoder has {encoder.n_features} features per delay but model {lm.name!r} has "
                          f"hidden size {lm.hidden_size}: give the model the encoder was fitted on")
    Y, tt, wt = _check_segment(responses, tr_times, word_times, encoder.n_targets)
    tr = float(np.median(np.diff(tt)))
    K = lanczos_kernel(tt[:, None] - wt[None, :], 1.0 / (2.0 * tr), encoder.lanczos_window)  # (n_trs, n_words)
    reach = _reach(tt, wt, tr, encoder.lanczos_window, encoder.delays)
    vocab = _VOCABULARIES.get(lm.tokenizer)
    if vocab is None:
        vocab = _VOCABULARIES[lm.tokenizer] = _Vocabulary(lm)
    prefix = list(prefix)
    beams = [_Beam(words=[], feats=[], logp=_start_logp(lm, prefix, encoder.layer))]
    for i in range(wt.size):
        hyps = [(b, w) for b in beams for w in vocab.top(b.logp, int(candidates))]
        windows = [(prefix + b.words + [w])[-(encoder.context_words + 1):] for b, w in hyps]
        feats, logp = _forward_last(lm, windows, encoder.layer)
        F = np.stack([np.stack(b.feats + [feats[h]]) for h, (b, _) in enumerate(hyps)])  # (H, i+1, f)
        pred = encoder.predict(np.einsum("tw,hwf->htf", K[:, : i + 1], F))
        rows = slice(0, reach[i] + 1)
        resid = Y[None, rows] - pred[:, rows]
        scores = -0.5 * np.einsum("htk,kl,htl->h", resid, encoder.precision, resid)
        seen: set[tuple[str, ...]] = set()
        kept: list[_Beam] = []
        for h in np.argsort(-scores, kind="stable"):
            b, w = hyps[h]
            key = tuple(b.words + [w])
            if key in seen:
                continue
            seen.add(key)
            kept.append(_Beam(words=list(key), feats=b.feats + [feats[h]], logp=logp[h], score=float(scores[h])))
            if len(kept) == beam:
                break
        beams = kept
    return beams[0].words


def _reach(tr_times: np.ndarray, word_times: np.ndarray, tr: float, window: int, delays: Sequence[int]
           ) -> np.ndarray:
    """Last response row each word (and the words before it) can influence: the Lanczos kernel
    reaches ``window * TR`` past a word, the largest delay as many rows further."""
    ends = np.searchsorted(tr_times, word_times + window * tr, side="left") - 1 + max(0, max(delays))
    return np.maximum.accumulate(np.clip(ends, 0, tr_times.size - 1))


def shifted_responses(responses: np.ndarray, n: int, seed: int = 0) -> list[np.ndarray]:
    """``n`` circular time shifts of a segment's responses (the null: right statistics, wrong timing).

    Shifts are drawn without repetition from the quarter to three quarters of the segment,
    so no shifted copy stays close to the true alignment.
    """
    Y = np.asarray(responses)
    n_trs = Y.shape[0]
    lo, hi = max(1, n_trs // 4), max(2, (3 * n_trs) // 4)
    if n_trs < 4:
        raise ConfigError(f"a segment of {n_trs} TRs is too short for a shifted-responses null: give at least 4")
    rng = np.random.default_rng(seed)
    pool = np.arange(lo, hi + 1)
    shifts = rng.choice(pool, size=n, replace=n > pool.size)
    return [np.roll(Y, int(s), axis=0) for s in shifts]


def _sentence_embeddings(embedder: LoadedModel, texts: list[str]) -> np.ndarray:
    """Mean-pooled (attention-masked) last hidden states, L2-normalised (sentence-transformers style)."""
    import torch

    enc = embedder.tokenizer(texts, padding=True, truncation=True, max_length=embedder.max_tokens,
                             return_tensors="pt")
    with torch.inference_mode():
        out = embedder.model(**{k: v.to(embedder.device) for k, v in enc.items()})
        mask = enc["attention_mask"].to(out.last_hidden_state.device)[..., None].float()
        emb = (out.last_hidden_state.float() * mask).sum(1) / mask.sum(1).clamp(min=1.0)
        emb = torch.nn.functional.normalize(emb, dim=-1)
    return emb.cpu().numpy().astype(np.float64)


def embedding_similarity(decoded: Sequence[str], actual: Sequence[str], embedder: LoadedModel, *,
                         window_words: int = 10) -> float:
    """Mean cosine similarity of sentence embeddings over aligned windows of words.

    Parameters
    ----------
    decoded, actual : sequence of str
        Word sequences of the same length (the decoded words share the actual words' times).
    embedder : LoadedModel
        A sentence encoder (e.g. the packaged all-MiniLM-L6-v2 via
        ``load_language_model(pipelines.demo.packaged_model_dir())``).
    window_words : int
        Words per window (Tang scores windows of about 20 s).

    Returns
    -------
    float
        Mean over windows of the cosine between the two windows' embeddings.
    """
    decoded, actual = list(decoded), list(actual)
    if len(decoded) != len(actual) or not actual:
        raise ConfigError(f"decoded and actual words must be non-empty and equally long; got {len(decoded)} and "
                          f"{len(actual)}")
    if isinstance(window_words, bool) or not isinstance(window_words, (int, np.integer)) or window_words < 1:
        raise ConfigError(f"'window_words' must be an integer >= 1; got {window_words!r}")
    starts = range(0, len(actual), int(window_words))
    texts = [" ".join(seq[s:s + window_words]) for seq in (decoded, actual) for s in starts]
    emb = _sentence_embeddings(embedder, texts)
    n = len(starts)
    return float(np.mean(np.sum(emb[:n] * emb[n:], axis=1)))


@dataclass
class SegmentDecoding:
    """One held-out segment decoded.

    Attributes
    ----------
    actual, decoded : list of str
    similarity : float
        :func:`embedding_similarity` of the decoded to the actual words.
    word_accuracy : float
        Fraction of words decoded exactly (same position).
    null_similarity : array of shape (n_null,)
        Similarity to the actual words of the decodings of shifted responses.
    z : float
        ``(similarity - mean(null)) / std(null)`` (NaN when the null is constant).
    percentile : float
        Fraction of the null strictly below ``similarity``.
    """

    actual: list[str]
    decoded: list[str]
    similarity: float
    word_accuracy: float
    null_similarity: np.ndarray
    z: float
    percentile: float

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready summary."""
        return {"actual": " ".join(self.actual), "decoded": " ".join(self.decoded),
                "similarity": round(self.similarity, 6), "word_accuracy": round(self.word_accuracy, 6),
                "null_mean": round(float(np.mean(self.null_similarity)), 6),
                "null_std": round(float(np.std(self.null_similarity)), 6),
                "z": None if not np.isfinite(self.z) else round(self.z, 4), "percentile": round(self.percentile, 4)}


@dataclass
class DecodingReport:
    """Semantic decoding of held-out segments against the shifted-responses null.

    Attributes
    ----------
    segments : list of SegmentDecoding
    similarity : float
        Mean similarity over segments.
    null_similarity : array of shape (n_null,)
        Mean over segments of each null draw's similarity.
    percentile : float
        Fraction of ``null_similarity`` strictly below ``similarity``.
    beam, candidates, window_words : int
        Settings of the decoder and the score.
    settings : dict
        The encoder's layer, context and delays, the number of null draws and their seed.
    """

    segments: list[SegmentDecoding]
    similarity: float
    null_similarity: np.ndarray
    percentile: float
    beam: int
    candidates: int
    window_words: int
    settings: dict[str, Any] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready report (what ``semantic_decoding.json`` would hold)."""
        return {"similarity": round(self.similarity, 6),
                "null_mean": round(float(np.mean(self.null_similarity)), 6),
                "null_std": round(float(np.std(self.null_similarity)), 6),
                "percentile": round(self.percentile, 4), "beam": self.beam, "candidates": self.candidates,
                "window_words": self.window_words, "null": "circular time shifts of each segment's responses",
                "word_times": "given (not decoded)", **self.settings,
                "segments": [s.as_dict() for s in self.segments]}


def decode_segments(encoder: SemanticEncoder, lm: LoadedModel, embedder: LoadedModel,
                    segments: Sequence[dict[str, Any]], *, beam: int = 5, candidates: int = 10, n_null: int = 20,
                    window_words: int = 10, seed: int = 0) -> DecodingReport:
    """Decode held-out segments and score them against the actual words and a null.

    Parameters
    ----------
    encoder, lm, beam, candidates
        As in :func:`beam_decode`.
    embedder : LoadedModel
        Sentence encoder for :func:`embedding_similarity`.
    segments : sequence of dict
        Each with ``responses`` (n_trs, n_targets), ``tr_times`` (n_trs,), ``word_times``
        (n_words,), ``words`` (the actual words, n_words) and optionally ``prefix``.
    n_null : int
        Decodings of shifted responses per segment (>= 2).
    window_words : int
        Words per similarity window.
    seed : int
        Seed of the null's shifts.

    Returns
    -------
    DecodingReport
    """
    if not segments:
        raise ConfigError("'segments' is empty: give at least one held-out segment to decode")
    if isinstance(n_null, bool) or not isinstance(n_null, (int, np.integer)) or n_null < 2:
        raise ConfigError(f"'n_null' must be an integer >= 2; got {n_null!r}")
    results: list[SegmentDecoding] = []
    for k, seg in enumerate(segments):
        missing = {"responses", "tr_times", "word_times", "words"} - set(seg)
        if missing:
            raise ConfigError(f"segment {k} lacks {sorted(missing)}: each segment needs responses, tr_times, "
                              "word_times and words")
        actual = [str(w) for w in seg["words"]]
        if len(actual) != np.asarray(seg["word_times"]).size:
            raise ConfigError(f"segment {k} has {len(actual)} words but {np.asarray(seg['word_times']).size} "
                              "word_times: give one onset per word")
        kwargs = dict(beam=beam, candidates=candidates, prefix=seg.get("prefix", ()))
        decoded = beam_decode(encoder, lm, seg["responses"], seg["tr_times"], seg["word_times"], **kwargs)
        sim = embedding_similarity(decoded, actual, embedder, window_words=window_words)
        null = np.array([embedding_similarity(beam_decode(encoder, lm, Yn, seg["tr_times"], seg["word_times"],
                                                          **kwargs), actual, embedder, window_words=window_words)
                         for Yn in shifted_responses(seg["responses"], n_null, seed=seed + k)])
        sd = float(np.std(null))
        results.append(SegmentDecoding(
            actual=actual, decoded=decoded, similarity=sim,
            word_accuracy=float(np.mean([a == b for a, b in zip(decoded, actual)])), null_similarity=null,
            z=(sim - float(np.mean(null))) / sd if sd > 0 else float("nan"),
            percentile=float(np.mean(null < sim))))
    sim = float(np.mean([r.similarity for r in results]))
    null = np.mean([r.null_similarity for r in results], axis=0)
    return DecodingReport(segments=results, similarity=sim, null_similarity=null,
                          percentile=float(np.mean(null < sim)), beam=int(beam), candidates=int(candidates),
                          window_words=int(window_words),
                          settings={"layer": encoder.layer, "context_words": encoder.context_words,
                                    "delays": encoder.delays, "n_null": int(n_null), "seed": int(seed)})
