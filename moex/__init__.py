"""moex: Mixture-of-Experts vision-language models in JAX/Flax."""

from moex.config import PRESETS, VLMConfig, get_config  # noqa: F401
from moex.model import abstract_params, build, forward, init_params  # noqa: F401

__version__ = "0.1.0"
