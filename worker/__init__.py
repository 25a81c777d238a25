"""The worker: turns a JobSpec into a stored PNG with the real diffusers Flux2KleinPipeline."""
