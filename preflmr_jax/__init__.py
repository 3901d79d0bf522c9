"""preflmr_jax: PreFLMR (fine-grained late-interaction multi-modal retrieval) in JAX/Flax.

  import preflmr_jax
  model = preflmr_jax.load_pretrained("PreFLMR_ViT-L")       # published HF folder
  scores = preflmr_jax.maxsim(Q, D, D_mask)                  # [num_queries, num_docs]
"""

from preflmr_jax.late_interaction import maxsim, maxsim_chunked, maxsim_pairwise
from preflmr_jax.models.model_config import PreFLMRConfig, TextConfig, VisionConfig
from preflmr_jax.models.preflmr import PreFLMR
from preflmr_jax.pretrained import PretrainedPreFLMR, load_pretrained

__all__ = [
    "PreFLMR", "PreFLMRConfig", "PretrainedPreFLMR", "TextConfig", "VisionConfig",
    "load_pretrained", "maxsim", "maxsim_chunked", "maxsim_pairwise",
]
