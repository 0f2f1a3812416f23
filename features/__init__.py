"""The Feast repository (`definitions.py`, `feature_store*.yaml`) and `sequences.SequenceStore`,
the batched reader/writer of users' rolling sequences."""
