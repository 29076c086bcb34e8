import conveyor


def test_exported_members() -> None:
    assert len(set(conveyor.__all__)) == len(conveyor.__all__)
    assert set(conveyor.__all__) == {
        "UNSET",
        "Conveyor",
        "ConveyorError",
        "Settings",
        "TaskCancelled",
        "TaskContext",
        "TaskFailed",
        "TaskHandle",
        "TaskRecord",
        "TaskStatus",
        "TaskType",
    }
    for name in conveyor.__all__:
        assert getattr(conveyor, name) is not None
