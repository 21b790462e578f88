"""Fixtures of the pipeline tests."""

import pytest


@pytest.fixture
def counting_store():
    """A real RunStore class that records the largest table the driver read from it (`most`, rows)."""
    from pipelines.store import RunStore

    class CountingStore(RunStore):
        most = 0

        def read_table(self, *args, **kwargs):
            table = super().read_table(*args, **kwargs)
            self.most = max(self.most, table.num_rows)
            return table

    return CountingStore
