"""The dispatcher: turns manifests into jobs, records them, hands them out and records what comes back.

Never imports `worker` or torch; the in-process renderer is found through the `kiln.renderers` entry point.
"""
