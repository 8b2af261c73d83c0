import subprocess
import sys

from remamber import __version__
from remamber.cli import main


def test_version_flag_prints_package_version():
    out = subprocess.run(
        [sys.executable, "-m", "remamber.cli", "--version"], capture_output=True, text=True, check=True
    )
    assert out.stdout.strip() == f"remamber {__version__}"


def test_no_command_prints_help(capsys):
    assert main([]) == 0
    assert "usage: remamber" in capsys.readouterr().out
