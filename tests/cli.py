"""Command-line test helper: a user mistake ends ``nemotron <cmd>`` with one stderr line."""
from nemotron.__main__ import main


def assert_cli_error(capsys, argv, code, *fragments) -> str:
    """``main(argv)`` returns ``code`` and prints exactly one line ``nemotron <cmd>: error: ...`` on
    stderr holding every fragment; returns that line."""
    assert main(argv) == code
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith(f"nemotron {argv[0]}: error: "), err
    for f in fragments:
        assert f in err, err
    return err
