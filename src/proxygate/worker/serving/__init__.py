"""A small serving engine for the hf worker, split the way vLLM splits one.

- `planner`: which sequences decode and which prefill how many prompt
  tokens in the next step (a per-step token budget), pure;
- `sampler`: greedy, temperature, top-p and seeded sampling of one row of logits;
- `detokenizer`: incremental detokenisation and the stop-string check,
  which holds back text that may still turn out to start a stop string;
- `prefix_cache`: the block-hash index of cached prompt prefixes, LRU, pure;
- `kv_cache`: the one object that owns the KV memory (sequence slots and
  the prefix cache's block pool);
- `runner`: the model's forward pass over one step's flattened tokens;
- `core`: the decode thread that ties them together.
"""
