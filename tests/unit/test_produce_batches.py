"""The produce batches' partition choice is aiokafka's: the same murmur2, the same partition for every key."""

from __future__ import annotations

import random

from aiokafka.partitioner import DefaultPartitioner
from aiokafka.partitioner import murmur2 as aiokafka_murmur2
from murmurhash2 import murmurhash2

from ocrbooth.daemon.produce_batches import MURMUR2_SEED, ProduceBatches
from tests.support.runtime import ScriptedProducer


def test_murmur2_equals_aiokafkas_for_every_length_and_byte() -> None:
    """Random keys of 0-130 bytes (every tail length, bytes with the high bit set) and typical ids hash
    exactly as aiokafka's murmur2."""
    rng = random.Random(13)
    keys = [rng.randbytes(n % 131) for n in range(5_000)]
    keys += [bytes([b]) * n for b in (0, 0x7F, 0x80, 0xFF) for n in range(9)]
    keys += [f"doc-{i:08d}".encode() for i in range(200)] + ["doc-ü-€".encode()]
    for key in keys:
        assert murmurhash2(key, MURMUR2_SEED) == aiokafka_murmur2(key), key


def test_the_partition_of_a_keyed_record_is_the_default_partitioners() -> None:
    """For 1-13 partitions and 500 keys, `choose` gives what aiokafka's DefaultPartitioner gives send(), also for
    the same key twice in a row (the remembered last choice) and after the partition list changed."""
    batches = ProduceBatches(ScriptedProducer())
    partitioner = DefaultPartitioner()
    for n in range(1, 14):
        partitions = list(range(n))
        for i in range(500):
            key = f"doc-{i}".encode()
            expected = partitioner(key, partitions, partitions)
            assert batches.choose(partitions, key) == expected
            assert batches.choose(partitions, key) == expected
    assert batches.choose([0, 1, 2], b"doc-1") == partitioner(b"doc-1", [0, 1, 2], [0, 1, 2])
    assert batches.choose([0, 1, 2, 3, 4], b"doc-1") == partitioner(b"doc-1", [0, 1, 2, 3, 4], [0, 1, 2, 3, 4])


def test_a_keyless_record_goes_to_one_of_the_partitions() -> None:
    """Without a key any partition will do, as with send()."""
    batches = ProduceBatches(ScriptedProducer())
    assert {batches.choose([0, 1, 2], None) for _ in range(200)} <= {0, 1, 2}
