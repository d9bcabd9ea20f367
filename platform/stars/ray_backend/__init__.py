"""Everything that touches Ray: the local cluster, Ray Train wiring, job submission.

The rest of `stars` never imports Ray, so it stays testable and usable without a cluster.
"""
