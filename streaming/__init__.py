"""The streaming layer: engagement events from Kafka (or a recorded log) to rolling sequences in
Feast, the dead-letter topic and the training feed.

kafka-python is imported here, once, inside `third_party_deprecations()`: version 3.0 reads its
protocol schemas through `importlib.resources.read_text` at import time, which warns on every
first run. Every later `from kafka import ...` in this package finds it already imported.
"""

from config.logs import third_party_deprecations

with third_party_deprecations():
    import kafka  # noqa: F401
