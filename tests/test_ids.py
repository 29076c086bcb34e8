import uuid

from conveyor.ids import uuid7, uuid7_many


def test_uuid7_is_version_7_and_ordered() -> None:
    ids = [uuid7() for _ in range(5000)]
    parsed = [uuid.UUID(i) for i in ids]
    assert all(u.version == 7 and u.variant == uuid.RFC_4122 for u in parsed)
    assert ids == sorted(ids), "ids made in one process sort in creation order"
    assert len(set(ids)) == len(ids)


def test_many_ids_at_once_are_the_ids_one_at_a_time_would_be() -> None:
    # more than one millisecond's counter (4,096) in one call, between single ids
    made = [uuid7(), *uuid7_many(10_000), uuid7(), *uuid7_many(3), *uuid7_many(0)]
    parsed = [uuid.UUID(i) for i in made]
    assert len(made) == 10_005
    assert all(u.version == 7 and u.variant == uuid.RFC_4122 for u in parsed)
    assert made == sorted(made), "bulk ids keep creation order with single ones"
    assert len(set(made)) == len(made)
    assert [str(u) for u in parsed] == made
