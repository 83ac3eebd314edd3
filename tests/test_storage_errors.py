"""The storage layer's own reports of a failure go to the debug log; other records pass."""

import logging

from jaxscale.storage_errors import quiet_storage_errors

TENSORSTORE_ERROR = ('OUT_OF_RANGE: Error reading "a.zarray" in OCDBT database at local file "/x/": '
                     "Requested byte range [0, 50453) is not valid for value of size 100 "
                     "[tensorstore_spec='{\"driver\":\"zarr\"}']")


def never_retrieved(message: str) -> logging.LogRecord:
    """What asyncio logs for a task whose exception nobody retrieved, raised where no Python frame
    of the storage layer is on the traceback (as TensorStore's C++ futures raise)."""
    try:
        raise ValueError(message)
    except ValueError as e:
        return logging.LogRecord("asyncio", logging.ERROR, "asyncio/base_events.py", 1,
                                 "Task exception was never retrieved", (), (ValueError, e, e.__traceback__))


def test_tensorstore_errors_left_in_asyncio_tasks_go_to_the_debug_log(caplog):
    quiet_storage_errors()
    filters = logging.getLogger("asyncio").filters
    with caplog.at_level(logging.DEBUG, logger="jaxscale"):
        assert not all(f.filter(never_retrieved(TENSORSTORE_ERROR)) for f in filters)
        # an OCDBT read's error names no spec (seen in tests/test_faults.py's truncated step)
        assert not all(f.filter(never_retrieved(TENSORSTORE_ERROR.split(" [")[0])) for f in filters)
        assert all(f.filter(never_retrieved("a bug of ours")) for f in filters)
    assert [r.getMessage() for r in caplog.records] == [
        "storage layer: Task exception was never retrieved"] * 2
