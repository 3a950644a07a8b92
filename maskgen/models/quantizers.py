"""Tokenizer quantizers: `vq` (learned codebook), `fsq` (finite scalar), `lfq` (lookup-free).

Every quantizer maps encoder features z [B,h,w,D] to (straight-through quantised
features [B,h,w,D] float32, aux), where aux holds
  encoding_indices  int32 [B,h,w] in [0, num_codes)
  raw               z as float32
  latent            the vectors that are quantised, float32 [B,h,w,d] (d = D, lookup_dim,
                    len(levels) or bits)
  codebook_loss, commitment_loss, entropy_loss, quantizer_loss (their sum)
and `lookup(ids)` turns ids back into decoder features (ids -> codes), so tokens a
transformer samples decode with any quantizer. Shapes are static; all of it jits.

* vq: nearest codebook row, codebook + commitment (+ optional entropy) loss, the
  official MaskGIT tree (`codebook` [K, D]). `lookup_dim > 0` adds ViT-VQGAN's
  factorised codes: project to a low dimension, l2-normalise features and codes,
  look up by cosine, project back (extra `project_in` / `project_out`; the codebook
  is [K, lookup_dim]); only then does the tree differ from the official one.
  `kmeans_codebook` (data-dependent init) and `restart_dead_codes` are pure functions
  the training step applies to the `codebook` parameter.
* fsq (Mentzer et al. 2023): len(levels) dims bounded with tanh, rounded with a
  straight-through estimator; id = mixed-radix number of the per-dim levels. No
  codebook and no codebook or commitment loss, so no code can die.
* lfq (MAGVIT-v2): sign of `bits` dims (codes +-1, or +-1/sqrt(bits) on the unit
  sphere with `normalize`); id = binary number. Loss: commitment, plus
  entropy_loss_ratio * (per-sample entropy - batch entropy) of softmax(-|z - c|^2 / T)
  over all 2**bits codes, which rewards confident and diverse codes.
fsq and lfq project D -> d and back with dense layers when D != d (none when equal).
"""
import math
from typing import Any, Dict, Optional, Sequence, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.typing import ArrayLike

from maskgen import axes, vq_losses

Dtype = Any
QUANTIZERS = ("vq", "fsq", "lfq")
LFQ_MAX_BITS = 16  # the entropy terms cost N x 2**bits; 65536 codes is already a large vocabulary
_FSQ_EPS = 1e-3


def check_quantizer(name: str) -> str:
    if name not in QUANTIZERS:
        raise ValueError(f"tokenizer.quantizer must be one of {QUANTIZERS}, got {name!r}")
    return name


def check_fsq_levels(levels: Sequence[int]) -> Tuple[int, ...]:
    """Levels as a tuple of ints; each must be >= 2 and the code count must fit int32."""
    try:
        levels = tuple(int(v) for v in levels)
    except TypeError as err:
        raise ValueError(f"tokenizer.fsq_levels must be a list of ints, got {levels!r}") from err
    if not levels or any(v < 2 for v in levels):
        raise ValueError(f"tokenizer.fsq_levels must be a non-empty list of ints >= 2, got {list(levels)}")
    if math.prod(levels) >= 2 ** 31:
        raise ValueError(f"tokenizer.fsq_levels {list(levels)} give {math.prod(levels)} codes, "
                         "more than int32 ids hold")
    return levels


def check_lfq_bits(bits: int) -> int:
    if int(bits) != bits or not 1 <= bits <= LFQ_MAX_BITS:
        raise ValueError(f"tokenizer.lfq_bits must be an int in [1, {LFQ_MAX_BITS}], got {bits!r}")
    return int(bits)


def code_count(quantizer: str, codebook_size: int, fsq_levels: Sequence[int] = (),
               lfq_bits: int = 0) -> int:
    """Number of distinct token ids: codebook_size (vq), prod(levels) (fsq), 2**bits (lfq)."""
    check_quantizer(quantizer)
    if quantizer == "fsq":
        return math.prod(check_fsq_levels(fsq_levels))
    if quantizer == "lfq":
        return 2 ** check_lfq_bits(lfq_bits)
    return int(codebook_size)


