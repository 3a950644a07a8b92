"""maskgen: masked generative image transformers (MaskGIT) in JAX/Flax.

    import maskgen
    model = maskgen.load("workdir/fashion_mnist")   # tokenizer + transformer + params + config
    from maskgen import editing, sampling, scheduler
"""

import os
from typing import TYPE_CHECKING, Any, Union

if TYPE_CHECKING:  # annotations only: `import maskgen` stays light
    import ml_collections

    from maskgen.bundle import Bundle

__version__ = "0.1.0"


def load(path: Union[str, os.PathLike], config: "ml_collections.ConfigDict | None" = None,
         device: Any = None) -> "Bundle":
    """A trained or converted model bundle, built with the config saved in the transformer step it loads.

    See `maskgen.bundle.load`: config.json is the fallback for older steps; `config=` wins over both.
    """
    from maskgen.bundle import load as _load  # deferred: keeps `import maskgen` light
    return _load(path, config=config, device=device)
