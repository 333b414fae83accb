"""--device strings: the accepted forms, checked before anything is loaded (torch is not imported here)."""

from __future__ import annotations

import re

from spinctl.errors import UsageError

FORMS = "auto, cpu, cuda or cuda:N"


def check_device(device: object, flag: str = "--device") -> str:
    """The value itself when it is auto, cpu, cuda or cuda:N; torch.device("tpu") would raise deep inside the load."""
    if not (isinstance(device, str) and re.fullmatch(r"auto|cpu|cuda(:\d+)?", device)):
        raise UsageError(f"{flag} {device!r}: expected {FORMS}")
    return device


def check_rank_device(device: str, world_size: int, flag: str = "--device") -> None:
    """Under torchrun each rank takes cuda:LOCAL_RANK (score.resolve_device); a fixed cuda:N would
    put every rank of the job on that one GPU, contending for its memory."""
    if world_size > 1 and re.fullmatch(r"cuda:\d+", device):
        raise UsageError(f"{flag} {device}: under torchrun ({world_size} ranks) every rank would use that one GPU; "
                         f"use --device cuda or auto (each rank takes cuda:LOCAL_RANK), or limit GPUs with CUDA_VISIBLE_DEVICES")
