"""dit.errors: how a command ends on an error. A user error is one line with its exit code; the types may be asked
for only when an exception arrives, from the modules imported by then."""

from __future__ import annotations

import subprocess
import sys
import types

import pytest

from dit.errors import loaded_errors, run_command


class Known(ValueError):
    pass


def _raise(error: BaseException):
    def command() -> int:
        raise error

    return command


@pytest.mark.parametrize("lazy", [False, True], ids=["mapping", "function"])
def test_a_user_error_is_one_line_with_its_code(capsys, lazy):
    codes = {Known: 3}
    assert run_command(_raise(Known("bad  value\nhere")), (lambda: codes) if lazy else codes) == 3
    assert capsys.readouterr().err == "error: bad value here\n"


def test_the_types_are_asked_for_only_when_an_exception_arrives(capsys):
    asked = []

    def user_errors():
        asked.append(True)
        return {Known: 2}

    assert run_command(lambda: 0, user_errors) == 0 and not asked
    assert run_command(_raise(RuntimeError("a bug")), user_errors) == 1 and asked
    err = capsys.readouterr().err
    assert "Traceback" in err and err.strip().endswith("please report it.")


def test_debug_raises_with_the_traceback(monkeypatch):
    monkeypatch.setenv("DIT_DEBUG", "1")
    with pytest.raises(Known):
        run_command(_raise(Known("x")), lambda: {Known: 2})


def test_loaded_errors_reads_only_imported_modules(monkeypatch):
    module = types.ModuleType("fakepkg.errors")
    module.Known = Known
    monkeypatch.setitem(sys.modules, "fakepkg.errors", module)
    where = {"errors": {"Known": 2}, "never_imported": {"Missing": 1}}
    assert loaded_errors("fakepkg", where) == {Known: 2}
    assert "fakepkg.never_imported" not in sys.modules


def test_every_train_error_is_found_once_imported():
    """The names in dit train's table resolve to exception classes (a renamed class would be missed silently)."""
    import importlib

    from dit.train.command import USER_ERRORS, user_errors

    for module in USER_ERRORS:
        importlib.import_module(f"dit.train.{module}")
    codes = user_errors()
    assert len(codes) == sum(len(c) for c in USER_ERRORS.values()) + 1
    assert all(isinstance(kind, type) and issubclass(kind, Exception) for kind in codes)


def test_a_bad_config_fails_before_torch_is_imported(tmp_path):
    (tmp_path / "bad.yaml").write_text("max_steps: [3\n")
    code = "import sys; from dit.cli import main; c = main(['train', '--config', 'bad.yaml']); print(c, 'torch' in sys.modules)"
    result = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert result.stdout.split() == ["2", "False"], result.stderr
    assert result.stderr.startswith("error: bad.yaml:")