# ----------------------------------------------------------------------------- statistics

def code_counts(ids: ArrayLike, num_codes: int) -> jax.Array:
    """float32 [num_codes]: how many of `ids` (any shape) fall on each code."""
    return jnp.zeros((num_codes,), jnp.float32).at[jnp.reshape(ids, (-1,))].add(1.0)


def usage_stats(counts: ArrayLike) -> Dict[str, jax.Array]:
    """codebook_usage (fraction of codes used at least once) and perplexity (exp of the entropy
    of the code histogram: the number of equally used codes with the same spread)."""
    counts = jnp.asarray(counts, jnp.float32)
    probs = counts / jnp.maximum(jnp.sum(counts), 1.0)
    entropy = -jnp.sum(jnp.where(probs > 0, probs * jnp.log(jnp.where(probs > 0, probs, 1.0)), 0.0))
    return dict(codebook_usage=jnp.mean((counts > 0).astype(jnp.float32)), perplexity=jnp.exp(entropy))


# ----------------------------------------------------------------------------- helpers

def _l2_normalize(x: jax.Array, eps: float = 1e-6) -> jax.Array:
    return x * jax.lax.rsqrt(jnp.maximum(jnp.sum(jnp.square(x), axis=-1, keepdims=True), eps * eps))


def _straight_through(z: jax.Array, q: jax.Array) -> jax.Array:
    """Forward value q, gradient of the identity to z."""
    return z + jax.lax.stop_gradient(q - z)


def _dense(features: int, param_dtype: jax.typing.DTypeLike, name: str) -> nn.Dense:
    return nn.Dense(
        features, param_dtype=param_dtype, name=name,
        kernel_init=nn.with_logical_partitioning(nn.initializers.lecun_normal(),
                                                 (axes.CODE_DIM, axes.CODE_DIM)),
        bias_init=nn.with_logical_partitioning(nn.initializers.zeros, (axes.CODE_DIM,)))


def squared_distances(z_NxD: ArrayLike, codebook_KxD: ArrayLike) -> jax.Array:
    """Squared distances [N,K] in the official expanded form |z|^2 - 2 z.c + |c|^2, float32."""
    codebook = codebook_KxD.astype(jnp.float32)
    z = z_NxD.astype(jnp.float32)
    z_sq = jnp.sum(z ** 2, axis=1, keepdims=True)
    c_sq = jnp.sum(codebook.T ** 2, axis=0, keepdims=True)
    cross = jnp.dot(z, codebook.T, precision=jax.lax.Precision.HIGHEST)
    return z_sq - 2 * cross + c_sq


def _zero() -> jax.Array:
    return jnp.zeros((), jnp.float32)


def _aux(ids: jax.Array, raw: Any, latent: jax.Array, codebook_loss: jax.Array, commitment_loss: jax.Array,
         entropy_loss: jax.Array) -> Dict[str, jax.Array]:
    return dict(encoding_indices=ids, raw=raw, latent=latent, codebook_loss=codebook_loss,
                commitment_loss=commitment_loss, entropy_loss=entropy_loss,
                quantizer_loss=codebook_loss + commitment_loss + entropy_loss)


# ----------------------------------------------------------------------------- vq

