"""The serving core every service shares: server bootstrap, config, logs, metrics, statuses, queues, routing.

Nothing here imports torch at module level except where a stage is run, so the gateway and the SDK stay light.
"""
