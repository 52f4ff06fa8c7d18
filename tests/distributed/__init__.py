"""Multi-process tests: each test starts 2 ranks on loopback (gloo) with :mod:`tests.distributed.launch` and asserts
on the JSON results the rank scripts in :mod:`tests.distributed.ranks` write."""
