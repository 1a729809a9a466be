"""The remotefs-aa command line on the embedded default (tooz file backend)."""

from __future__ import annotations

import json
import os
import threading

import pytest

from remotefs_aa import coordination
from remotefs_aa.cmd import main as cli
from remotefs_aa.coordination.tooz_provider import ToozLockProvider
from tests.unit.fakes import make_conf


@pytest.fixture
def conf_file(tmp_path):
    path = tmp_path / "rfsaa.conf"
    path.write_text(f"[DEFAULT]\nstate_path = {tmp_path}/state\n")
    return str(path)


def run(capsys, *argv):
    code = cli.main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_lock_run_passes_exit_status_through(capsys, conf_file, tmp_path):
    marker = tmp_path / "ran"
    code, _out, _err = run(
        capsys,
        "--config-file",
        conf_file,
        "lock",
        "run",
        "job",
        "--",
        "sh",
        "-c",
        f"touch {marker}; exit 3",
    )
    assert code == 3
    assert marker.exists()


def test_lock_run_without_command_is_usage_error(capsys, conf_file):
    code, _out, err = run(capsys, "--config-file", conf_file, "lock", "run", "job", "--")
    assert code == cli.EX_USAGE
    assert "no COMMAND" in err


def test_lock_run_missing_program_is_127(capsys, conf_file):
    code, _out, err = run(
        capsys, "--config-file", conf_file, "lock", "run", "job", "--", "/nonexistent/prog"
    )
    assert code == 127
    assert "/nonexistent/prog" in err


def test_lock_run_nonblocking_on_held_lock_exits_75_and_runs_nothing(capsys, conf_file, tmp_path):
    conf = make_conf(backend_url=f"file://{tmp_path}/state/coordination")
    holder = ToozLockProvider(conf)
    holder.start()
    lock = holder.get_lock("remotefs_aa-busy")
    assert lock.acquire()
    marker = tmp_path / "ran"
    try:
        code, _out, err = run(
            capsys,
            "--config-file",
            conf_file,
            "lock",
            "run",
            "-n",
            "busy",
            "--",
            "touch",
            str(marker),
        )
        assert code == cli.EX_TEMPFAIL
        assert "remotefs_aa-busy" in err
        code, _out, err = run(
            capsys,
            "--config-file",
            conf_file,
            "lock",
            "run",
            "-w",
            "0.2",
            "busy",
            "--",
            "touch",
            str(marker),
        )
        assert code == cli.EX_TEMPFAIL
        assert "timed out after -w 0.2 s" in err and "give -w a longer wait" in err
        assert "lock_acquire_timeout" not in err  # the wait came from -w, not the option
        # Options after NAME are ours (before --), also --format json.
        code, _out, err = run(
            capsys,
            "--config-file",
            conf_file,
            "lock",
            "run",
            "busy",
            "-w",
            "0.1",
            "--format",
            "json",
            "--",
            "touch",
            str(marker),
        )
        assert code == cli.EX_TEMPFAIL
        assert _json_error(err)["error"].endswith("give -w a longer wait")
        assert not marker.exists()
        # Freed while a blocking run waits: it runs.
        threading.Timer(0.3, lock.release).start()
        code, _out, _err = run(
            capsys,
            "--config-file",
            conf_file,
            "lock",
            "run",
            "busy",
            "--",
            "touch",
            str(marker),
        )
        assert code == 0 and marker.exists()
    finally:
        holder.stop()


def test_lock_check_table_and_json(capsys, conf_file, tmp_path):
    code, out, _err = run(capsys, "--config-file", conf_file, "lock", "check", "--rounds", "3")
    assert code == 0
    assert "spans hosts" in out and "no (one host only)" in out
    assert "acquire+release" in out
    code, out, _err = run(
        capsys, "--config-file", conf_file, "lock", "check", "--format", "json", "--rounds", "3"
    )
    report = json.loads(out)
    # Neither the start probe nor the check's own lock leaves a file behind.
    assert [p for p in os.listdir(f"{tmp_path}/state/coordination") if "remotefs_aa" in p] == []
    assert report["lock_provider"] == "tooz"
    assert report["backend"].startswith("file://")
    assert report["spans_hosts"] is False
    assert report["owner_check"] is True
    assert report["rounds"] == 3


