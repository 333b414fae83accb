"""--device strings: the accepted forms, checked before anything is loaded (torch is not imported here)."""

from __future__ import annotations

import re

from .errors import UsageError

FORMS = "auto, cpu, cuda or cuda:N"


def check_device(device: object, flag: str = "--device") -> str:
    """The value itself when it is auto, cpu, cuda or cuda:N; torch.device("tpu") would raise deep inside the load."""
    if not (isinstance(device, str) and re.fullmatch(r"auto|cpu|cuda(:\d+)?", device)):
        raise UsageError(f"{flag} {device!r}: expected {FORMS}")
    return device
