"""The block reader over the S3 protocol (local moto server, no Ray): the same batches as from local disk, each rank
fetching only its blocks with ranged GETs."""

from __future__ import annotations

import numpy as np

from bigray.storage import Store
from bigray.train.batches import BlockSource, DataOrder, ReadCounter, Reader
from tests.unit.test_batches import SIZES, write_split


def test_ranks_read_their_blocks_from_s3_with_ranged_gets(s3, tmp_path):
    blocks = write_split(tmp_path, SIZES)
    store, uri = Store(), s3.uri("batches-split")
    for f in tmp_path.iterdir():
        store.write_bytes(f"{uri}/{f.name}", f.read_bytes())
    order = DataOrder.of(blocks, seed=5, partitions=8, global_batch=16, window=2)
    steps = order.epoch(0).steps

    def read(root, rank, world):
        reader = Reader(order, BlockSource(blocks, root, store, ("tokens",), ReadCounter()), rank, world)
        return [rows for _, _, rows in reader.batches(0, steps)], reader.counter.snapshot()

    local, _ = read(str(tmp_path), 0, 1)
    remote = [read(uri, r, 2) for r in range(2)]
    for k in range(steps):
        ids = np.sort(np.concatenate([batches[k].row_ids for batches, _ in remote]))
        np.testing.assert_array_equal(ids, np.sort(local[k].row_ids))
        for batches, _ in remote:
            np.testing.assert_array_equal(batches[k].tokens[:, 0], batches[k].row_ids)
    split_bytes = sum(b["length"] for b in blocks)
    for _, counter in remote:
        # One GET per block read and per file footer; about half of the split's bytes each.
        assert counter["requests"] <= counter["blocks"] + len({b["path"] for b in blocks}), counter
        assert counter["bytes"] - counter["footer_bytes"] <= split_bytes / 2 + max(b["length"] for b in blocks)
