"""Process limits for tests of failing writes."""

import resource


class FileSizeLimit:
    """Regular files in this process cannot grow past ``limit`` bytes (writes fail with EFBIG)."""

    def __init__(self, limit: int):
        self.limit = limit

    def __enter__(self):
        self.saved = resource.getrlimit(resource.RLIMIT_FSIZE)
        resource.setrlimit(resource.RLIMIT_FSIZE, (self.limit, self.saved[1]))

    def __exit__(self, *exc):
        resource.setrlimit(resource.RLIMIT_FSIZE, self.saved)
