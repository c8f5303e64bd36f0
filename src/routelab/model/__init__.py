"""The model stage: loading models (:mod:`.loading`), the MoE families routelab routes
(:mod:`.families`), installing a router (:mod:`.patching`) with its experts kernels
(:mod:`.experts`), and pinning a job to one GPU (:mod:`.gpus`).
"""
