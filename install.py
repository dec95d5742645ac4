"""Installs mediapipe 0.10.21 (the face-mesh landmarker) without its dependencies.

ComfyUI-Manager runs this file with ComfyUI's Python after it installs requirements.txt; by hand:
``python install.py`` with that Python. mediapipe's own dependency list pulls jax and jaxlib
(~360 MB on disk, ~100 MB to download), which face mesh never imports; requirements.txt lists the
dependencies it does use. Nothing is downloaded when the right version is already installed.
"""
import subprocess
import sys

MEDIAPIPE = "mediapipe==0.10.21"  # the newest release with the face-mesh models inside the wheel


def installed_version(name: str) -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(name)
    except PackageNotFoundError:
        return None


def main() -> int:
    want = MEDIAPIPE.split("==")[1]
    if installed_version("mediapipe") == want:
        print(f"[TalkFormer] mediapipe {want} already installed")
        return 0
    cmd = [sys.executable, "-m", "pip", "install", "--no-deps", MEDIAPIPE]
    print("[TalkFormer] " + " ".join(cmd))
    return subprocess.call(cmd)


if __name__ == "__main__":
    sys.exit(main())
