"""The launch tests' Slurm cluster is the session's one (tests/slurm_cluster.py, registered in tests/conftest.py)."""

from tests.slurm_cluster import SlurmCluster

__all__ = ["SlurmCluster"]
