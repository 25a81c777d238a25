"""The contract the dispatcher and the worker share: models, jobs, states, tables, settings, errors.

`schemas` imports neither `dispatcher` nor `worker`, and never torch.
"""