def test_bad_option_value_is_one_clear_error(capsys, tmp_path):
    path = tmp_path / "bad.conf"
    path.write_text("[coordination]\nheartbeat = fast\n")
    code, _out, err = run(capsys, "--config-file", str(path), "lock", "check")
    assert code == cli.EX_CONFIG
    assert "[coordination] heartbeat" in err and "'fast'" in err
    assert len(err.strip().splitlines()) == 1


def test_missing_config_file_is_reported(capsys, tmp_path):
    code, _out, err = run(capsys, "--config-file", str(tmp_path / "nope.conf"), "lock", "check")
    assert code == cli.EX_CONFIG
    assert "no such file" in err


def test_unknown_provider_lists_choices(capsys, tmp_path):
    path = tmp_path / "c.conf"
    path.write_text(f"[DEFAULT]\nstate_path={tmp_path}\n[coordination]\nlock_provider = zk\n")
    code, _out, err = run(capsys, "--config-file", str(path), "lock", "check")
    assert code == cli.EX_CONFIG
    assert "unknown lock provider 'zk'" in err and "local, tooz" in err


def test_active_active_with_host_local_provider_is_refused(capsys, tmp_path):
    path = tmp_path / "c.conf"
    path.write_text(
        f"[DEFAULT]\nstate_path={tmp_path}\ncluster = c1\n[coordination]\nlock_provider = local\n"
    )
    code, _out, err = run(capsys, "--config-file", str(path), "lock", "run", "x", "--", "true")
    assert code == cli.EX_CONFIG
    assert "Active-Active" in err


def test_unreachable_backend_exits_69(capsys, tmp_path):
    from tests.functional.servers import free_port

    path = tmp_path / "c.conf"
    path.write_text(
        f"[DEFAULT]\nstate_path={tmp_path}\n[coordination]\n"
        f"backend_url = redis://127.0.0.1:{free_port()}\n"
    )
    code, _out, err = run(capsys, "--config-file", str(path), "lock", "run", "x", "--", "true")
    assert code == cli.EX_UNAVAILABLE
    assert "cannot reach lock backend redis://127.0.0.1" in err


def teardown_function():
    coordination.guard.set_provider(None)


def test_misspelled_option_and_section_are_named_at_start(capsys, caplog, monkeypatch, tmp_path):
    path = tmp_path / "c.conf"
    path.write_text(
        f"[DEFAULT]\nstate_path = {tmp_path}/state\nvolume_drvier = nfs\n"
        # registered, deprecated-alias and oslo.log options are not reported
        "use_rootwrap_daemon = false\ndebug = false\nlogfile = \n"
        "[coordinaton]\nbackend_url = zookeeper://h:2181\n"
        "[coordination]\nheartbeat = 2\nheartbaet = 3\n"
    )
    # oslo.log's set-up would replace pytest's log capture with its own handler.
    monkeypatch.setattr(cli, "_setup_logging", lambda conf, args: None)
    code, _out, _err = run(capsys, "--config-file", str(path), "lock", "check", "--rounds", "1")
    assert code == 0  # warned, not refused: other projects' sections may share the file
    lines = [r.getMessage() for r in caplog.records if "configuration:" in r.getMessage()]
    assert len(lines) == 3, lines
    assert "unknown option [DEFAULT] volume_drvier" in lines[0]
    assert "did you mean volume_driver?" in lines[0]
    assert "unknown section [coordinaton]" in lines[1] and "backend_url" in lines[1]
    assert "did you mean [coordination]?" in lines[1]
    assert "unknown option [coordination] heartbaet" in lines[2]


def test_config_dir_files_are_checked_too(tmp_path):
    from remotefs_aa import service

    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "extra.conf").write_text("[DEFAULT]\nlocal_sharse = /x\n")
    conf = service.make_config(["--config-dir", str(tmp_path / "d")])
    (warning,) = service.unknown_options(conf)
    assert "local_sharse" in warning and "extra.conf" in warning
    assert "did you mean local_shares?" in warning


