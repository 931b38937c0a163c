"""Baselines that SLS is compared with: width pruning by DepGraph (:mod:`sls.baselines.depgraph`)."""
