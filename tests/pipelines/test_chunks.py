"""Reading a stage's table a range of prompts at a time (pipelines/chunks.py): every chunk opens only
the part files whose prompt range (from the Parquet footers) meets its own, and the chunks together
are the table in canonical order."""

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from pipelines.chunks import PartWriter, check_once, chunk_frames, id_ranges, part_ranges
from pipelines.config import config_from_dict
from pipelines.store import RunStore


class FileCountingStore(RunStore):
    """A real RunStore that records which part files each read opened (None = the whole table)."""

    opened: list = []

    def read_table(self, *args, **kwargs):
        self.opened.append(kwargs.get("files"))
        return super().read_table(*args, **kwargs)


def rows(lo, hi, n=2):
    return pd.DataFrame({"prompt_id": [f"p{i:03d}" for i in range(lo, hi) for _ in range(n)],
                         "sample_index": [s for _ in range(lo, hi) for s in range(n)],
                         "score": [0.5 + i / 100 for i in range(lo, hi) for _ in range(n)]})


def test_chunks_open_only_the_files_that_can_hold_their_prompts(tmp_path):
    store = FileCountingStore(str(tmp_path), "r")
    store.init(config_from_dict({}))
    writer = PartWriter(store, 1, "judge", "data", rows(0, 0))
    for lo in range(0, 40, 10):  # four files of ten contiguous prompts, as the workers write them
        writer.write(rows(lo, lo + 10).sample(frac=1, random_state=lo))  # rows unordered within a file
    assert writer.close() == 80
    no_stats = store.path("round_1", "judge", "data", "part-nostats.parquet")  # a file without statistics
    pq.write_table(pa.Table.from_pandas(rows(40, 42), preserve_index=False), no_stats, write_statistics=False)
    empty = store.path("round_1", "judge", "data", "part-empty.parquet")
    pq.write_table(pa.Table.from_pandas(rows(0, 0), preserve_index=False), empty)

    parts = part_ranges(store, 1, "judge")
    assert sorted((a, b) for _, a, b in parts if a) == [("p000", "p009"), ("p010", "p019"), ("p020", "p029"),
                                                         ("p030", "p039")]
    assert [f for f, a, _ in parts if a is None] == [no_stats] and empty not in {f for f, _, _ in parts}

    ids = [f"p{i:03d}" for i in range(42)]
    store.opened.clear()
    chunks = list(chunk_frames(store, 1, "judge", ids, 5))
    whole = pd.concat([rows(0, 40), rows(40, 42)]).sort_values(["prompt_id", "sample_index"]).reset_index(drop=True)
    pd.testing.assert_frame_equal(pd.concat(chunks, ignore_index=True)[whole.columns], whole)
    assert [len(c) for c in chunks] == [10] * 8 + [4]
    # each chunk: its own ten-prompt file + the one without statistics (the last: that one alone), of six
    assert [len(files) for files in store.opened] == [2] * 8 + [1]
    assert check_once(store, 1, "judge", ids, 7) == {"total": 84, "seen": 84, "duplicated": 0}

    beyond = list(chunk_frames(store, 1, "judge", ["q1", "q2"], 5, columns=["prompt_id", "score"]))
    assert len(beyond) == 1 and beyond[0].empty and list(beyond[0].columns) == ["prompt_id", "score"]
    assert id_ranges(pa.chunked_array([["b", "a"], ["c", "a"]]), 2) == [("a", "b"), ("c", "c")]
