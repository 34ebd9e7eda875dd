"""The latent cache: VAE latents and text embeddings of a :class:`PreferenceDataset` encoded once
into ``cache_dir/<key>/``, keyed by the dataset, the model (folder or Hub id, revision, variant,
VAE) and the resolution, written in shards that an interrupted build resumes, read memory-mapped,
and served in place of pixels by :class:`CachedPreferenceDataset`.

Modules: ``key`` (what the cache depends on), ``tensor_files`` (safetensors written atomically,
read memory-mapped, checked), ``building`` (the steps of a build) and ``cache`` (the cache and
its dataset view)."""

from .building import CAPTIONS_FILE, META_FILE
from .cache import CachedPreferenceDataset, LatentCache
from .key import CACHE_FORMAT, cache_key, dataset_fingerprint, model_fingerprint
from .tensor_files import CacheFileError, read_tensors

__all__ = [
    "CACHE_FORMAT",
    "CAPTIONS_FILE",
    "META_FILE",
    "CacheFileError",
    "CachedPreferenceDataset",
    "LatentCache",
    "cache_key",
    "dataset_fingerprint",
    "model_fingerprint",
    "read_tensors",
]
