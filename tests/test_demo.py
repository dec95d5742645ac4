"""The README's main job: the demo runs offline end to end and writes what it says."""

import pytest

from talkformer_core import demo


@pytest.mark.skipif(not demo.DEMO_CHECKPOINT.exists(), reason="demo checkpoint not in this checkout")
def test_demo_main_job_writes_preview_and_lipsync(tmp_path, capsys):
    from talkformer_core.video import probe_video

    assert demo.main(["--out", str(tmp_path), "--steps", "5"]) == 0
    out = capsys.readouterr().out
    assert "mel spectrogram (80," in out and "face found in 100" in out
    prev = probe_video(tmp_path / "frontend_preview.mp4")
    assert prev.width == 2 * prev.height and prev.has_audio and abs(prev.num_frames - 100) <= 1
    sync = probe_video(tmp_path / "lipsync.mp4")
    assert sync.has_audio and abs(sync.num_frames - 100) <= 1  # 4 s of new speech at 25 fps


def test_demo_reports_a_missing_video_cleanly(tmp_path, capsys):
    assert demo.main(["--out", str(tmp_path), "--video", str(tmp_path / "nope.mp4")]) == 2
    assert "nope.mp4" in capsys.readouterr().err
