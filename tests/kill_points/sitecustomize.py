"""Test aid, loaded by Python at start-up when this folder is on PYTHONPATH: holds a command at a chosen point of
its writing, so that a test can ``kill -9`` it exactly there however fast the machine.

``KILL_POINT`` names the point, ``KILL_POINT_FLAG`` a file created when the process reaches it (it then sleeps until
killed):

* ``publish:NAME``: in :func:`kd_core.atomic.publish_directory`, the temporary directory filled, just before it is
  renamed onto ``.../NAME``;
* ``reserve:NAME``: in an atomic file write of ``.../NAME``, just after its temporary file ``.NAME.<random>.tmp`` is
  created (empty), before anything is written into it.

Without ``KILL_POINT`` nothing changes. The pause changes timing only.
"""

import os
import time
from pathlib import Path

_point = os.environ.get("KILL_POINT", "")
if _point:
    import kd_core.atomic as _atomic

    _kind, _, _name = _point.partition(":")

    def _hold() -> None:
        Path(os.environ["KILL_POINT_FLAG"]).touch()
        time.sleep(600)

    if _kind == "publish":
        _original_publish = _atomic.publish_directory

        def _publish(tmp, final):
            if Path(final).name == _name:
                _hold()
            return _original_publish(tmp, final)

        _atomic.publish_directory = _publish
    elif _kind == "reserve":
        _original_reserve = _atomic._reserve_file

        def _reserve(path):
            tmp = _original_reserve(path)
            if Path(path).name == _name:
                _hold()
            return tmp

        _atomic._reserve_file = _reserve
    else:
        raise SystemExit(f"KILL_POINT: expected publish:NAME or reserve:NAME, got {_point!r}")
