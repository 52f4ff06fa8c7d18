"""Rank-side scripts, each run as a file by a launcher (torchrun, ``accelerate launch``), one process per rank; the
shared start-up, teardown and tiny model live in :mod:`tests.distributed.ranks.common`."""
