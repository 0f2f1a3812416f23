"""The Ray Serve application: ranking and retrieval over HTTP, features from Feast, candidate
scoring with the trainer's one model (KV-cache M-FALCON), hot-swap of model versions.

Modules, thin to thick: `app` (FastAPI ingress, the Serve deployment, the `app` builder),
`service` (requests to jobs), `scorer` (one batch: features, encode, score, answer),
`versions` (the registry watcher and hot-swap), `features` (batched Feast reads, recent events),
`history_cache` (the LRU of encoded histories), `schemas` (the HTTP contract), `config`.
Decisions (score, cache keys, swap semantics): docs/serving.md.
"""
