"""Bad input: one line naming the problem, exit code 2, nothing half-written."""

import os
import subprocess
import sys


def glassforge(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "glassforge", *args], capture_output=True, text=True, cwd=cwd,
                          timeout=120)


def assert_one_line_error(result, *fragments):
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("glassforge: error: ")
    assert "Traceback" not in result.stderr
    for f in fragments:
        assert f in lines[0], lines[0]


def test_unknown_recipe(tmp_path):
    out = tmp_path / "run"
    assert_one_line_error(glassforge("build", "--recipe", "nope", "--out", str(out)), "unknown recipe 'nope'", "tiny")
    assert not out.exists()


def test_malformed_recipe(tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text("name = \n")
    out = tmp_path / "run"
    assert_one_line_error(glassforge("build", "--recipe", str(bad), "--out", str(out)), "bad.toml", "malformed TOML")
    assert not out.exists()


def test_out_is_an_existing_file(tmp_path):
    f = tmp_path / "file"
    f.write_text("keep me")
    assert_one_line_error(glassforge("build", "--recipe", "tiny", "--out", str(f)), str(f), "not a folder")
    assert f.read_text() == "keep me"


def test_run_folder_without_a_model(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    assert_one_line_error(glassforge("generate", str(empty), "--prompt", "hi"), "holds no model")
    assert_one_line_error(glassforge("serve", str(empty)), "holds no model")
    assert_one_line_error(glassforge("release", str(empty)), "not a run folder")
    assert list(empty.iterdir()) == []


def test_bad_stream_interval(tmp_path):
    assert_one_line_error(glassforge("serve", str(tmp_path), "--stream-interval-ms", "-5"),
                          "--stream-interval-ms -5", "0..1000")
    env_bad = subprocess.run([sys.executable, "-m", "glassforge", "serve", str(tmp_path)], capture_output=True,
                             text=True, timeout=120, env={**os.environ, "GLASSFORGE_STREAM_INTERVAL_MS": "soon"})
    assert_one_line_error(env_bad, "GLASSFORGE_STREAM_INTERVAL_MS='soon'", "milliseconds")


def test_missing_folder(tmp_path):
    assert_one_line_error(glassforge("generate", str(tmp_path / "nowhere"), "--prompt", "hi"), "no such folder")
