"""Ray Serve application: ranking and retrieval endpoints, feature lookup, candidate scoring and
hot-swap of model versions (see docs/DESIGN.md). Not built yet: no open issue covers it so far;
the model it will serve lives in trainer/model.py so training and serving share one definition."""
