"""CTKD methods, one file each, registered by name (installed as ``ctkd_bench.methods``).

A method states only its objective; alignment comes from :mod:`ctkd_bench.alignment` through the
batch, and everything it may use is in :mod:`ctkd_bench.api`.
"""
