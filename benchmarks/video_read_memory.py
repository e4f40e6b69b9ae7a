"""Peak memory of reading a long video with `cosmos3.io`: streaming in chunks against one full read.

    python benchmarks/video_read_memory.py                  # 60 s of 832x480 at 24 fps (1440 frames)
    python benchmarks/video_read_memory.py --seconds 10 --chunk-frames 16

The clip (smooth synthetic motion, H.264) is written to a temporary directory. Each mode then runs in a fresh
interpreter that reports its own peak RSS (`ru_maxrss`) and, for isolated reads, the peak of its decoder process:
`VmHWM` of its child processes, sampled every 20 ms (`RUSAGE_CHILDREN` would report at least the caller's own RSS,
which a child inherits as its high-water mark at fork). The `import only` row is the interpreter after
`import cosmos3.io` (torch comes in through the package); subtract it to see what a read costs. A full read must hold
T*H*W*3 bytes (1.7 GB for the default clip).
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

MODES = {
    "import": "import only",
    "stream": "stream_video, isolated",
    "stream-local": "stream_video, isolated=False",
    "full": "read_video, isolated",
    "full-local": "read_video, isolated=False",
}


def make_clip(path: Path, seconds: float, width: int, height: int, fps: int) -> int:
    """Encode the clip frame by frame with PyAV (never holding it whole), so that generation costs no memory."""
    import av

    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    count = round(seconds * fps)
    with av.open(str(path), "w") as container:
        stream = container.add_stream("libx264", rate=fps)
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        stream.options = {"crf": "20", "preset": "veryfast"}
        for i in range(count):
            t = i / fps
            frame = np.stack(
                [
                    128 + 100 * np.sin(x / 60 + 2 * t),
                    128 + 100 * np.sin(y / 45 - 1.5 * t),
                    128 + 100 * np.sin((x + y) / 80 + t),
                ],
                -1,
            )
            cx, cy = int((0.5 + 0.4 * np.sin(t)) * width), int((0.5 + 0.4 * np.cos(0.7 * t)) * height)
            frame[max(cy - 40, 0) : cy + 40, max(cx - 40, 0) : cx + 40] = 250  # a moving square
            video_frame = av.VideoFrame.from_ndarray(frame.astype(np.uint8), format="rgb24")
            container.mux(stream.encode(video_frame))
        container.mux(stream.encode(None))
    return count


def children_peak_mib(stop: threading.Event, peaks: dict[int, float]) -> None:
    """Sample the high-water RSS (`VmHWM`, reset by exec) of this process's children until `stop`."""
    while not stop.wait(0.02):
        for task in Path("/proc/self/task").iterdir():
            for pid in (task / "children").read_text().split():
                try:
                    status = Path(f"/proc/{pid}/status").read_text()
                except OSError:  # exited meanwhile
                    continue
                for line in status.splitlines():
                    if line.startswith("VmHWM:"):
                        peaks[int(pid)] = max(peaks.get(int(pid), 0.0), int(line.split()[1]) / 1024)


def measure(mode: str, path: str, chunk_frames: int) -> dict[str, float]:
    """Run one mode in this (fresh) process; peak RSS in MiB (Linux reports ru_maxrss in KiB)."""
    from cosmos3 import io as cio

    stop, peaks = threading.Event(), {}
    sampler = threading.Thread(target=children_peak_mib, args=(stop, peaks), daemon=True)
    sampler.start()
    start, frames, checksum = time.perf_counter(), 0, 0
    if mode.startswith("stream"):
        with cio.stream_video(path, chunk_frames=chunk_frames, isolated=mode == "stream") as stream:
            for chunk in stream:
                frames += len(chunk)
                checksum += int(chunk[:, ::64, ::64].sum())  # touch every chunk, as a consumer would
    elif mode.startswith("full"):
        clip = cio.read_video(path, isolated=mode == "full")
        frames, checksum = len(clip.frames), int(clip.frames[:, ::64, ::64].sum())
    seconds = time.perf_counter() - start
    stop.set()
    sampler.join()
    return {
        "seconds": seconds,
        "frames": frames,
        "checksum": checksum,
        "self_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "worker_mib": max(peaks.values(), default=0.0),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=60.0)
    parser.add_argument("--width", type=int, default=832)
    parser.add_argument("--height", type=int, default=480)
    parser.add_argument("--fps", type=int, default=24)
    parser.add_argument("--chunk-frames", type=int, default=32)
    parser.add_argument("--measure", nargs=2, metavar=("MODE", "PATH"), help=argparse.SUPPRESS)  # child side
    args = parser.parse_args()
    if args.measure:
        print(json.dumps(measure(args.measure[0], args.measure[1], args.chunk_frames)))
        return

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "clip.mp4"
        started = time.perf_counter()
        count = make_clip(path, args.seconds, args.width, args.height, args.fps)
        size_mib = path.stat().st_size / 2**20
        full_mib = count * args.width * args.height * 3 / 2**20
        print(
            f"clip: {count} frames of {args.width}x{args.height} at {args.fps} fps, {size_mib:.1f} MiB on disk, "
            f"{full_mib:.0f} MiB decoded (encoded in {time.perf_counter() - started:.1f} s); chunk_frames="
            f"{args.chunk_frames} ({args.chunk_frames * args.width * args.height * 3 / 2**20:.0f} MiB per chunk)\n"
        )
        print(f"| {'mode':<30} | {'frames':>6} | {'time s':>6} | {'caller peak MiB':>15} | {'decoder peak MiB':>16} |")
        print(f"|{'-' * 32}|{'-' * 7}:|{'-' * 7}:|{'-' * 16}:|{'-' * 17}:|")
        checksums = set()
        for mode, label in MODES.items():
            command = [sys.executable, __file__, "--measure", mode, str(path), "--chunk-frames", str(args.chunk_frames)]
            result = json.loads(subprocess.run(command, check=True, capture_output=True, text=True).stdout)
            worker = f"{result['worker_mib']:.0f}" if mode in ("stream", "full") else "-"
            if mode != "import":
                checksums.add(result["checksum"])
            print(
                f"| {label:<30} | {result['frames']:>6} | {result['seconds']:>6.1f} | {result['self_mib']:>15.0f} | "
                f"{worker:>16} |"
            )
        if len(checksums) != 1:
            raise SystemExit(f"the modes decoded different frames (checksums {sorted(checksums)})")


if __name__ == "__main__":
    main()
