import uuid

from conveyor.ids import uuid7


def test_uuid7_is_version_7_and_ordered() -> None:
    ids = [uuid7() for _ in range(5000)]
    parsed = [uuid.UUID(i) for i in ids]
    assert all(u.version == 7 and u.variant == uuid.RFC_4122 for u in parsed)
    assert ids == sorted(ids), "ids made in one process sort in creation order"
    assert len(set(ids)) == len(ids)
