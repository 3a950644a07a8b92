"""Token-id layout shared by the transformer, the scheduler and training.

Ids follow the official google-research/maskgit layout, so official checkpoints
load without remapping:

    [0, codebook_size)                       VQ codes
    [codebook_size, codebook_size + C)       class tokens (label + codebook_size)
    codebook_size + C                        the mask token (last vocabulary row)

The official code stores the mask as -1 and relies on `jnp.take` wrapping it to
the last row; maskgen names the id explicitly (`mask_id`) and maps -1 onto it.
Models trained by maskgen reserve one extra class id (`null_class_id`) as the
"no class" token used by classifier-free guidance.
"""
import dataclasses
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np
from jax.typing import ArrayLike

OFFICIAL_MASK_ID = -1


@dataclasses.dataclass(frozen=True)
class TokenLayout:
    """A model's token-id layout (see the module docstring); frozen, so layouts compare by value."""
    codebook_size: int
    num_classes: int  # class ids in the vocabulary, the null class included
    null_class_id: Optional[int] = None  # a class id in [0, num_classes) or None

    def __post_init__(self) -> None:
        if self.codebook_size < 1 or self.num_classes < 1:
            raise ValueError(f"TokenLayout needs positive sizes, got {self}")
        if self.null_class_id is not None and not 0 <= self.null_class_id < self.num_classes:
            raise ValueError(
                f"null_class_id={self.null_class_id} must lie in [0, num_classes={self.num_classes})")

    @property
    def vocab_size(self) -> int:
        """Embedding rows: the codes, the class tokens and the mask token."""
        return self.codebook_size + self.num_classes + 1

    @property
    def mask_id(self) -> int:
        """The mask token: the last vocabulary row, where the official -1 marker lands."""
        return self.vocab_size - 1

    @property
    def num_real_classes(self) -> int:
        """Classes a user may ask for (the null class excluded)."""
        return self.num_classes - (self.null_class_id is not None)

    def class_token(self, labels: ArrayLike) -> jax.Array:
        """Class label(s) -> token id(s)."""
        return jnp.asarray(labels, jnp.int32) + self.codebook_size

    def canonical_ids(self, ids: ArrayLike) -> jax.Array:
        """Maps the official mask marker -1 onto `mask_id`; other ids unchanged."""
        ids = jnp.asarray(ids, jnp.int32)
        return jnp.where(ids == OFFICIAL_MASK_ID, self.mask_id, ids)

    def check_labels(self, labels: ArrayLike, allow_null: bool = False) -> np.ndarray:
        """Raises ValueError for class ids a user may not ask for (host-side check)."""
        labels = np.asarray(labels)
        limit = self.num_classes if allow_null else self.num_real_classes
        bad = labels[(labels < 0) | (labels >= limit)]
        if bad.size:
            raise ValueError(
                f"class id {int(bad.flat[0])} out of range: this model has classes 0..{limit - 1}")
        return labels