def _json_error(err):
    (line,) = err.strip().splitlines()  # one line, nothing else on stderr
    return json.loads(line)


def test_json_format_errors_are_one_json_line_on_stderr(capsys, conf_file, tmp_path):
    # configuration error (78)
    code, out, err = run(
        capsys, "--config-file", str(tmp_path / "nope.conf"), "lock", "check", "--format", "json"
    )
    assert (code, out) == (cli.EX_CONFIG, "")
    assert _json_error(err) == {
        "error": f"configuration error: invalid value '{tmp_path}/nope.conf' for option "
        "--config-file: no such file",
        "exit_code": 78,
    }
    # argparse's usage error (2)
    code, _out, err = run(capsys, "volume", "show", "--format", "json")
    assert code == cli.EX_USAGE
    assert _json_error(err) == {
        "error": "volume show: error: the following arguments are required: volume",
        "exit_code": 2,
    }
    # our own usage check (2)
    code, _out, err = run(
        capsys, "--config-file", conf_file, "lock", "check", "--rounds", "0", "--format=json"
    )
    assert code == cli.EX_USAGE
    assert _json_error(err)["error"] == "lock check: --rounds must be at least 1"
    # without --format json: the plain line, as before
    code, _out, err = run(capsys, "--config-file", conf_file, "lock", "check", "--rounds", "0")
    assert err == "remotefs-aa: lock check: --rounds must be at least 1\n"


def test_lock_run_options_after_name_are_parsed_as_ours(capfd, conf_file, tmp_path):
    marker = tmp_path / "ran"
    code, out, err = run(
        capfd, "--config-file", conf_file, "lock", "run", "job", "--format", "json", "--",
        "sh", "-c", f"touch {marker}; echo --format json",
    )  # fmt: skip
    assert code == 0 and marker.exists(), err
    assert out == "--format json\n"  # COMMAND's own arguments stay COMMAND's
    # Without --, COMMAND cannot be told from our options: a usage error that says so.
    code, _out, err = run(
        capfd, "--config-file", conf_file, "lock", "run", "job", "-w", "1", "touch", str(marker)
    )
    assert code == cli.EX_USAGE
    assert "give COMMAND after --" in err


@pytest.mark.parametrize("exists", [False, True])
def test_share_outside_allowed_paths_exits_78_whether_or_not_it_exists(capsys, tmp_path, exists):
    """One rule: a configuration refusal is 78, however far the start got."""
    outside = tmp_path / "outside"
    if exists:
        outside.mkdir()
    path = tmp_path / "c.conf"
    path.write_text(f"[DEFAULT]\nstate_path = {tmp_path}/state\nlocal_shares = {outside}\n")
    code, _out, err = run(capsys, "--config-file", str(path), "volume", "list")
    assert code == cli.EX_CONFIG, err
    assert "configuration error" in err and f"share {outside}" in err
    assert "allowed_paths" in err
    assert outside.exists() == exists  # nothing was created to find out


def test_help_lists_no_internal_command(capsys):
    assert cli.main(["--help"]) == 0
    out = capsys.readouterr().out
    assert "SUPPRESS" not in out and "demo-worker" not in out
    assert "demo " in out


def test_demo_worst_wait_keeps_its_decimal():
    from remotefs_aa.cmd.volumes import worker_summary

    line = worker_summary({"pid": 7, "operations": 3, "lock_wait_max_s": 0.0123456})
    assert line["lock_wait_max_ms"] == 12.3  # was 12.0: ms from seconds rounded to the ms
    assert line["lock_wait_max_s"] == 0.0123


def test_progress_rate_and_summary_rate_use_one_clock(capsys, monkeypatch):
    from remotefs_aa.cmd import volumes

    clock = iter([100.0, 101.0, 102.0, 104.0, 150.0])  # start, 3 ticks, a late call
    monkeypatch.setattr(volumes.time, "monotonic", lambda: next(clock))
    bar = volumes._Progress(3)
    for _ in range(3):
        bar.tick()
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert last.endswith("3/3 operations, 0.8/s")  # 3 operations in 4 s
    assert f"{3 / bar.elapsed():.1f}" == "0.8"  # the summary's: to the last operation, not later
