"""Key placement (geomx.kvclient.partition): the split rule of GeoMX towards the global servers, and
the alignment that lets a party have several local servers."""
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from geomx.kvclient import partition

pytestmark = pytest.mark.unit

BOUND = 1000


def covers(parts, total):
    """Contiguous, in order, non-empty, exactly [0, total)."""
    pos = 0
    for _, offset, numel in parts:
        assert offset == pos and numel > 0
        pos += numel
    return pos == total


def test_geomx_rule_towards_global_servers():
    assert partition(7, 10, 1, BOUND) == [(0, 0, 10)]
    assert partition(7, 10, 3, BOUND) == [((7 * 9973) % 3, 0, 10)]  # small: whole, hashed
    assert partition(7, 3000, 3, BOUND) == [(0, 0, 1000), (1, 1000, 1000), (2, 2000, 1000)]
    assert partition(7, 1001, 2, BOUND) == [(0, 0, 500), (1, 500, 501)]  # round(1001 / 2) == 500


def test_party_servers_take_whole_global_parts():
    # 3 global parts over 2 local servers: parts 0 and 1 on server 0 (merged), part 2 on server 1.
    assert partition(5, 3000, 2, BOUND, global_servers=3) == [(0, 0, 2000), (1, 2000, 1000)]
    # More local servers than global parts: each part whole on its own server.
    assert partition(5, 3000, 4, BOUND, global_servers=2) == [(0, 0, 1500), (2, 1500, 1500)]
    # One global part (small key, or one global server): the key goes whole to one local server.
    assert partition(5, 3000, 3, BOUND, global_servers=1) == [((5 * 9973) % 3, 0, 3000)]
    assert partition(5, 10, 3, BOUND, global_servers=2) == [((5 * 9973) % 3, 0, 10)]
    # As many local servers as global servers (the central party): the global rule itself.
    assert partition(5, 3000, 3, BOUND, global_servers=3) == partition(5, 3000, 3, BOUND)


@settings(max_examples=300, deadline=None)
@given(key=st.integers(0, 10**6), total=st.integers(1, 10**5), local=st.integers(1, 8),
       glob=st.integers(1, 8), bound=st.integers(1, 5000))
def test_every_local_part_is_a_union_of_global_parts(key, total, local, glob, bound):
    upstream = partition(key, total, glob, bound)
    ours = partition(key, total, local, bound, global_servers=glob)
    assert covers(upstream, total) and covers(ours, total)
    assert all(0 <= s < local for s, _, _ in ours)
    assert len({s for s, _, _ in ours}) == len(ours)  # one message per local server
    edges = {offset for _, offset, _ in upstream} | {total}
    for _, offset, numel in ours:
        assert offset in edges and offset + numel in edges