class VectorQuantizer(nn.Module):
    """Nearest-codebook-entry quantiser with straight-through gradients and VQ losses."""
    codebook_size: int
    embedding_dim: int
    commitment_cost: float = 0.25
    entropy_loss_ratio: float = 0.0
    entropy_temperature: float = 0.01
    lookup_dim: int = 0  # > 0: factorised, l2-normalised lookup in this many dimensions
    param_dtype: Dtype = jnp.float32

    def setup(self) -> None:
        code_dim = self.lookup_dim or self.embedding_dim
        self.codebook = self.param(
            "codebook",
            nn.with_logical_partitioning(
                nn.initializers.variance_scaling(1.0, "fan_in", "uniform"),
                (axes.CODEBOOK, axes.CODE_DIM)),
            (self.codebook_size, code_dim), self.param_dtype)
        if self.lookup_dim:
            self.project_in = _dense(self.lookup_dim, self.param_dtype, "project_in")
            self.project_out = _dense(self.embedding_dim, self.param_dtype, "project_out")

    @property
    def num_codes(self) -> int:
        return self.codebook_size

    def codes(self) -> jax.Array:
        """The codebook as searched: float32 [K, d], l2-normalised with `lookup_dim`."""
        codebook = self.codebook.astype(jnp.float32)
        return _l2_normalize(codebook) if self.lookup_dim else codebook

    def search_vectors(self, z_BxhxwxD: jax.Array) -> jax.Array:
        """The vectors compared with the codes: z, or its l2-normalised projection."""
        z = z_BxhxwxD.astype(jnp.float32)
        return _l2_normalize(self.project_in(z).astype(jnp.float32)) if self.lookup_dim else z

    def distances(self, z_NxD: jax.Array) -> jax.Array:
        """Squared distances [N,K] between search vectors and codes, float32."""
        return squared_distances(z_NxD, self.codes())

    def __call__(self, z_BxhxwxD: jax.Array) -> Tuple[jax.Array, Dict[str, jax.Array]]:
        raw = z_BxhxwxD.astype(jnp.float32)
        z = self.search_vectors(raw)
        dist_NxK = self.distances(z.reshape(-1, z.shape[-1]))
        ids = jnp.argmin(dist_NxK, axis=-1).astype(jnp.int32).reshape(z.shape[:-1])
        q = jnp.take(self.codes(), ids, axis=0)
        codebook_loss = jnp.mean((q - jax.lax.stop_gradient(z)) ** 2)
        commitment_loss = self.commitment_cost * jnp.mean((jax.lax.stop_gradient(q) - z) ** 2)
        entropy_loss = _zero()
        if self.entropy_loss_ratio:
            entropy_loss = self.entropy_loss_ratio * vq_losses.entropy_loss(
                -dist_NxK, temperature=self.entropy_temperature)
        out = _straight_through(z, q)
        if self.lookup_dim:
            out = self.project_out(out).astype(jnp.float32)
        return out, _aux(ids, raw, z, codebook_loss, commitment_loss, entropy_loss)

    def lookup(self, ids: jax.Array) -> jax.Array:
        """Decoder features for integer ids (out-of-range ids give NaN; check on the host)."""
        q = jnp.take(self.codes(), ids, axis=0)
        return self.project_out(q).astype(jnp.float32) if self.lookup_dim else q


