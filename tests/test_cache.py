"""The wheel cache: a download in progress is never visible, a failed one leaves nothing."""
import subprocess
import zipfile

import pytest

from physkern import cache


def _fake_pip(tmp_cache, seen, fail=False):
    def run(cmd, capture_output, text):
        dest = cmd[cmd.index("-d") + 1]
        wheel = f"{dest}/demo_pkg-1.0-py3-none-any.whl"
        with zipfile.ZipFile(wheel, "w") as zf:
            zf.writestr("demo_pkg/data.txt", "payload")
        # While pip is still "writing", another process looking at the cache finds nothing.
        seen.append(cache._find_wheel(tmp_cache / "wheels", "demo-pkg==1.0"))
        return subprocess.CompletedProcess(cmd, 1 if fail else 0, "", "boom" if fail else "")
    return run


def test_download_is_invisible_until_complete(tmp_path, monkeypatch):
    monkeypatch.setenv("PHYSKERN_CACHE", str(tmp_path))
    seen = []
    monkeypatch.setattr(cache.subprocess, "run", _fake_pip(tmp_path, seen))
    path = cache.fetch_wheel_member("demo-pkg==1.0", "demo_pkg/data.txt")
    assert seen == [None]
    assert path.read_text() == "payload"
    assert sorted(p.name for p in (tmp_path / "wheels").iterdir()) == \
        ["demo_pkg-1.0-py3-none-any.whl"]
    # cached now: pip is not called again
    monkeypatch.setattr(cache.subprocess, "run", lambda *a, **k: pytest.fail("pip called"))
    assert cache.fetch_wheel_member("demo-pkg==1.0", "demo_pkg/data.txt") == path


def test_failed_download_leaves_nothing(tmp_path, monkeypatch):
    monkeypatch.setenv("PHYSKERN_CACHE", str(tmp_path))
    monkeypatch.setattr(cache.subprocess, "run", _fake_pip(tmp_path, [], fail=True))
    with pytest.raises(RuntimeError, match="could not fetch demo-pkg==1.0"):
        cache.fetch_wheel_member("demo-pkg==1.0", "demo_pkg/data.txt")
    assert list((tmp_path / "wheels").iterdir()) == []
    assert not (tmp_path / "files").exists()


def test_missing_member_names_it(tmp_path, monkeypatch):
    monkeypatch.setenv("PHYSKERN_CACHE", str(tmp_path))
    monkeypatch.setattr(cache.subprocess, "run", _fake_pip(tmp_path, []))
    with pytest.raises(RuntimeError, match="no member 'demo_pkg/other.txt'"):
        cache.fetch_wheel_member("demo-pkg==1.0", "demo_pkg/other.txt")


def test_written_files_get_the_umask_mode(tmp_path, monkeypatch):
    """Atomic writes go through mkstemp (mode 0600); the finished file must have the mode a
    plain open() gives it, like every other file the user writes."""
    import os
    from physkern.provenance import write_json
    old = os.umask(0o022)
    try:
        monkeypatch.setenv("PHYSKERN_CACHE", str(tmp_path))
        monkeypatch.setattr(cache.subprocess, "run", _fake_pip(tmp_path, []))
        member = cache.fetch_wheel_member("demo-pkg==1.0", "demo_pkg/data.txt")
        result = write_json(tmp_path / "out" / "r.json", {"a": 1})
    finally:
        os.umask(old)
    assert member.stat().st_mode & 0o777 == 0o644
    assert result.stat().st_mode & 0o777 == 0o644