def kmeans_codebook(features_NxD: ArrayLike, codebook_KxD: jax.Array, key: jax.Array, iterations: int = 10,
                    replace: Optional[ArrayLike] = None, normalize: bool = False) -> jax.Array:
    """k-means++ seeding + Lloyd iterations on `features`; returns a new codebook (its dtype).

    Why: the default init puts codes within +-sqrt(3/K) of 0, far from encoder outputs,
    so most codes are never picked; seeding them on the data spreads them over it.
    Only rows where `replace` [K] is True change (default: all); the others stay fixed
    and count as chosen centres. Deterministic given `key`. `normalize` l2-normalises
    the centres (spherical k-means, for the normalised lookup).
    """
    x = jnp.asarray(features_NxD, jnp.float32).reshape(-1, codebook_KxD.shape[-1])
    old = codebook_KxD.astype(jnp.float32)
    if normalize:
        x, old = _l2_normalize(x), _l2_normalize(old)
    num_codes = old.shape[0]
    replace = jnp.ones((num_codes,), bool) if replace is None else jnp.asarray(replace, bool)
    live = ~replace
    d2 = jnp.where(jnp.any(live), jnp.min(jnp.where(live[None], squared_distances(x, old), jnp.inf), 1),
                   jnp.inf)

    def seed(k: jax.Array, carry: Any) -> tuple[jax.Array, jax.Array]:
        centres, d2 = carry
        finite = jnp.isfinite(d2)
        weights = jnp.where(finite, jnp.maximum(d2, 0.0), 1.0)
        weights = jnp.where(jnp.any(finite) & (jnp.sum(weights) > 0), weights, 1.0)
        pick = jax.random.categorical(jax.random.fold_in(key, k), jnp.log(weights))
        row = jnp.where(replace[k], x[pick], centres[k])
        new_d2 = jnp.minimum(d2, jnp.sum(jnp.square(x - row), axis=-1))
        return centres.at[k].set(row), jnp.where(replace[k], new_d2, d2)

    centres, _ = jax.lax.fori_loop(0, num_codes, seed, (old, d2))

    def lloyd(_: Any, centres: jax.Array) -> jax.Array:
        assign = jnp.argmin(squared_distances(x, centres), axis=-1)
        sums = jax.ops.segment_sum(x, assign, num_segments=num_codes)
        counts = jax.ops.segment_sum(jnp.ones(x.shape[0], jnp.float32), assign, num_segments=num_codes)
        means = sums / jnp.maximum(counts, 1.0)[:, None]
        if normalize:
            means = _l2_normalize(means)
        return jnp.where((replace & (counts > 0))[:, None], means, centres)

    centres = jax.lax.fori_loop(0, iterations, lloyd, centres)
    return jnp.where(replace[:, None], centres, codebook_KxD.astype(jnp.float32)).astype(codebook_KxD.dtype)


def update_usage_ema(usage_ema_K: jax.Array, counts_K: jax.Array, decay: float) -> jax.Array:
    """EMA of each code's use relative to uniform (1.0 = used as often as 1/K of the vectors)."""
    rel = counts_K * counts_K.shape[0] / jnp.maximum(jnp.sum(counts_K), 1.0)
    return decay * usage_ema_K + (1.0 - decay) * rel


def restart_dead_codes(codebook_KxD: jax.Array, usage_ema_K: jax.Array, features_NxD: ArrayLike, key: jax.Array,
                       threshold: float) -> Tuple[jax.Array, jax.Array, jax.Array]:
    """Codes whose usage EMA is below `threshold` become random vectors of this batch.

    Returns (codebook, usage EMA with restarted codes reset to 1.0, dead mask [K]); live
    rows are returned bit for bit. Distinct batch vectors are drawn when the batch has at
    least K of them.
    """
    x = jnp.asarray(features_NxD).reshape(-1, codebook_KxD.shape[-1]).astype(codebook_KxD.dtype)
    num_codes, n = codebook_KxD.shape[0], x.shape[0]
    if n >= num_codes:
        idx = jax.random.permutation(key, n)[:num_codes]
    else:
        idx = jax.random.randint(key, (num_codes,), 0, n)
    dead = usage_ema_K < threshold
    codebook = jnp.where(dead[:, None], x[idx], codebook_KxD)
    return codebook, jnp.where(dead, 1.0, usage_ema_K), dead


# ----------------------------------------------------------------------------- fsq

def fsq_bound(z: jax.Array, levels: Sequence[int]) -> jax.Array:
    """Squashes z so that rounding gives `levels[i]` integer values per dim (tanh, with the
    half-step offset that even level counts need)."""
    lv = jnp.asarray(levels, jnp.float32)
    half_l = (lv - 1) * (1 + _FSQ_EPS) / 2
    offset = jnp.where(jnp.asarray(levels) % 2 == 0, 0.5, 0.0)
    shift = jnp.arctanh(offset / half_l)
    return jnp.tanh(z + shift) * half_l - offset


def _fsq_half_width(levels: Sequence[int]) -> jax.Array:
    return jnp.asarray([v // 2 for v in levels], jnp.float32)


def fsq_quantize(z: jax.Array, levels: Sequence[int]) -> jax.Array:
    """Codes in [-1, 1] per dim (round with a straight-through estimator)."""
    bounded = fsq_bound(z.astype(jnp.float32), levels)
    return _straight_through(bounded, jnp.round(bounded)) / _fsq_half_width(levels)


def _fsq_basis(levels: Sequence[int]) -> jax.Array:
    basis = [1]
    for v in levels[:-1]:
        basis.append(basis[-1] * v)
    return jnp.asarray(basis, jnp.int32)


def fsq_codes_to_ids(codes: jax.Array, levels: Sequence[int]) -> jax.Array:
    """Mixed-radix id of per-dim level indices (codes as from `fsq_quantize`)."""
    digits = jnp.round(codes * _fsq_half_width(levels) + _fsq_half_width(levels)).astype(jnp.int32)
    return jnp.sum(digits * _fsq_basis(levels), axis=-1).astype(jnp.int32)


def fsq_ids_to_codes(ids: ArrayLike, levels: Sequence[int]) -> jax.Array:
    digits = (jnp.asarray(ids, jnp.int32)[..., None] // _fsq_basis(levels)) % jnp.asarray(levels, jnp.int32)
    return (digits.astype(jnp.float32) - _fsq_half_width(levels)) / _fsq_half_width(levels)


class _Projected(nn.Module):
    """Shared projection D -> dim -> D for quantizers without a codebook (none when equal)."""

    def _setup_projections(self, dim: int) -> None:
        if dim != self.embedding_dim:
            self.project_in = _dense(dim, self.param_dtype, "project_in")
            self.project_out = _dense(self.embedding_dim, self.param_dtype, "project_out")

    def _in(self, z: jax.Array, dim: int) -> jax.Array:
        return z if dim == self.embedding_dim else self.project_in(z).astype(jnp.float32)

    def _out(self, q: jax.Array, dim: int) -> jax.Array:
        return q if dim == self.embedding_dim else self.project_out(q).astype(jnp.float32)


class FiniteScalarQuantizer(_Projected):
    """FSQ: prod(levels) implicit codes, no learned codebook, no codebook loss."""
    levels: Tuple[int, ...]
    embedding_dim: int
    param_dtype: Dtype = jnp.float32

    def setup(self) -> None:
        check_fsq_levels(self.levels)
        self._setup_projections(len(self.levels))

    @property
    def num_codes(self) -> int:
        return math.prod(self.levels)

    def __call__(self, z_BxhxwxD: jax.Array) -> Tuple[jax.Array, Dict[str, jax.Array]]:
        raw = z_BxhxwxD.astype(jnp.float32)
        latent = self._in(raw, len(self.levels))
        codes = fsq_quantize(latent, self.levels)
        ids = fsq_codes_to_ids(jax.lax.stop_gradient(codes), self.levels)
        return self._out(codes, len(self.levels)), _aux(ids, raw, latent, _zero(), _zero(), _zero())

    def lookup(self, ids: jax.Array) -> jax.Array:
        return self._out(fsq_ids_to_codes(ids, self.levels), len(self.levels))


# ----------------------------------------------------------------------------- lfq

def lfq_scale(bits: int, normalize: bool) -> float:
    return 1.0 / math.sqrt(bits) if normalize else 1.0


def lfq_quantize(z: jax.Array, normalize: bool = False) -> Tuple[jax.Array, jax.Array]:
    """Sign codes (+-scale per dim) with a straight-through estimator; `normalize` first puts
    z on the unit sphere and the codes at +-1/sqrt(bits), so quantisation error stays bounded."""
    z = z.astype(jnp.float32)
    if normalize:
        z = _l2_normalize(z)
    scale = lfq_scale(z.shape[-1], normalize)
    return _straight_through(z, jnp.where(z > 0, scale, -scale)), z


def lfq_codes_to_ids(codes: jax.Array) -> jax.Array:
    bits = codes.shape[-1]
    return jnp.sum((codes > 0).astype(jnp.int32) * (2 ** jnp.arange(bits, dtype=jnp.int32)),
                   axis=-1).astype(jnp.int32)


def lfq_ids_to_codes(ids: ArrayLike, bits: int, normalize: bool = False) -> jax.Array:
    on = (jnp.asarray(ids, jnp.int32)[..., None] >> jnp.arange(bits, dtype=jnp.int32)) & 1
    scale = lfq_scale(bits, normalize)
    return jnp.where(on > 0, scale, -scale).astype(jnp.float32)


class LookupFreeQuantizer(_Projected):
    """LFQ: 2**bits implicit codes; commitment and per-sample / batch entropy losses."""
    bits: int
    embedding_dim: int
    commitment_cost: float = 0.25
    entropy_loss_ratio: float = 0.1
    entropy_temperature: float = 0.01
    normalize: bool = False
    param_dtype: Dtype = jnp.float32

    def setup(self) -> None:
        check_lfq_bits(self.bits)
        self._setup_projections(self.bits)

    @property
    def num_codes(self) -> int:
        return 2 ** self.bits

    def all_codes(self) -> jax.Array:
        """float32 [2**bits, bits]: code i is `lfq_ids_to_codes(i)`."""
        return lfq_ids_to_codes(jnp.arange(self.num_codes), self.bits, self.normalize)

    def __call__(self, z_BxhxwxD: jax.Array) -> Tuple[jax.Array, Dict[str, jax.Array]]:
        raw = z_BxhxwxD.astype(jnp.float32)
        codes, latent = lfq_quantize(self._in(raw, self.bits), self.normalize)
        q = jax.lax.stop_gradient(codes)
        ids = lfq_codes_to_ids(q)
        commitment_loss = self.commitment_cost * jnp.mean((q - latent) ** 2)
        entropy_loss = _zero()
        if self.entropy_loss_ratio:
            dist = squared_distances(latent.reshape(-1, self.bits), self.all_codes())
            entropy_loss = self.entropy_loss_ratio * vq_losses.entropy_loss(
                -dist, temperature=self.entropy_temperature)
        return self._out(codes, self.bits), _aux(ids, raw, latent, _zero(), commitment_loss, entropy_loss)

    def lookup(self, ids: jax.Array) -> jax.Array:
        return self._out(lfq_ids_to_codes(ids, self.bits, self.normalize), self.bits)


def make_quantizer(quantizer: str, *, codebook_size: int, embedding_dim: int, commitment_cost: float,
                   entropy_loss_ratio: float, entropy_temperature: float, fsq_levels: Sequence[int],
                   lfq_bits: int, lfq_normalize: bool, vq_lookup_dim: int,
                   param_dtype: Dtype, name: Optional[str] = None) -> nn.Module:
    """The quantizer module a tokenizer's fields name (see the module docstring)."""
    check_quantizer(quantizer)
    if quantizer == "fsq":
        return FiniteScalarQuantizer(levels=check_fsq_levels(fsq_levels), embedding_dim=embedding_dim,
                                     param_dtype=param_dtype, name=name)
    if quantizer == "lfq":
        return LookupFreeQuantizer(bits=check_lfq_bits(lfq_bits), embedding_dim=embedding_dim,
                                   commitment_cost=commitment_cost, entropy_loss_ratio=entropy_loss_ratio,
                                   entropy_temperature=entropy_temperature, normalize=lfq_normalize,
                                   param_dtype=param_dtype, name=name)
    return VectorQuantizer(codebook_size=codebook_size, embedding_dim=embedding_dim,
                           commitment_cost=commitment_cost, entropy_loss_ratio=entropy_loss_ratio,
                           entropy_temperature=entropy_temperature, lookup_dim=vq_lookup_dim,
                           param_dtype=param_dtype, name=name)
